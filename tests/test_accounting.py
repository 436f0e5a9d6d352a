"""Accounting: dp-accounting wrapped, checked against values computed independently here.

Independent reference: the RDP of the Poisson-subsampled Gaussian at integer orders, by the
exact binomial expansion (Mironov, Talwar, Zhang 2019, Sec. 3.3),
    A_a = sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2)),  RDP(a) = log(A_a)/(a-1),
converted to epsilon by (i) the classic bound eps = min_a T*RDP(a) + log(1/delta)/(a-1)
(what Abadi et al.'s moments accountant gives) and (ii) the improved bound of Canonne,
Kamath, Steinke 2020 / Asoodeh et al. 2020, which dp-accounting uses.

Tolerance rule: dp-accounting's RDP minimises over a superset of our integer orders (it adds
fractional ones), so its epsilon may only be smaller than ours (up to float rounding), and
by little: a fractional order sits between two integer ones where the curve is flat, so we
allow 5% below.  PLD is tight up to a pessimistic discretisation: never below the exact
value, at most 2% above it.
"""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm
from torch import nn

import dpkernels
from dpkernels.accounting import epsilon_from_history


def rdp_integer(q, sigma, orders):
    out = []
    for a in orders:
        k = np.arange(a + 1)
        log_binom = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
        log_terms = log_binom + (a - k) * math.log1p(-q) + k * math.log(q) \
            + (k * k - k) / (2 * sigma**2)
        out.append(logsumexp(log_terms) / (a - 1))
    return np.array(out)


ORDERS = np.arange(2, 257)


def eps_classic(q, sigma, steps, delta, orders=ORDERS):
    r = steps * rdp_integer(q, sigma, orders)
    return float(np.min(r + math.log(1 / delta) / (orders - 1)))


def eps_improved(q, sigma, steps, delta, orders=ORDERS):
    return eps_improved_history([(sigma, q, steps)], delta, orders)


def eps_improved_history(segments, delta, orders=ORDERS):
    """Segments (sigma, q, steps) compose by adding their RDP order by order."""
    r = sum(steps * rdp_integer(q, sigma, orders) for sigma, q, steps in segments)
    e = r + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(e))


def eps_gaussian_exact(sigma, steps, delta):
    """T Gaussian steps without sampling = one Gaussian of std sigma/sqrt(T); its exact
    epsilon solves Balle & Wang (2018) Thm. 8:
    delta = Phi(-eps*s + 1/(2s)) - e^eps Phi(-eps*s - 1/(2s)),  s = sigma / sqrt(T)."""
    s = sigma / math.sqrt(steps)

    def gap(eps):
        return norm.cdf(-eps * s + 0.5 / s) - math.exp(eps) * norm.cdf(-eps * s - 0.5 / s) - delta

    return brentq(gap, 0.0, 100.0, xtol=1e-12)


def test_abadi_mnist_moments_accountant():
    # Abadi et al. 2016, Sec. 4: q=0.01, sigma=4, delta=1e-5, T=10000 steps -> eps ~ 1.26
    # with the moments accountant.  Our independent classic-conversion value reproduces it;
    # dp-accounting's RDP (improved conversion) must match our improved-conversion value.
    q, sigma, steps, delta = 0.01, 4.0, 10_000, 1e-5
    assert eps_classic(q, sigma, steps, delta) == pytest.approx(1.26, abs=0.005)
    ours = eps_improved(q, sigma, steps, delta)
    rdp = dpkernels.epsilon(sigma, q, steps, delta, accountant="rdp")
    assert 0.95 * ours <= rdp <= ours * (1 + 1e-9)
    pld = dpkernels.epsilon(sigma, q, steps, delta)  # default: pld
    assert pld <= rdp


@pytest.mark.parametrize("q,sigma,steps", [(0.05, 1.0, 100), (0.2, 2.0, 50), (0.01, 0.8, 300),
                                           (0.1, 5.0, 1000)])
def test_rdp_matches_independent(q, sigma, steps):
    ours = eps_improved(q, sigma, steps, 1e-5)
    rdp = dpkernels.epsilon(sigma, q, steps, 1e-5, accountant="rdp")
    assert 0.95 * ours <= rdp <= ours * (1 + 1e-9)


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (3.0, 50, 1e-6),
                                               (10.0, 400, 1e-3)])
def test_pld_matches_exact_gaussian(sigma, steps, delta):
    exact = eps_gaussian_exact(sigma, steps, delta)
    pld = dpkernels.epsilon(sigma, 1.0, steps, delta)
    assert exact * (1 - 1e-9) <= pld <= exact * 1.02


def test_pld_below_rdp_on_grid():
    # small sigma makes the PLD grid wide and slow; 1.2 is as low as a fast test goes
    for i, (q, sigma, steps) in enumerate(itertools.product((0.01, 0.2), (1.2, 4.0),
                                                            (1, 100))):
        delta = (1e-3, 1e-6)[i % 2]
        pld = dpkernels.epsilon(sigma, q, steps, delta, accountant="pld")
        rdp = dpkernels.epsilon(sigma, q, steps, delta, accountant="rdp")
        assert 0 <= pld <= rdp, (q, sigma, steps, delta, pld, rdp)


def test_monotone_in_steps_and_sigma():
    e = [dpkernels.epsilon(2.0, 0.05, t, 1e-5) for t in (10, 100, 500)]
    assert e[0] < e[1] < e[2]
    e = [dpkernels.epsilon(s, 0.05, 100, 1e-5) for s in (2.0, 2.5, 4.0)]
    assert e[0] > e[1] > e[2]


@pytest.mark.parametrize("accountant,target,q,steps", [
    ("pld", 1.0, 0.05, 100), ("rdp", 2.0, 0.1, 100), ("rdp", 0.5, 0.02, 200),
    ("rdp", 0.3, 1.0, 10)])
def test_noise_multiplier_for_inverts(accountant, target, q, steps):
    rtol = 1e-3
    sigma = dpkernels.noise_multiplier_for(target, 1e-5, q, steps, accountant=accountant,
                                           rtol=rtol)
    assert dpkernels.epsilon(sigma, q, steps, 1e-5, accountant) <= target
    assert dpkernels.epsilon(sigma * (1 - rtol), q, steps, 1e-5, accountant) > target


def test_zero_noise_and_zero_steps():
    assert dpkernels.epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert dpkernels.epsilon(0.0, 0.1, 10, 1e-5, accountant="rdp") == math.inf
    assert dpkernels.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert dpkernels.noise_multiplier_for(1.0, 1e-5, 0.1, 0) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(delta=float("nan")), "delta"),
    (dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"), (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"), (dict(accountant="moments"), "accountant"),
])
def test_errors(kwargs, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dpkernels.epsilon(**args)


def test_noise_multiplier_for_errors():
    with pytest.raises(ValueError, match="target_epsilon"):
        dpkernels.noise_multiplier_for(0.0, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match="delta"):
        dpkernels.noise_multiplier_for(1.0, 2.0, 0.1, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        dpkernels.noise_multiplier_for(1.0, 1e-5, 0.0, 10)


def test_history_composition():
    # segments compose: two halves with one sigma equal the whole; a changed sigma lies
    # between the two constant runs
    h = [(2.0, 0.05, 60), (2.0, 0.05, 40)]
    for acc in ("pld", "rdp"):
        whole = dpkernels.epsilon(2.0, 0.05, 100, 1e-5, acc)
        assert epsilon_from_history(h, 1e-5, acc) == pytest.approx(whole, rel=2e-3)
        mixed = epsilon_from_history([(2.0, 0.05, 50), (4.0, 0.05, 50)], 1e-5, acc)
        assert dpkernels.epsilon(4.0, 0.05, 100, 1e-5, acc) < mixed < whole
    # RDP composes exactly additively per order: check against our own integer-order sum
    orders = np.arange(2, 257)
    r = 50 * rdp_integer(0.05, 2.0, orders) + 50 * rdp_integer(0.05, 4.0, orders)
    ours = float(np.min(r + np.log1p(-1 / orders) - (math.log(1e-5) + np.log(orders))
                        / (orders - 1)))
    got = epsilon_from_history([(2.0, 0.05, 50), (4.0, 0.05, 50)], 1e-5, "rdp")
    assert 0.95 * ours <= got <= ours * (1 + 1e-9)


def _dp_setup(noise=1.0):
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                 noise_multiplier=noise, max_grad_norm=1.0,
                                 expected_batch_size=8, seed=0)
    return m, opt


def _train(m, opt, steps):
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_optimizer_changing_noise_is_accounted_step_by_step():
    m, opt = _dp_setup(2.0)
    ds = torch.utils.data.TensorDataset(torch.randn(80, 4), torch.randint(0, 3, (80,)))
    dpkernels.poisson_loader(ds, 0.1, seed=0, optimizer=opt)
    _train(m, opt, 30)
    opt.noise_multiplier = 3.0
    _train(m, opt, 20)
    assert opt.steps == 50
    assert opt.history == [[2.0, 0.1, 30], [3.0, 0.1, 20]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Poisson sampling declared: no warning
        eps = opt.epsilon(1e-5, accountant="rdp")
    # independent of the code under test: the integer-order RDP sum above (tolerance rule in
    # the module docstring)
    ours = eps_improved_history([(2.0, 0.1, 30), (3.0, 0.1, 20)], 1e-5)
    assert 0.95 * ours <= eps <= ours * (1 + 1e-9)
    # and the one constant-noise run it must not be (both segments at sigma 2 costs more)
    assert eps < 0.95 * eps_improved(0.1, 2.0, 50, 1e-5)
    assert "epsilon = " in opt.privacy_report(1e-5, accountant="rdp")
    with pytest.raises(ValueError, match="contradicts"):
        opt.epsilon(1e-5, sample_rate=0.2)
    # the new fields survive a checkpoint
    m2, opt2 = _dp_setup(2.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.sample_rate == 0.1 and opt2.poisson is True and opt2.history == opt.history
    assert opt2.epsilon(1e-5, accountant="rdp") == eps


def test_optimizer_without_poisson_loader():
    m, opt = _dp_setup(2.0)
    assert opt.epsilon(1e-5) == 0.0
    _train(m, opt, 5)
    with pytest.raises(ValueError, match="sample rate"):
        opt.epsilon(1e-5)
    with pytest.warns(UserWarning, match="Poisson"):
        eps = opt.epsilon(1e-5, sample_rate=0.1, accountant="rdp")
    ours = eps_improved(0.1, 2.0, 5, 1e-5)  # independent (module docstring)
    assert 0.95 * ours <= eps <= ours * (1 + 1e-9)
    assert "Poisson assumption" in opt.privacy_report(1e-5, sample_rate=0.1, accountant="rdp")


def test_optimizer_zero_noise_reports_inf():
    m, opt = _dp_setup(0.0)
    _train(m, opt, 2)
    with pytest.warns(UserWarning):
        assert opt.epsilon(1e-5, sample_rate=0.1) == math.inf
