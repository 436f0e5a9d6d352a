"""Op rules for op-level capture (opcapture.py): one small unit per op, registered with
``@rule(*funcs)``.

A rule gets an ``OpCall`` (the call, its arguments and which of them are tracked tensors of
the module's own parameters), runs the op with those detached, and taps the output: from
its backprop ``g`` and the saved operands it records one ``Use`` per tracked operand, exact
per sample.  It raises ``Decline`` when it cannot be exact (an operand that varies along the
batch, rows whose sample it cannot tell), which sends the module to the generic fallback.

Batch structure comes from the batch-first contract (dim 0 of a layer's data is the sample)
checked against the forward's micro-batch size, and, for 2-D row inputs (HF ``Conv1D`` runs
``addmm`` on ``x.view(-1, d)``), from the view's base: rows are samples' rows in order only
when the view covers its contiguous base exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_unflatten

from dpkernels.layers.base import BiasUse, LinearUse
from dpkernels.layers.conv import ConvUse
from dpkernels.layers.embedding import EmbeddingUse
from dpkernels.layers.opcapture import Decline, OpCall, Tracked

RULES: dict = {}


def rule(*funcs):
    def register(f):
        for fn in funcs:
            RULES[fn] = f
        return f

    return register


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sum_to(G: torch.Tensor, shape) -> torch.Tensor:
    """``G`` [B, *S] summed per sample over the dims ``shape`` (right-aligned with [B, *S],
    dim 0 of size 1 if as long) is broadcast along: [B, *shape]."""
    full = G.dim()
    padded = (1,) * (full - len(shape)) + tuple(shape)
    dims = [j for j in range(1, full) if padded[j] == 1 and G.shape[j] != 1]
    if dims:
        G = G.sum(dims, keepdim=True)
    return G.reshape(G.shape[0], *shape)


def _sample_shape(call: OpCall, t: torch.Tensor, tr: Tracked, out_dim: int, batch: int):
    """The shape of ``t`` seen by one sample, if ``t`` is broadcast along the batch."""
    if t.dim() < out_dim:
        return tuple(t.shape)
    if t.shape[0] == 1 or batch == 1:
        return tuple(t.shape)
    if tr.batch_const:
        return (1, *t.shape[1:])
    raise Decline(call.func, "the parameter's tensor varies along the batch dimension")


def _single(call: OpCall):
    if len(call.hits) != 1:
        raise Decline(call.func, "more than one of its operands comes from a parameter")
    return call.hits[0]


def _elementwise(call: OpCall, grad):
    """``out = op(x, t)`` broadcast; ``grad(g, other, position)`` is the backprop to ``t``
    before the broadcast is summed out."""
    i, tr = _single(call)
    a, k = tree_args(call)
    if k.get("out") is not None:
        raise Decline(call.func, "out= is not supported")
    pos = 0 if a[0] is call.flat[i] else 1
    other = a[1 - pos] if len(a) > 1 else None
    out = call.run()
    if out.dim() == 0:
        raise Decline(call.func, "its result has no batch dimension")
    B = call.batch(out.shape[0])
    t = call.flat[i]
    shape = _sample_shape(call, t, tr, out.dim(), B)
    saved = [other] if isinstance(other, torch.Tensor) else []
    scalar = None if saved else other

    def record(g, *s):
        o = s[0] if s else scalar
        G = grad(_f32(g), o, pos, k)
        G = G.expand(g.shape) if G.shape != g.shape else G
        psg = _sum_to(G, shape)
        # a sum over broadcast positions (HF RMSNorm's w * x, a layer scale): its rounding
        # error is relative to the terms' magnitudes (SummedTerms), not to the sum
        terms = G[0].numel() // max(psg[0].numel(), 1) if G.shape[0] else 1
        mag = _sum_to(G.abs(), shape) if terms > 1 else None
        call.engine.record(call.name, B, [(tr.param, tr.use(psg, mag=mag, terms=terms))])

    return call.tap(out, record, *saved)


def tree_args(call: OpCall):
    """The call's (args, kwargs) as given."""
    return tree_unflatten(list(call.flat), call.spec)


@rule(torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
def mul(call: OpCall):
    return _elementwise(call, lambda g, other, pos, k: g * other)


@rule(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
def add(call: OpCall):
    def grad(g, other, pos, k):
        return g * k["alpha"] if pos == 1 and "alpha" in k else g

    return _elementwise(call, grad)


@rule(torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)
def sub(call: OpCall):
    def grad(g, other, pos, k):
        return g if pos == 0 else -g * k.get("alpha", 1)

    return _elementwise(call, grad)


@rule(torch.Tensor.__rsub__)
def rsub(call: OpCall):  # x - t dispatched as t.__rsub__(x): t is operand 0
    return _elementwise(call, lambda g, other, pos, k: -g)


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(call: OpCall):
    """``cat([p.expand(B, ...), x], dim)`` (ViT's class token): each tracked piece gets its
    slice of ``g``."""
    a, k = tree_args(call)
    tensors = a[0]
    dim = a[1] if len(a) > 1 else k.get("dim", k.get("axis", 0))
    out = call.run()
    dim = dim % out.dim()
    if dim == 0:
        raise Decline(call.func, "it concatenates along the batch dimension")
    B = call.batch(out.shape[0])
    pieces, offset = [], 0
    for t in tensors:
        for i, tr in call.hits:
            if call.flat[i] is t:
                pieces.append((tr, offset, t.shape[dim], _sample_shape(call, t, tr, out.dim(), B)))
        offset += t.shape[dim]

    def record(g):
        uses = [(tr.param, tr.use(_f32(g.narrow(dim, off, n)).reshape(B, *shape)))
                for tr, off, n, shape in pieces]
        call.engine.record(call.name, B, uses)

    return call.tap(out, record)


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether each ``t[b]`` fills the block ``[b * stride(0), (b + 1) * stride(0))`` of
    memory: the dims after the first are dense in some order, the first outermost."""
    dims = sorted((t.stride(j), t.shape[j]) for j in range(1, t.dim()) if t.shape[j] != 1)
    step = 1
    for stride, size in dims:
        if stride != step:
            return False
        step *= size
    return t.dim() >= 1 and (t.shape[0] <= 1 or t.stride(0) == step)


def _rows(call: OpCall, x: torch.Tensor):
    """(B, T) for a 2-D ``x`` of B*T rows.  A view's rows belong to the samples of its base
    (batch first) when it covers the base exactly and each sample's block of the base is
    dense: row r is then in sample ``r * d // stride(0)``.  Otherwise dim 0 is the batch."""
    N, d = x.shape
    base = x._base
    if base is None:
        return call.batch(N), 1
    per = math.prod(base.shape[1:])
    if not (x.is_contiguous() and _dense_rows(base) and x.numel() == base.numel()
            and x.storage_offset() == base.storage_offset() and d and per % d == 0):
        raise Decline(call.func, "its rows are a view that does not cover its base in order, "
                      "so the sample of each row is unknown")
    return call.batch(base.shape[0]), per // d


def _linear_uses(call, B, a3, g3, w, b, transposed):
    """Uses of a weight (``[p, d]``, or ``[d, p]`` when ``transposed``) and bias (``[p]``)
    from ``a3`` [B, T, d] and ``g3`` [B, T, p]."""
    uses = []
    method = call.engine.norm_method
    if a3.dtype != g3.dtype and a3.is_floating_point():
        # under autocast the op ran in g's dtype on a cast of the saved input
        a3 = a3.to(g3.dtype)
    if w is not None:
        if transposed:  # G_b = sum_t a_t g_t^T: a LinearUse with the roles swapped
            fast = lambda: LinearUse(g3, a3, method)  # noqa: E731
            dense = lambda: torch.einsum("btd,btp->bdp", _f32(a3), _f32(g3))  # noqa: E731
        else:
            fast = lambda: LinearUse(a3, g3, method)  # noqa: E731
            dense = lambda: torch.einsum("btp,btd->bpd", _f32(g3), _f32(a3))  # noqa: E731
        uses.append((w.param, fast() if w.same_grad else w.use(dense())))
    if b is not None:
        if b.same_grad and b.param.dim() == 1:
            uses.append((b.param, BiasUse(g3)))
        else:
            psg = _f32(g3).sum(1).reshape(B, *b.param.shape) if b.fn is None else \
                _f32(g3).sum(1)
            uses.append((b.param, b.use(psg)))
    return uses


def _linear_tap(call: OpCall, x, B: int, T: int, wt, bt, transposed: bool):
    """Run a Linear-like op on ``x`` (B*T rows of width d) and tap it for its weight/bias."""
    out = call.run()

    def record(g, xs):
        a3, g3 = xs.reshape(B, T, xs.shape[-1]), g.reshape(B, T, g.shape[-1])
        call.engine.record(call.name, B, _linear_uses(call, B, a3, g3, wt, bt, transposed))

    return call.tap(out, record, x)


def _tracked_at(call: OpCall, value) -> Tracked | None:
    for i, tr in call.hits:
        if call.flat[i] is value:
            return tr
    return None


@rule(torch.addmm, torch.Tensor.addmm)
def addmm(call: OpCall):
    """``addmm(b, x, W)`` = ``b + x @ W`` (HF ``Conv1D`` on ``x.view(-1, d)``)."""
    a, k = tree_args(call)
    bias, x, W = a[0], a[1], a[2]
    if k.get("beta", 1) != 1 or k.get("alpha", 1) != 1 or len(a) > 3:
        raise Decline(call.func, "beta/alpha other than 1")
    wt, bt = _tracked_at(call, W), _tracked_at(call, bias)
    if _tracked_at(call, x) is not None or W.dim() != 2 or x.dim() != 2:
        raise Decline(call.func, "the parameter is not its right-hand 2-D matrix or bias")
    if bt is not None and not (bias.dim() == 1 or (bias.dim() == 2 and bias.shape[0] == 1)):
        raise Decline(call.func, "its bias varies per row")
    B, T = _rows(call, x)
    return _linear_tap(call, x, B, T, wt, bt, True)


@rule(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
def matmul(call: OpCall):
    """``x @ W`` with a 2-D parameter ``W`` on the right."""
    a, _ = tree_args(call)
    x, W = a[0], a[1]
    wt = _tracked_at(call, W)
    if wt is None or len(call.hits) != 1 or W.dim() != 2 or x.dim() < 2:
        raise Decline(call.func, "the parameter is not a 2-D right-hand operand")
    if x.dim() == 2:
        B, T = _rows(call, x)
    else:
        B, T = call.batch(x.shape[0]), math.prod(x.shape[1:-1])
    return _linear_tap(call, x, B, T, wt, None, True)


@rule(F.linear, torch.nn.functional.linear)
def linear(call: OpCall):
    """``F.linear(x, W, b)`` in a module's own forward."""
    a, k = tree_args(call)
    x = a[0]
    W = a[1] if len(a) > 1 else k.get("weight")
    bias = a[2] if len(a) > 2 else k.get("bias")
    if _tracked_at(call, x) is not None or x.dim() < 2:
        raise Decline(call.func, "its input is a parameter or has no batch dimension")
    wt, bt = _tracked_at(call, W), _tracked_at(call, bias) if bias is not None else None
    B, T = call.batch(x.shape[0]), math.prod(x.shape[1:-1])
    return _linear_tap(call, x, B, T, wt, bt, False)


def _norm(call: OpCall, x, weight, bias, psg):
    """A norm op ``f(x, ..., weight, bias)``; ``psg(x, g, need_w, need_b, absolute)`` gives the
    per-sample gradients of the affine parameters, [B, *weight.shape] each (``absolute``: the
    sums of their terms' magnitudes)."""
    if _tracked_at(call, x) is not None or x.dim() < 2:
        raise Decline(call.func, "its input is a parameter or has no batch dimension")
    wt = _tracked_at(call, weight) if weight is not None else None
    bt = _tracked_at(call, bias) if bias is not None else None
    B = call.batch(x.shape[0])
    out = call.run()

    def record(g, xs):
        gw, gb = psg(xs, g, wt is not None, bt is not None, False)
        # the terms' magnitudes and how many positions each sums (SummedTerms' bound)
        mw, mb = psg(xs, g, wt is not None, bt is not None, True)
        uses = [(tr.param, tr.use(_f32(v), mag=m,
                                  terms=math.prod(xs.shape[1:]) // max(tr.param.numel(), 1)))
                for tr, v, m in ((wt, gw, mw), (bt, gb, mb)) if tr is not None]
        call.engine.record(call.name, B, uses)

    return call.tap(out, record, x)


def _bind(call: OpCall, names: str, **defaults) -> dict:
    """The call's arguments by name, positional ones in the order of ``names``."""
    a, k = tree_args(call)
    return {**defaults, **dict(zip(names.split(), a)), **k}


@rule(F.layer_norm, torch.layer_norm)
def layer_norm(call: OpCall):
    v = _bind(call, "input normalized_shape weight bias eps", weight=None, bias=None, eps=1e-5)
    shape, eps = tuple(v["normalized_shape"]), v["eps"]
    return _norm(call, v["input"], v["weight"], v["bias"], lambda xs, g, nw, nb, ab: call.engine.op(
        "layer_norm_psg", xs, g, shape, eps, nw, nb, ab))


@rule(F.rms_norm, torch.rms_norm)
def rms_norm(call: OpCall):
    v = _bind(call, "input normalized_shape weight eps", weight=None, eps=None)
    shape, eps = tuple(v["normalized_shape"]), v["eps"]
    return _norm(call, v["input"], v["weight"], None, lambda xs, g, nw, nb, ab: (
        call.engine.op("rms_norm_psg", xs, g, shape, eps, ab), None))


@rule(F.group_norm, torch.group_norm)
def group_norm(call: OpCall):
    v = _bind(call, "input num_groups weight bias eps", weight=None, bias=None, eps=1e-5)
    groups, eps = v["num_groups"], v["eps"]
    return _norm(call, v["input"], v["weight"], v["bias"], lambda xs, g, nw, nb, ab: call.engine.op(
        "group_norm_psg", xs, g, groups, eps, nw, nb, ab))


@rule(F.embedding, torch.embedding)
def embedding(call: OpCall):
    """``F.embedding(ids, W, padding_idx)`` in a module's own forward (an Embedding subclass
    that scales or offsets around ``super().forward``, e.g. OPT's learned positions)."""
    a, k = tree_args(call)
    ids = a[0]
    W = a[1] if len(a) > 1 else k.get("weight")
    wt = _tracked_at(call, W)
    if call.func is torch.embedding:  # the aten signature: (weight, indices, padding_idx, ...)
        W, ids = ids, W
        wt = _tracked_at(call, W)
        pad = a[2] if len(a) > 2 else k.get("padding_idx", -1)
        rest = a[3:]
    else:
        pad = a[2] if len(a) > 2 else k.get("padding_idx")
        rest = a[3:] + tuple(k.get(n) for n in ("max_norm", "scale_grad_by_freq", "sparse"))
    if wt is None or len(call.hits) != 1 or W.dim() != 2 or ids.dim() < 1:
        raise Decline(call.func, "the parameter is not its 2-D weight")
    if any(r not in (None, False, 2.0, 2) for r in rest):
        raise Decline(call.func, "max_norm, scale_grad_by_freq or sparse")
    if pad is not None and pad < 0:
        pad = pad + W.shape[0] if pad >= -W.shape[0] and call.func is F.embedding else None
    B, T = call.batch(ids.shape[0]), math.prod(ids.shape[1:])
    V = W.shape[0]
    out = call.run()

    def record(g, ids_s):
        i2, g3 = ids_s.reshape(B, T), g.reshape(B, T, g.shape[-1])
        if wt.fn is None:
            use = EmbeddingUse(i2, g3, pad, V)
        else:
            use = wt.use(EmbeddingUse(i2, _f32(g3), pad, V).raw_dense(call.engine.op))
        call.engine.record(call.name, B, [(wt.param, use)])

    return call.tap(out, record, ids)


def _tuple(v, n: int, what: str, call: OpCall) -> tuple:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    if len(v) == 1:
        return v * n
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise Decline(call.func, f"its {what} {v!r} is not {n} integers")
    return v


@rule(F.conv1d, F.conv2d, F.conv3d)
def conv(call: OpCall):
    """``F.conv{1,2,3}d(x, w, b, ...)`` in a module's own forward (timm's ``Conv2dSame`` pads
    then calls ``F.conv2d(x, self.weight, self.bias, ...)``).  The weight as it reaches the op
    (the parameter, a cast or same-shape view of it) gets the Conv ``Use`` of the module rule
    (ghost or direct norm, im2col inside the kernel); a weight computed from the parameter by
    anything else (weight standardisation) gets the per-sample gradient with respect to what
    reached the op, mapped back through that function (``Tracked.use``): exact, materialised
    [B, *weight.shape], never the conv norm of the transformed weight passed off as the
    parameter's."""
    v = _bind(call, "input weight bias stride padding dilation groups", bias=None, stride=1,
              padding=0, dilation=1, groups=1)
    x, W, bias = v["input"], v["weight"], v["bias"]
    n = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[call.func]
    if _tracked_at(call, x) is not None or not isinstance(x, torch.Tensor) or x.dim() != n + 2:
        raise Decline(call.func, f"its input is a parameter or not batched [B, C, {n} dims]")
    wt = _tracked_at(call, W)
    bt = _tracked_at(call, bias) if bias is not None else None
    if wt is None and bt is None:
        raise Decline(call.func, "the parameter is neither its weight nor its bias")
    if bt is not None and bias.dim() != 1:
        raise Decline(call.func, "its bias is not 1-D")
    groups = v["groups"]
    if not isinstance(groups, int):
        raise Decline(call.func, "non-integer groups")
    stride = _tuple(v["stride"], n, "stride", call)
    dilation = _tuple(v["dilation"], n, "dilation", call)
    k = tuple(W.shape[2:])
    padding = v["padding"]
    if padding == "valid":
        pairs = [(0, 0)] * n
    elif padding == "same":
        pairs = [(d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2)
                 for kk, d in zip(k, dilation, strict=True)]
    elif isinstance(padding, str):
        raise Decline(call.func, f"padding={padding!r}")
    else:
        pairs = [(q, q) for q in _tuple(padding, n, "padding", call)]
    # the Use takes symmetric padding; torch's "same" with an even span pads one more on the
    # right, which the Use gets as an explicit pad of the saved input
    extra = [hi - lo for lo, hi in pairs]
    conf = (stride, tuple(lo for lo, _ in pairs), dilation, groups)
    B = call.batch(x.shape[0])
    out = call.run()

    def record(g, xs):
        if any(extra):
            xs = F.pad(xs, [q for e in reversed(extra) for q in (0, e)])
        if xs.dtype != g.dtype and xs.is_floating_point():
            xs = xs.to(g.dtype)  # under autocast the op ran in g's dtype on a cast of x
        uses = []
        if wt is not None:
            use = ConvUse(xs, g, W.shape, conf, call.engine.norm_method)
            if not wt.same_grad:
                use = wt.use(use.raw_dense(call.engine.op))
            uses.append((wt.param, use))
        if bt is not None:
            T = math.prod(g.shape[2:])  # not -1: an empty batch leaves it ambiguous
            g3 = g.reshape(B, g.shape[1], T).transpose(1, 2)
            uses.append((bt.param, BiasUse(g3) if bt.same_grad else bt.use(_f32(g3).sum(1))))
        call.engine.record(call.name, B, uses)

    return call.tap(out, record, x)
