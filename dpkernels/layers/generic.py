"""The fallback for any module with trainable parameters and no fused rule.

Forward runs the module with its own parameters behind a gradient block (so autograd never
hands them an un-clipped gradient) and hooks every differentiable tensor in its output
(tuples, dicts, nested).  When their gradients arrive, the module is re-run per sample with
``torch.func`` (``vmap`` of a ``vjp``; a loop over samples where vmap cannot run the module,
e.g. a float64 LSTM) with respect to its own parameters: exact per-sample gradients,
materialised, so correct but slow.

Soundness, because a wrong guess here would be a silently wrong gradient:

- which inputs are batched is never guessed from shapes alone: the candidates (tensors whose
  first dimension is the batch size) are checked by re-running the module per sample at
  forward and comparing with its real output; the first assignment that reproduces every
  differentiable output is used, and if none does the module is refused;
- each output's batch dimension is found the same way (an LSTM's ``h_n`` has it second);
- a forward that draws random numbers (dropout, drop-path) is refused, naming the module,
  because the per-sample re-run cannot replay the same draws.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpkernels.layers.base import DenseUse

# How close the per-sample re-run must come to the module's real output (max abs difference
# over max abs value).  The re-run differs only in kernel choice and summation order, so the
# honest gap is rounding: tens of ulps, up to TF32's 2^-11 on a GPU in float32.  A wrong
# batching guess changes outputs by O(1) of their scale.
_REPRODUCE_RTOL = {torch.float64: 1e-10, torch.float32: 2.0**-8, torch.bfloat16: 2.0**-4,
                   torch.float16: 2.0**-6}

# Assignments of batched / shared inputs tried at most (subsets of the ambiguous inputs).
_MAX_TRIALS = 32

# Output leaves that cannot hide a tensor.
_LEAF_TYPES = (torch.Tensor, int, float, bool, str, bytes, complex, type(None), torch.dtype,
               torch.device, enum.Enum)


class GenericHandler:
    types: tuple = ()
    generic = True

    def __init__(self, whole_module: bool = False) -> None:
        # whole_module: the module's children's parameters are its own too (nn.MultiheadAttention
        # reads out_proj.weight directly instead of calling out_proj).
        self.whole_module = whole_module

    def check(self, module: nn.Module, name: str) -> None:
        pass

    def own_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        it = module.named_parameters() if self.whole_module else module.named_parameters(
            recurse=False)
        return {n: p for n, p in it if p.requires_grad}

    def forward(self, engine, module: nn.Module, name: str, orig, *args, **kwargs):
        own = self.own_params(module)
        if not own or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        kind = type(module).__name__
        if module.training and _random_dropout(module):
            # the per-sample re-run would draw other dropout masks than this forward did, and
            # the per-sample gradients would be silently wrong
            raise ValueError(
                f"dpkernels: {name} ({kind}) uses the generic per-sample "
                "fallback, which re-runs its forward per sample, and it applies dropout, whose "
                "masks cannot be replayed; set its dropout to 0 (for attention, build it from "
                "nn.Linear and F.scaled_dot_product_attention, which are captured exactly)"
            )
        flat, spec = tree_flatten((args, kwargs))
        if any(isinstance(t, nn.utils.rnn.PackedSequence) for t in (*args, *kwargs.values())):
            raise TypeError(
                f"dpkernels: {name} ({kind}) got a PackedSequence; the generic per-sample "
                "fallback needs padded batch-first tensors (pad the sequences, e.g. with "
                "nn.utils.rnn.pad_sequence(..., batch_first=True))"
            )
        engine.on_forward(name)
        blocked = {n: _BlockGrad.apply(p) for n, p in own.items()}
        watch = _RandomOps()
        with engine.bypassed() if self.whole_module else contextlib.nullcontext(), watch:
            out = _call_with(module, orig, blocked, args, kwargs)
        if watch.op is not None:
            raise ValueError(
                f"dpkernels: {name} ({kind}) uses the generic per-sample fallback, which "
                f"re-runs its forward per sample, and its forward draws random numbers "
                f"({watch.op}: dropout, drop-path, noise) that the re-run cannot replay; make "
                "it deterministic in training (p=0 / drop_path_rate=0) or freeze its parameters"
            )
        leaves, out_spec = tree_flatten(out)
        odd = sorted({type(t).__name__ for t in leaves if not isinstance(t, _LEAF_TYPES)})
        if odd:
            # Tensors hidden in an object that pytree cannot open would get no per-sample
            # gradient: refuse rather than drop their contribution.
            raise TypeError(
                f"dpkernels: {name} ({kind}) uses the generic per-sample fallback and returned "
                f"{', '.join(odd)}, which it cannot look into; return tensors (in tuples, "
                "lists or dicts), or freeze its parameters"
            )
        live, where = _distinct_live(leaves)
        if not live:
            return out
        flat = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
        params = {n: p.detach() for n, p in own.items()}
        autocast = _autocast_state(flat)
        run = _Runner(engine, module, orig, params, flat, spec, live)
        plan = run.find_batching([leaves[i].detach() for i in live], name, kind)

        def hook(grads):
            if plan is None:  # empty batch
                engine.record(name, 0, [(p, DenseUse(p.new_zeros((0, *p.shape))))
                                        for p in own.values()])
                return
            with autocast:
                psg = run.per_sample_grads(plan, grads)
            engine.record(name, plan.B, [(own[n], DenseUse(psg[n])) for n in own])

        modified = (
            f"dpkernels: an output of {name} ({kind}) that is a view of another of its outputs "
            "was modified in place; the generic fallback returns its outputs as separate "
            "copies, so the other one did not change. Modify a copy (out = out * 2) instead"
        )
        captured = _Capture.apply(hook, modified, _shares_memory([leaves[i] for i in live]),
                                  *(leaves[i] for i in live))
        for i, j in where:
            leaves[i] = captured[j]
        return tree_unflatten(leaves, out_spec)


def _distinct_live(leaves) -> tuple[list[int], list[tuple[int, int]]]:
    """(indices of the distinct differentiable tensors among ``leaves``, (leaf index, entry)
    for every differentiable leaf): a tensor returned twice is one output, captured once,
    and stays one tensor for the caller."""
    live, where = [], []
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            j = next((k for k, u in enumerate(live) if leaves[u] is t), None)
            if j is None:
                live.append(i)
                j = len(live) - 1
            where.append((i, j))
    return live, where


def _shares_memory(tensors) -> tuple[bool, ...]:
    """Per tensor: does another one of ``tensors`` use the same storage (views of it)?"""
    ptrs = [t.untyped_storage().data_ptr() if t.numel() else -k - 1
            for k, t in enumerate(tensors)]
    return tuple(ptrs.count(p) > 1 for p in ptrs)


class _Capture(torch.autograd.Function):
    """Identity on the module's differentiable outputs whose backward hands ``hook`` their
    gradients, all at once (zeros for unused ones).  The gradients are those of the returned
    tensors only: a hook on the outputs themselves would also see what flows into one output
    from another derived from it inside the module (``return y, y[:, 0]``) and count it twice.
    Copies, so that the caller may modify them in place (outputs that are views of one
    another become separate copies; ``hook`` refuses if one of those is modified in place)."""

    @staticmethod
    def forward(ctx, hook, modified, aliased, *outs):
        ctx.hook, ctx.modified = hook, modified
        copies = tuple(o.clone() for o in outs)
        # saved only so that autograd's version check sees in-place changes to them
        ctx.save_for_backward(*(c for c, a in zip(copies, aliased) if a))
        return copies

    @staticmethod
    def backward(ctx, *grads):
        try:
            _ = ctx.saved_tensors  # raises if one was modified in place
        except RuntimeError as e:
            raise RuntimeError(ctx.modified) from e
        ctx.hook(grads)
        return (None, None, None, *grads)


class _Plan:
    """Which flat inputs are batched (dim 0), and where each live output has its batch."""

    def __init__(self, B: int, batched: list[bool], out_dims: list[int]) -> None:
        self.B, self.batched, self.out_dims = B, batched, out_dims


class _Runner:
    """Re-runs one captured call of a module per sample with given parameters."""

    def __init__(self, engine, module, orig, params, flat, spec, live) -> None:
        self.engine, self.module, self.orig = engine, module, orig
        self.params, self.flat, self.spec, self.live = params, flat, spec, live

    def run(self, P, batched, vals):
        """The live outputs of the module on one sample (a batch of one), parameters ``P``."""
        it = iter(vals)
        full = [next(it).unsqueeze(0) if b else t for t, b in zip(self.flat, batched)]
        a, k = tree_unflatten(full, self.spec)
        with self.engine.bypassed():
            out = _call_with(self.module, self.orig, P, a, k)
        leaves, _ = tree_flatten(out)
        if len(leaves) <= max(self.live) or not all(
                isinstance(leaves[i], torch.Tensor) for i in self.live):
            raise _Mismatch("the per-sample output has another structure")
        return tuple(leaves[i] for i in self.live)

    def primal(self, batched, vals):
        """``run`` through the same ``vjp`` as the per-sample gradients, so that both take
        the same code path (under no_grad some modules take a fast path vmap cannot run)."""
        out, _ = torch.func.vjp(lambda P: self.run(P, batched, vals), self.params)
        return tuple(o.detach() for o in out)

    def per_sample(self, fn, batched, extra=()):
        """Stack ``fn(vals_b, *extra_b)`` over samples: vmap, or a loop where vmap fails."""
        vals = [t for t, b in zip(self.flat, batched) if b]
        try:
            return torch.func.vmap(fn)(vals, *extra)
        except _Mismatch:
            raise
        except Exception:
            # vmap lacks batching rules for some modules (float64 LSTM, in-place ops on
            # unbatched state, data-dependent control flow): the loop is exact, only slower.
            pass
        B = vals[0].shape[0]
        rows = [fn([v[b] for v in vals], *(e[b] for e in extra)) for b in range(B)]
        return _stack(rows)

    def find_batching(self, real: list[torch.Tensor], name: str, kind: str) -> _Plan | None:
        firsts = [t for t in self.flat if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not firsts:
            raise ValueError(
                f"dpkernels: {name} ({kind}) uses the generic per-sample fallback and got no "
                "tensor input with a batch dimension; pass the batch as an argument, or "
                "freeze its parameters"
            )
        if firsts[0].shape[0] == 0:
            return None
        # Batch sizes to try: each first dimension among the inputs, in order, 1 last (with
        # a batch of one every assignment reproduces the output, so it proves the least).
        sizes = sorted(dict.fromkeys(t.shape[0] for t in firsts if t.shape[0] > 0),
                       key=lambda n: n == 1)

        def trials():
            for B in sizes:
                cands = [i for i, t in enumerate(self.flat)
                         if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B]
                for k in range(len(cands), 0, -1):
                    for c in itertools.combinations(cands, k):
                        yield B, set(c)

        last = None
        for B, chosen in itertools.islice(trials(), _MAX_TRIALS):
            batched = [i in chosen for i in range(len(self.flat))]
            try:
                with torch.enable_grad():
                    outs = self.per_sample(functools.partial(self.primal, batched), batched)
                dims = [_match(o, r, B) for o, r in zip(outs, real)]
            except Exception as e:  # a wrong assignment may fail inside the module
                last = e
                continue
            if all(d is not None for d in dims):
                return _Plan(B, batched, dims)
        why = f" (last error: {type(last).__name__}: {last})" if last is not None else ""
        raise ValueError(
            f"dpkernels: {name} ({kind}) uses the generic per-sample fallback, but re-running "
            "it on each sample alone does not reproduce its output, whichever of its inputs "
            f"are taken as batched (first dimensions {sizes}): it mixes samples, its batch is "
            "not the first dimension of its inputs (use batch_first=True), or its output has "
            f"no batch dimension{why}. Give it a fused rule, restructure it, or freeze its "
            "parameters"
        )

    def per_sample_grads(self, plan: _Plan, grads) -> dict[str, torch.Tensor]:
        cots = []
        for g, d in zip(grads, plan.out_dims):
            cots.append(g.detach().movedim(d, 0))

        def one(vals, *cot):
            _, vjp_fn = torch.func.vjp(lambda P: self.run(P, plan.batched, vals), self.params)
            return vjp_fn(tuple(c.unsqueeze(d) for c, d in zip(cot, plan.out_dims)))[0]

        with torch.enable_grad():
            return self.per_sample(one, plan.batched, cots)


def _match(per_sample: torch.Tensor, real: torch.Tensor, B: int) -> int | None:
    """The dim of ``real`` that holds the batch, if the stacked per-sample outputs
    ``per_sample`` [B, *shape with a 1 at that dim] reproduce it; else None."""
    s, S = tuple(per_sample.shape[1:]), tuple(real.shape)
    for d in range(len(S)):
        if s[d:d + 1] == (1,) and S[d] == B and s[:d] + s[d + 1:] == S[:d] + S[d + 1:]:
            if _close(per_sample.squeeze(d + 1), real.movedim(d, 0)):
                return d
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype:
        # under autocast, torch.func.vmap runs the per-sample re-run without autocast's casts
        # (float32 where the real output is bfloat16): compared in float32, to the
        # tolerance of the less precise dtype
        if not (a.is_floating_point() and b.is_floating_point()):
            return False
        tol = max(_REPRODUCE_RTOL.get(a.dtype, 2.0**-8), _REPRODUCE_RTOL.get(b.dtype, 2.0**-8))
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return _close_at(a.to(dt), b.to(dt), tol)
    if not b.is_floating_point():
        return torch.equal(a, b)
    return _close_at(a, b, _REPRODUCE_RTOL.get(b.dtype, 2.0**-8))


def _close_at(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Every element of ``a`` within ``rtol`` times ``b``'s largest finite magnitude (NaN
    where ``b`` has NaN)."""
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, 0, (a - b).abs())
    if diff.isnan().any():
        return False
    scale = torch.where(b.isfinite(), b.abs(), 0).max() if b.numel() else 0
    return bool(diff.max() <= rtol * scale) if b.numel() else True


def _stack(rows):
    """Stack a list of (tuples or dicts of) tensors along a new first dim."""
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return tuple(torch.stack(col) for col in zip(*rows))


class _Mismatch(Exception):
    pass


def _autocast_state(flat):
    """A context that re-enters the forward's autocast (backward hooks run without it)."""
    dev = next((t.device.type for t in flat if isinstance(t, torch.Tensor)), "cpu")
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, dtype=torch.get_autocast_dtype(dev))
    return contextlib.nullcontext()


class _RandomOps(TorchDispatchMode):
    """Notes the first random-number op (tagged ``nondeterministic_seeded``) it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.op is None and _draws(func, args, kwargs):
            self.op = str(func.overloadpacket.__name__)
        return func(*args, **kwargs)


def _draws(func, args, kwargs) -> bool:
    """Does this call draw random numbers?  Attention kernels are tagged as seeded because
    they take a ``dropout_p``; they draw only when it is not 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            p = kwargs.get(a.name, args[i] if i < len(args) else a.default_value)
            return p is not None and p != 0
    return True


def _random_dropout(module: nn.Module) -> bool:
    """Dropout with p > 0 inside ``module`` (nn.Dropout* children, or MultiheadAttention's own)."""
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


class _BlockGrad(torch.autograd.Function):
    """Identity that passes no gradient back: the output still requires grad (so the module
    output gets a hook even when its input does not), the parameter never gets one."""

    @staticmethod
    def forward(ctx, p):
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        return None


def _call_with(module, orig, params, args, kwargs):
    """Run ``orig`` (the module's own forward) with ``params`` in place of its parameters."""
    saved = {}
    try:
        for n, t in params.items():
            owner, leaf = _owner(module, n)
            saved[n] = owner._parameters[leaf]
            owner._parameters[leaf] = t
        return orig(*args, **kwargs)
    finally:
        for n, t in saved.items():
            owner, leaf = _owner(module, n)
            owner._parameters[leaf] = t


def _owner(module: nn.Module, name: str):
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


HANDLER = GenericHandler()
WHOLE_MODULE = GenericHandler(whole_module=True)
