"""The grouped Linear norms (``linear_norms_many``: the weight and bias norms of every Linear
use of a micro-batch, one launch per kind) against the reference ``linear_norms`` per use,
through Triton's interpreter; tolerance rule of tests/kernel_check.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernel_check import DEVICE, check, on_device, poison  # noqa: E402, F401
from torch import nn  # noqa: E402

import dpkernels  # noqa: E402
from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import ghost_many  # noqa: E402
from dpkernels.reference import bounds as ref_bounds  # noqa: E402
from dpkernels.reference import embedding as ref_emb  # noqa: E402
from dpkernels.reference import ghost_many as ref_many  # noqa: E402
from dpkernels.reference import linear as ref  # noqa: E402


def _items(B):
    g_t = torch.randn(B, 9, 40).transpose(1, 2)  # [B, 40, 9], strided like a conv backprop
    ids = torch.randint(0, 5, (B, 40))  # few ids: many equal pairs
    ids[:, -3:] = 0
    return [
        (torch.randn(B, 40, 5), torch.randn(B, 40, 7), "ghost", True),  # 2 tiles of 32
        (torch.randn(B, 70, 3), torch.randn(B, 70, 4), "auto", False),  # 3 tiles, ghost
        (torch.randn(B, 33, 6), g_t[:, :33], "ghost", True),
        (torch.randn(B, 1, 70), torch.randn(B, 1, 2), "auto", True),  # T = 1
        (torch.randn(B, 1, 4), torch.randn(B, 1, 300), "ghost", False),  # T = 1, wide g
        (torch.randn(B, 5, 3).to(torch.bfloat16), torch.randn(B, 5, 4).to(torch.bfloat16),
         "ghost", True),
        (torch.randn(B, 6, 4), torch.randn(B, 6, 5).to(torch.bfloat16), "ghost", True),  # mixed
        (torch.randn(B, 9, 3), torch.randn(B, 9, 2), "direct", True),  # not the ghost form
        (torch.randn(B, 0, 3), torch.randn(B, 0, 2), "auto", True),  # T = 0
        (torch.randn(B, 4, 0), torch.randn(B, 4, 3), "auto", True),  # d = 0: a bias only
        (torch.randn(B, 6, 2, 8)[:, :, 1], torch.randn(B, 6, 5), "ghost", False),  # strided a
        (None, torch.randn(B, 7, 2, 9)[:, :, 1], "auto", True),  # a bias alone, strided
        (None, torch.randn(B, 1, 300), "auto", True),  # a bias alone, T = 1
        (None, torch.randn(B, 0, 3), "auto", True),  # a bias alone, T = 0
        (ids, torch.randn(B, 40, 6), "embedding", 0),  # an Embedding with a padding id
        (ids[:, :33].to(torch.int32), torch.randn(B, 33, 5), "embedding", None),
        (ids[:, :1], torch.randn(B, 1, 4), "embedding", None),  # T = 1
        (ids[:, :0], torch.randn(B, 0, 4), "embedding", 2),  # T = 0
        (torch.randn(B, 50, 3), torch.randn(B, 50, 4), "auto", True),  # direct by cost
        (torch.randn(B, 9, 3), torch.randn(B, 9, 2), "direct", False),  # same shape, no bias
        (torch.randn(B, 45, 40), torch.randn(B, 45, 70)[:, :, ::2], "direct", True),  # tiles
        (torch.randn(B, 12, 5).to(torch.bfloat16), torch.randn(B, 12, 6).to(torch.bfloat16),
         "direct", True),
    ]


def _expected(items, dt):
    rows = []
    for a, g, method, with_bias in items:
        if method == "embedding":
            rows.append(ref_emb.embedding_norm(a, g.to(dt), with_bias))
            continue
        if a is None:
            rows.append(ref.linear_bias_norm(g.to(dt)))
            continue
        w, b = ref.linear_norms(a.to(dt), g.to(dt), method, with_bias)
        rows += [w] + ([b] if with_bias else [])
    return rows


@pytest.mark.parametrize("B", [3, 1, 0])
def test_linear_norms_many(B):
    torch.manual_seed(B)
    items = _items(B)
    out = ghost_many.linear_norms_many(items)
    exp64, exp32 = _expected(items, torch.float64), _expected(items, torch.float32)
    assert out.shape == (len(exp64), B)
    for r, (e64, e32) in enumerate(zip(exp64, exp32)):
        check(out[r], e64, e32, f"row {r}")


@pytest.mark.parametrize("which", [[0], [1, 2], [3, 4], [0, 3], [11], [1, 11, 12], [14],
                                   [1, 14, 15, 16], [19], [7, 18, 19, 20, 21], [0, 7, 3, 19]],
                         ids=["ghost", "ghost-2T", "rows", "ghost+rows", "bias", "ghost+biases",
                              "embedding", "ghost+embeddings", "direct", "directs",
                              "direct+ghost+rows"])
def test_linear_norms_many_one_kind(which):
    """Each launch alone and in the combinations that decide whether unwritten partials are
    zeroed (one ghost width, two widths, T == 1 only, T == 1 beside ghost)."""
    torch.manual_seed(7)
    items = [_items(4)[i] for i in which]
    out = ghost_many.linear_norms_many(items)
    for r, (e64, e32) in enumerate(zip(_expected(items, torch.float64),
                                       _expected(items, torch.float32))):
        check(out[r], e64, e32, f"row {r}")


def test_direct_uses_take_the_grouped_launch(monkeypatch):
    """Direct-form uses (long sequences) run in one launch per shape, never per use."""
    def per_use(*a, **k):
        raise AssertionError("linear_norms called per use")

    monkeypatch.setattr(ghost_many.linear, "linear_norms", per_use)
    items = [_items(3)[i] for i in (7, 18, 19, 20, 21)]
    out = ghost_many.linear_norms_many(items)
    for r, (e64, e32) in enumerate(zip(_expected(items, torch.float64),
                                       _expected(items, torch.float32))):
        check(out[r], e64, e32, f"row {r}")


# magnitude rows (item of _items, kind): the T == 1 launch's (items 3, 4), a duplicate, and
# uses outside it (ghost, bf16, mixed dtypes, a bias alone, T = 0, d = 0: magnitude_many)
_MAGS = [(3, "a"), (3, "g"), (3, "ag"), (4, "ag"), (4, "a"), (4, "g"), (3, "a"), (0, "a"),
         (0, "ag"), (5, "g"), (6, "ag"), (12, "g"), (11, "g"), (8, "ag"), (9, "a"), (2, "ag")]


def _mag_expected(items, mags, dt):
    out = []
    for i, kind in mags:
        a, g = ref_many.mag_operands(items[i], kind)
        out.append(ref_bounds.magnitude(None if a is None else a.to(dt), g.to(dt)))
    return out


@pytest.mark.parametrize("B", [3, 0])
def test_linear_norms_many_magnitudes(B):
    """The magnitude rows ``mags`` (the deferred bounds' ``sum_t |a_t|``, ``sum_t |g_t|``,
    ``sum_t |a_t| |g_t|``) after the norm rows, against reference/bounds.py's ``magnitude``;
    the norm rows are unchanged by them."""
    torch.manual_seed(11 + B)
    items = _items(B)
    out = ghost_many.linear_norms_many(items, _MAGS)
    exp64, exp32 = _expected(items, torch.float64), _expected(items, torch.float32)
    n = len(exp64)
    assert out.shape == (n + len(_MAGS), B)
    for r, (e64, e32) in enumerate(zip(exp64, exp32)):
        check(out[r], e64, e32, f"row {r}")
    for j, (e64, e32) in enumerate(zip(_mag_expected(items, _MAGS, torch.float64),
                                       _mag_expected(items, _MAGS, torch.float32))):
        check(out[n + j], e64, e32, f"magnitude {_MAGS[j]}")


def test_linear_norms_many_magnitudes_only_t1():
    """The engine's case: only T == 1 uses, every magnitude from the T == 1 launch."""
    torch.manual_seed(5)
    items = [_items(4)[i] for i in (3, 4)]
    mags = [(0, "ag"), (0, "g"), (0, "a"), (1, "a"), (1, "g")]
    out = ghost_many.linear_norms_many(items, mags)
    n = len(_expected(items, torch.float32))
    for j, (e64, e32) in enumerate(zip(_mag_expected(items, mags, torch.float64),
                                       _mag_expected(items, mags, torch.float32))):
        check(out[n + j], e64, e32, f"magnitude {mags[j]}")


def test_reference_linear_norms_many_magnitudes():
    """The reference's magnitude rows are reference/bounds.py's ``magnitude``, exactly."""
    torch.manual_seed(3)
    items = [(torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 5, dtype=torch.float64),
              "auto", True),
             (torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64),
              "ghost", False),
             (None, torch.randn(3, 6, 2, dtype=torch.float64), "auto", True)]
    mags = [(0, "a"), (0, "g"), (0, "ag"), (1, "ag"), (2, "g")]
    out = ref_many.linear_norms_many(items, mags)
    torch.testing.assert_close(out[:4], ref_many.linear_norms_many(items), rtol=0, atol=0)
    for j, (i, kind) in enumerate(mags):
        torch.testing.assert_close(out[4 + j], ref_bounds.magnitude(
            *ref_many.mag_operands(items[i], kind)), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_norms_many_refuses_bad_mags(impl):
    fn = ref_many.linear_norms_many if impl == "reference" else ghost_many.linear_norms_many
    items = [(torch.randn(2, 1, 4), torch.randn(2, 1, 5), "auto", True),
             (None, torch.randn(2, 1, 5), "auto", True),
             (torch.zeros(2, 1, dtype=torch.long), torch.randn(2, 1, 5), "embedding", None)]
    for bad in [(3, "a"), (-1, "g"), (0, "b"), (1, "a"), (1, "ag"), (2, "g"), [0, "a"]]:
        with pytest.raises(ValueError, match=r"mags\[0\]"):
            fn(items, [bad])


def test_engine_t1_magnitudes_come_from_the_norms_op(monkeypatch):
    """An MLP (T = 1 Linears): the deferred bounds' magnitudes (the underflow bound's
    ``||a||``, ``||g||``, and ``||a|| ||g||``) are rows of the linear_norms_many call, with no
    magnitude_many call, and equal magnitude_many's rows (tolerance rule); the clip factors
    are those of the magnitude_many path up to that rounding."""
    from dpkernels.engine import Engine
    from dpkernels.reference import bounds as rb

    def run(fused):
        seen, op = [], Engine.op

        def spy(self, name, *args, **kwargs):
            out = op(self, name, *args, **kwargs)
            if name == "clip_from_parts":
                seen.append((name, args[2].clone(), list(self._mag_items)))
            else:
                seen.append((name, len(args)))
            return out

        with monkeypatch.context() as mp:
            mp.setattr(Engine, "op", spy)
            if not fused:
                mp.setattr(Engine, "_fused_magnitudes", lambda self: None)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8, bias=False),
                                  nn.Tanh(), nn.Linear(8, 3))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=0.5,
                                        loss_reduction="sum", backend="triton", seed=0)
            try:
                model(torch.randn(5, 6)).square().sum().backward()
                dp.step()
                return seen, model._dpkernels_engine.last_factors.clone()
            finally:
                dpkernels.detach(model)

    seen, fac = run(True)
    names = [s[0] for s in seen]
    assert "magnitude_many" not in names and "clip_from_parts" in names, names
    assert ("linear_norms_many", 2) in seen, seen  # called with the magnitude rows
    _, M, items = next(s for s in seen if s[0] == "clip_from_parts")
    assert M.shape[0] == len(items) > 0
    for r, (a, g) in enumerate(items):
        e64 = rb.magnitude(None if a is None else a.double(), g.double())
        check(M[r], e64, rb.magnitude(a, g), f"magnitude row {r}")
    seen0, fac0 = run(False)
    assert "magnitude_many" in [s[0] for s in seen0]
    torch.testing.assert_close(fac, fac0, rtol=4 * 2.0**-23, atol=0)


def test_linear_norms_many_refuses_bad_inputs():
    with pytest.raises(ValueError, match="input 1 has shapes"):
        ghost_many.linear_norms_many([(torch.randn(2, 3, 4), torch.randn(2, 3, 5), "auto", 0),
                                      (torch.randn(3, 3, 4), torch.randn(3, 3, 5), "auto", 0)])
    with pytest.raises(ValueError, match="no inputs"):
        ghost_many.linear_norms_many([])
    with pytest.raises(ValueError, match="embedding"):
        ghost_many.linear_norms_many([(torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 3, 5),
                                       "embedding", None)])
    with pytest.raises(TypeError, match="ids must be integers"):
        ghost_many.linear_norms_many([(torch.zeros(2, 3), torch.randn(2, 3, 5), "embedding",
                                       None)])
    with pytest.raises(ValueError, match="neither a weight"):
        ghost_many.linear_norms_many([(None, torch.randn(2, 3, 5), "auto", False)])
    with pytest.raises(ValueError, match="method must be"):
        ghost_many.linear_norms_many([(torch.randn(2, 3, 4), torch.randn(2, 3, 5), "gram", 0)])
    with pytest.raises(TypeError, match="unsupported dtype"):
        ghost_many.linear_norms_many([(torch.ones(2, 3, 4, dtype=torch.int32),
                                       torch.ones(2, 3, 5, dtype=torch.int32), "auto", 0)])


def test_linear_norms_many_float64_is_the_reference():
    items = [(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5,
                                                                      dtype=torch.float64),
              "auto", True)]
    out = ghost_many.linear_norms_many(items)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_many.linear_norms_many(items), rtol=0, atol=0)


def test_linear_norms_many_resolves_to_triton():
    fn, backend = dispatch.resolve("linear_norms_many", "triton", DEVICE)
    assert backend == "triton" and fn.__module__.startswith("dpkernels.ops")


class Net(nn.Module):
    """Linears with and without a bias, one whose weight is frozen (bias only), one used
    twice (cross terms), T = 1 and T = 33 inputs (two Gram tiles)."""

    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.nob = nn.Linear(d, d, bias=False)
        self.frozen = nn.Linear(d, d)
        self.frozen.weight.requires_grad_(False)
        self.twice = nn.Linear(d, d)
        self.pool = nn.Linear(d, 3)

    def forward(self, x):  # [B, T, d]
        h = torch.tanh(self.twice(torch.tanh(self.twice(self.nob(self.fc(x))))))
        h = self.frozen(h)
        return self.pool(h.mean(1))  # T = 1 (a [B, d] input)


def _norms(backend, dtype, defer, monkeypatch, twice, method, net):
    from dpkernels.engine import Engine

    with monkeypatch.context() as mp:
        if not defer:
            mp.setattr(Engine, "defers_norms", lambda self: False)
        torch.manual_seed(0)
        if net == "embedding":
            model = nn.Sequential(nn.Embedding(11, 6, padding_idx=0), nn.Linear(6, 3)).to(dtype)
            inp = torch.randint(0, 4, (2, 33))  # few ids: many equal pairs
            inp[:, -2:] = 0
        else:
            model = (Net() if net == "net" else nn.Sequential(nn.Linear(6, 6), nn.Tanh(),
                                                               nn.Linear(6, 3))).to(dtype)
            inp = torch.randn(2, 33, 6, dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0,
                                    loss_reduction="sum", backend=backend, seed=0,
                                    norm_method=method)
        try:
            out = model(inp)
            if twice:  # two backwards of one forward: the second use of each parameter
                out.sum().backward(retain_graph=True)
            out.square().sum().backward()
            engine = model._dpkernels_engine
            assert bool(engine._deferred) == (defer and not twice)  # twice: taken already
            if net != "net" and defer:  # every norm from one grouped op: its one sum
                assert all(type(t).__name__ == "_Pending" for t in engine._norm_parts)
            got = engine.norm_sq.clone(), engine.err_sq().clone()
            dp.step()
            return got
        finally:
            dpkernels.detach(model)


@pytest.mark.parametrize("backend,dtype,twice,method,net", [
    ("reference", torch.float64, False, "auto", "net"),
    ("reference", torch.float64, True, "auto", "net"),
    ("reference", torch.float64, False, "ghost", "net"),
    ("reference", torch.float64, False, "auto", "linears"),
    ("triton", torch.float32, False, "ghost", "net"),  # the kernels (two Gram tiles, T = 1)
    ("triton", torch.float32, False, "ghost", "linears"),
    ("reference", torch.float64, False, "auto", "embedding"),
    ("triton", torch.float32, False, "auto", "embedding"),
], ids=["reference", "reference-two-backwards", "reference-ghost", "reference-linears",
        "triton-ghost", "triton-linears", "reference-embedding", "triton-embedding"])
def test_engine_deferred_norms_are_the_eager_norms(backend, dtype, twice, method, net,
                                                    monkeypatch):
    """The fast mode defers the Linear norms to one linear_norms_many call at clip time; the
    squared norms and their cancellation bounds must be the ones computed during the backward.
    The reference computes the same operations in the same order (identical results); the
    Triton kernels compute the same tile products and add the per-tile partials of every use
    in one sum instead of one per use, another order of at most a few dozen float32 additions:
    64 unit roundoffs, relatively."""
    want = _norms(backend, dtype, False, monkeypatch, twice, method, net)
    got = _norms(backend, dtype, True, monkeypatch, twice, method, net)
    rtol = 0.0 if dtype == torch.float64 else 64 * 2.0**-24
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=0)


def _direct_items(B):
    items = []
    for T, d, p, bias, dt in [(50, 3, 4, True, torch.float32), (9, 3, 2, False, torch.float32),
                              (45, 40, 35, True, torch.float32),
                              (12, 5, 6, True, torch.bfloat16), (0, 3, 4, True, torch.float32)]:
        a = torch.randn(B, T, d).to(dt)
        g = torch.randn(B, T, 2 * p)[:, :, ::2].to(dt) if p == 35 else torch.randn(B, T, p).to(dt)
        items.append((a, g, bias, torch.full((B, p, d), float("nan"))))
    return items


@pytest.mark.parametrize("B", [3, 1, 0])
def test_linear_direct_many_is_the_reference(B):
    """The materialised W_b and the norms (its sum of squares, the bias's) against float64."""
    torch.manual_seed(B)
    items = _direct_items(B)
    out = ghost_many.linear_direct_many(items)
    exp64 = ref_many.linear_direct_many(
        [(a.double(), g.double(), wb, torch.empty(w.shape, dtype=torch.float64))
         for a, g, wb, w in items])
    exp32 = ref_many.linear_direct_many(
        [(a.float(), g.float(), wb, torch.empty(w.shape)) for a, g, wb, w in items])
    assert out.shape == exp64.shape == (9, B)
    for r in range(out.shape[0]):
        check(out[r], exp64[r], exp32[r], f"row {r}")
    for a, g, _, w in items:
        want = torch.einsum("btp,btd->bpd", g.double(), a.double())
        assert torch.allclose(w.double(), want, rtol=1e-5, atol=1e-5)
    # each weight norm is the sum of squares of the very W stored (up to summation order)
    for (*_, w), r in zip(items, [0, 2, 3, 5, 7]):
        assert torch.allclose(out[r], w.pow(2).sum((1, 2)), rtol=2e-6, atol=0)


def test_linear_direct_many_refuses_a_bad_w():
    a, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    for w in (torch.empty(2, 3, 4), torch.empty(2, 4, 3, dtype=torch.float64),
              torch.empty(2, 3, 4).transpose(1, 2)):
        with pytest.raises(ValueError, match="linear_direct_many"):
            ghost_many.linear_direct_many([(a, g, True, w)])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_engine_materialises_long_sequence_weight_gradients(backend, monkeypatch):
    """Long sequences (T (d + p) >= d p): the engine keeps W_b from the norm op and the clipped
    sum reads it; exact against the float64 oracle, and the weights' clipped sums never go
    through a and g again."""
    from oracle import check_engine
    from torch import nn

    def no_second_pass(*a, **k):
        raise AssertionError("a materialised use's clipped sum went through a and g")

    for b in ("reference", "triton"):
        monkeypatch.setitem(dispatch._IMPLS, ("linear_clipped_sum_many", b), no_second_pass)
    calls = []
    real = dispatch._IMPLS[("linear_direct_many", backend)]
    monkeypatch.setitem(dispatch._IMPLS, ("linear_direct_many", backend),
                        lambda items: calls.append(len(items)) or real(items))
    dispatch._RESOLVED.clear()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False))
        x, y = torch.randn(4, 40, 6), torch.randn(4, 40, 4)
        dt = torch.float64 if backend == "reference" else torch.float32
        model, x, y = model.to(dt), x.to(dt), y.to(dt)

        def loss(o, t):
            return ((o - t) ** 2).sum((1, 2)).mean()

        # float32: the oracle also runs the float32 model (test_triton_engine.py's rule, K =
        # 40 positions here: rtol 1e-4); float64: the oracle's RTOL_F64-scale agreement
        check_engine(model, loss, x, y, backend=backend,
                     rtol=1e-9 if backend == "reference" else 1e-4)
    finally:
        dispatch._RESOLVED.clear()
    assert calls == [2]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tied_weight_cross_term_before_w_b_is_filled(backend, monkeypatch):
    """A Linear's weight also used as ``x * w`` earlier in the forward (later in the
    backward): the cross term arrives before the deferred op fills the Linear's W_b, and
    must come from a and g (reviewer: from the unfilled buffer, 73 C released).  W_b's
    buffer is filled with 1e3 garbage to make the ordering visible."""
    from oracle import check_engine
    from torch import nn

    import dpkernels.layers.linear as L

    class Garbage:
        def __getattr__(self, k):
            return getattr(torch, k)

        def empty(self, *shape, **kw):
            return torch.full(shape if len(shape) > 1 else shape[0], 1e3, **kw)

    monkeypatch.setattr(L, "torch", Garbage())

    class Scale(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, x):
            return x * self.w

    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    dt = torch.float64 if backend == "reference" else torch.float32
    model = nn.Sequential(Scale(lin.weight), nn.Tanh(), lin).to(dt)
    model[0].w = model[2].weight
    x, y = torch.randn(4, 5, 6, dtype=dt), torch.randn(4, 5, 5, dtype=dt)

    def loss(o, t):
        return ((o - t) ** 2).sum((1, 2)).mean()

    check_engine(model, loss, x, y, backend=backend,
                 rtol=1e-9 if backend == "reference" else 1e-4)


def test_forced_direct_on_short_sequences_keeps_no_w_b():
    """W_b is kept only where it is no larger than the a and g kept anyway."""
    from torch import nn

    import dpkernels

    model = nn.Linear(256, 256)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=1.0, seed=0,
                                loss_reduction="sum", norm_method="direct")
    try:
        assert not dp.engine.instantiates(2, 256, 256)  # 2 * 512 < 256 * 256
        assert dp.engine.instantiates(256, 256, 256)
        assert not dp.engine.instantiates(200, 256, 256, itemsize=2)  # bf16 a, g: half
    finally:
        dpkernels.detach(model)
