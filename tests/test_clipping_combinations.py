"""The clipping modes with the rest of the engine (issue 10): secure noise with per-layer
and adaptive clipping (drawn once per step, with the right std, from ChaCha20, the adaptive
count's noise included), and adaptive clipping over micro-batches against the float64 oracle.
Per-layer with adaptive clipping is refused (tests/test_per_layer.py::test_bad_settings...).

Statistical bands as in tests/test_secure.py: Z = 5.33 standard errors, false failure 1e-7
per check; the keys are fresh os.urandom keys, so that probability is real."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from noise_stats import check_noise
from oracle import RTOL_F64, oracle, rel_err
from torch import nn

import dpkernels
from dpkernels import secure
from dpkernels.adaptive import AdaptiveClipping, gradient_noise_multiplier

Z = 5.33
BOUNDS = [0.3, 0.2, 0.4, 0.1]  # per-layer: one per parameter of mlp()
C_TOTAL = math.sqrt(sum(c * c for c in BOUNDS))

needs_ext = pytest.mark.skipif(os.environ.get("DPKERNELS_SKIP_EXT") == "1",
                               reason="C++ extension switched off (DPKERNELS_SKIP_EXT=1)")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


@pytest.fixture
def draws(monkeypatch):
    """Every secure draw: (key, stream, numel, std, offset)."""
    seen = []
    real = secure.secure_normal_

    def spy(out, key, stream, std, offset=0):
        seen.append((key, stream, out.numel(), std, offset))
        return real(out, key, stream, std, offset=offset)

    monkeypatch.setattr(secure, "secure_normal_", spy)
    return seen


def one_step(kind, secure_mode, sigma, B, micro, C=0.5, count_noise_std=1.2):
    """A fresh model and one step; returns (flat gradient, the optimizer)."""
    model = mlp()
    kw = dict(max_grad_norm=C)
    if kind == "per_layer":
        kw = dict(clipping="per_layer", max_grad_norm=BOUNDS)
    elif kind == "adaptive":
        kw["adaptive_clipping"] = AdaptiveClipping(count_noise_std=count_noise_std)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=sigma, expected_batch_size=B,
                                secure_mode=secure_mode, backend="reference",
                                seed=None if secure_mode else 0, **kw)
    x, y = data(B)
    for s in np.array_split(np.arange(B), micro):
        F.cross_entropy(model(x[s]), y[s]).backward()
        dp.accumulate()
    dp.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), dp


@needs_ext
@pytest.mark.parametrize("kind,micro", [("per_layer", 1), ("per_layer", 3), ("adaptive", 1),
                                        ("adaptive", 2)],
                         ids=["per-layer", "per-layer-micro-batches", "adaptive",
                              "adaptive-micro-batches"])
def test_secure_noise_once_per_step_with_the_right_std(draws, kind, micro):
    """The noise in param.grad (secure run minus the same run without noise) has std
    sigma_grad * C / B, where C is sqrt(sum C_k^2) for per-layer clipping and sigma_grad is
    the adaptive gradient multiplier (here 3.62 for sigma = 2 and sigma_b = 1.2, far from 2):
    83 values x 25 steps, relative standard error 1 / sqrt(2n) = 1.6%, a 5.33-sigma band;
    noise added twice would be +41%.  Every step draws one ChaCha20 key for the gradient,
    one stream per parameter, each once, and (adaptive) one value for the count from a
    key of its own, with std sigma_b."""
    sigma, B, sb = 2.0, 10, 1.2
    std = sigma * C_TOTAL if kind == "per_layer" else gradient_noise_multiplier(sigma, sb) * 0.5
    noise = []
    for _ in range(25):
        draws.clear()
        g_secure, dp = one_step(kind, True, sigma, B, micro, count_noise_std=sb)
        grad_draws = [d for d in draws if d[2] > 1]
        assert len({d[0] for d in grad_draws}) == 1  # one key for the step's gradient noise
        assert sorted(d[1] for d in grad_draws) == [0, 1, 2, 3]  # each parameter once
        assert all(d[3] == pytest.approx(std, rel=1e-12) for d in grad_draws)
        count_draws = [d for d in draws if d[2] == 1]
        if kind == "adaptive":
            assert len(count_draws) == 1 and count_draws[0][3] == sb
            assert count_draws[0][0] != grad_draws[0][0]
        else:
            assert count_draws == []
        g_clean, _ = one_step(kind, False, 0.0, B, micro, count_noise_std=sb)
        noise.append(g_secure - g_clean)
    noise = torch.cat(noise)
    n = noise.numel()
    assert abs(noise.std().item() / (std / B) - 1) < Z / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < Z * (std / B) / math.sqrt(n)


@needs_ext
def test_secure_adaptive_count_noise_has_std_sigma_b():
    """With every per-sample gradient zero (norm 0, never clipped) the unclipped count is
    known, B_real / 2 after centring, so the noisy fraction gives the count's noise back:
    400 draws must be N(0, sigma_b^2) (noise_stats.check_noise: 5-sigma bands, power >=
    0.999 against a sqrt 2 error).  The learning rate is tiny so that C stays far above 0."""
    sb, B = 1.5, 12
    model = mlp()
    ad = AdaptiveClipping(target_quantile=0.5, learning_rate=1e-9, count_noise_std=sb)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B,
                                loss_reduction="sum", secure_mode=True, adaptive_clipping=ad)
    x, _ = data(7)
    noise = []
    for _ in range(400):
        (model(x) * 0.0).sum().backward()
        dp.step()
        dp.zero_grad()
        noise.append((ad.last_fraction - 0.5) * B - 7 / 2)
    check_noise({"count": torch.tensor(noise, dtype=torch.float64)}, sb)


def test_adaptive_over_micro_batches_matches_the_oracle_each_step():
    """Adaptive clipping over two micro-batches per step: each step's gradient is the
    float64 oracle's at that step's C (the one dp_opt.max_grad_norm held before the step),
    and C moves between steps (so later steps test an adapted C)."""
    model = mlp()
    ad = AdaptiveClipping(target_quantile=0.5, learning_rate=0.5, count_noise_std=1.0)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=0.0, max_grad_norm=0.05,
                                expected_batch_size=12, seed=0, adaptive_clipping=ad)
    loss = F.cross_entropy
    Cs = []
    for step in range(3):
        x, y = data(9 + step, seed=step)
        C = dp.max_grad_norm
        Cs.append(C)
        _, want, _ = oracle(copy.deepcopy(model), loss, x, y, C, 12, "mean")
        for s in (slice(0, 4), slice(4, None)):
            loss(model(x[s]), y[s]).backward()
            dp.accumulate()
        dp.step()
        for name, p in model.named_parameters():
            assert rel_err(p.grad, want[name]) <= RTOL_F64, (step, name)
        dp.zero_grad()
    assert len(set(Cs)) == 3
