"""Adaptive clipping (issue 10, item 2; Andrew et al. 2021): C follows a target quantile of
the per-sample norms, driven by a noisy unclipped count whose noise is part of the budget."""

import math

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.adaptive import AdaptiveClipping, gradient_noise_multiplier


def private(B_exp, sigma=1.0, C=1.0, d=4, out=1, **kw):
    torch.manual_seed(0)
    m = nn.Linear(d, out, bias=False).double()
    ad = AdaptiveClipping(**kw)
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                noise_multiplier=sigma, max_grad_norm=C,
                                expected_batch_size=B_exp, loss_reduction="sum", seed=0,
                                adaptive_clipping=ad)
    return m, dp, ad


def batch(norms, d=4):
    """Inputs whose per-sample gradients (of ``model(x).sum()``) have exactly these norms."""
    x = torch.zeros(len(norms), d, dtype=torch.float64)
    x[:, 0] = torch.as_tensor(norms, dtype=torch.float64)
    return x


# name, sampler, CDF, target quantile
DISTS = [
    ("lognormal-q0.5", lambda g, n: torch.exp(torch.randn(n, generator=g, dtype=torch.float64)
                                              + 1.0),
     lambda c: 0.5 * (1 + math.erf((math.log(c) - 1.0) / math.sqrt(2))), 0.5),
    ("uniform-q0.9", lambda g, n: 10 * torch.rand(n, generator=g, dtype=torch.float64),
     lambda c: min(1.0, c / 10), 0.9),
    ("exponential-q0.2", lambda g, n: -0.05 * torch.log(torch.rand(n, generator=g,
                                                                   dtype=torch.float64)),
     lambda c: 1 - math.exp(-c / 0.05), 0.2),
]


@pytest.mark.parametrize("name, sample, cdf, gamma", DISTS, ids=[d[0] for d in DISTS])
def test_clip_bound_converges_to_the_target_quantile(name, sample, cdf, gamma):
    B, steps, W, eta = 500, 200, 100, 0.2
    m, dp, ad = private(B, learning_rate=eta, target_quantile=gamma)
    g = torch.Generator().manual_seed(1)
    Cs = [dp.max_grad_norm]
    for _ in range(steps):
        m(batch(sample(g, B))).sum().backward()
        dp.step()
        dp.zero_grad()
        Cs.append(dp.max_grad_norm)
    # Over the last W steps the update telescopes: sum_t (b~_t - gamma) = log(C_s / C_e) / eta,
    # and b~_t = F(C_t) + e_t with e_t zero-mean noise of std s (binomial count and
    # count noise sigma_b = B / 20).  So mean F(C_t) - gamma is log(C_s / C_e) / (W eta) plus
    # an average of W noises; 5 standard errors bound a false failure at ~1e-6.
    s = math.sqrt(gamma * (1 - gamma) / B + (1 / 20) ** 2)
    window = Cs[-W - 1:-1]
    mean_f = sum(cdf(c) for c in window) / W
    drift = abs(math.log(Cs[-W - 1] / Cs[-1])) / (W * eta)
    assert abs(mean_f - gamma) <= drift + 5 * s / math.sqrt(W), (mean_f, gamma, drift)
    assert abs(cdf(Cs[-1]) - gamma) < 0.1  # and the last C sits near the quantile


def test_paper_formula_for_the_gradient_noise_multiplier():
    sigma, sb = 1.0, 0.6
    sg = gradient_noise_multiplier(sigma, sb)
    assert sg == pytest.approx((sigma ** -2 - (2 * sb) ** -2) ** -0.5, rel=1e-15)
    assert sg ** -2 + (2 * sb) ** -2 == pytest.approx(sigma ** -2, rel=1e-14)
    # Gaussians compose exactly in RDP (alpha / (2 sigma^2) per order): the gradient part and
    # the count (multiplier 2 sigma_b: sensitivity 1/2) cost exactly what sigma alone costs
    both = dpkernels.epsilon_from_history([(sg, 1.0, 10), (2 * sb, 1.0, 10)], 1e-5, "rdp")
    assert both == pytest.approx(dpkernels.epsilon(sigma, 1.0, 10, 1e-5, "rdp"), rel=1e-10)
    assert gradient_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="2 \\* count_noise_std > noise_multiplier"):
        gradient_noise_multiplier(1.0, 0.5)


def test_noise_drawn_and_accounted_follow_the_formula():
    sigma, sb, C = 1.0, 0.6, 0.5
    sg = gradient_noise_multiplier(sigma, sb)  # 1.809
    B = 4
    m, dp, ad = private(B, sigma=sigma, C=C, d=200, out=100, count_noise_std=sb,
                        learning_rate=1e-12)  # C stays put (to 1e-11) while we measure
    for _ in range(3):
        m(batch([0.0] * B, d=200)).sum().backward()  # zero gradients: p.grad is the noise
        dp.step()
        # 20000 draws: standard error of the std 0.5%; 6 of them
        assert abs(m.weight.grad.std().item() / (sg * C) - 1) < 6 / math.sqrt(2 * 20000)
        dp.zero_grad()
    m, dp, ad = private(B, sigma=sigma, C=C, count_noise_std=sb, learning_rate=1e-12)
    fracs = []
    for _ in range(200):
        m(batch([0.0] * B)).sum().backward()
        dp.step()
        dp.zero_grad()
        fracs.append(ad.last_fraction)
    # every sample unclipped: b~ = (B/2 + N(0, sb^2)) / B + 1/2 = 1 + noise / B
    noise = torch.tensor([(f - 1.0) * B for f in fracs])
    assert abs(noise.mean().item()) < 6 * sb / math.sqrt(200)
    assert abs(noise.std().item() / sb - 1) < 6 / math.sqrt(2 * 200)
    # the accountant composes the total sigma: the count is paid for
    assert dp.history == [[sigma, None, 200]]
    with pytest.warns(UserWarning, match="Poisson"):
        eps = dp.epsilon(1e-5, sample_rate=0.01, accountant="rdp")
    assert eps == pytest.approx(dpkernels.epsilon(sigma, 0.01, 200, 1e-5, "rdp"), rel=1e-12)
    assert "noise multiplier 1," in dp.privacy_report(1e-5, sample_rate=0.01,
                                                      accountant="rdp")


@pytest.mark.parametrize("mode", ["fast", "low-memory"])
def test_count_uses_the_clipping_bound_over_the_logical_batch(mode):
    eta, gamma = 0.3, 0.5
    torch.manual_seed(0)
    m = nn.Linear(4, 1, bias=False).double()
    ad = AdaptiveClipping(target_quantile=gamma, learning_rate=eta, count_noise_std=1e-9)
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5,
                                loss_reduction="sum", seed=0, adaptive_clipping=ad, mode=mode)
    # norm 1 - 1e-5 is unclipped (factor 1); 1 - 1e-7 is clipped, if barely, by the 1e-6 in
    # c_b = min(1, C / (n + 1e-6)): the count follows the factors that clipped, not n <= C
    for norms in ([0.5, 1 - 1e-5, 3.0], [1 - 1e-7, 0.25]):
        dp.backward(m(batch(norms)).sum())
        dp.accumulate()
    dp.step()
    frac = (3 - 2.5) / 5 + 0.5  # 3 of 5 unclipped
    assert ad.last_fraction == pytest.approx(frac, abs=1e-8)
    assert dp.max_grad_norm == pytest.approx(math.exp(-eta * (frac - gamma)), rel=1e-8)
    # discard() drops the unfinished batch's count with its sums
    dp.backward(m(batch([9.0, 9.0])).sum())
    dp.accumulate()
    dp.discard()
    C = dp.max_grad_norm
    dp.backward(m(batch([0.0])).sum())
    dp.step()
    frac = (1 - 0.5) / 5 + 0.5
    assert ad.last_fraction == pytest.approx(frac, abs=1e-8)
    assert dp.max_grad_norm == pytest.approx(C * math.exp(-eta * (frac - gamma)), rel=1e-8)


@pytest.mark.parametrize("kw, ad_kw, exc, match", [
    (dict(noise_multiplier=2.0), dict(count_noise_std=0.5), ValueError,
     "count_noise_std=0.5 is too small"),
    (dict(expected_batch_size=None), {}, ValueError, "needs expected_batch_size"),
    ({}, dict(target_quantile=1.0), ValueError, "target_quantile must lie in"),
    ({}, dict(learning_rate=0.0), ValueError, "learning_rate must be"),
    ({}, dict(count_noise_std=-1.0), ValueError, "count_noise_std must be"),
], ids=["count-noise-too-small", "no-batch-size", "quantile", "lr", "count-noise"])
def test_bad_settings_are_refused(kw, ad_kw, exc, match):
    m = nn.Linear(4, 1)
    args = dict(noise_multiplier=1.0, expected_batch_size=8, loss_reduction="sum")
    args.update(kw)
    with pytest.raises(exc, match=match):
        dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                               adaptive_clipping=AdaptiveClipping(**ad_kw), **args)
    assert getattr(m, "_dpkernels_engine", None) is None


def test_one_adaptive_clipping_per_optimizer():
    ad = AdaptiveClipping()
    m1, m2 = nn.Linear(4, 1), nn.Linear(4, 1)
    # default sigma_b = 40 / 20 = 2 > sigma / 2
    dpkernels.make_private(m1, torch.optim.SGD(m1.parameters(), lr=0.1),
                           expected_batch_size=40, adaptive_clipping=ad)
    assert ad.count_noise_std == 2.0
    with pytest.raises(RuntimeError, match="already used by a DPOptimizer"):
        dpkernels.make_private(m2, torch.optim.SGD(m2.parameters(), lr=0.1),
                               expected_batch_size=40, adaptive_clipping=ad)
    assert getattr(m2, "_dpkernels_engine", None) is None
