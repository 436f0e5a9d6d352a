"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping"): the clipping bound C follows a quantile of the per-sample
gradient norms.

Each step counts the samples the step did not clip (clip factor 1, computed with the very C
that clipped them), privately: every sample contributes ``b_i - 1/2`` with
``b_i = 1[unclipped]``, which has sensitivity 1/2 under add/remove-one, and the sum gets
Gaussian noise of std ``count_noise_std`` (sigma_b).  The noisy fraction
``b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / expected_batch_size + 1/2`` then moves C
geometrically toward the target quantile gamma::

    C <- C * exp(-learning_rate * (b~ - gamma))

In ``secure_mode`` the count's noise comes from ChaCha20 (``dpkernels.secure``, a fresh
``os.urandom`` key each step), like the gradient's; otherwise from a torch generator seeded
per step from the run's seed.

Privacy: the count is a second Gaussian mechanism on the same Poisson sample, with noise
multiplier ``2 sigma_b`` (std over sensitivity).  Both together are one Gaussian mechanism
on the concatenated query, whose noise multiplier sigma satisfies
``sigma^-2 = sigma_grad^-2 + (2 sigma_b)^-2`` (the paper's Theorem 1).  The user's
``noise_multiplier`` is that total sigma: the gradient gets the smaller effective multiplier

    sigma_grad = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)

and the accountant composes sigma per step, as for plain DP-SGD, so the count's privacy cost
is included.  ``2 sigma_b > sigma`` is required (otherwise the count alone would spend more
than the budget).
"""

from __future__ import annotations

import math

import torch

from dpkernels.engine import derive_seed

# The count's noise draws from its own seed stream (a per-parameter index would collide).
_COUNT_SEED_INDEX = 1 << 48


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``(sigma^-2 - (2 sigma_b)^-2)^(-1/2)``: the gradient's noise multiplier when the
    count noise std sigma_b is part of a total noise multiplier sigma."""
    sigma, sb = float(noise_multiplier), float(count_noise_std)
    if sigma == 0.0:
        return 0.0  # no noise at all: no guarantee either way (epsilon is inf)
    if not 2.0 * sb > sigma:
        raise ValueError(
            f"adaptive clipping: count_noise_std={sb:g} is too small for noise_multiplier="
            f"{sigma:g}: the count alone would cost more than the budget (it needs "
            f"2 * count_noise_std > noise_multiplier); raise count_noise_std (the paper uses "
            "expected_batch_size / 20) or lower the noise multiplier"
        )
    return (sigma ** -2 - (2.0 * sb) ** -2) ** -0.5


class AdaptiveClipping:
    """``make_private(..., adaptive_clipping=AdaptiveClipping(target_quantile=0.5))``.

    ``max_grad_norm`` given to make_private is the initial C.  ``learning_rate`` is the
    paper's eta_C (0.2 there); ``count_noise_std`` is sigma_b, the std of the noise on the
    unclipped count (default ``expected_batch_size / 20``, the paper's choice).  After each
    ``dp_opt.step()``, ``dp_opt.max_grad_norm`` is the C of the next step, and
    ``last_fraction`` the noisy unclipped fraction that set it.
    """

    def __init__(self, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise_std: float | None = None) -> None:
        if not 0.0 < float(target_quantile) < 1.0:
            raise ValueError(f"target_quantile must lie in (0, 1), got {target_quantile!r}")
        if not (math.isfinite(float(learning_rate)) and float(learning_rate) > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got "
                             f"{learning_rate!r}")
        if count_noise_std is not None and not (math.isfinite(float(count_noise_std))
                                                and float(count_noise_std) > 0):
            raise ValueError(f"count_noise_std must be a finite number > 0, got "
                             f"{count_noise_std!r}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = None if count_noise_std is None else float(count_noise_std)
        self.count: torch.Tensor | None = None  # sum of (b_i - 1/2) in this logical batch
        self.last_fraction: float | None = None
        self.optimizer = None

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer) -> None:
        """Called by make_private: checks the settings against the optimizer and starts
        counting at every clip-factor computation of its engine."""
        if self.optimizer is not None:
            raise RuntimeError("this AdaptiveClipping is already used by a DPOptimizer; make a "
                               "new one for each make_private")
        if optimizer.distributed:
            raise ValueError("adaptive clipping with distributed=True is not supported yet "
                             "(the unclipped counts would have to be summed across ranks)")
        if getattr(optimizer.engine, "clipping", "flat") != "flat":
            raise ValueError("adaptive clipping needs clipping='flat' (one bound for the "
                             "whole gradient, as in the paper); per-layer bounds that adapt "
                             "(one noisy count per group, each paid for) are not implemented. "
                             "Use clipping='flat' with adaptive_clipping, or per-layer bounds "
                             "that are fixed or follow a clip schedule")
        if optimizer.expected_batch_size is None:
            raise ValueError("adaptive clipping needs expected_batch_size (it normalises the "
                             "unclipped count), also for loss_reduction='sum'")
        sb = self.count_noise_std
        if sb is None:
            sb = optimizer.expected_batch_size / 20.0
        gradient_noise_multiplier(optimizer.noise_multiplier, sb)  # checks 2 sigma_b > sigma
        self.count_noise_std = sb
        self.optimizer = optimizer
        optimizer.engine.factor_hooks.append(self._count)

    def _count(self, norms: torch.Tensor, factors: torch.Tensor) -> None:
        # factors == 1 exactly when C / (bound + 1e-6) >= 1: unclipped by the C that clipped
        centred = (factors >= 1.0).to(torch.float64).sum() - 0.5 * factors.numel()
        self.count = centred if self.count is None else self.count + centred

    def reset(self) -> None:
        """Drop the count of an unfinished logical batch (``dp_opt.discard()``)."""
        self.count = None

    # ------------------------------------------------------------------ per step
    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        return gradient_noise_multiplier(noise_multiplier, self.count_noise_std)

    def after_step(self, optimizer, step: int) -> None:
        """The noisy unclipped fraction of step ``step``, and C for the next step."""
        count = 0.0 if self.count is None else float(self.count)  # one host sync per step
        self.count = None
        if optimizer.secure_mode:  # the count's noise is DP noise too: from ChaCha20
            from dpkernels.secure import StepNoise

            z = StepNoise(self.count_noise_std)(0, torch.zeros(1, dtype=torch.float64))
            noise = float(z)
        else:
            g = torch.Generator().manual_seed(derive_seed(optimizer.seed, step,
                                                          _COUNT_SEED_INDEX))
            noise = float(torch.randn((), generator=g, dtype=torch.float64)) \
                * self.count_noise_std
        frac = (count + noise) / optimizer.expected_batch_size + 0.5
        self.last_fraction = frac
        new = optimizer.max_grad_norm * math.exp(-self.learning_rate
                                                 * (frac - self.target_quantile))
        optimizer.max_grad_norm = new

    def state_dict(self) -> dict:
        """The settings and the last noisy fraction (C itself is ``dp_opt.max_grad_norm``,
        saved by ``dp_opt.state_dict()``, which holds this too)."""
        return {"target_quantile": self.target_quantile, "learning_rate": self.learning_rate,
                "count_noise_std": self.count_noise_std, "last_fraction": self.last_fraction}

    def check_state(self, state: dict, noise_multiplier: float,
                    expected_batch_size: float | None) -> dict:
        """``state`` validated (for ``dp_opt.load_state_dict``, which then calls
        ``load_state``): the checkpoint's settings replace this object's, so they are checked
        as the constructor and ``attach`` check them, against the checkpoint's sigma."""
        keys = {"target_quantile", "learning_rate", "count_noise_std", "last_fraction"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"dpkernels: load_state_dict: the checkpoint's adaptive clipping "
                             f"state must hold {sorted(keys)}, got {state!r}")
        if expected_batch_size is None:
            raise ValueError("dpkernels: load_state_dict: adaptive clipping needs "
                             "expected_batch_size, and the checkpoint has none")
        AdaptiveClipping(state["target_quantile"], state["learning_rate"],
                         state["count_noise_std"])  # the constructor's checks
        if state["count_noise_std"] is None:
            raise ValueError("dpkernels: load_state_dict: the checkpoint's adaptive clipping "
                             "has no count_noise_std")
        gradient_noise_multiplier(noise_multiplier, state["count_noise_std"])
        last = state["last_fraction"]
        return {"target_quantile": float(state["target_quantile"]),
                "learning_rate": float(state["learning_rate"]),
                "count_noise_std": float(state["count_noise_std"]),
                "last_fraction": None if last is None else float(last)}

    def load_state(self, state: dict) -> None:
        """Take a ``check_state``-validated state; the count of an unfinished batch is
        dropped (loading is refused in the middle of a logical batch anyway)."""
        vars(self).update(state)
        self.count = None
