"""Target epsilon: the noise multiplier that spends a privacy budget, for ``make_private``.

``make_private(..., target_epsilon=, target_delta=, sample_rate=, epochs= or steps=)`` calls
:func:`calibrate` before attaching: it finds with the PLD accountant the smallest noise
multiplier whose epsilon after the planned steps is at most ``target_epsilon``, and close to
it from below (``(1 - EPS_RTOL) * target <= epsilon <= target``).  The result is kept on the
optimizer (``dp_opt.calibration``) and logged on the ``dpkernels`` logger.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from dpkernels.accounting import epsilon, noise_multiplier_for

logger = logging.getLogger("dpkernels")

# The epsilon reached must be within this fraction of the target, from below.  A sigma found
# to a relative tolerance r changes epsilon by about r * |d log eps / d log sigma| (1 to 2 in
# practice), so the search starts at r = EPS_RTOL and tightens tenfold while it falls short.
EPS_RTOL = 1e-3
_MIN_SIGMA_RTOL = 1e-6


@dataclass(frozen=True)
class Calibration:
    """What ``make_private(target_epsilon=...)`` chose, and the epsilon it reaches."""

    noise_multiplier: float
    target_epsilon: float
    epsilon: float  # reached after ``steps`` steps; <= target_epsilon
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    seconds: float

    def __str__(self) -> str:
        return (f"noise multiplier {self.noise_multiplier:.4f} for epsilon "
                f"{self.target_epsilon:g} at delta {self.delta:g} ({self.accountant}, "
                f"q={self.sample_rate:.4g}, {self.steps} steps; epsilon reached "
                f"{self.epsilon:.5g}; calibrated in {self.seconds:.1f} s)")


def planned_steps(sample_rate, epochs=None, steps=None) -> int:
    """``steps``, or ``epochs`` worth of Poisson steps: ``ceil(epochs / sample_rate)`` (an
    epoch is ``1 / q`` steps in expectation; rounding up can only overestimate epsilon)."""
    if (epochs is None) == (steps is None):
        raise ValueError(
            "make_private(target_epsilon=...) needs exactly one of epochs= or steps= (how "
            f"long training will run, to spend the budget over); got epochs={epochs!r}, "
            f"steps={steps!r}"
        )
    if steps is not None:
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return steps
    e = float(epochs)
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    # the 1e-9 keeps 0.5 / 0.01 at 50 steps despite rounding in the division
    return max(1, math.ceil(e / float(sample_rate) - 1e-9))


def calibrate(target_epsilon, target_delta, sample_rate, *, epochs=None, steps=None,
              accountant: str = "pld") -> Calibration:
    """The noise multiplier for ``target_epsilon`` at ``target_delta`` after the planned
    steps, with ``(1 - EPS_RTOL) * target <= epsilon(sigma) <= target``."""
    if target_delta is None:
        raise ValueError("make_private(target_epsilon=...) needs target_delta= (e.g. 1e-5, "
                         "below 1 / dataset size)")
    if sample_rate is None:
        raise ValueError("make_private(target_epsilon=...) needs sample_rate= (expected batch "
                         "size / dataset size: the Poisson sampling probability)")
    q = float(sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    n = planned_steps(q, epochs, steps)
    t0 = time.perf_counter()
    target = float(target_epsilon)
    rtol = EPS_RTOL
    while True:
        sigma = noise_multiplier_for(target, target_delta, q, n, accountant=accountant,
                                     rtol=rtol)
        eps = epsilon(sigma, q, n, target_delta, accountant)
        if eps >= (1.0 - EPS_RTOL) * target or rtol <= _MIN_SIGMA_RTOL:
            break
        rtol /= 10.0
    if eps < (1.0 - EPS_RTOL) * target:
        raise RuntimeError(
            f"dpkernels: could not calibrate the noise multiplier to within {EPS_RTOL:g} of "
            f"target_epsilon={target} (best sigma {sigma}, epsilon {eps}); pass "
            "noise_multiplier= instead"
        )
    cal = Calibration(sigma, target, eps, float(target_delta), q, n, accountant,
                      time.perf_counter() - t0)
    logger.info("%s", cal)
    return cal
