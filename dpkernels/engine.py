"""The one-backward engine: capture, norm accumulation, clip factors, clipped sums.

``Engine.attach`` swaps each module's ``forward`` (an instance attribute, so the class and
every other instance are untouched) for one that runs the layer through a custom autograd
Function.  In the backward pass that Function computes only the input gradient and hands
the engine one ``Use`` per trainable parameter; the engine adds the use's per-sample squared
norm (plus the cross terms with earlier uses of the same parameter) into a ``[B]``
accumulator and keeps the use.  ``fold`` then turns the norms into clip factors and every
use into its clipped sum: into a float32 accumulator (``accumulate``), or with noise and
scale straight into ``param.grad`` (``step``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import sys
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from dpkernels import dispatch
from dpkernels.layers import find_handler, refuse
from dpkernels.layers.base import (
    UNIT_ROUNDOFF,
    Use,
    cancellation_bounds,
    cross,
    cross_error,
    stacked_bounds,
    underflow_cross,
    underflow_eta,
    underflow_own,
)
from dpkernels.reference import bounds as ref_bounds

_ENGINE_ATTR = "_dpkernels_engine"

# Relative margin on norms accumulated in float32 (float32 and bf16/fp16 models), so that the
# clip factor is computed from an upper bound of the exact norm (DESIGN.md section 6).  2^-16
# (~1.5e-5, 128 float32 ulps) is well above the error the kernels are tested to (at most twice
# torch's own float32 error plus 16 ulps); float64 norms (the oracle tests) get none.
NORM_MARGIN = {torch.float64: 0.0, torch.float32: 2.0**-16}


class Engine:
    clipping = "flat"  # one bound for the whole gradient (PerLayerEngine: "per_layer")

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float,
        loss_reduction: str = "mean",
        backend: str = "auto",
        norm_method: str = "auto",
        mode: str = "fast",
    ) -> None:
        if mode not in ("fast", "low-memory"):
            raise ValueError(f"mode must be 'fast' or 'low-memory', got {mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)
                and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if norm_method not in ("auto", "ghost", "direct"):
            raise ValueError(
                f"norm_method must be 'auto', 'ghost' or 'direct', got {norm_method!r}"
            )
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.backend = backend
        self.norm_method = norm_method
        # "fast": one backward, backprops kept until step()/accumulate().  "low-memory": two
        # backward passes (dp_opt.backward(loss)): the first only accumulates norms, the second
        # folds each layer's clipped sum as soon as its backprop arrives, so no backprop is
        # kept beyond its layer (except for parameters used more than once, in pass one).
        self.mode = mode
        self.phase: str | None = None  # low-memory mode: "norms", then "sums"
        self.factors: torch.Tensor | None = None  # clip factors between the two passes
        self.loss_scale = 1.0  # realised batch size ("mean") or 1 ("sum"), per micro-batch
        self.calls: dict[str, int] = {}  # forward calls per module in this micro-batch
        self.shared: set[nn.Parameter] = set()
        self.bypass = False  # True while the generic fallback re-runs a forward per sample
        self._patched: dict[nn.Module, tuple[str, object]] = {}
        self._hooks: list = []
        self.param_names: dict[nn.Parameter, str] = {}
        self.params: list[nn.Parameter] = []
        # per micro-batch state
        self.uses: dict[nn.Parameter, list[Use]] = {}
        self._norm_sq: torch.Tensor | None = None  # read through the norm_sq property
        self._norm_parts: list[torch.Tensor] = []  # per-use contributions not yet summed
        self._norm_rows: list[torch.Tensor] = []  # [B, N] rows whose norms are not yet taken
        # grouped op -> (operands, [_Pending] rows) of the norms deferred to clip time
        self._deferred: dict[str, list[tuple[tuple, list[_Pending]]]] = {}
        self._pending_uses: list[Use] = []  # uses whose norm is deferred, given it when taken
        # [B] bound on the rounding error of norm_sq from cancellation (layers/base.py)
        self._err_terms: list = []  # (S, kappa, T, norm_sq) per use: see err_sq
        self._err_parts: list[torch.Tensor] = []  # cross-term bounds
        # Deferred bounds (fast mode): the magnitudes of all uses with ``magnitude_operands``
        # are taken at clip time in one grouped op (``magnitude_many``), rows of it in order:
        self._mag_items: list[tuple] = []  # (a | None, g) per row
        # id(use) -> (row, unit roundoff); the use is kept in self.uses until they are taken
        self._mag_rows: dict[int, tuple[int, float]] = {}
        self._mag_keys: dict[tuple, int] = {}  # (id(a) | None, id(g)) -> row
        self._err_own: list[tuple] = []  # (row, kappa u, (T + 16) u, norm_sq): stacked_bounds
        self._err_cross: list[tuple] = []  # (row, row', 2 max(kappa, kappa') u)
        self._fused_M: torch.Tensor | None = None  # those rows from linear_norms_many, if so
        self.batch_size: int | None = None
        self.first_module: str | None = None
        # The micro-batch size of the forward pass in progress, from the first captured input
        # with a batch other than 1 (reset when the model's own forward starts): a captured
        # layer whose input has batch 1 inside a B-batch forward (HF's [1, T] position ids)
        # is broadcast against the batch, and is expanded to B so its backprop is per sample.
        self.forward_batch: int | None = None
        # multiple_forwards=False: a second forward of the model (gradients on) before the
        # backward means two batches paired row by row, refused; True: the calls are views of
        # the same samples (contrastive views, R-Drop) whose gradients add per sample
        self.multiple_forwards = False
        self.root_forwards = 0  # forwards of the model since the last backward recorded
        # fold() count, and the generation of each module's last forward: a backward over a
        # forward from before the last fold would count its samples twice
        self.generation = 0
        self.forward_generation: dict[str, int] = {}
        self._grad_nodes: dict[nn.Parameter, object] = {}  # param -> its AccumulateGrad node
        # across micro-batches of one logical step
        self.acc: dict[nn.Parameter, torch.Tensor] = {}
        self.last_norms: torch.Tensor | None = None
        self.last_factors: torch.Tensor | None = None  # c_b of the last micro-batch
        self.scaled_factors: torch.Tensor | None = None  # c_b * loss_scale (clip_factors)
        self._checked_devices: set[str] = set()
        self.attached = False
        self._hooked: set[nn.Parameter] = set()  # parameters with a leak hook
        # param -> (the gradient tensor fold() wrote, its version): step() checks that every
        # gradient the wrapped optimizer sees is one of these, and fold() that nothing was
        # accumulated into them from outside the capture since
        self.written: dict[nn.Parameter, tuple[torch.Tensor, int]] = {}
        self.backward_done = False  # the pending micro-batch's backward pass has completed
        self.nonfinite_samples = 0  # samples dropped (c_b = 0) for a non-finite gradient
        self.bad_samples: torch.Tensor | None = None  # [B] bool, low-memory mode's sums pass
        # called as hook(norms, factors) with every micro-batch's clip factors, once each
        # (adaptive clipping counts the samples left unclipped by the C that clipped them)
        self.factor_hooks: list[Callable[[torch.Tensor, torch.Tensor], None]] = []

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        model = self.model
        if getattr(model, _ENGINE_ATTR, None) is not None:
            raise RuntimeError(
                "this model is already attached to a DPOptimizer; call dpkernels.detach(model) "
                "first"
            )
        owners: dict[nn.Parameter, list[str]] = {}
        plan: dict[nn.Module, tuple[str, object]] = {}
        skip: set[nn.Module] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            name = name or type(module).__name__
            if module in skip:
                continue
            refuse(module, name)
            handler = find_handler(module)
            whole = getattr(handler, "whole_module", False)
            if whole:  # e.g. nn.MultiheadAttention reads its children's weights itself
                skip.update(m for m in module.modules() if m is not module)
            params = list(
                module.parameters() if whole else module.parameters(recurse=False)
            )
            if not params:
                continue
            for p in params:
                owners.setdefault(p, []).append(name)
            plan.setdefault(module, (name, handler))
        for module, (name, handler) in plan.items():
            handler.check(module, name)
            if getattr(handler, "generic", False) and any(p.requires_grad for p in
                                                          module.parameters(recurse=False)):
                warnings.warn(
                    f"dpkernels: {name} ({type(module).__name__}) has no fused per-sample "
                    "rule; its parameters use the generic torch.func fallback (exact, slow)",
                    stacklevel=3,
                )
        for p, names in owners.items():
            self.param_names[p] = names[0]
            if len(names) > 1:
                self.shared.add(p)
        for name, p in model.named_parameters(remove_duplicate=True):
            self.param_names[p] = name
            self.params.append(p)
        for module, (name, _) in plan.items():
            self._check_not_captured(module, name)
        for module, (name, handler) in plan.items():
            self._patch(module, name, handler)
        for p in self.params:
            if p.requires_grad:
                self._hooks.append(p.register_hook(self._leak_hook(self.param_names[p])))
        self.param_index = {p: i for i, p in enumerate(self.params)}
        self._hooked = {p for p in self.params if p.requires_grad}
        self.attached = True
        self._hooks.append(model.register_forward_pre_hook(_ForwardStart(self)))
        self._hooks.append(model.register_forward_hook(_ForwardEnd(self)))
        setattr(model, _ENGINE_ATTR, self)

    def _check_not_captured(self, module: nn.Module, name: str) -> None:
        previous = module.__dict__.get("forward", None)
        if isinstance(previous, _CapturedForward) and previous.engine.attached:
            raise ValueError(
                f"dpkernels: {name} ({type(module).__name__}) is already captured by another "
                "DPOptimizer (a module shared between two attached models); its per-sample "
                "gradients would be recorded into one engine only. Give each private model "
                "its own modules, or attach only the model that contains both"
            )

    def _patch(self, module: nn.Module, name: str, handler) -> None:
        previous = module.__dict__.get("forward", None)
        module.forward = _CapturedForward(self, module, name, handler, module.forward, previous)
        self._patched[module] = (name, previous)

    def __deepcopy__(self, memo):
        # A copy of an attached model (EMA, "best model" snapshots) must not record into this
        # engine or run this model's weights: the copy comes out detached (see
        # _CapturedForward.__deepcopy__), and its engine attribute is None.
        return None

    def __reduce__(self):
        # torch.save(model) of an attached model: the engine (hooks, kept backprops) is not
        # saved; the loaded model is detached.
        return (_none, ())

    def detach(self) -> None:
        self.attached = False
        for module, (_, previous) in self._patched.items():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._grad_nodes.clear()
        self.clear_pending()
        self.acc.clear()
        if getattr(self.model, _ENGINE_ATTR, None) is self:
            delattr(self.model, _ENGINE_ATTR)

    @staticmethod
    def _leak_hook(name: str) -> Callable:
        def hook(grad):
            if grad is None:  # our Functions return no gradient for captured parameters
                return None
            raise RuntimeError(
                f"dpkernels: parameter {name!r} received a gradient outside the per-sample "
                "capture (it is used by an operation outside its own module's forward, e.g. "
                "read directly by a parent module); that gradient would not be clipped. Move "
                "the use into a module, or freeze the parameter."
            )

        return hook

    # ------------------------------------------------------------------ ops
    def op(self, name: str, *args, **kwargs):
        return dispatch.call(name, self.backend, *args, **kwargs)

    def check_device(self, device: torch.device) -> None:
        if device.type not in self._checked_devices:
            dispatch.check_backend(self.backend, device.type)
            self._checked_devices.add(device.type)

    @contextlib.contextmanager
    def bypassed(self):
        old, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = old

    # ------------------------------------------------------------------ capture
    def note_batch(self, n: int) -> int | None:
        """A captured input's batch dimension ``n``; returns the forward's micro-batch size
        (None while only batch-1 inputs have been seen)."""
        if self.forward_batch is None and n != 1:
            self.forward_batch = n
        return self.forward_batch

    def on_forward(self, name: str) -> None:
        """Called by every captured forward: refuse to mix two micro-batches' backprops."""
        if not self.attached:
            return
        self.forward_generation[name] = self.generation
        if recomputing():
            # activation checkpointing re-runs the forward inside the backward: the layers'
            # backward that will record are the original forward's, so this is no new use
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.uses and torch.is_grad_enabled():
            raise RuntimeError(
                f"dpkernels: a forward pass through {name} (with gradients enabled) started "
                "while the previous backward's per-sample gradients were not folded in; call "
                "dp_opt.accumulate() (or dp_opt.step()) after each backward, or "
                "dp_opt.zero_grad() to drop them; run evaluation forwards under torch.no_grad()"
            )

    def record(self, name: str, batch_size: int, uses: list[tuple[nn.Parameter, Use]]) -> None:
        """Called from a layer's backward: add the norms of ``uses`` and keep them (or, in the
        second pass of the low-memory mode, fold their clipped sums right away)."""
        if not uses:
            return
        if self.mode == "low-memory" and self.phase is None:
            raise RuntimeError(
                "dpkernels: mode='low-memory' needs two backward passes: call "
                "dp_opt.backward(loss) instead of loss.backward()"
            )
        for p, _ in uses:
            if p not in self.param_index:
                raise RuntimeError(
                    f"dpkernels: {name} used a parameter of shape {tuple(p.shape)} that was not "
                    "in the model when make_private attached to it (a parameter replaced or "
                    "added afterwards); its gradient would be neither clipped nor noised. Call "
                    "dpkernels.detach(model) and make_private again after changing parameters"
                )
        if self.forward_generation.get(name, self.generation) != self.generation:
            raise RuntimeError(
                f"dpkernels: a backward pass reached {name} through a forward whose per-sample "
                "gradients were already folded in by dp_opt.accumulate()/step(): its samples "
                "would count twice. For several losses of one forward, call backward on each "
                "(or on their sum) and accumulate() once after the last"
            )
        # torch.autograd.grad(loss, inputs) or backward(inputs=...) runs this layer's backward
        # without computing (some) parameters' gradients: those uses must not be recorded
        uses = [(p, u) for p, u in uses if self._will_accumulate(p)]
        if not uses:
            return
        self.root_forwards = 0
        if self.batch_size is None:
            self.batch_size, self.first_module = batch_size, name
            self.loss_scale = float(batch_size) if self.loss_reduction == "mean" else 1.0
            self.backward_done = False
            _queue_end_of_backward(self._on_backward_done)
        elif batch_size != self.batch_size:
            raise ValueError(self._batch_mismatch(name, batch_size))
        if self.phase == "sums":
            c = self.scaled_factors  # factors * loss_scale, from clip_factors
            for p, use in uses:
                if self.bad_samples is not None:
                    use.drop_samples(self.bad_samples)
                self.acc[p] = use.clipped_sum(self.op, c, self.acc.get(p), 0.0, 0, 1.0)
            return
        # pass one of the low-memory mode keeps a use only if its parameter can be used again
        reused = self.calls.get(name, 0) > 1
        # raw squared norms: the loss scale is applied once, in clip_factors
        for p, use in uses:
            earlier = self.uses.setdefault(p, [])
            # a term used once whose norm is a plain sum of squares of materialised rows (no
            # cancellation bound, no cross term to come): all of them in one op, in norm_sq;
            # rows that are themselves sums over positions (SummedTerms) keep their bound
            rows = (None if (earlier or reused or p in self.shared
                             or not self.defer_norm_rows
                             or use.bound_constants() is not None) else use.norm_rows())
            if rows is not None:
                self._norm_rows.append(rows)
            else:
                self._add_norm(p, use, earlier)
            if self.phase != "norms" or reused or p in self.shared:
                earlier.append(use)

    def _will_accumulate(self, p: nn.Parameter) -> bool:
        node = self._grad_nodes.get(p)
        if node is None:
            node = self._grad_nodes[p] = torch.autograd.graph.get_gradient_edge(p).node
        return torch._C._will_engine_execute_node(node)

    def on_model_forward(self) -> None:
        """The model's own forward is starting (its forward pre-hook)."""
        self.forward_batch = None
        if not self.attached or recomputing() or not torch.is_grad_enabled():
            return
        if self.root_forwards >= 1 and not self.multiple_forwards:
            self.root_forwards = 0
            raise RuntimeError(
                "dpkernels: the model was called twice (with gradients enabled) before a "
                "backward. If the two calls are different samples (two batches, real and fake "
                "batches of a GAN discriminator), the engine would pair row i of one with row i "
                "of the other as one sample and clip them together: run a backward (and "
                "dp_opt.accumulate()) per call, or torch.cat the inputs into one call; run "
                "evaluation forwards under torch.no_grad(). If they are views of the same "
                "samples (contrastive views, R-Drop), pass make_private(..., "
                "multiple_forwards=True)"
            )

    def on_model_forward_done(self) -> None:
        """The model's forward returned (a forward that raised does not count)."""
        if self.attached and not recomputing() and torch.is_grad_enabled():
            self.root_forwards += 1

    # PerLayerEngine needs every use's norm through add_norm (its groups' norms)
    defer_norm_rows = True

    def defers_norms(self) -> bool:
        """Whether a layer may hand its norms over to ``defer_norm``: in the fast mode's one
        backward (which keeps every use until clip time anyway), for engines that take all
        norms at clip time."""
        return self.phase is None and self.defer_norm_rows

    # Direct-form Linear uses (long sequences: T (d + p) >= d p) keep their per-sample gradients
    # W_b, no larger than the a and g they keep anyway: the norms and the clipped sum then both
    # read W_b (one pass over a and g instead of two; ops "linear_direct_many").
    instantiate_direct = True

    def instantiates(self, T: int, d: int, p: int, itemsize: int = 4) -> bool:
        """Whether a deferred Linear use of these sizes materialises ``W_b``: when its norm
        takes the direct form and the float32 ``W_b`` is no larger than the ``a`` and ``g``
        (``itemsize`` bytes each) it keeps anyway (not for a direct form forced on short
        sequences, whose W_b would be far larger)."""
        if not (self.instantiate_direct and T > 1 and d and p) or self.norm_method == "ghost":
            return False
        return 4 * d * p <= itemsize * T * (d + p)

    def defer_norm(self, op: str, operands: tuple, rows: int) -> list[_Pending]:
        """``rows`` [B] squared norms that ``op([operands, ...])`` computes, as a [rows in
        all, B] tensor, for every use deferred to it at once: taken when first needed (at
        clip time, or for a cross term of a later use of the same parameter)."""
        held = [_Pending() for _ in range(rows)]
        self._deferred.setdefault(op, []).append((operands, held))
        return held

    def _take_deferred(self, mags: list | None = None
                       ) -> list[tuple[torch.Tensor, list[_Pending]]]:
        """Run the deferred grouped ops: ([rows, B] output, its rows' holders) per op.
        ``mags`` (from ``_fused_magnitudes``): linear_norms_many also outputs these magnitude
        rows, kept in ``self._fused_M`` [len(mags), B] (the rows of ``self._mag_items``)."""
        deferred, self._deferred = self._deferred, {}
        taken = []
        for name, items in deferred.items():
            if mags and name == "linear_norms_many":
                out = self.op(name, [ops for ops, _ in items], mags)
                n = out.shape[0] - len(mags)
                block, self._fused_M = out[:n], out[n:]
            else:
                block = self.op(name, [ops for ops, _ in items])
            held = [h for _, hs in items for h in hs]
            for h, row in zip(held, block.unbind(0)):
                h.value = row
            taken.append((block, held))
        for use in self._pending_uses:
            use.norm_sq = self._value(use.norm_sq)
            if isinstance(getattr(use, "norm", None), _Pending):
                use.norm = use.norm.value
        self._pending_uses = []
        return taken

    def _fused_magnitudes(self) -> list[tuple[int, str]] | None:
        """The deferred magnitudes (``self._mag_items``, in order) as ``linear_norms_many``
        magnitude rows ``(item, "a" | "g" | "ag")``, when every one of them is of a T == 1
        Linear use deferred to it and not yet taken (the MLP case: the T == 1 kernel has the
        row norms ``||a||``, ``||g||`` in hand, so ``magnitude_many``, its table copy and its
        sum are not needed); None otherwise (``magnitude_many`` takes them)."""
        if not self._mag_items or list(self._deferred) != ["linear_norms_many"]:
            return None
        # the operands are kept alive by self._deferred and self._mag_items: ids are unique
        single: dict[int, tuple[int, str]] = {}
        pairs: dict[tuple[int, int], int] = {}
        for i, (ops, _) in enumerate(self._deferred["linear_norms_many"]):
            a, g, method = ops[0], ops[1], ops[2]
            if method == "embedding" or a is None or a.dim() != 3 or a.shape[1] != 1:
                continue
            single.setdefault(id(a), (i, "a"))
            single.setdefault(id(g), (i, "g"))
            pairs.setdefault((id(a), id(g)), i)
        mags = []
        for a, g in self._mag_items:
            if a is None:
                hit = single.get(id(g))
            else:
                i = pairs.get((id(a), id(g)))
                hit = None if i is None else (i, "ag")
            if hit is None:
                return None
            mags.append(hit)
        return mags

    def _value(self, norm):
        """``norm``, or the tensor of a deferred one (computing the deferred norms)."""
        if isinstance(norm, _Pending):
            if norm.value is None:
                self._take_deferred()
            return norm.value
        return norm

    def _add_norm(self, p: nn.Parameter, use: Use, earlier: list[Use]) -> None:
        """``use``'s squared norm and its cross terms with the ``earlier`` uses of ``p``, with
        what bounds their cancellation error, handed to ``add_norm`` (or, in the fast mode,
        deferred to ``err_sq``: one grouped pass over the magnitudes of all uses)."""
        own = use.raw_norm(self.op)
        if earlier:  # a cross term to add: needs the value now
            own = self._value(own)
        contrib = own
        use.norm_sq = own
        if isinstance(own, _Pending):
            self._pending_uses.append(use)
        # deferred only where the use is kept until clip time anyway (not in the low-memory
        # mode's norms pass), and for engines that take every bound at clip time
        defer = self.phase is None and self.defer_norm_rows
        terms = None
        cross_err = None
        mine = self._magnitude_row(use) if defer else None
        mine_uf = self._underflow_rows(use) if defer else None
        if mine is not None:
            k = use.bound_constants()
            if k is not None:
                self._err_own.append((mine[0], k[0] * mine[1], (k[1] + 16) * mine[1], own))
        else:
            terms = use.error_terms()
        if mine_uf is not None:  # underflow of a Gram form (layers/base.py): 2 eta (m Y^2 + n X^2)
            x, y, m, n, eta = mine_uf
            self._err_cross += [(y, y, 2.0 * eta * m), (x, x, 2.0 * eta * n)]
        else:
            cross_err = underflow_own(use)
        for u in earlier:
            contrib = contrib + 2.0 * cross(u, use, self.op)
            theirs = self._magnitude_row(u) if mine is not None else None
            theirs_uf = self._underflow_rows(u) if mine_uf is not None else None
            if theirs_uf is not None:
                x, y, m, n, eta = mine_uf
                x2, y2, m2, n2, eta2 = theirs_uf
                k = 4.0 * max(eta, eta2)
                self._err_cross += [(y2, y, k * max(m, m2)), (x2, x, k * max(n, n2))]
            else:
                e = underflow_cross(u, use)
                if e is not None:
                    cross_err = e if cross_err is None else cross_err + e
            if theirs is not None:
                # the larger unit roundoff of the two: never looser than cross_error's
                self._err_cross.append((theirs[0], mine[0], 2.0 * max(u.kappa(), use.kappa())
                                        * max(theirs[1], mine[1])))
                continue
            e = cross_error(u, use, self._value(u.norm_sq), self._value(own))
            if e is not None:
                cross_err = e if cross_err is None else cross_err + e
        self.add_norm(p, contrib, None if terms is None else (*terms, self._value(own)),
                      cross_err)

    def _magnitude_row(self, use: Use) -> tuple[int, float] | None:
        """(``use``'s row in the deferred magnitudes, the unit roundoff of its bound), or None
        when it has no ``magnitude_operands``."""
        known = self._mag_rows.get(id(use))
        if known is not None:
            return known
        ops = use.magnitude_operands()
        if ops is None:
            return None
        a, g = ops
        dt = torch.promote_types(g.dtype, torch.float32)
        if a is not None:
            dt = torch.promote_types(dt, a.dtype)
        known = self._mag_rows[id(use)] = (self._item_row(a, g), UNIT_ROUNDOFF.get(dt, 2.0**-24))
        return known

    def _item_row(self, a: torch.Tensor | None, g: torch.Tensor) -> int:
        """The row of ``magnitude(a, g)`` in the deferred magnitudes (one per pair of tensors:
        a Linear's ``sum_t |g_t|`` is its bias's magnitude)."""
        key = (None if a is None else id(a), id(g))
        row = self._mag_keys.get(key)
        if row is None:
            row = self._mag_keys[key] = len(self._mag_items)
            self._mag_items.append((a, g))  # keeps a and g alive, so the ids stay unique
        return row

    def _underflow_rows(self, use: Use) -> tuple | None:
        """``use.underflow_operands()`` as rows of the deferred magnitudes (or constants),
        with eta: (x, y, m, n, eta); None when it has none."""
        ops = use.underflow_operands()
        if ops is None:
            return None
        x, y, m, n = ops
        ts = [t for t in (x, y) if isinstance(t, torch.Tensor)]
        rows = [self._item_row(None, t) if isinstance(t, torch.Tensor) else float(t)
                for t in (x, y)]
        return (*rows, m, n, underflow_eta(*(t.dtype for t in ts)))

    def add_norm(self, p: nn.Parameter, contrib: torch.Tensor, terms: tuple | None,
                 cross_err: torch.Tensor | None) -> None:
        """Add one use's [B] squared-norm contribution to ``p`` (with its cross terms); its
        cancellation bound's ``terms`` (``cancellation_bounds``) and cross terms' bound."""
        self._norm_parts.append(contrib)  # summed once, by the norm_sq property
        if terms is not None:  # bounded in one stacked pass, by err_sq
            self._err_terms.append(terms)
        if cross_err is not None:
            self._err_parts.append(cross_err)

    def _on_backward_done(self) -> None:
        self.backward_done = True

    def _batch_mismatch(self, name: str, batch_size: int) -> str:
        first, b0 = self.first_module, self.batch_size
        head = f"dpkernels: in one backward pass {name} saw a batch of {batch_size} samples"
        if name == first or self.calls.get(name, 0) > 1:
            return (f"{head} and also one of {b0} ({name} was called "
                    f"{max(self.calls.get(name, 0), 2)} times): a backward must cover one batch. "
                    "Feed the samples through the model in one forward (torch.cat the batches), "
                    "or call dp_opt.accumulate() after each batch's own backward")
        msg = f"{head}, but {first} saw {b0}. "
        if min(batch_size, b0) == 1:
            small = name if batch_size == 1 else first
            return msg + (
                f"{small} got an input with a batch dimension of 1 that is broadcast against "
                "the batch afterwards (for example Hugging Face position ids of shape [1, T]); "
                "its per-sample gradients cannot be told apart. Pass that input expanded to the "
                "batch (e.g. position_ids=position_ids.expand(B, -1))")
        return msg + (
            "Either one of them does not take the batch as the first dimension of its input "
            "(batch_first=False layouts, a transposed input: use batch_first=True), or the two "
            "layers ran on different batches before one backward (use one forward per "
            "backward, and dp_opt.accumulate() between backwards)")

    def two_pass_backward(self, loss: torch.Tensor) -> None:
        """The low-memory mode's backward: norms first (graph retained), clipped sums second."""
        if self.uses:
            raise RuntimeError(
                "dpkernels: the previous backward's per-sample gradients were not folded in; "
                "call dp_opt.accumulate() or dp_opt.step() first"
            )
        calls = dict(self.calls)
        self.clear_pending()
        self.calls = calls
        self.phase = "norms"
        try:
            loss.backward(retain_graph=True)
            self.uses = {}  # kept only for cross terms; the sums pass needs none of it
            self.factors = self.clip_factors()
            if self.factors is None:  # nothing captured
                return
            self.phase = "sums"
            loss.backward()
        finally:
            self.phase = None
        self.uses = {}

    def clear_pending(self) -> None:
        self.root_forwards = 0
        self.calls = {}
        self.factors = None
        self.uses = {}
        self.norm_sq = None
        self._err_terms, self._err_parts = [], []
        self._mag_items, self._mag_rows, self._err_own, self._err_cross = [], {}, [], []
        self._mag_keys, self._fused_M = {}, None
        self.batch_size = None
        self.first_module = None
        self.bad_samples = None
        self.backward_done = False

    # ------------------------------------------------------------------ fold
    def pending_norms(self) -> torch.Tensor | None:
        """[B] norms of the backward not yet folded in, once that backward has completed."""
        if self.norm_sq is None or not self.backward_done:
            return None
        return self.norm_sq.detach().clamp_min(0).sqrt() * self.loss_scale

    @property
    def norm_sq(self) -> torch.Tensor | None:
        """[B] squared per-sample norms of the pending micro-batch.  ``record`` only appends
        each use's contribution (or, for ``Use.norm_rows``, the rows to take norms of); they
        are summed here in one pass (a few launches, not one or two per use)."""
        block = self._norm_block()
        if block is not None:
            self._norm_sq = block.sum(0)
        return self._norm_sq

    def _norm_block(self, rows: list | None = None, mags: list | None = None
                    ) -> torch.Tensor | None:
        """[U, B] contributions to ``norm_sq`` not summed yet (the current ``norm_sq`` first, if
        any), taking the deferred norms (with the magnitude rows ``mags``: ``_take_deferred``);
        None when there are none.  Clears them.  ``rows``: extended with the U tensors the
        block's rows are, in order."""
        rows = [] if rows is None else rows
        taken = self._take_deferred(mags) if self._deferred else []
        if (len(taken) == 1 and self._norm_sq is None and not self._norm_rows
                and list(map(id, taken[0][1])) == list(map(id, self._norm_parts))):
            # every contribution is a row of one grouped op's output: no stack
            self._norm_parts = []
            rows.extend(h.value for h in taken[0][1])
            return taken[0][0]
        parts = [self._value(t) for t in self._norm_parts]
        if self._norm_rows:
            parts.extend(self.op("dense_norm_many", self._norm_rows).unbind(0))
            self._norm_rows = []
        if not parts:
            return None
        if self._norm_sq is not None:
            parts.insert(0, self._norm_sq)
        dt = parts[0].dtype
        for t in parts[1:]:
            dt = torch.promote_types(dt, t.dtype)
        self._norm_parts = []
        rows.extend(parts)
        return torch.stack([t.to(dt) for t in parts])

    @norm_sq.setter
    def norm_sq(self, value: torch.Tensor | None) -> None:
        self._norm_sq, self._norm_parts, self._norm_rows = value, [], []
        self._deferred, self._pending_uses = {}, []

    def err_sq(self) -> torch.Tensor | None:
        """[B] bound on the rounding error of ``norm_sq`` from cancellation (layers/base.py)."""
        parts = list(self._err_parts)
        if self._err_terms:
            parts.append(cancellation_bounds(self._err_terms))
        if self._err_own or self._err_cross:
            M = self.op("magnitude_many", self._mag_items)  # [rows, B]
            own = [(r, k, c, self._value(n)) for r, k, c, n in self._err_own]
            parts.append(stacked_bounds(M, own, self._err_cross))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.stack([t.to(parts[-1].dtype) for t in parts]).sum(0)

    def _stage_tables(self) -> None:
        """On the Triton backend, stage the tables of the ops that follow the deferred norms
        (ops/_common.py ``stage_table``): the clip op's bounds table and the weights'
        clipped-sum scaling tables, so that they ride along the norms' table copy (one
        host-to-device copy instead of three).  Each op still checks that its own table has
        exactly the staged bytes, and uploads its own otherwise."""
        common = sys.modules.get("dpkernels.ops._common")
        if common is not None:
            common.drop_staged()
        if not self._deferred:
            return
        items = next(iter(self._deferred.values()))
        x = items[0][0][1]  # a g of the first deferred use: its device
        if not isinstance(x, torch.Tensor) or dispatch.resolve(
                "linear_norms_many", self.backend, x.device.type)[1] != "triton":
            return
        from dpkernels.ops import _common, linear
        from dpkernels.reference.clip_many import bounds_table

        if self._err_own or self._err_cross:
            _common.stage_table(bounds_table([e[:3] for e in self._err_own], self._err_cross),
                                torch.float32, x.device)
        # the weights whose clipped sums fold() groups (the first use of each parameter
        # with a group, as fold picks them)
        grouped = []
        for p in self.params:
            for u in self.uses.get(p, []):
                job = u.group()
                if job is not None:
                    if job[0] == "linear_clipped_sum_many":
                        grouped.append(job[1])
                    break
        if grouped and dispatch.resolve("linear_clipped_sum_many", self.backend,
                                        x.device.type)[1] == "triton":
            linear.stage_clipped_sum_tables(grouped)

    def clip_factors(self) -> torch.Tensor | None:
        rows: list[torch.Tensor] = []
        # the deferred magnitudes from the deferred norms' op when they are all of T == 1 uses
        mags = self._fused_magnitudes() if (self._err_own or self._err_cross) else None
        self._fused_M = None
        self._stage_tables()
        block = self._norm_block(rows, mags)
        if block is None:
            if self._norm_sq is None:
                return None
            block = self._norm_sq.unsqueeze(0)
        # The squared norms (the sum of the contributions), the bound on their rounding error
        # (err_sq's terms), norms, factors min(C / (bound + 1e-6), 1) from the bound of
        # norm_bound and the factors times the loss scale, in one op (one launch on the
        # Triton backend).  A sample whose gradient is not finite (NaN/inf loss, overflow)
        # gets c_b = 0: its contribution then has norm 0 <= C, and its rows are zeroed before
        # the clipped sums (0 * NaN would still be NaN).  One host sync per micro-batch
        # (whether there is any).
        errs = list(self._err_parts)
        if self._err_terms:
            errs.append(cancellation_bounds(self._err_terms))
        M = own = None
        if self._err_own or self._err_cross:
            M = self._fused_M  # [rows, B]: the same rows, from linear_norms_many
            if M is None:
                M = self.op("magnitude_many", self._mag_items)  # [rows, B]
        self._fused_M = None
        if self._err_own:
            norms_own = [self._value(n) for _, _, _, n in self._err_own]
            dt = M.dtype
            for n in norms_own:
                dt = torch.promote_types(dt, n.dtype)
            if block.dtype == dt and list(map(id, norms_own)) == list(map(id, rows)):
                own = block  # every use's own norm is its whole contribution: the same rows
            else:
                own = torch.stack([n.to(dt) for n in norms_own])
        norm_sq, norms, factors, self.scaled_factors, all_finite = self.op(
            "clip_from_parts", block, errs, M, own, [e[:3] for e in self._err_own],
            self._err_cross, self.loss_scale, NORM_MARGIN.get(block.dtype, 2.0**-16),
            self.max_grad_norm)
        self._norm_sq = norm_sq
        self.last_norms = norms
        if not bool(all_finite):
            # a non-finite norm or bound (the op gave those samples c_b = 0; so it does to
            # the rare sample whose factor underflows, which is dropped with them)
            bad = factors == 0
            self.bad_samples = bad
            idx = bad.nonzero().flatten().tolist()
            self.nonfinite_samples += len(idx)
            warnings.warn(
                f"dpkernels: {len(idx)} of {norms.numel()} samples had a non-finite (NaN or "
                f"inf) per-sample gradient or norm bound (indices within this micro-batch: "
                f"{idx[:10]}"
                f"{' ...' if len(idx) > 10 else ''}); they were given clip factor 0 and "
                "contribute nothing to this step (dp_opt.nonfinite_samples counts them)",
                stacklevel=4,
            )
        self.last_factors = factors
        for hook in self.factor_hooks:
            hook(norms, factors)
        return factors

    def fold(self, *, finalize: bool, noise_std: float = 0.0, scale: float = 1.0,
             seeds: Callable[[int], int] | None = None,
             reduce: Callable[[torch.Tensor], None] | None = None,
             noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the pending micro-batch into the accumulators; with ``finalize`` also add
        ``noise_std * z`` once per parameter, multiply by ``scale`` and write ``param.grad``.

        ``reduce`` (data-parallel training) sums a flat buffer of every clipped sum across
        processes in place before the noise, which is then the same on every process (same
        seeds), so it is added once to the global sum.

        ``noise`` (secure mode) replaces ``noise_std``/``seeds``: ``noise(i, acc)`` adds the
        noise of parameter ``i`` to its unscaled float32/float64 sum in place.  With
        ``reduce`` it is added before the reduction, by the one process whose ``noise`` draws
        (the others pass one that adds nothing), so the sum holds it once."""
        if finalize and reduce is not None:
            self.fold(finalize=False)
            trainable = [p for p in self.params if p.requires_grad]
            for p in trainable:
                if p not in self.acc:
                    dt = torch.float64 if p.dtype == torch.float64 else torch.float32
                    self.acc[p] = torch.zeros(p.shape, dtype=dt, device=p.device)
            if noise is not None:
                for i, p in enumerate(self.params):
                    if p in self.acc:
                        noise(i, self.acc[p])
            for dt in {self.acc[p].dtype for p in trainable}:
                group = [p for p in trainable if self.acc[p].dtype == dt]
                flat = torch.cat([self.acc[p].reshape(-1) for p in group])
                reduce(flat)
                for p, part in zip(group, flat.split([p.numel() for p in group])):
                    self.acc[p].copy_(part.view(self.acc[p].shape))
            # nothing is pending now: the finalising pass only adds noise and scales
            return self.fold(finalize=True, noise_std=0.0 if noise else noise_std, scale=scale,
                             seeds=seeds)
        self.generation += 1
        self.root_forwards = 0
        with torch.no_grad():  # gradients are leaves: no micro-batch's graph may stay alive
            self._fold(finalize, noise_std, scale, seeds, noise)

    def _fold(self, finalize, noise_std, scale, seeds, noise) -> None:
        self.scaled_factors = None
        c = self.clip_factors() if self.uses else None
        if c is not None:
            c = self.scaled_factors  # c * loss_scale, from the same op
            if self.bad_samples is not None:
                for uses in self.uses.values():
                    for u in uses:
                        u.drop_samples(self.bad_samples)
        previous: dict = {}
        if finalize:
            previous, self.written = self.written, {}
        folded: list[tuple[int, nn.Parameter, torch.Tensor | None]] = []
        groups: dict[str, list[tuple[int, tuple]]] = {}  # op -> (index in folded, operands)
        for i, p in enumerate(self.params):
            uses = self.uses.get(p, [])
            if not p.requires_grad and not uses:
                self.acc.pop(p, None)
                if finalize and p in previous and p.grad is previous[p][0]:
                    # frozen since an earlier step: its stale engine gradient must not be
                    # stepped again
                    p.grad = None
                continue
            if p.requires_grad and p not in self._hooked:  # unfrozen after attach
                self._hooks.append(p.register_hook(self._leak_hook(self.param_names[p])))
                self._hooked.add(p)
            if finalize:
                self._check_no_leak(p, previous.get(p))
            acc = self.acc.pop(p, None)
            grouped = None  # one use per parameter joins a group; others fold here
            for u in uses:
                job = u.group() if grouped is None else None
                if job is None:
                    acc = u.clipped_sum(self.op, c, acc, 0.0, 0, 1.0)
                else:
                    grouped = job
            if grouped is not None:
                groups.setdefault(grouped[0], []).append((len(folded), grouped[1]))
            folded.append((i, p, acc))
        for name, items in groups.items():
            # all clipped sums of the step that this op folds (e.g. every bias and norm-layer
            # term) in one call
            sums = self.op(name, [ops for _, ops in items], c, [folded[k][2] for k, _ in items])
            for (k, _), acc in zip(items, sums):
                folded[k] = (*folded[k][:2], acc)
        noisy: list[tuple[nn.Parameter, torch.Tensor, int]] = []  # finalize: (p, sum, seed)
        for i, p, acc in folded:
            if finalize:
                if acc is None:
                    dt = torch.float64 if p.dtype == torch.float64 else torch.float32
                    acc = torch.zeros(p.shape, dtype=dt, device=p.device)
                if noise is not None:  # secure noise on the unscaled sum, then the scale
                    acc = noise(i, acc)
                noisy.append((p, acc, seeds(i) if seeds is not None else 0))
            elif acc is not None:
                self.acc[p] = acc
        if noisy:
            # noise once per parameter and the scale, for all parameters in one grouped op
            accs = self.op("add_noise_many", [a for _, a, _ in noisy],
                           0.0 if noise is not None else noise_std,
                           [s for _, _, s in noisy], scale)
            for (p, _, _), acc in zip(noisy, accs):
                p.grad = acc.reshape(p.shape).to(p.dtype)
                self.written[p] = (p.grad, p.grad._version)
        self.clear_pending()

    def refresh_written(self) -> None:
        """After ``p.grad`` was zeroed in place by the optimizer wrapper."""
        self.written = {p: (g, g._version) for p, (g, _) in self.written.items()}

    def _check_no_leak(self, p: nn.Parameter, mine: tuple | None) -> None:
        """``p.grad`` must be empty, zero, or the gradient this engine wrote, untouched: anything
        else came from autograd outside the capture (a use the engine did not see, e.g. by a
        parameter frozen at attach and unfrozen since) and was not clipped."""
        g = p.grad
        if g is None:
            return
        if mine is not None and g is mine[0] and g._version == mine[1]:
            return
        if bool(g.ne(0).any()):
            raise RuntimeError(
                f"dpkernels: parameter {self.param_names[p]!r} received a gradient outside the "
                "per-sample capture since the last step (a use of it by an operation outside its "
                "own module's forward, or a gradient written by hand); it would not be clipped. "
                "Move the use into a module, freeze the parameter, or call dp_opt.zero_grad() "
                "before the forward if the gradient was stale"
            )


class _Pending:
    """A [B] squared norm deferred to a grouped op (``Engine.defer_norm``): ``value`` once
    taken."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


def recomputing() -> bool:
    """True inside a backward pass (where only activation checkpointing runs forwards)."""
    return torch._C._current_graph_task_id() != -1


def norm_bound(norm_sq: torch.Tensor, err_sq: torch.Tensor | None,
               loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] norms from raw squared norms, and an upper bound of the exact norms for the clip
    factors: the cancellation bound on the squared norm (layers/base.py), then the relative
    margin for the remaining (cancellation-free) rounding."""
    return ref_bounds.norm_bound(norm_sq, err_sq, loss_scale,
                                 NORM_MARGIN.get(norm_sq.dtype, 2.0**-16))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_M64 = (1 << 64) - 1


def derive_seed(base: int, step: int, index: int) -> int:
    """A 62-bit seed for (run, step, parameter): fresh every step, reproducible per run.

    splitmix64 chained over the three numbers: cheap enough to call per parameter per step."""
    h = _splitmix64(base & _M64)
    h = _splitmix64(h ^ (step & _M64))
    h = _splitmix64(h ^ (index & _M64))
    return h >> 2


def _none():
    return None


def _queue_end_of_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the autograd pass now executing has finished."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class _ForwardStart:
    """The model's forward pre-hook: a new forward pass, whose batch size is not known yet.
    A copy of the model (``copy.deepcopy``, ``torch.save``) gets one that does nothing."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __call__(self, module, args) -> None:
        if self.engine is not None:
            self.engine.on_model_forward()

    def __deepcopy__(self, memo):
        return type(self)(None)

    def __reduce__(self):
        return (type(self), (None,))


class _ForwardEnd(_ForwardStart):
    """The model's forward hook (after a forward that returned); copies get a no-op."""

    def __call__(self, module, args, output) -> None:
        if self.engine is not None:
            self.engine.on_model_forward_done()


class _CapturedForward:
    """An attached module's ``forward``: runs the handler, or the original while bypassed.

    A class rather than a closure so that a copy of the model (``copy.deepcopy``, ``torch.save``)
    gets its own plain forward back instead of one that runs this module's weights and records
    into this engine."""

    def __init__(self, engine, module, name, handler, orig, previous) -> None:
        self.engine, self.module, self.name = engine, module, name
        self.handler, self.orig, self.previous = handler, orig, previous
        self.signature: inspect.Signature | None = None

    def __call__(self, *args, **kwargs):
        if self.engine.bypass:
            return self.orig(*args, **kwargs)
        if kwargs:
            # Handlers take the module's inputs positionally (``fc(input=x)`` is ``fc(x)``);
            # a call that does not fit the signature gets the module's own error.
            if self.signature is None:
                self.signature = inspect.signature(self.orig)
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError:
                return self.orig(*args, **kwargs)
            args, kwargs = bound.args, bound.kwargs
        return self.handler.forward(self.engine, self.module, self.name, self.orig, *args,
                                    **kwargs)

    def __deepcopy__(self, memo):
        module = memo.get(id(self.module))
        if module is None:  # the forward copied on its own, without its module
            raise TypeError("dpkernels: a captured forward cannot be copied without its module")
        if self.previous is not None:
            return copy.deepcopy(self.previous, memo)
        return types.MethodType(type(module).forward, module)

    def __reduce__(self):
        return (_plain_forward, (self.module, self.previous))


def _plain_forward(module, previous):
    return previous if previous is not None else types.MethodType(type(module).forward, module)
