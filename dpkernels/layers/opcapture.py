"""Op-level capture: parameters a module uses in its own forward (DESIGN.md section 7, 2).

A module with trainable parameters of its own and no module rule (HF's ``Conv1D`` and
``*RMSNorm``, layer-scale ``gamma``, ViT's ``cls_token`` and ``pos_embed``, a LayerNorm
subclass that permutes its input) runs its forward under a ``TorchFunctionMode`` that reacts
only to calls taking one of those parameters or a tensor computed from them alone:

- a call whose tensor arguments all come from one parameter (a view, a cast, ``1 + w``,
  ``p.expand(B, -1, -1)``) runs as it is, and its result is tracked with a function that
  recomputes it from the parameter (the per-sample gradient is mapped back through it with
  ``torch.func.vjp``);
- a call that mixes a tracked tensor with data is a *use*: the rule registered for the op in
  ``op_rules.py`` runs it with the tracked tensors detached (autograd never hands the
  parameter a gradient), taps the output's backprop, and turns it into per-sample ``Use``s.

An op with no rule, or a rule that cannot recover the batch structure, raises ``Decline``:
the module then runs on the generic fallback (warned once, naming the op).  A tracked
tensor that escapes the rules (returned, stored) still carries the parameter's gradient,
which the engine's leak hook refuses: nothing reaches a parameter unclipped.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpkernels.layers import generic
from dpkernels.layers.base import DenseUse, SummedDenseUse, Use


class Decline(Exception):
    """An op on a module's own parameter that op-level capture cannot make exact."""

    def __init__(self, op, reason: str) -> None:
        super().__init__(f"{op_name(op)}: {reason}")
        self.op, self.reason = op_name(op), reason


def op_name(func) -> str:
    if isinstance(func, str):
        return func
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{name}" if owner is torch.Tensor or owner is torch._C.TensorBase else name


class Tracked:
    """A tensor computed from ``param`` alone: ``fn(param)`` (``fn`` None: the parameter).

    ``batch_const``: dim 0 is an expand from size 1 to the batch (``cls_token.expand(B, ...)``),
    so every row of it is the same function of the parameter.

    ``same_grad``: the tensor is the parameter up to casts and same-shape views (``w.float()``,
    ``w.to(dtype)``, ``w.contiguous()``), so a gradient with respect to it *is* one with
    respect to the parameter (cast back): rules may then use their fused ``Use`` for the
    parameter directly.  Anything else (``1 + w``, a transpose, weight standardisation) maps
    the per-sample gradient back through ``fn`` with ``torch.func.vjp``: exact, because ``fn``
    does not depend on the sample, but materialised.

    ``diagonal``: ``fn`` maps each element of the parameter to the same element of the result
    alone (casts, ``1 + w``, ``exp(w)``, ``w * w``: a diagonal Jacobian), so the magnitudes of
    a per-sample gradient's terms map back through it too (``use``'s ``mag``)."""

    def __init__(self, param: nn.Parameter, fn: Callable | None = None,
                 batch_const: bool = False, same_grad: bool | None = None,
                 diagonal: bool | None = None, low_ops: int = 0,
                 low_ops_bf16: bool = False) -> None:
        self.param, self.fn, self.batch_const = param, fn, batch_const
        self.same_grad = fn is None if same_grad is None else same_grad
        self.diagonal = fn is None if diagonal is None else diagonal
        # calls of fn with a 16-bit result: autograd rounds the gradient (and the derivative)
        # to 16 bits there, which the vjp in ``use`` does too; whether one is bfloat16
        self.low_ops, self.low_ops_bf16 = low_ops, low_ops_bf16

    def value(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.fn is None else self.fn(v)

    def use(self, per_sample: torch.Tensor, fast: Callable[[], Use] | None = None,
            mag: torch.Tensor | None = None, terms: int = 1) -> Use:
        """The ``Use`` of the parameter from ``per_sample`` [B, *s]: the per-sample gradients
        with respect to this tensor (``s`` its shape, with dim 0 as 1 when ``batch_const``).
        ``fast``: a ghost-norm ``Use`` valid when this is the parameter itself.  ``mag``:
        ``per_sample`` is a sum over ``terms`` positions whose magnitudes sum to ``mag``
        (``SummedTerms``: its cancellation bound), used when this is the parameter itself or
        a ``diagonal`` function of it (the rounding error e of ``per_sample`` maps back as
        J^T e with J diagonal: |J^T e| <= |J^T mag| elementwise, mag being >= 0).  Any other
        function of the parameter releases the materialised gradient mapped back: its norm
        is that of what is released, but its distance to the exact gradient is not bounded
        (DESIGN.md section 6)."""
        p = self.param
        if self.fn is None or (self.same_grad and not self.batch_const):
            # the parameter itself, or a cast or same-shape view of it: the gradient with
            # respect to it is the parameter's (no vjp, which would round it to a 16-bit cast)
            if self.fn is not None:
                per_sample = per_sample.reshape(per_sample.shape[0], *p.shape).to(
                    torch.promote_types(per_sample.dtype, torch.float32))
                if mag is not None:
                    mag = mag.reshape(per_sample.shape)
            if fast is not None:
                return fast()
            if mag is not None:
                return SummedDenseUse(per_sample, mag, terms)
            return DenseUse(per_sample)
        dt = torch.promote_types(p.dtype, torch.float32)
        if per_sample.shape[0] == 0:
            return DenseUse(torch.zeros((0, *p.shape), dtype=dt, device=p.device))
        v = p.detach().to(dt)
        fn = self.fn
        if self.batch_const:  # every row is the same function of p: differentiate row 0
            def fn(v, f=self.fn):
                return f(v)[:1]
        out, vjp_fn = torch.func.vjp(fn, v)
        back = torch.func.vmap(vjp_fn)

        def mapped(t):
            r = back(t.to(out.dtype).reshape(-1, *out.shape))[0]
            return r.to(torch.promote_types(r.dtype, torch.float32))

        psg = mapped(per_sample)
        if not self.diagonal:
            return DenseUse(psg)
        if self.low_ops:
            # the vjp rounds the gradient to 16 bits where fn has a 16-bit result, and takes
            # the derivatives there in 16 bits: an error of at most (1 + 2 low_ops) u16 |J|
            # |per_sample| per element, |per_sample| <= mag, charged as extra positions of
            # the sum form's bound (in units of float32's u)
            u16 = 2.0**-8 if self.low_ops_bf16 else 2.0**-11
            extra = math.ceil((1 + 2 * self.low_ops) * u16 / 2.0**-24)
            m = per_sample.abs() if mag is None else mag
            return SummedDenseUse(psg, mapped(m).abs(), terms + extra)
        if mag is not None and terms > 1:
            return SummedDenseUse(psg, mapped(mag).abs(), terms)
        return DenseUse(psg)


_EXPANDS = {torch.Tensor.expand, torch.broadcast_to, torch.Tensor.broadcast_to}
_LOW = (torch.bfloat16, torch.float16)
# calls whose backward is the identity on the parameter's elements (up to a cast) when the
# result keeps the parameter's shape
_SAME_GRAD = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
              torch.Tensor.bfloat16, torch.Tensor.type, torch.Tensor.contiguous,
              torch.Tensor.clone, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
              torch.Tensor.view_as, torch.Tensor.reshape_as}
# calls that keep every row along dim 0 equal when they were
# calls that map each element to the same element alone (with scalars or the parameter itself
# as the other operands: every tensor operand of a parameter-only call is tracked): a diagonal
# Jacobian when the result keeps the parameter's shape (checked where it is used)
_DIAGONAL = _SAME_GRAD - {torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
                          torch.Tensor.view_as, torch.Tensor.reshape_as} | {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.rsub,
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.exp, torch.Tensor.exp,
    torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, torch.sqrt,
    torch.Tensor.sqrt, torch.rsqrt, torch.Tensor.rsqrt, torch.square, torch.Tensor.square,
    torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.__rpow__, torch.abs,
    torch.Tensor.abs, F.softplus, F.relu, torch.relu, torch.clamp, torch.Tensor.clamp}
_ROWWISE = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
            torch.Tensor.bfloat16, torch.Tensor.type, torch.Tensor.contiguous, torch.Tensor.clone}


class CaptureMode(TorchFunctionMode):
    """Active inside one module's forward: tracks tensors computed from its own parameters
    and sends every call mixing them with data to the op's rule."""

    def __init__(self, engine, name: str, params: dict[nn.Parameter, str], kind: str) -> None:
        super().__init__()
        self.engine, self.name, self.param_names, self.kind = engine, name, params, kind
        # id -> (tensor, Tracked, its version counter when tracked); the tensor is kept so that
        # an id is never reused meanwhile
        self.tracked: dict[int, tuple[torch.Tensor, Tracked, int]] = {
            id(p): (p, Tracked(p), p._version) for p in params}
        self.used: set[nn.Parameter] = set()

    def lookup(self, t, func=None) -> Tracked | None:
        e = self.tracked.get(id(t))
        if e is None or e[0] is not t:
            return None
        if t._version != e[2]:
            # changed in place since it was tracked (w = p.clone(); w[0] = 0, F.relu(w,
            # inplace=True), out=w): its value is no longer fn(param), so neither the gradient
            # mapped back through fn nor the fused Use of a same_grad tensor is the parameter's
            raise Decline(func, "a tensor computed from the parameter "
                          f"{self.param_names[e[1].param]!r} was modified in place")
        return e[1]

    def track(self, t: torch.Tensor, tr: Tracked) -> None:
        self.tracked[id(t)] = (t, tr, t._version)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        hits = []
        data = False
        for i, a in enumerate(flat):
            if isinstance(a, torch.Tensor):
                tr = self.lookup(a, func)
                if tr is None:
                    data = True
                else:
                    hits.append((i, tr))
        if not hits:
            return func(*args, **kwargs)
        if func in _SHAPE_ONLY and len(hits) == 1 and hits[0][0] == 0:
            # p.expand_as(x), p.type_as(x): x gives a shape or a dtype, not data
            func, flat, spec = _SHAPE_ONLY[func](flat)
            data = False
        if not data:
            return self._param_only(func, flat, spec, hits)
        from dpkernels.layers.op_rules import RULES

        rule = RULES.get(func)
        if rule is None:
            raise Decline(func, "no op rule for it")
        if kwargs.get("out") is not None:
            raise Decline(func, "out= writes into a tensor the capture does not see")
        return self._use(rule, func, flat, spec, hits)

    def _use(self, rule, func, flat, spec, hits):
        for _, tr in hits:
            if tr.param in self.used:
                # a second use inside one forward: the engine must keep both for the cross
                # term, also in the first pass of the low-memory mode
                self.engine.shared.add(tr.param)
            self.used.add(tr.param)
        return rule(OpCall(self, func, flat, spec, hits))

    def _param_only(self, func, flat, spec, hits):
        params = {id(tr.param): tr.param for _, tr in hits}
        if len(params) > 1:
            raise Decline(func, "it combines two parameters without data")
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
            raise Decline(func, "it modifies a parameter in place")
        a, k = tree_unflatten(flat, spec)
        if _random(func, a, k):
            raise ValueError(
                f"dpkernels: {self.name} ({self.kind}) applies {op_name(func)} (random) to its "
                f"parameter "
                f"{self.param_names[hits[0][1].param]!r}; its per-sample gradients would need "
                "the same random draw again, which cannot be replayed; apply the randomness to "
                "the data instead, or turn it off in training"
            )
        out = func(*a, **k)
        param = hits[0][1].param
        if not torch.is_grad_enabled() or (isinstance(out, torch.Tensor)
                                           and not out.requires_grad):
            # under no_grad, detach(), .data, an integer result: a constant to autograd, so
            # no gradient flows back through it (tracked, it would be differentiated anyway)
            return out

        def fn(v):
            vals = list(flat)
            for i, tr in hits:
                vals[i] = tr.value(v)
            a, k = tree_unflatten(vals, spec)
            return func(*a, **k)

        if any(out is flat[i] for i, _ in hits):  # a no-op (x.to(its own dtype)): as it was
            return out
        if isinstance(out, torch.Tensor):
            src = flat[hits[0][0]]
            if func in _EXPANDS:
                const = out.dim() >= 1 and (src.dim() < out.dim() or src.shape[0] == 1)
            else:
                const = func in _ROWWISE and hits[0][1].batch_const
            # (not w.view(dtype): that reinterprets the bits)
            same = (func in _SAME_GRAD and all(tr.same_grad for _, tr in hits)
                    and out.shape == param.shape and out.is_floating_point()
                    and not (func is torch.Tensor.view
                             and any(isinstance(v, torch.dtype) for v in flat)))
            diag = (func in _DIAGONAL and all(tr.diagonal for _, tr in hits)
                    and out.shape == param.shape and out.is_floating_point()
                    and not (func is torch.Tensor.view
                             and any(isinstance(v, torch.dtype) for v in flat)))
            low = sum(tr.low_ops for _, tr in hits) + (out.dtype in _LOW)
            bf16 = out.dtype == torch.bfloat16 or any(tr.low_ops_bf16 for _, tr in hits)
            self.track(out, Tracked(param, fn, const and out.shape[0] != 1, same, diag, low,
                                    bf16))
        elif isinstance(out, (tuple, list)):  # split, chunk, unbind
            for j, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.track(o, Tracked(param, lambda v, j=j: fn(v)[j]))
        return out


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod",
                                             "pow", "matmul", "and", "or", "xor", "lshift",
                                             "rshift")}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout, torch.dropout}
_RANDOM = {torch.bernoulli, torch.Tensor.bernoulli, torch.rand_like, torch.randn_like,
           torch.randint_like, torch.normal, torch.poisson, torch.multinomial}


def _random(func, a, k) -> bool:
    """A random draw on a parameter (dropout only with p > 0 in training)."""
    if func in _DROPOUTS:
        p = a[1] if len(a) > 1 else k.get("p", 0.5)
        train = a[2] if len(a) > 2 else k.get("training", k.get("train", True))
        return bool(p) and bool(train)
    return func in _RANDOM


def _expand_as(flat):
    t, other = flat[0], flat[1]
    return torch.Tensor.expand, [t, *other.shape], tree_flatten(((t, *other.shape), {}))[1]


def _type_as(flat):
    t, other = flat[0], flat[1]
    return torch.Tensor.to, [t, other.dtype], tree_flatten(((t, other.dtype), {}))[1]


_SHAPE_ONLY = {torch.Tensor.expand_as: _expand_as, torch.Tensor.type_as: _type_as}


class OpCall:
    """One call that uses tracked tensors; what its rule needs."""

    def __init__(self, mode: CaptureMode, func, flat, spec, hits) -> None:
        self.mode, self.func, self.flat, self.spec, self.hits = mode, func, flat, spec, hits
        self.engine, self.name = mode.engine, mode.name

    def arguments(self):
        """(args, kwargs) with the tracked tensors detached."""
        vals = list(self.flat)
        for i, _ in self.hits:
            vals[i] = vals[i].detach()
        return tree_unflatten(vals, self.spec)

    def run(self):
        a, k = self.arguments()
        return self.func(*a, **k)

    def batch(self, n: int) -> int:
        """Check ``n`` (the batch dim the rule reads) against the forward's batch size."""
        known = self.engine.forward_batch
        if known is not None and n != known:
            raise Decline(self.func, f"its data has {n} rows along dim 0 but the batch is "
                          f"{known}")
        return n

    def tap(self, out: torch.Tensor, record: Callable, *saved: torch.Tensor) -> torch.Tensor:
        """``out``, whose backprop ``g`` calls ``record(g, *saved)`` (saved for backward, so
        activation checkpointing frees and recomputes them)."""
        params = [tr.param for _, tr in self.hits]
        return _Tap.apply(out, record, len(saved), *saved, *params)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, record, n_saved, *rest):
        ctx.save_for_backward(*rest[:n_saved])
        ctx.record, ctx.n = record, len(rest)
        # a copy, not a view: autograd forbids in-place changes of a custom Function's view
        # outputs, and models do modify op outputs in place (h = x * w; h += r)
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.record(g, *ctx.saved_tensors)
        return (g, None, None, *([None] * ctx.n))


class OpCaptureHandler:
    """Module handler: the module's own forward under ``CaptureMode``."""

    types: tuple = ()

    def __init__(self) -> None:
        # modules sent to the generic fallback, with the reason (found at their first forward)
        self.declined: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # module -> input signatures whose batching was verified (see _verify)
        self.verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, module: nn.Module, name: str) -> None:
        pass

    def forward(self, engine, module: nn.Module, name: str, orig, *args, **kwargs):
        own = {p: n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        if module not in self.declined:
            first = next((a for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor)), None)
            if first is not None and first.dim() >= 1:
                engine.check_device(first.device)
                engine.note_batch(first.shape[0])
            engine.on_forward(name)
            try:
                with CaptureMode(engine, name, own, type(module).__name__):
                    out = orig(*args, **kwargs)
                self._verify(engine, module, name, orig, own, args, kwargs, out)
                return out
            except Decline as e:
                self.declined[module] = e
                if name in engine.calls:  # the generic fallback counts this forward itself
                    engine.calls[name] -= 1
                warnings.warn(
                    f"dpkernels: {name} ({type(module).__name__}) has no fused per-sample rule "
                    f"for {e.op} on its own parameters ({e.reason}); its parameters use the "
                    "generic torch.func fallback (exact, slow)",
                    stacklevel=3,
                )
        return generic.HANDLER.forward(engine, module, name, orig, *args, **kwargs)


    def _verify(self, engine, module, name, orig, own, args, kwargs, out) -> None:
        """The op rules give row r of an op's output to sample r.  That holds when the module
        treats dim 0 of every input of the batch's size as the batch: re-run it per sample
        with exactly those inputs sliced and compare with the real output (once per module and
        input signature, the batch size left out so Poisson batches do not re-verify; in eval
        mode, against an eval-mode run of the whole batch).  A
        module that reads a batch-sized tensor as shared data (a [T, d] table with T == B)
        fails this and goes to the generic fallback, which finds its real batching.  Then, in
        the module's own mode, ``_check_rows_independent``: no row of the output or of an op's
        data operand may depend on another sample (mixing in training, internal permutations).
        Neither check leaves a trace: buffers and the RNG state are put back."""
        flat, spec = tree_flatten((args, kwargs))
        B = engine.forward_batch
        tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0]
        if B is None:
            B = tensors[0].shape[0] if tensors else None
        if not B or B == 1:  # empty batch, or one sample: any assignment is right
            return
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B
                   for t in flat]
        key = tuple((tuple(t.shape[1:]) if b else tuple(t.shape))
                    if isinstance(t, torch.Tensor) else None for t, b in zip(flat, batched))
        done = self.verified.setdefault(module, set())
        if key in done:
            return
        leaves, _ = tree_flatten(out)
        live = [i for i, t in enumerate(leaves)
                if isinstance(t, torch.Tensor) and t.is_floating_point()]
        params = {n: p.detach() for p, n in own.items()}
        flat_d = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
        run = generic._Runner(engine, module, orig, params, flat_d, spec, live)
        # the checks' forwards must leave no trace: buffers a forward updates are put back
        # (in place, or rebound to a new tensor), and attributes it sets (self.last_attn = a)
        buffers = [(m, n, b, None if b is None else b.detach().clone())
                   for m in module.modules() for n, b in m._buffers.items()]
        attrs = [(m, dict(m.__dict__)) for m in module.modules()]
        try:
            self._check(engine, module, name, orig, own, run, flat_d, spec, batched, live, B)
        finally:
            for m, d in attrs:
                m.__dict__.clear()
                m.__dict__.update(d)
            with torch.no_grad():
                for m, n, b, v in buffers:
                    m._buffers[n] = b
                    if b is not None:
                        b.copy_(v)
        done.add(key)

    @staticmethod
    def _check(engine, module, name, orig, own, run, flat_d, spec, batched, live, B) -> None:
        params = run.params
        try:
            # plain forwards (no vjp: it would trip activation checkpointing's saved-tensor
            # hooks; under no_grad nothing is saved), in eval mode so that dropout and
            # drop-path draw nothing: the whole batch once, then each sample, compared
            modes = [(m, m.training) for m in module.modules()]
            module.eval()
            try:
                with torch.no_grad():
                    full = run.run(params, [False] * len(flat_d), [])
                    outs = run.per_sample(lambda vals: run.run(params, batched, vals), batched)
            finally:
                for m, mode in modes:
                    m.training = mode
            ok = all(generic._match(o, f, B) == 0 for o, f in zip(outs, full))
        except Exception as e:  # a wrong assignment may fail inside the module
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "its output rows are not its samples"
        if not ok:
            raise Decline("batching", "re-running it per sample, with every input of "
                          f"{B} rows taken as batched, does not reproduce its output ({why})")
        _check_rows_independent(engine, module, name, orig, own, flat_d, spec, batched, live,
                                B)


class _OperandProbe(CaptureMode):
    """``CaptureMode`` that runs no rule: each use's op runs as it is and its data operands
    are kept, for ``_check_rows_independent``."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.operands: list[tuple[str, torch.Tensor]] = []

    def _use(self, rule, func, flat, spec, hits):
        mine = {i for i, _ in hits}
        self.operands += [(op_name(func), t) for i, t in enumerate(flat)
                          if i not in mine and isinstance(t, torch.Tensor)]
        vals = [t.detach() if i in mine else t for i, t in enumerate(flat)]
        a, k = tree_unflatten(vals, spec)
        return func(*a, **k)


def _check_rows_independent(engine, module, name, orig, own, flat, spec, batched, live, B):
    """The per-sample re-run in ``_verify`` shows that the module's *output* rows are its
    samples, in eval mode.  Two things it cannot see: a module that mixes its batch only in
    training (batch statistics, a roll or a shuffle of the rows), and a module that permutes
    its rows internally and puts them back before it returns (sorting by length, routing), so
    that row r of an op on its parameter belongs to another sample than r while the output
    looks right.  The op rules give row r of each use's data operand, and of the output, to
    sample r; so this runs the module as it trains (dropout draws replayed from one RNG
    state, buffers restored after), perturbs the rows of the batched inputs whose bit k is
    set (k = 0..ceil(log2 B) - 1: any two rows differ in one bit), and requires every other
    row of the output and of each use's operand (a block of rows per sample when it has
    B*m rows) to stay as it was, and an operand not batch-sized not to change at all.
    Once per input signature, like the per-sample check: a module whose mixing starts later
    (a step counter) or depends on data beyond the perturbation is not seen."""
    devices = {t.device for t in flat if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
    cpu_rng = torch.get_rng_state()
    dev_rng = {d: torch.get_device_module(d.type).get_rng_state(d) for d in devices}
    gen = torch.Generator().manual_seed(0)

    def run(vals):
        torch.set_rng_state(cpu_rng)
        for d, st in dev_rng.items():
            torch.get_device_module(d.type).set_rng_state(st, d)
        probe = _OperandProbe(engine, name, own, type(module).__name__)
        a, k = tree_unflatten(vals, spec)
        with torch.no_grad(), engine.bypassed(), probe:
            out = orig(*a, **k)
        leaves, _ = tree_flatten(out)
        return [("output", leaves[i]) for i in live] + probe.operands

    def perturbed(rows):
        vals = []
        for t, b in zip(flat, batched):
            if b and t.is_floating_point():
                scale = t.detach().float().square().mean().sqrt().item() if t.numel() else 0
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                t = torch.where(rows.view(-1, *[1] * (t.dim() - 1)).to(t.device),
                                t + (4 * (scale or 1.0) * noise).to(t.device, t.dtype), t)
            elif b:  # ids, masks: another sample's row
                nxt = t.roll(-1, 0)
                t = torch.where(rows.view(-1, *[1] * (t.dim() - 1)).to(t.device), nxt, t)
            vals.append(t)
        return vals

    try:
        base = run(list(flat))
        for bit in range(max(1, (B - 1).bit_length())):
            _probe_bit(run, perturbed, base, bit, B, module)
    except Decline:
        raise
    except Exception as e:  # perturbed inputs the module rejects: let the fallback decide
        raise Decline("batching", f"the row check could not run it ({type(e).__name__}: {e})"
                      ) from e
    finally:
        torch.set_rng_state(cpu_rng)
        for d, st in dev_rng.items():
            torch.get_device_module(d.type).set_rng_state(st, d)


def _probe_bit(run, perturbed, base, bit: int, B: int, module: nn.Module) -> None:
    """One run of ``_check_rows_independent`` with the rows whose ``bit`` is set perturbed."""
    rows = (torch.arange(B) >> bit) & 1 == 1
    got = run(perturbed(rows))
    if len(got) != len(base) or any(g.shape != r.shape for (_, g), (_, r) in zip(got, base)):
        raise Decline("batching", "changing some samples changes which ops it runs")
    for (what, g), (_, r) in zip(got, base):
        if r.dim() >= 1 and r.shape[0] and r.shape[0] % B == 0:  # B rows, or B blocks of rows
            keep = ~rows.to(r.device)
            same = generic._close(g.reshape(B, -1)[keep], r.reshape(B, -1)[keep])
        else:  # not batched: must not depend on any sample
            same = generic._close(g, r)
        if not same:
            where = "its output" if what == "output" else f"the data operand of {what}"
            mode = "training" if module.training else "eval"
            raise Decline("batching", f"changing some samples changes the rows of other samples "
                          f"in {where} (in {mode} mode): it mixes or permutes its batch")


HANDLER = OpCaptureHandler()
