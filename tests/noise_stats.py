"""Statistical checks of the DP noise, each with a stated false-failure rate and power.

Every check is a two-sided band of ``Z = 5`` standard errors, so a correct implementation
fails any one of them by chance with probability 2 * (1 - Phi(5)) = 5.7e-7 (the seeds are
fixed, so a passing test stays passing; the rate says how unlucky a seed could be).

- std:  the sample std of n N(0, s^2) draws has standard error s / sqrt(2n).  Band:
  |std / s - 1| <= 5 / sqrt(2n).  Power against noise sqrt(2) too large (noise added twice
  with independent draws; twice with the same draw is a factor 2, easier):
  Phi((sqrt(2) - 1 - 5 / sqrt(2n)) * sqrt(2n) / sqrt(2)); ``check_noise`` refuses to run
  with fewer draws than give power 0.999 (n >= 256), against a factor 1/sqrt(2) too small
  the power is higher still.  Missing noise (std 0) is always caught.
- mean: |mean| <= 5 s / sqrt(n).
- correlation between two parameters' noise, position by position over their common
  length m: the sample correlation of independent normals is ~N(0, 1/m); band 5 / sqrt(m).
  Power against the same draws for both (correlation 1): 1 for m > 25.
"""

from __future__ import annotations

import itertools
import math

import torch

Z = 5.0
FALSE_FAILURE = math.erfc(Z / math.sqrt(2))  # 5.7e-7 per check
MIN_POWER = 0.999


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def power_sqrt2(n: int) -> float:
    """Probability that the std band catches noise whose std is sqrt(2) times too large."""
    band = Z / math.sqrt(2 * n)
    return _phi((math.sqrt(2) - 1 - band) * math.sqrt(2 * n) / math.sqrt(2))


def check_noise(noise: dict[str, torch.Tensor], std: float) -> None:
    """``noise[name]``: every draw of one parameter's noise (any shape, e.g. [steps, numel]);
    each must be N(0, std^2), and different parameters' draws uncorrelated."""
    flat = {k: v.double().reshape(v.shape[0], -1) if v.dim() > 1 else v.double()[None]
            for k, v in noise.items()}
    for name, z in flat.items():
        n = z.numel()
        assert power_sqrt2(n) >= MIN_POWER, f"{name}: {n} draws are too few for the test"
        s = z.std().item()
        assert abs(s / std - 1) <= Z / math.sqrt(2 * n), (
            f"{name}: noise std {s:.4g}, expected {std:.4g} ({n} draws)")
        assert abs(z.mean().item()) <= Z * std / math.sqrt(n), f"{name}: noise mean"
    for (na, a), (nb, b) in itertools.combinations(flat.items(), 2):
        m = min(a.shape[1], b.shape[1])
        k = min(a.shape[0], b.shape[0])
        x, y = a[:k, :m].flatten(), b[:k, :m].flatten()
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(r) <= Z / math.sqrt(x.numel()), (
            f"noise of {na} and {nb} is correlated: r = {r:.3g} over {x.numel()} pairs")


def empty_batch_noise(model, empty_input, backend, steps, *, sigma=1.3, C=0.7,
                      expected_batch_size=4):
    """Run ``steps`` DP steps of ``model`` on an empty batch (the backward still runs through
    every layer, so each kernel sees B = 0); returns ({name: [steps, numel] gradients}, the
    std they must have).  An empty step's gradient is pure noise: N(0, (sigma C / B_exp)^2)."""
    import dpkernels

    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=sigma, max_grad_norm=C,
                                expected_batch_size=expected_batch_size, backend=backend,
                                seed=77)
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for _ in range(steps):
            model(empty_input).sum().backward()
            dp.step()
            assert dp.per_sample_norms.shape == (0,)
            for name, p in model.named_parameters():
                assert p.grad is not None, name
                out.setdefault(name, []).append(p.grad.detach().flatten().clone())
            dp.zero_grad()
    finally:
        dpkernels.detach(model)
    return {k: torch.stack(v) for k, v in out.items()}, sigma * C / expected_batch_size
