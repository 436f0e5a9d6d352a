"""Privacy accounting for DP-SGD with Poisson sampling, on Google's ``dp-accounting``.

One DP-SGD step is the Poisson-subsampled Gaussian mechanism: every example joins the batch
independently with probability ``sample_rate`` (q) and the clipped sum gets Gaussian noise of
``noise_multiplier`` (sigma) times the clipping norm.  ``steps`` such steps are composed; a
run whose sigma or q changed is composed segment by segment (:func:`epsilon_from_history`).

Two accountants, both for the add/remove-one neighbouring relation:

- ``"pld"`` (default): privacy loss distributions.  Tight up to its discretisation, which
  only ever overestimates epsilon.
- ``"rdp"``: Renyi DP, converted to (epsilon, delta).  A robust upper bound, looser than
  PLD, and much faster.

``dp_accounting`` is imported inside the functions, so the rest of dpkernels (and the GPU
checks) never need it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence

ACCOUNTANTS = ("pld", "rdp")


# ---------------------------------------------------------------------------- checks
def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    return delta


def _check_segment(noise_multiplier: float, sample_rate: float, steps: int) -> tuple:
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not sigma >= 0.0:  # also catches NaN
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"sample_rate must lie in (0, 1], got {sample_rate} (the probability that one "
            "example is in one batch: expected batch size / dataset size)"
        )
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return sigma, q, steps


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


# ---------------------------------------------------------------------------- epsilon
def epsilon_from_history(
    history: Iterable[Sequence], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at ``delta`` after the composition of every segment in ``history``.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` triples, one per stretch of
    training with constant settings (``DPOptimizer.history`` after the sample rates are
    known).  A segment with ``noise_multiplier == 0`` and at least one step makes the result
    ``inf``: noiseless steps have no finite privacy guarantee.
    """
    delta = _check_delta(delta)
    _check_accountant(accountant)
    segments = [_check_segment(*seg) for seg in history]
    segments = [s for s in segments if s[2] > 0]
    if not segments:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in segments):
        return math.inf

    import dp_accounting

    events = []
    for sigma, q, steps in segments:
        event = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, steps))
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    if accountant == "pld":
        acc = dp_accounting.pld.PLDAccountant()
    else:
        acc = dp_accounting.rdp.RdpAccountant()
    with _quiet_absl():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_absl():
    """The RDP accountant logs a warning for every fractional order whose series does not
    converge and leaves that order out; the epsilon from the other orders is still valid."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps with Poisson sampling.

    ``sample_rate`` is the probability that an example is in a batch (expected batch size /
    dataset size); ``accountant`` is ``"pld"`` (tight, default) or ``"rdp"`` (upper bound).
    ``noise_multiplier == 0`` gives ``inf``.
    """
    return epsilon_from_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


# ---------------------------------------------------------------------------- calibration
def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier whose :func:`epsilon` meets ``target_epsilon``.

    Tolerance: the returned ``sigma`` satisfies ``epsilon(sigma) <= target_epsilon`` and
    ``epsilon(sigma * (1 - rtol)) > target_epsilon`` (epsilon falls as sigma grows, so no
    sigma smaller by more than a fraction ``rtol`` meets the target).  The search keeps such
    a bracket ``[lo, hi]`` and shrinks it by regula falsi on ``log epsilon`` against
    ``log sigma`` (the curve is nearly straight there), with bisection as the fallback.
    """
    target = float(target_epsilon)
    if not (target > 0.0 and math.isfinite(target)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    _check_delta(delta)
    _check_accountant(accountant)
    _check_segment(1.0, sample_rate, steps)
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol}")
    if int(steps) == 0:
        return 0.0
    log_target = math.log(target)

    def f(log_sigma: float) -> float:
        eps = epsilon(math.exp(log_sigma), sample_rate, steps, delta, accountant)
        if eps <= 0.0:
            return -math.inf
        return math.log(eps) - log_target

    # bracket: f(lo) > 0 (misses the target), f(hi) <= 0 (meets it)
    lo = hi = 0.0  # log sigma
    f_hi = f(hi)
    if f_hi <= 0.0:
        f_lo = f_hi
        while f_lo <= 0.0:
            hi, f_hi = lo, f_lo
            lo -= math.log(2.0)
            if lo < math.log(1e-4):
                raise ValueError(
                    f"target_epsilon={target} is met by every noise multiplier above 1e-4"
                )
            f_lo = f(lo)
    else:
        f_lo = f_hi
        while f_hi > 0.0:
            lo, f_lo = hi, f_hi
            hi += math.log(2.0)
            if hi > math.log(1e5):
                raise ValueError(
                    f"target_epsilon={target} needs a noise multiplier above 1e5 for "
                    f"sample_rate={sample_rate}, steps={steps}, delta={delta}"
                )
            f_hi = f(hi)

    width = -math.log1p(-rtol)  # hi - lo <= width  <=>  sigma_lo >= sigma_hi * (1 - rtol)
    side = 0
    while hi - lo > width:
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            c = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        else:
            c = 0.5 * (lo + hi)
        # never probe within width/2 of an end, so the bracket closes once c is at the root
        c = min(max(c, lo + 0.5 * width), hi - 0.5 * width)
        f_c = f(c)
        if f_c <= 0.0:
            hi, f_hi = c, f_c
            if side == 1:  # Illinois: the same end moved twice, halve the other's weight
                f_lo *= 0.5
            side = 1
        else:
            lo, f_lo = c, f_c
            if side == -1:
                f_hi *= 0.5
            side = -1
    return math.exp(hi)
