"""The numbers the README's "Clipping modes" section quotes, from real runs of the library.

- target epsilon: ``make_private(target_epsilon=3, target_delta=1e-5, sample_rate=256/1438,
  epochs=40)`` (the demo's setting): the calibrated noise multiplier and epsilon reached;
- schedules: 300 steps at q = 0.01 of a real DPOptimizer with ``ExponentialNoise(gamma=
  0.999)`` from sigma 1 and ``StepClip(step_size=100, gamma=0.5)`` from C 1: the last sigma
  and C, and the epsilon (PLD) of the history the optimizer recorded, against constant sigma;
- adaptive clipping: batches of 256 inputs whose per-sample gradient norms are lognormal
  with median e (2.718), from C_0 = 0.1 (target quantile 0.5, learning rate 0.2, the
  default count noise 256 / 20): the first step whose C is within 5% of the median, and the
  geometric mean of C over steps 201-300 with the quantile of the norm distribution it is.

    python bench/clipping_modes.py [--skip-calibration]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import dpkernels
from dpkernels.schedules import ExponentialNoise, StepClip


def target_epsilon() -> None:
    m = nn.Linear(4, 2)
    t0 = time.perf_counter()
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                target_epsilon=3.0, target_delta=1e-5,
                                sample_rate=256 / 1438, epochs=40,
                                max_grad_norm=1.0, expected_batch_size=256)
    print(f"target epsilon: {dp.calibration} ({time.perf_counter() - t0:.1f} s in all)")


def schedules(q: float = 0.01, steps: int = 300, delta: float = 1e-5) -> None:
    m = nn.Linear(4, 2, bias=False)
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                noise_multiplier=1.0, max_grad_norm=1.0,
                                loss_reduction="sum", seed=0, sample_rate=q)
    noise, clip = ExponentialNoise(dp, gamma=0.999), StepClip(dp, step_size=100, gamma=0.5)
    x = torch.zeros(2, 4)
    for _ in range(steps):
        m(x).sum().backward()
        dp.step()
        dp.zero_grad()
        noise.step()
        clip.step()
    last = dp.history[-1][0]  # the sigma of the last step taken
    eps = dpkernels.epsilon_from_history([(s, q, n) for s, _, n in dp.history], delta, "pld")
    lo = dpkernels.epsilon(1.0, q, steps, delta, "pld")
    hi = dpkernels.epsilon(last, q, steps, delta, "pld")
    print(f"schedules: {steps} steps at q = {q}: sigma 1 -> {last:.4f} (last step), C 1 -> "
          f"{dp.max_grad_norm:.4g} (after the last schedule step); epsilon {eps:.4g} at "
          f"delta {delta:g} (pld), constant sigma 1: {lo:.4g}, constant sigma {last:.4f}: {hi:.4g}")


def adaptive(B: int = 256, steps: int = 300, seed: int = 0) -> None:
    torch.manual_seed(seed)
    m = nn.Linear(4, 1, bias=False).double()
    ad = dpkernels.AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                noise_multiplier=1.0, max_grad_norm=0.1,
                                expected_batch_size=B, loss_reduction="sum", seed=seed,
                                adaptive_clipping=ad)
    g = torch.Generator().manual_seed(seed + 1)
    median = math.e
    Cs, first = [dp.max_grad_norm], None
    for step in range(1, steps + 1):
        x = torch.zeros(B, 4, dtype=torch.float64)  # sample b's gradient of m(x).sum() is x_b
        x[:, 0] = torch.exp(torch.randn(B, generator=g, dtype=torch.float64) + 1.0)
        m(x).sum().backward()
        dp.step()
        dp.zero_grad()
        Cs.append(dp.max_grad_norm)
        if first is None and abs(Cs[-1] / median - 1) <= 0.05:
            first = step
    tail = Cs[200:300]  # Cs[t] is the C that step t + 1 clipped with
    gm = math.exp(sum(math.log(c) for c in tail) / len(tail))
    quantile = 0.5 * (1 + math.erf((math.log(gm) - 1.0) / math.sqrt(2)))
    print(f"adaptive: batch {B}, lognormal norms (median {median:.4g}), C_0 = 0.1, sigma 1 "
          f"(gradient sigma {ad.gradient_noise_multiplier(1.0):.6g}): C within 5% of the "
          f"median after step {first}; geometric mean of the C of steps 201-300 {gm:.4g}, the "
          f"{quantile:.4f} quantile")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-calibration", action="store_true",
                    help="skip the target-epsilon calibration (about 10 s)")
    a = ap.parse_args()
    print(f"dpkernels, torch {torch.__version__}")
    if not a.skip_calibration:
        target_epsilon()
    schedules()
    adaptive()


if __name__ == "__main__":
    main()
