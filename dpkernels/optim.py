"""DPOptimizer: clip, noise once, scale, step, around any ``torch.optim`` optimizer."""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict

import torch
from torch import nn

from dpkernels.engine import Engine, derive_seed


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; the model's per-sample gradients come from the attached engine.

    ``step()`` folds the last micro-batch (clip factors from the per-sample norms, the clipped
    sum of every parameter), adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` once per
    parameter, divides by ``expected_batch_size`` for ``loss_reduction="mean"``, writes
    ``param.grad`` and steps the wrapped optimizer.  ``accumulate()`` folds a micro-batch
    without stepping, so one logical batch can be fed as many small ones.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        engine: Engine,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
        seed: int | None = None,
        distributed: bool = False,
        secure_mode: bool = False,
    ) -> None:
        if secure_mode:
            from dpkernels.secure import require

            if seed is not None:
                raise ValueError(
                    "dpkernels: seed is refused with secure_mode=True: secure noise comes from "
                    "a fresh os.urandom key every step and cannot be reproduced; pass "
                    "seed=None (or secure_mode=False for reproducible Philox noise)"
                )
            require()
        self.secure_mode = bool(secure_mode)
        if loss_reduction == "mean" and expected_batch_size is None:
            raise ValueError(
                "expected_batch_size must be a positive number for loss_reduction='mean' "
                "(sample_rate * dataset size under Poisson sampling)"
            )
        self.original_optimizer = optimizer
        # A torch.optim.Optimizer to the outside (learning-rate schedulers check isinstance),
        # but its state, groups and defaults are the wrapped optimizer's: Optimizer.__init__
        # is not called, only the hook tables its methods expect are set up.
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        # A seed drawn from the OS never leaves this object: the noise of step k is a pure
        # function of (seed, k), so a checkpoint holding it would let anyone with the
        # checkpoint and the starting weights subtract the noise.  An explicit seed (tests,
        # reproducible experiments) is saved, and documented as not for private releases.
        self.seed_given = seed is not None
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.distributed = distributed
        if distributed:
            seed = _broadcast_seed(seed, engine.params)
        self.seed = int(seed)
        self.steps = 0
        # make_private(target_epsilon=...): the dpkernels.calibration.Calibration it made
        self.calibration = None
        # make_private(adaptive_clipping=...): the dpkernels.adaptive.AdaptiveClipping
        self.adaptive = None
        # dpkernels.schedules objects made on this optimizer (they register themselves), whose
        # positions state_dict() saves
        self.schedules: list = []
        # (noise_multiplier, sample_rate or None, number of steps): for the accountant
        self.history: list[list] = []
        # Set by the dpkernels.data helpers: the Poisson sample rate of the batches, and
        # whether they really are Poisson samples (None: not known).  Steps taken without
        # poisson=True are counted, so the epsilon report can say the assumption fails.
        self.sample_rate: float | None = None
        self.poisson: bool | None = None
        self.non_poisson_steps = 0
        # {explicit Poisson seed: epochs drawn}: a seeded sampler feeding this optimizer never
        # replays an epoch (dpkernels.data.PoissonBatchSampler), also across a resume
        self.poisson_epochs: dict[int, set[int]] = {}
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "dpkernels: LBFGS evaluates the loss several times per step (a closure), each "
                "on the private batch; DP-SGD accounts for one clipped, noised gradient per "
                "step. Use a first-order optimizer (SGD, Adam, AdamW, ...)"
            )
        # the wrapped optimizer's own step() would apply no gradient (before dp_opt.step())
        # or the last noised one a second time: only dp_opt.step() may call it
        self._stepping = False
        register = getattr(optimizer, "register_step_pre_hook", None)
        self._inner_hook = register(self._inner_step_pre_hook) if register else None
        self._managed = {id(p) for p in engine.params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._managed:
                    raise ValueError(
                        "dpkernels: the optimizer holds a parameter that is not part of the "
                        "model given to make_private; its gradient would not be clipped"
                    )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        idle = [engine.param_names[p] for p in engine.params
                if p.requires_grad and id(p) not in held]
        if idle:
            warnings.warn(
                f"dpkernels: {len(idle)} trainable parameter(s) of the model are not in the "
                f"optimizer ({', '.join(idle[:5])}{', ...' if len(idle) > 5 else ''}); they "
                "still count in every per-sample norm (clipping the others harder) and get "
                "noise-only gradients. Freeze them (requires_grad_(False)) if they are not "
                "trained, or add them to the optimizer",
                stacklevel=3,
            )

    # --- C, sigma and the batch size: validated, one source of truth ---------------------
    # The engine clips with max_grad_norm; step() draws noise with std noise_multiplier *
    # max_grad_norm read at that moment and logs noise_multiplier for the accountant.  Changing
    # either in the middle of a logical batch would clip some micro-batches at one C and noise
    # at another, so the setters refuse while clipped sums are pending.
    @property
    def max_grad_norm(self) -> float:
        return self.engine.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        value = _finite("max_grad_norm", value, positive=True)
        self._refuse_mid_batch("max_grad_norm")
        self.engine.max_grad_norm = value

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        value = _finite("noise_multiplier", value, positive=False)
        self._refuse_mid_batch("noise_multiplier")
        self._noise_multiplier = value

    @property
    def expected_batch_size(self) -> float | None:
        return self._expected_batch_size

    @expected_batch_size.setter
    def expected_batch_size(self, value: float | None) -> None:
        if value is not None:  # None: only for loss_reduction="sum" (checked in step)
            value = _finite("expected_batch_size", value, positive=True)
        self._refuse_mid_batch("expected_batch_size")
        self._expected_batch_size = value

    def _pending_batch(self) -> str | None:
        """What this optimizer holds of an unfinished logical batch (None after step(),
        discard() or before the first backward)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return None
        if engine.acc:
            return "the clipped sums that dp_opt.accumulate() folded in since the last step()"
        if engine.uses:
            return ("the per-sample gradients of a backward not yet folded in by "
                    "dp_opt.accumulate() or dp_opt.step()")
        adaptive = getattr(self, "adaptive", None)
        if adaptive is not None and adaptive.count is not None:
            return "the adaptive clipping count of the micro-batches since the last step()"
        return None

    def _refuse_state_dict_mid_batch(self) -> None:
        """The pending sums are not saved (a checkpoint of unnoised clipped gradients would
        leak them), so a checkpoint taken now would resume a shorter logical batch."""
        pending = self._pending_batch()
        if pending is not None:
            raise RuntimeError(
                "dpkernels: dp_opt.state_dict() was called while a logical batch is in "
                f"progress (pending: {pending}). That is not saved (clipped but not yet noised "
                "sums must not go into a checkpoint), so a run resumed from this checkpoint "
                "would step on fewer samples than it trained on. Call state_dict() right after "
                "dp_opt.step(), or drop the unfinished logical batch with dp_opt.discard() "
                "first"
            )

    def _refuse_mid_batch(self, what: str) -> None:
        pending = self._pending_batch()
        if pending is not None:
            raise RuntimeError(
                f"dpkernels: {what} cannot change in the middle of a logical batch (pending: "
                f"{pending}; some micro-batches would be clipped or noised with the old "
                "value); change it right after dp_opt.step(), or call dp_opt.discard() first"
            )

    def _check_attached(self, what: str) -> None:
        if not self.engine.attached:
            raise RuntimeError(
                f"dpkernels: dp_opt.{what}() after dpkernels.detach(model): this DPOptimizer "
                "no longer sees the model's per-sample gradients (its plain gradients would be "
                "overwritten with noise). Step the original optimizer for non-private training, "
                "or make_private again"
            )

    # --- the torch.optim surface -------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if p.requires_grad and id(p) not in self._managed:
                raise ValueError(
                    "dpkernels: add_param_group got a parameter that is not part of the model "
                    "given to make_private; its gradient would not be clipped"
                )
        self.original_optimizer.add_param_group(param_group)

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @property
    def per_sample_norms(self) -> torch.Tensor | None:
        """[B] per-sample gradient norms before clipping (float32; float64 for a float64
        model): those of the last completed backward not yet folded in (so they can be logged
        between ``backward()`` and ``step()``), else those of the last micro-batch folded."""
        pending = self.engine.pending_norms()
        return pending if pending is not None else self.engine.last_norms

    @property
    def nonfinite_samples(self) -> int:
        """Samples so far whose gradient was NaN/inf and that were dropped (clip factor 0)."""
        return self.engine.nonfinite_samples

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad`` and any backward not yet folded in (not the accumulator)."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.engine.clear_pending()
        self.engine.refresh_written()

    def discard(self) -> None:
        """Drop an unfinished logical batch: the backward not yet folded in and the clipped
        sums accumulated since the last ``step()``."""
        self.engine.clear_pending()
        self.engine.acc.clear()
        if self.adaptive is not None:
            self.adaptive.reset()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` for either mode: in ``mode="low-memory"`` two passes (norms, then
        clipped sums), which is the only way to run a backward in that mode."""
        if self.engine.mode == "low-memory":
            self.engine.two_pass_backward(loss)
        else:
            loss.backward()

    def accumulate(self) -> None:
        """Fold the last backward's clipped per-sample gradients into the accumulator."""
        self._check_attached("accumulate")
        self.engine.fold(finalize=False)

    def _inner_step_pre_hook(self, optimizer, args, kwargs) -> None:
        if not self._stepping and self.engine.attached:
            raise RuntimeError(
                "dpkernels: step() of the optimizer wrapped by make_private was called "
                "directly; it would apply no private gradient (or the last one again). Call "
                "step() on the DPOptimizer that make_private returned (or dpkernels.detach("
                "model) to train without DP)"
            )

    # GradScaler.step(dp_opt) then hands its scale to step() (grad_scale), which refuses it
    _step_supports_amp_scaling = True

    def __deepcopy__(self, memo):
        raise TypeError(
            "dpkernels: a DPOptimizer cannot be deep-copied (it is bound to its model's "
            "engine); copy dp_opt.state_dict() and load it into a DPOptimizer made for the copy"
        )

    @torch.optim.Optimizer.profile_hook_step  # step pre/post hooks, as for any optimizer
    def step(self, closure=None):
        self._check_attached("step")
        if getattr(self, "grad_scale", None) is not None:
            raise ValueError(
                "dpkernels: GradScaler is not supported: its loss scale would enter every "
                "per-sample gradient before clipping (clipping at max_grad_norm / scale), and its "
                "inf check cannot see the engine's gradients. Use bf16 autocast (no scaler "
                "needed) or float32; per-sample gradients that are not finite are already "
                "dropped by the engine (dp_opt.nonfinite_samples)"
            )
        _check_outside_state(self.engine.model, self.engine, at_step=True)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sigma = self.noise_multiplier
        if self.adaptive is not None:  # the count's noise is part of sigma (adaptive.py)
            sigma = self.adaptive.gradient_noise_multiplier(sigma)
        std = sigma * self.max_grad_norm
        if self.loss_reduction == "mean" and self.expected_batch_size is None:
            raise ValueError("dpkernels: loss_reduction='mean' needs expected_batch_size")
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        step = self.steps

        def seeds(i: int) -> int:
            return derive_seed(self.seed, step, i)

        reduce = _all_reduce_sum if self.distributed else None
        noise = None
        if self.secure_mode:
            from dpkernels.secure import StepNoise, no_noise

            noise = StepNoise(std) if _draws_noise(self.distributed) else no_noise
        self.engine.fold(finalize=True, noise_std=std, scale=scale, seeds=seeds, reduce=reduce,
                         noise=noise)
        self._check_provenance()
        self.steps += 1
        self._log_step(self.sample_rate)
        if self.adaptive is not None:
            self.adaptive.after_step(self, step)  # C for the next step
        self._stepping = True
        try:
            self.original_optimizer.step()
        finally:
            self._stepping = False
        return loss

    def _check_provenance(self) -> None:
        """Every gradient the wrapped optimizer is about to apply must be the clipped, noised
        one the engine wrote in this step: a parameter the model does not hold, one added to
        the wrapped optimizer behind our back, or one unfrozen after make_private would
        otherwise be stepped with its raw gradient."""
        written = self.engine.written
        for gi, group in enumerate(self.original_optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                mine = written.get(p)
                if mine is not None and p.grad is mine[0]:
                    continue
                if not bool(p.grad.ne(0).any()):  # e.g. zeroed, kept by set_to_none=False
                    continue
                name = self.engine.param_names.get(p)
                what = (f"parameter {name!r}" if name is not None else
                        f"a parameter of shape {tuple(p.shape)} (param group {gi}, index {pi}) "
                        "that is not part of the model given to make_private")
                raise RuntimeError(
                    f"dpkernels: the optimizer would update {what} with a gradient that did not "
                    "come from the DP engine in this step (not clipped, not noised). Parameters "
                    "must belong to the model at make_private time (call dpkernels.detach(model) "
                    "and make_private again after adding or unfreezing parameters outside it), "
                    "and their gradients may only come from the engine"
                )

    def _log_step(self, sample_rate: float | None = None) -> None:
        key = [self.noise_multiplier, sample_rate]
        if self.history and self.history[-1][:2] == key:
            self.history[-1][2] += 1
        else:
            self.history.append([*key, 1])
        if not self.poisson:
            self.non_poisson_steps += 1

    # --- accounting --------------------------------------------------------------------
    def epsilon(self, delta: float, sample_rate: float | None = None,
                accountant: str = "pld") -> float:
        """Epsilon at ``delta`` for every step taken so far, segment by segment when the
        noise multiplier changed.  ``sample_rate`` fills in steps whose rate the Poisson
        loader did not record.  Warns when some steps were not Poisson-sampled."""
        eps, note = self._account(delta, sample_rate, accountant)
        if note:
            warnings.warn(note, stacklevel=2)
        return eps

    def privacy_report(self, delta: float, sample_rate: float | None = None,
                       accountant: str = "pld") -> str:
        """A few lines: steps, noise, sample rate, epsilon, and any sampling caveat."""
        eps, note = self._account(delta, sample_rate, accountant)
        sigmas = sorted({h[0] for h in self.history}) or [self.noise_multiplier]
        rates = sorted({h[1] if h[1] is not None else sample_rate for h in self.history})
        lines = [f"DP-SGD: {self.steps} steps, noise multiplier "
                 f"{', '.join(f'{s:.4g}' for s in sigmas)}, sample rate "
                 f"{', '.join(f'{q:.4g}' for q in rates) or '-'}, max_grad_norm "
                 f"{self.max_grad_norm:.4g}",
                 f"epsilon = {eps:.4g} at delta = {delta:g} ({accountant} accountant)"]
        if note:
            lines.append("WARNING: " + note)
        return "\n".join(lines)

    def _account(self, delta, sample_rate, accountant) -> tuple[float, str | None]:
        from dpkernels.accounting import epsilon_from_history

        segments = []
        for sigma, q, count in self.history:
            if q is None:
                q = sample_rate
            elif sample_rate is not None and abs(q - sample_rate) > 1e-12 * q:
                raise ValueError(f"sample_rate={sample_rate} contradicts the rate {q} that "
                                 "the Poisson loader recorded for these steps")
            if q is None:
                raise ValueError("the sample rate of these steps is unknown: pass "
                                 "sample_rate=expected batch size / dataset size, or feed "
                                 "batches through dpkernels.poisson_loader")
            segments.append((sigma, q, count))
        note = None
        if self.non_poisson_steps:
            note = (f"{self.non_poisson_steps} of {self.steps} steps did not come from "
                    "Poisson sampling (dpkernels.poisson_loader / PoissonBatchSampler), e.g. "
                    "from a shuffled DataLoader with a fixed batch size: the Poisson "
                    "assumption behind this epsilon does not hold for them")
        return epsilon_from_history(segments, delta, accountant), note

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._refuse_state_dict_mid_batch()
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "dp": {
                "steps": self.steps,
                "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm,
                "expected_batch_size": self.expected_batch_size,
                "loss_reduction": self.loss_reduction,
                "seed": self.seed if self.seed_given else None,
                "history": [list(h) for h in self.history],
                "sample_rate": self.sample_rate,
                "poisson": self.poisson,
                "non_poisson_steps": self.non_poisson_steps,
                "poisson_epochs": {k: sorted(v) for k, v in self.poisson_epochs.items()},
                "secure_mode": self.secure_mode,
                **self._clipping_state(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``: everything that determines the next step (C, sigma,
        ``expected_batch_size``, ``loss_reduction``, the step count, and the seed of a run
        seeded explicitly) comes from the checkpoint, whatever this optimizer was built with,
        so a resumed seeded run continues the saved one exactly.  Everything is validated
        before anything is changed; a bad checkpoint leaves this optimizer as it was."""
        dp = state["dp"]
        reduction = dp["loss_reduction"]
        if reduction not in ("mean", "sum"):
            raise ValueError(f"dpkernels: load_state_dict: the checkpoint's loss_reduction must "
                             f"be 'mean' or 'sum', got {reduction!r}")
        ebs = dp["expected_batch_size"]
        if ebs is not None:
            ebs = _finite("expected_batch_size", ebs, positive=True)
        elif reduction == "mean":
            raise ValueError("dpkernels: load_state_dict: the checkpoint has "
                             "loss_reduction='mean' but no expected_batch_size")
        C = _finite("max_grad_norm", dp["max_grad_norm"], positive=True)
        sigma = _finite("noise_multiplier", dp["noise_multiplier"], positive=False)
        secure = dp.get("secure_mode")  # None: a checkpoint from before it was saved
        if secure is not None and bool(secure) != self.secure_mode:
            raise ValueError(
                f"dpkernels: load_state_dict: the checkpoint was saved with secure_mode="
                f"{bool(secure)} but this optimizer has secure_mode={self.secure_mode}; a "
                "resumed run must draw its noise the same way: make_private(..., secure_mode="
                f"{bool(secure)}) before loading"
            )
        apply_clipping_state = self._check_clipping_state(dp, sigma, ebs)
        self._refuse_mid_batch("the DP state (load_state_dict)")
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.steps = int(dp["steps"])
        self.noise_multiplier = sigma
        self.max_grad_norm = C  # the engine's C: one source of truth
        apply_clipping_state()  # per-layer bounds (their total is C), adaptive, schedules
        self.expected_batch_size = ebs
        # the engine turns the loss back into per-sample losses with it (loss_scale)
        self.loss_reduction = self.engine.loss_reduction = reduction
        if dp["seed"] is not None:  # a seeded run resumes its own noise sequence
            self.seed, self.seed_given = int(dp["seed"]), True
        # else: this optimizer keeps its own seed (fresh OS entropy unless one was given), so
        # resuming from any checkpoint, even an earlier one, draws noise never drawn before
        self.history = [list(h) for h in dp["history"]]
        self.sample_rate = dp.get("sample_rate")
        self.poisson = dp.get("poisson")
        self.non_poisson_steps = int(dp.get("non_poisson_steps", 0))
        # in place: samplers already attached keep reading this record
        self.poisson_epochs.clear()
        self.poisson_epochs.update({int(k): {int(e) for e in v}
                                    for k, v in dp.get("poisson_epochs", {}).items()})

    # The clipping mode, the per-layer bounds, the adaptive clipping settings and the
    # schedules' positions determine the next steps as much as C and sigma do.  A checkpoint
    # and the optimizer it is loaded into must agree on what kind of clipping runs (mode,
    # per-layer groups, adaptive or not, which schedules); the values (bounds, quantile,
    # learning rates, schedule positions) then come from the checkpoint, as C and sigma do.
    def _clipping_state(self) -> dict:
        engine = self.engine
        state: dict = {"clipping": getattr(engine, "clipping", "flat"), "adaptive": None,
                       "schedules": [{"type": type(s).__name__, "state": s.state_dict()}
                                     for s in self.schedules]}
        if state["clipping"] == "per_layer":
            state["group_labels"] = list(engine.group_labels)
            state["group_bounds"] = list(engine.group_bounds)
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        return state

    def _check_clipping_state(self, dp: dict, sigma: float, ebs: float | None):
        """Validate the checkpoint's clipping state against this optimizer without changing
        anything; return the function that applies it."""
        def refuse(what: str) -> ValueError:
            return ValueError(f"dpkernels: load_state_dict: {what}")

        engine = self.engine
        mine, saved = getattr(engine, "clipping", "flat"), dp.get("clipping", "flat")
        if saved != mine:
            raise refuse(f"the checkpoint was saved with clipping={saved!r} but this optimizer "
                         f"uses clipping={mine!r}; make_private with clipping={saved!r} (and "
                         "its bounds) to resume it")
        bounds = None
        if mine == "per_layer":
            labels = list(dp.get("group_labels") or [])
            if labels != list(engine.group_labels):
                raise refuse(f"per-layer clipping groups differ: the checkpoint has {labels}, "
                             f"this optimizer {list(engine.group_labels)}; make_private with "
                             "max_grad_norm covering the same groups to resume it")
            bounds = [_finite(f"max_grad_norm[{k!r}]", c, positive=True)
                      for k, c in zip(labels, dp["group_bounds"])]
            if len(bounds) != len(labels) or len(dp["group_bounds"]) != len(labels):
                raise refuse(f"the checkpoint has {len(labels)} per-layer groups but "
                             f"{len(dp['group_bounds'])} bounds")
            total = math.sqrt(sum(c * c for c in bounds))
            if not math.isclose(total, float(dp["max_grad_norm"]), rel_tol=1e-12):
                raise refuse(f"the checkpoint's per-layer bounds have total sqrt(sum C_k^2) = "
                             f"{total!r} but its max_grad_norm is {dp['max_grad_norm']!r}")
        adaptive = dp.get("adaptive")
        if (adaptive is None) != (self.adaptive is None):
            have = "with" if adaptive is not None else "without"
            fix = ("pass adaptive_clipping=dpkernels.AdaptiveClipping() to make_private"
                   if adaptive is not None else "make_private without adaptive_clipping")
            raise refuse(f"the checkpoint was saved {have} adaptive clipping and this optimizer "
                         f"is {'without' if adaptive is not None else 'with'} it; {fix} to "
                         "resume it")
        if adaptive is not None:
            adaptive = self.adaptive.check_state(adaptive, sigma, ebs)
        saved_sched = dp.get("schedules", [])
        kinds = [s["type"] for s in saved_sched]
        have = [type(s).__name__ for s in self.schedules]
        if kinds != have:
            raise refuse(
                f"the checkpoint was saved with the schedules {kinds} and this optimizer has "
                f"{have}: create the same schedules, in the same order, on this optimizer "
                "before load_state_dict (a schedule new to the resumed run: create it after "
                "load_state_dict, so that it starts from the loaded values)")
        for sched, saved in zip(self.schedules, saved_sched):
            sched.check_state(saved["state"])

        def apply() -> None:
            if bounds is not None:
                engine.group_bounds = bounds
            if adaptive is not None:
                self.adaptive.load_state(adaptive)
            for sched, saved in zip(self.schedules, saved_sched):
                sched.load_state_dict(saved["state"])

        return apply

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm="
                f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
                f"loss_reduction={self.loss_reduction!r}, backend={self.engine.backend!r}, "
                f"wrapping {self.original_optimizer!r})")


def _finite(name: str, value, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")
    return v


def _broadcast_seed(seed: int, params) -> int:
    """Every process must draw the same noise (it is added once, to the summed gradient):
    rank 0's seed wins."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "dpkernels: distributed=True needs torch.distributed to be initialised first "
            "(torch.distributed.init_process_group)"
        )
    device = params[0].device if params and dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _draws_noise(distributed: bool) -> bool:
    """Secure noise is drawn by one process (rank 0) and reaches the others through the sum."""
    if not distributed:
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def _all_reduce_sum(t: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    expected_batch_size: int | None = None,
    loss_reduction: str = "mean",
    backend: str = "auto",
    seed: int | None = None,
    norm_method: str = "auto",
    mode: str = "fast",
    distributed: bool = False,
    multiple_forwards: bool = False,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float | None = None,
    adaptive_clipping=None,
    clipping: str = "flat",
    secure_mode: bool = False,
) -> DPOptimizer:
    """Attach DP-SGD to ``model`` in place and return the optimizer to step with.

    ``norm_method`` ("auto", "ghost", "direct") overrides the per-layer choice of how Linear
    and Conv norms are computed (for benchmarks; "auto" picks the cheaper one per layer).

    ``mode="fast"`` (default): one backward; every captured layer's backprop is kept until
    ``step()``/``accumulate()``.  ``mode="low-memory"``: call ``dp_opt.backward(loss)``
    instead of ``loss.backward()``; it runs the backward twice (norms, then clipped sums folded
    layer by layer), so backprops are not kept: about non-private memory for one more backward
    pass of time.

    ``multiple_forwards=True``: several calls of ``model`` before one backward are views of
    the *same* samples (row i of every call is sample i: contrastive views, R-Drop), and their
    gradients add per sample.  By default a second call before the backward raises, because
    two different batches would be paired row by row and clipped together.

    ``distributed=True`` (data-parallel training; do not wrap the model in
    DistributedDataParallel): each process clips its own samples, ``step()`` sums the clipped
    sums across processes (one all-reduce) and adds the noise once, from a seed shared by
    rank 0.  ``expected_batch_size`` is then the global one; feed each process its share of
    every logical Poisson batch (``PoissonBatchSampler(..., rank=, world_size=, seed=)``).

    ``noise_multiplier`` (default 1.0), or ``target_epsilon`` with ``target_delta``,
    ``sample_rate`` and ``epochs`` or ``steps``: the noise multiplier is then calibrated with
    the PLD accountant so that the planned steps spend the budget (epsilon within 1e-3
    relative of the target, from below); ``dp_opt.calibration`` says what was chosen.
    ``sample_rate`` also becomes ``dp_opt.sample_rate`` for the epsilon report (a Poisson
    loader given the optimizer overrides it).

    ``adaptive_clipping=dpkernels.AdaptiveClipping(target_quantile=...)``: C follows that
    quantile of the per-sample norms from the initial ``max_grad_norm`` (Andrew et al. 2021);
    ``noise_multiplier`` is then the total noise multiplier, part of which pays for the noisy
    unclipped count (dpkernels/adaptive.py).

    ``clipping="per_layer"`` with ``max_grad_norm=[C_1, ..., C_K]`` (one bound per trainable
    parameter, in ``model.named_parameters()`` order) or ``{parameter or module name: C_k}``
    (groups): each group is clipped to its own bound, the noise std is
    ``noise_multiplier * sqrt(sum C_k^2)``, and each group's clipped sum is formed in the
    backward as soon as its norms are complete, its backprops dropped (dpkernels/per_layer.py).

    ``secure_mode=True``: every noise draw comes from ChaCha20 keyed from ``os.urandom`` each
    step (``dpkernels.secure``; needs the C++ extension, and raises saying why when it is
    not built); ``seed`` is refused.  With ``distributed=True`` rank 0 draws the noise and
    adds it to its clipped sum before the all-reduce.
    """
    _check_outside_state(model)
    calibration = _calibrate(noise_multiplier, target_epsilon, target_delta, epochs, steps,
                             sample_rate)
    if calibration is not None:
        noise_multiplier = calibration.noise_multiplier
    elif noise_multiplier is None:
        noise_multiplier = 1.0
    engine_cls = _engine_class(clipping, max_grad_norm, distributed)
    engine = engine_cls(model, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                        backend=backend, norm_method=norm_method, mode=mode)
    engine.multiple_forwards = bool(multiple_forwards)
    engine.attach()
    try:
        _check_outside_state(model, engine)
        dp = DPOptimizer(optimizer, engine, noise_multiplier=noise_multiplier,
                         max_grad_norm=engine.max_grad_norm,
                         expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction, seed=seed, distributed=distributed,
                         secure_mode=secure_mode)
    except Exception:
        engine.detach()
        raise
    dp.calibration = calibration
    if adaptive_clipping is not None:
        try:
            adaptive_clipping.attach(dp)
        except Exception:
            engine.detach()
            raise
        dp.adaptive = adaptive_clipping
    if sample_rate is not None:
        dp.sample_rate = float(sample_rate)
    return dp


def _check_outside_state(model: nn.Module, engine: Engine | None = None,
                         at_step: bool = False) -> None:
    """Trainable state the engine cannot clip, refused by name: a buffer that requires grad
    (its gradient is never clipped), a lazy parameter not yet materialised, a hook on a
    parameter (the engine writes ``param.grad`` itself, so a gradient hook would never see
    the private gradient, and an optimizer-in-backward hook would never step it; checked
    once ``engine`` is attached, its own hooks excepted), and, at ``step()``, a parameter
    added to the model after make_private that holds a gradient (created in a forward: that
    gradient is raw)."""
    for name, b in model.named_buffers():
        if b.requires_grad:
            raise ValueError(
                f"dpkernels: buffer {name!r} requires grad: its gradient would be neither "
                "clipped nor noised. Register it as a parameter (then it is trained privately) "
                "or call requires_grad_(False) on it"
            )
    ours = set() if engine is None else {h.id for h in engine._hooks}
    for name, p in model.named_parameters():
        if nn.parameter.is_lazy(p):
            raise ValueError(
                f"dpkernels: parameter {name!r} is uninitialised (a Lazy module): run one "
                "forward with a dummy batch before make_private, so that it exists when the "
                "engine attaches"
            )
        if engine is None:
            continue
        hooks = [k for k in (p._backward_hooks or {}) if k not in ours]
        if hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            raise ValueError(
                f"dpkernels: parameter {name!r} has a gradient hook (register_hook or "
                "register_post_accumulate_grad_hook); the engine writes the clipped, noised "
                "gradient itself, so the hook would never see it. Remove the hook and do the "
                "work on param.grad after dp_opt.step() has written it"
            )
        if at_step and p not in engine.param_index and p.grad is not None:
            raise RuntimeError(
                f"dpkernels: parameter {name!r} was added to the model after make_private "
                "(e.g. created in a forward) and holds a gradient that was neither clipped nor "
                "noised. Create every parameter before make_private (run a dummy forward "
                "first), or call dpkernels.detach(model) and make_private again"
            )


def _engine_class(clipping, max_grad_norm, distributed):
    if clipping == "flat":
        if isinstance(max_grad_norm, (list, tuple, dict)):
            raise ValueError("make_private: a list or mapping of max_grad_norm bounds needs "
                             "clipping='per_layer'")
        return Engine
    if clipping == "per_layer":
        if distributed:
            raise ValueError("make_private: clipping='per_layer' with distributed=True is not "
                             "supported yet; use clipping='flat'")
        from dpkernels.per_layer import PerLayerEngine

        return PerLayerEngine
    raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")


def _calibrate(noise_multiplier, target_epsilon, target_delta, epochs, steps, sample_rate):
    """make_private's target-epsilon arguments: checked, and the calibration if asked for."""
    if target_epsilon is None:
        extra = [k for k, v in (("target_delta", target_delta), ("epochs", epochs),
                                ("steps", steps)) if v is not None]
        if extra:
            raise ValueError(f"make_private: {', '.join(extra)} only apply with "
                             "target_epsilon= (calibrating the noise multiplier); pass "
                             "target_epsilon too, or drop them")
        if sample_rate is not None and not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        return None
    if noise_multiplier is not None:
        raise ValueError(
            "make_private: pass either noise_multiplier= or target_epsilon= (which calibrates "
            f"the noise multiplier), not both; got noise_multiplier={noise_multiplier!r} and "
            f"target_epsilon={target_epsilon!r}"
        )
    from dpkernels.calibration import calibrate

    return calibrate(target_epsilon, target_delta, sample_rate, epochs=epochs, steps=steps)


def detach(model: nn.Module) -> None:
    """Restore ``model``'s original forwards and drop the engine's hooks and state."""
    engine = getattr(model, "_dpkernels_engine", None)
    if engine is None:
        warnings.warn("dpkernels.detach: this model is not attached", stacklevel=2)
        return
    engine.detach()
