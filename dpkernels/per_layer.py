"""Per-layer (group-wise) clipping: ``make_private(..., clipping="per_layer",
max_grad_norm=[C_1, ..., C_K])``.

Each group k of trainable parameters (by default one parameter per group) has its own bound:
``c_kb = min(1, C_k / (||g_kb|| (1 + m) + 1e-6))`` from the norm of the sample's gradient
restricted to the group, so the clipped gradient of sample b has norm at most
``C = sqrt(sum_k C_k^2)``, and the noise has std ``sigma * C`` (Opacus's convention).

The gain over the flat mode: a group's clip factors need only that group's norms, which are
complete as soon as the backward has passed every use of its parameters.  The engine then
forms the group's clipped sum right there and drops its kept activations and backprops, so
the backward holds no more than non-private training does (one clipped-sum buffer per
parameter, the size of ``param.grad``).  A parameter used more than once (tied weights, a
block applied twice) waits for its last use: the engine counts the forward calls of the
modules that own it and folds when as many uses have arrived.  Groups with a parameter on
the op-capture path or under a user-registered rule (several records per forward call, or
an unknown number) are clipped at ``step()``/``accumulate()`` instead, as in the flat mode.
A use that would arrive after its group was folded raises instead of clipping with a
partial norm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dpkernels.engine import Engine, norm_bound
from dpkernels.layers import conv, embedding, generic, linear, norms
from dpkernels.layers.base import Use, cancellation_bounds

# Handlers whose backward records each of their parameters exactly once per counted forward
# call.  Op-level capture records once per captured op (a module may use its parameter in
# several) and user rules are unknown: their groups are folded at step(), not in the backward.
_ONE_RECORD_PER_CALL = {id(h) for h in (linear.HANDLER, *conv.HANDLERS, *embedding.HANDLERS,
                                        *norms.HANDLERS, generic.HANDLER,
                                        generic.WHOLE_MODULE)}


class FoldedUse(Use):
    """A group's clipped sum, formed in the backward; ``clipped_sum`` adds it (no c_b)."""

    per_sample = ()

    def __init__(self, total: torch.Tensor) -> None:
        self.total = total

    def clipped_sum(self, op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        total = self.total if acc is None else acc + self.total
        if noise_std == 0.0 and scale == 1.0:
            return total
        return op("add_noise", total, noise_std, seed, scale)


def _bound(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"per-layer clipping: {what} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"per-layer clipping: {what} must be a finite number > 0, got {value!r}")
    return v


def check_bounds(max_grad_norm):
    """The per-layer ``max_grad_norm``: a sequence of bounds (one per trainable parameter) or
    a mapping {parameter or module name: bound}."""
    if isinstance(max_grad_norm, Mapping):
        if not max_grad_norm:
            raise ValueError("per-layer clipping: max_grad_norm is an empty mapping")
        return {str(k): _bound(f"max_grad_norm[{k!r}]", v) for k, v in max_grad_norm.items()}
    if isinstance(max_grad_norm, Sequence) and not isinstance(max_grad_norm, str):
        if not max_grad_norm:
            raise ValueError("per-layer clipping: max_grad_norm is an empty list")
        return [_bound(f"max_grad_norm[{i}]", v) for i, v in enumerate(max_grad_norm)]
    raise TypeError(
        "clipping='per_layer' needs max_grad_norm as a list of bounds, one per trainable "
        "parameter in model.named_parameters() order, or a mapping {parameter or module name: "
        f"bound}}; got {max_grad_norm!r}"
    )


class PerLayerEngine(Engine):
    clipping = "per_layer"

    def __init__(self, model: nn.Module, *, max_grad_norm, **kwargs) -> None:
        if kwargs.get("mode", "fast") != "fast":
            raise ValueError("clipping='per_layer' already folds each layer in its one "
                             "backward (about non-private memory); use mode='fast'")
        self._spec = check_bounds(max_grad_norm)
        values = self._spec.values() if isinstance(self._spec, dict) else self._spec
        self.group_bounds: list[float] | None = None
        self._total = math.sqrt(sum(c * c for c in values))
        super().__init__(model, max_grad_norm=self._total, **kwargs)
        self._reset_groups()

    # C: the total bound sqrt(sum C_k^2); setting it rescales every C_k in proportion
    @property
    def max_grad_norm(self) -> float:
        if self.group_bounds is None:
            return self._total
        return math.sqrt(sum(c * c for c in self.group_bounds))

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if self.group_bounds is None:
            self._total = float(value)
            return
        ratio = float(value) / self.max_grad_norm
        if ratio != 1.0:
            self.group_bounds = [c * ratio for c in self.group_bounds]

    # ------------------------------------------------------------------ groups
    def attach(self) -> None:
        super().attach()
        try:
            self._make_groups()
        except Exception:
            self.detach()
            raise

    def _make_groups(self) -> None:
        trainable = [p for p in self.params if p.requires_grad]
        names = [self.param_names[p] for p in trainable]
        spec = self._spec
        if isinstance(spec, list):
            if len(spec) != len(trainable):
                raise ValueError(
                    f"per-layer clipping: max_grad_norm has {len(spec)} bounds but the model "
                    f"has {len(trainable)} trainable parameters ({', '.join(names)}); give one "
                    "bound per parameter in that order, or a mapping {name: bound}"
                )
            groups = [[p] for p in trainable]
            bounds = list(spec)
            labels = names
        else:
            labels = list(spec)
            members: dict[str, list] = {k: [] for k in labels}
            missing = []
            for p, n in zip(trainable, names):
                keys = [k for k in labels if n == k or n.startswith(k + ".")]
                if not keys:
                    missing.append(n)
                    continue
                members[max(keys, key=len)].append(p)  # the most specific name wins
            if missing:
                raise ValueError(
                    "per-layer clipping: no bound in max_grad_norm covers the trainable "
                    f"parameters {missing}; add their (or their module's) names")
            empty = [k for k in labels if not members[k]]
            if empty:
                raise ValueError(
                    f"per-layer clipping: max_grad_norm names {empty}, which match no "
                    f"trainable parameter (trainable: {names})")
            groups = [members[k] for k in labels]
            bounds = [spec[k] for k in labels]
        self.group_labels = labels
        self.group_params = groups
        self.group_bounds = bounds
        self.group_of = {p: k for k, ps in enumerate(groups) for p in ps}
        # the captured modules whose forward calls are uses of each parameter
        self.owner_names: dict[nn.Parameter, list[str]] = {}
        deferred: set[nn.Parameter] = set()
        for module, (name, _) in self._patched.items():
            handler = module.__dict__["forward"].handler
            whole = getattr(handler, "whole_module", False)
            for p in (module.parameters() if whole else module.parameters(recurse=False)):
                self.owner_names.setdefault(p, []).append(name)
                if id(handler) not in _ONE_RECORD_PER_CALL:
                    deferred.add(p)
        # groups clipped only at step(): their use count per forward is not known
        self.deferred_groups = {k for k, ps in enumerate(groups) if deferred.intersection(ps)}

    def _reset_groups(self) -> None:
        self.group_norm_sq: dict[int, torch.Tensor] = {}
        self.group_err_sq: dict[int, torch.Tensor] = {}
        self.seen: dict[nn.Parameter, int] = {}
        self.folded: set[int] = set()
        self.bad_mask: torch.Tensor | None = None

    def clear_pending(self) -> None:
        super().clear_pending()
        if hasattr(self, "group_norm_sq"):
            self._reset_groups()

    @property
    def group_max_grad_norms(self) -> dict[str, float]:
        """{group label: C_k} (labels: parameter names, or the mapping's keys)."""
        return dict(zip(self.group_labels, self.group_bounds))

    # ------------------------------------------------------------------ capture
    def record(self, name: str, batch_size: int, uses: list) -> None:
        for p, _ in uses:
            if p in self.param_index and p not in self.group_of:
                raise RuntimeError(
                    f"dpkernels: per-layer clipping: parameter {self.param_names[p]!r} was "
                    "frozen at make_private, so it has no clipping bound; call "
                    "dpkernels.detach(model) and make_private again after unfreezing it")
            k = self.group_of.get(p)
            if k is not None and k in self.folded:
                raise RuntimeError(
                    f"dpkernels: per-layer clipping: {name} used parameter "
                    f"{self.param_names[p]!r} after its group was clipped in this backward "
                    "(more uses than counted forward calls of its modules); its clip factor "
                    "would miss part of the norm. Use clipping='flat' for this model")
        super().record(name, batch_size, uses)
        if not uses:
            return
        for p, _ in uses:
            self.seen[p] = self.seen.get(p, 0) + 1
        for k in sorted({self.group_of[p] for p, _ in uses}):
            if self._complete(k):
                self._fold_group(k)

    defer_norm_rows = False  # every use's norm must reach add_norm, for its group

    def add_norm(self, p: nn.Parameter, contrib: torch.Tensor, terms: tuple | None,
                 cross_err: torch.Tensor | None) -> None:
        super().add_norm(p, contrib, terms, cross_err)
        err = None if terms is None else cancellation_bounds([terms])
        if cross_err is not None:
            err = cross_err if err is None else err + cross_err.to(err.dtype)
        k = self.group_of[p]
        for store, value in ((self.group_norm_sq, contrib), (self.group_err_sq, err)):
            if value is None:
                continue
            acc = store.get(k)
            if acc is None:
                store[k] = value.to(self.norm_sq.dtype)
            else:
                dt = torch.promote_types(acc.dtype, value.dtype)
                store[k] = acc.to(dt) + value.to(dt)

    def _complete(self, k: int) -> bool:
        if k in self.deferred_groups:
            return False
        for p in self.group_params[k]:
            expected = sum(self.calls.get(n, 0) for n in self.owner_names.get(p, ()))
            if self.seen.get(p, 0) < expected:
                return False
        return True

    # ------------------------------------------------------------------ fold
    def _fold_group(self, k: int) -> None:
        """Clip group k with its own bound and keep only its clipped sum."""
        with torch.no_grad():
            # the flat mode's upper bound (cancellation bound, margin), on the group's norms
            norms, bound = norm_bound(self.group_norm_sq[k], self.group_err_sq.get(k),
                                      self.loss_scale)
            c = (self.group_bounds[k] / (bound + 1e-6)).clamp(max=1.0)
            c = torch.where(c < torch.finfo(c.dtype).tiny, 0.0, c)  # as ref clip_factors
            finite = torch.isfinite(norms) & torch.isfinite(bound)  # NaN bound: c = 0 too
            bad = None
            if not bool(finite.all()):  # as in the flat mode: c = 0 and rows zeroed
                bad = ~finite
                c = torch.where(bad, torch.zeros_like(c), c)
                self.bad_mask = bad if self.bad_mask is None else self.bad_mask | bad
            c = c * self.loss_scale
            for p in self.group_params[k]:
                uses = self.uses.get(p)
                if not uses:
                    continue
                total = None
                for u in uses:
                    if bad is not None:
                        u.drop_samples(bad)
                    total = u.clipped_sum(self.op, c, total, 0.0, 0, 1.0)
                # a FoldedUse, not an empty list: self.uses still says that a backward is
                # pending (a second forward is refused, C and sigma cannot change)
                self.uses[p] = [FoldedUse(total)]
        self.folded.add(k)

    def clip_factors(self) -> None:
        """At fold time: clip the groups still open (a use that never reached the backward,
        e.g. a module output that did not reach the loss) and report the total norms.  The
        clipped sums are all in FoldedUse entries, so no flat factor is returned."""
        if self.norm_sq is None:
            return None
        for k in sorted(set(self.group_norm_sq) - self.folded):
            self._fold_group(k)
        norms, _ = norm_bound(self.norm_sq, None, self.loss_scale)
        self.last_norms = norms
        self.last_factors = None
        if self.bad_mask is not None:
            idx = self.bad_mask.nonzero().flatten().tolist()
            self.nonfinite_samples += len(idx)
            warnings.warn(
                f"dpkernels: {len(idx)} of {norms.numel()} samples had a non-finite (NaN or "
                f"inf) per-sample gradient in some parameter group (batch indices "
                f"{idx[:10]}{' ...' if len(idx) > 10 else ''}); they were given clip factor "
                "0 in those groups (dp_opt.nonfinite_samples counts them)",
                stacklevel=4,
            )
        return None
