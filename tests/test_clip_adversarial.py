"""Adversarial review of the clip path (norms, bounds, clip factors): crafted samples that
made a sample's released contribution exceed C, or poisoned the whole step, without an error.

Each test releases crafted samples with noise 0 and checks the invariant of DESIGN.md section
6 (``||c_b g_b|| <= C``) or that the step stays finite.  The tolerance 1e-6 relative on C is
the one of tests/test_cancellation.py (float64 sum of the released gradient)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.ops import bounds as tri_bounds
from dpkernels.reference import bounds as ref_bounds


def released(model, loss_fn, x, backend, method="auto", C=1.0, mode="fast", **kw):
    """The norm of the released (summed, clipped) gradient, and the engine's optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=C,
                                loss_reduction="sum", backend=backend, norm_method=method,
                                seed=0, mode=mode, **kw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = loss_fn(model(x))
            if mode == "low-memory":
                dp.backward(loss)
            else:
                loss.backward()
            dp.step()
        return torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()
                              if p.grad is not None)).item(), dp
    finally:
        dpkernels.detach(model)


# Underflow: inputs of 2e-23 square to below float32's smallest subnormal, so every Gram entry
# a_t . a_s (and ||a||^2 for T = 1) is 0 and the ghost norm of sum_t g_t a_t^T comes out 0,
# while the clipped sum forms g_t a_t^T (~1e-6 each) directly: main released ~50 C (C = 1e-5).
UF_C = 1e-5


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("method", ["ghost", "auto"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_gram_underflow(T, method, backend):
    model = nn.Linear(64, 64, bias=False)
    x = torch.full((1, T, 64), 2e-23)
    r, _ = released(model, lambda o: o.sum() * 1e17, x, backend, method, C=UF_C)
    assert r <= UF_C * (1 + 1e-6), r / UF_C


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gram_underflow_cases_take_the_grouped_path(backend, monkeypatch):
    """The fast-mode cases above run through the grouped ops (the Linear norms deferred to
    linear_norms_many, bounds and factors in clip_from_parts), so they test those ops' bounds;
    a Linear with a bias too (its sum_t |g_t| row shared with the underflow bound's)."""
    from dpkernels.engine import Engine

    seen, op = [], Engine.op

    def spy(self, name, *args, **kwargs):
        seen.append(name)
        return op(self, name, *args, **kwargs)

    monkeypatch.setattr(Engine, "op", spy)
    for model in (nn.Linear(64, 64, bias=False), nn.Linear(64, 64)):
        seen.clear()
        r, _ = released(model, lambda o: o.sum() * 1e17, torch.full((1, 4, 64), 2e-23),
                        backend, "ghost", C=UF_C)
        assert {"linear_norms_many", "magnitude_many", "clip_from_parts"} <= set(seen), seen
        assert "linear_norm" not in seen and "stacked_bounds" not in seen
        assert r <= UF_C * (1 + 1e-6), r / UF_C


def test_linear_gram_underflow_low_memory():
    """The per-use bound path (low-memory mode), T = 1 and a Linear used twice (cross term)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.fc(x) + self.fc(x * 0.5)

    for model in (nn.Linear(64, 64, bias=False), Twice()):
        x = torch.full((1, 64), 2e-23)
        r, _ = released(model, lambda o: o.sum() * 1e17, x, "reference", "ghost", C=UF_C,
                        mode="low-memory")
        assert r <= UF_C * (1 + 1e-6), r / UF_C


def test_linear_gram_underflow_reused_fast():
    """A Linear used twice in the fast mode: the deferred cross-term underflow bound."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.fc(x) + self.fc(x * 0.5)

    r, _ = released(Twice(), lambda o: o.sum() * 1e17, torch.full((1, 3, 64), 2e-23),
                    "reference", "ghost", C=UF_C)
    assert r <= UF_C * (1 + 1e-6), r / UF_C


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_conv_gram_underflow(method):
    model = nn.Conv1d(64, 64, 1, bias=False)
    x = torch.full((1, 64, 1), 2e-23)
    r, _ = released(model, lambda o: o.sum() * 1e17, x, "reference", method, C=UF_C)
    assert r <= UF_C * (1 + 1e-6), r / UF_C


# A NaN bound with a finite norm: sample 1 has a huge input (|x|^2 overflows float32) at a
# position whose backprop is 0, so its magnitude sum_t |a_t||g_t| has inf * 0 = NaN while the
# direct norm is finite; main gave it a NaN clip factor and every parameter's sum became NaN.
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_bound_is_dropped_not_propagated(backend, clipping):
    if clipping == "per_layer" and backend == "triton":
        pytest.skip("per-layer mode takes its bounds per use: the reference case covers it")
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    x = torch.randn(2, 3, 8)
    x[1, 1] = 1e20
    kw = {"clipping": "per_layer"} if clipping == "per_layer" else {}
    C = 1.0 if clipping == "flat" else [1.0]
    r, dp = released(model, lambda o: o[:, 0].sum(), x, backend, "direct", C=C, **kw)
    assert r == r and r <= 1.0 * (1 + 1e-6), r  # finite: sample 0 alone, clipped
    assert r > 0  # sample 0 still contributes
    assert dp.nonfinite_samples == 1


# Mixed dtypes in the per-use bound path: a float64 use next to a float32 use made torch.cat
# promote the float32 magnitudes, and float64's unit roundoff then bounded the float32 norm
# (2^29 too tight): a crafted float32 sample released ~26 C in the low-memory mode.
class MixedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False).double()
        self.b = nn.Linear(32, 24, bias=False)

    def forward(self, x):
        return self.b(x.float()).sum() + 0 * self.a(x).sum()


class MixedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(32, 32, 1, bias=False).double()
        self.b = nn.Conv1d(32, 24, 1, bias=False)

    def forward(self, x):
        x = x.transpose(1, 2)
        return self.b(x.float()).sum() + 0 * self.a(x).sum()


def crafted(d, k, seed):
    """[v, -v + e] with |v| ~ 2^k (tests/test_cancellation.py), float64."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64) * 2.0**k
    e = torch.randn(d, generator=g, dtype=torch.float64)
    return torch.stack([v, -v + e])


@pytest.mark.parametrize("model_cls,mode", [(MixedLinear, "low-memory"), (MixedConv, "fast")])
def test_mixed_dtype_cancellation(model_cls, mode):
    worst = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        r, _ = released(model_cls(), lambda o: o, crafted(32, 11, seed)[None], "reference",
                        "ghost", mode=mode)
        worst = max(worst, r)
    assert worst <= 1.0 * (1 + 1e-6), worst


# clip_factors on adversarial inputs, Triton kernel against the reference: exactly at C, just
# above, zeros, negatives, subnormals, near float32 max, inf, NaN; every factor must keep
# c * sqrt(norm_sq + err) * loss_scale <= C (the inputs taken as exact, in float64).
F32MAX = torch.finfo(torch.float32).max
VALS = [0.0, -0.0, -1.0, 1e-45, 2.0**-126, 1e-7, 1.0, (1.0 / (1 + 2**-16) - 1e-6) ** 2,
        0.99999, 1.00001, 4.0, 1e30, 1e38, F32MAX, float("inf"), float("nan"), -float("inf")]


@pytest.mark.parametrize("C", [1.0, 0.1, 7.0, 1e-30])
@pytest.mark.parametrize("loss_scale", [1.0, 3.0, 256.0, 1e30])
def test_clip_factors_adversarial(C, loss_scale):
    nsq = torch.tensor(VALS, dtype=torch.float32)
    errs = [None, torch.zeros_like(nsq), torch.full_like(nsq, 1e-3),
            torch.full_like(nsq, F32MAX), torch.tensor([float("nan")] + [1.0] * (len(VALS) - 1))]
    for err in errs:
        n1, f1, ok1 = ref_bounds.clip_factors(nsq, err, loss_scale, 2.0**-16, C)
        n2, f2, ok2 = tri_bounds.clip_factors(nsq, err, loss_scale, 2.0**-16, C)
        assert bool(ok1) == bool(ok2)
        e64 = 0.0 if err is None else err.double()
        exact = (nsq.double().clamp_min(0) + e64).sqrt() * loss_scale
        for f in (f1, f2):
            assert not torch.isnan(f).any(), (nsq, f)
            out = f.double() * exact
            ok = ~(f > 0) | ~torch.isfinite(out) | (out <= C * (1 + 1e-12))
            assert ok.all(), (nsq[~ok], f[~ok], out[~ok] / C)
            # 0 wherever the norm or the bound is not finite
            assert (f[~torch.isfinite(exact)] == 0).all()
        # the kernel's factor never above the reference's by more than an ulp or two
        m = f1 > 0
        assert (f2[m].double() <= f1[m].double() * (1 + 2.0**-22)).all()
        assert torch.equal(f1 == 0, f2 == 0)


# Norm-layer affine terms whose positions cancel: LayerNorm, RMSNorm, GroupNorm (module
# rules), an HF-style RMSNorm's op-captured ``w * x`` and a functional ``F.layer_norm`` on the
# module's own parameters.  Every position has the same input (so x_hat is the same and the
# float64 oracle's gradient is the float32 model's up to relative rounding) and backprops
# r, -r + e, r, -r with |r| ~ 2^18: the per-sample term sum_pos g * x_hat is ~|e| but is
# formed in float32 with an error ~u 2^18 |x_hat| per position.  Main bounded these terms only
# relative to their partial sums (fast mode) or not at all (materialised terms): c_b times the
# oracle's norm reached 1.015 C (|r| ~ 2^16, two seeds).  Measured with the float64 oracle
# per-sample gradients times the engine's factors (tests/oracle.py), tolerance 1e-6 as above.
class HFRMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm scales by ``1 + w``: the op-captured term is mapped back through a
    function of the parameter (``Tracked.fn``), an elementwise one."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * (1.0 + self.weight.float())


class FunctionalLN(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias)


class ChannelGN(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.gn = nn.GroupNorm(4, n)

    def forward(self, x):
        return self.gn(x.transpose(1, 2)).transpose(1, 2)


NORMS = {"layer_norm": lambda n: nn.LayerNorm(n), "rms_norm": lambda n: nn.RMSNorm(n),
         "group_norm": ChannelGN, "hf_rms_norm": HFRMSNorm, "functional_ln": FunctionalLN,
         "gemma_rms_norm": GemmaRMSNorm}


@pytest.mark.parametrize("mode", ["fast", "low-memory"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norm_affine_terms_that_cancel(kind, backend, mode):
    from oracle import per_sample_grads

    n, worst = 16, 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        model = NORMS[kind](n)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        m64 = copy.deepcopy(model).double()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 1, n, generator=g).expand(1, 4, n).contiguous()
        r = torch.randn(n, generator=g) * 2.0**18
        R = torch.stack([r, -r + torch.randn(n, generator=g), r, -r])[None]  # float32 values

        def loss(o, R=R):
            return (o * R.to(o.dtype)).sum()

        factors = []
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0,
                                    loss_reduction="sum", backend=backend, seed=0, mode=mode)
        dp.engine.factor_hooks.append(lambda nrm, f, out=factors: out.append(f.double()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = loss(model(x))
                dp.backward(out) if mode == "low-memory" else out.backward()
                dp.step()
        finally:
            dpkernels.detach(model)
        psg = per_sample_grads(m64, lambda o, y: loss(o), x.double(), torch.zeros(1))
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
        worst = max(worst, float((factors[-1] * norms).max()))
    assert worst <= 1.0 * (1 + 1e-6), worst


@pytest.mark.parametrize("op", ["layer_norm_psg", "rms_norm_psg", "group_norm_psg"])
def test_norm_psg_absolute_kernel_is_the_reference(op):
    """``absolute=True`` (the magnitudes of the affine terms: sum_pos |g * x_hat|, sum_pos
    |g|) from the Triton kernels against the reference and the float64 sums; all terms are
    nonnegative, so float32 sums are within (positions + 4) u relatively: 1e-4 here (600
    positions, 604 u = 3.6e-5)."""
    from dpkernels.ops import norms as tri
    from dpkernels.reference import norms as ref

    torch.manual_seed(0)
    x, g = torch.randn(3, 600, 16), torch.randn(3, 600, 16) * 2.0**12
    if op == "group_norm_psg":
        args = (x.transpose(1, 2), g.transpose(1, 2), 4, 1e-5, True, True)
        xh = torch.nn.functional.group_norm(x.transpose(1, 2).double(), 4, eps=1e-5)
        want = ((g.transpose(1, 2).double() * xh).abs().sum(2), g.double().abs().sum(1))
    elif op == "layer_norm_psg":
        args = (x, g, (16,), 1e-5, True, True)
        xh = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-5)
        want = ((g.double() * xh).abs().sum(1), g.double().abs().sum(1))
    else:
        args = (x, g, (16,), 1e-6)
        xh = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
        want = (g.double() * xh).abs().sum(1)
    got_t = getattr(tri, op)(*args, absolute=True)
    got_r = getattr(ref, op)(*args, absolute=True)
    got = [got_t, got_r]
    if op != "group_norm_psg":  # the fast mode's partial sums: magnitudes from the same launch
        from dpkernels.ops import norm_parts as tri_parts
        from dpkernels.reference import norm_parts as ref_parts

        for mod in (tri_parts, ref_parts):
            fn = getattr(mod, op + "_parts")
            out = fn(*args, magnitudes=True)
            assert mod is ref_parts or out[0].shape[1] > 1  # the kernel split the positions
            got.append(tuple(t.sum(1) for t in out[2:]) if op == "layer_norm_psg"
                       else out[1].sum(1))
    for vals in got:
        for t, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (vals, want))):
            assert torch.allclose(t.double(), w, rtol=1e-4, atol=0), (t - w).abs().max()


# Attacks that found nothing on main, kept as guards: a tied Embedding / LM head with repeated
# ids, cancelling head rows and (second case) activations that underflow in the Gram form; and
# non-contiguous (transposed, expanded, sliced) inputs and backprops reaching the grouped ops.
class TiedHead(nn.Module):
    def __init__(self, V=13, p=8):
        super().__init__()
        self.emb = nn.Embedding(V, p)
        self.head = nn.Linear(p, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("mode", ["fast", "low-memory"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tiny", [False, True])
def test_tied_embedding_head_crafted(tiny, backend, mode):
    from oracle import per_sample_grads

    C = UF_C if tiny else 1.0
    worst = 0.0
    for seed in range(2):
        torch.manual_seed(seed)
        model = TiedHead()
        if tiny:  # every Gram entry of the head's inputs underflows
            with torch.no_grad():
                model.emb.weight.mul_(1e-23)
        m64 = copy.deepcopy(model).double()
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(13, generator=g) * 2.0**16
        R = torch.stack([r, -r + torch.randn(13, generator=g), 0.5 * r, -0.5 * r])[None]
        if tiny:
            R = R * 1e17
        ids = torch.tensor([[3, 3, 3, 5]])

        def loss(o, R=R):
            return (o * R.to(o.dtype)).sum()

        factors = []
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=C,
                                    loss_reduction="sum", backend=backend, seed=0, mode=mode)
        dp.engine.factor_hooks.append(lambda nrm, f, out=factors: out.append(f.double()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = loss(model(ids))
                dp.backward(out) if mode == "low-memory" else out.backward()
                dp.step()
            released_norm = model.emb.weight.grad.double().norm().item()
        finally:
            dpkernels.detach(model)
        psg = per_sample_grads(m64, lambda o, y: loss(o), ids, torch.zeros(1))
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
        worst = max(worst, float((factors[-1] * norms).max()) / C, released_norm / C)
    assert worst <= 1 + 1e-6, worst


def test_grouped_ops_take_strided_inputs():
    """Triton ``linear_norms_many`` and ``magnitude_many`` on transposed, expanded (stride 0)
    and sliced inputs equal the reference on contiguous copies (float32 sums of the same
    terms in another order: 1e-5 relative)."""
    from dpkernels.ops import ghost_many as tri_many
    from dpkernels.reference import ghost_many as ref_many

    torch.manual_seed(0)
    B, T, d, p = 3, 5, 8, 6
    cases = [(torch.randn(B, d, T).transpose(1, 2),
              torch.randn(B, p, 2 * T).transpose(1, 2)[:, ::2]),
             (torch.randn(B, 1, d).expand(B, T, d), torch.randn(1, T, p).expand(B, T, p)),
             (torch.randn(B, T, 2 * d)[..., ::2], torch.randn(B, T, p + 3)[..., 1:p + 1])]
    for a, g in cases:
        ac, gc = a.contiguous(), g.contiguous()
        for method in ("ghost", "direct"):
            t = tri_many.linear_norms_many([(a, g, method, True), (None, g, "auto", True)])
            r = ref_many.linear_norms_many([(ac, gc, method, True), (None, gc, "auto", True)])
            assert torch.allclose(t, r, rtol=1e-5, atol=0), (t - r).abs().max()
        t = tri_bounds.magnitude_many([(a, g), (None, g)])
        r = ref_bounds.magnitude_many([(ac, gc), (None, gc)])
        assert torch.allclose(t, r, rtol=1e-5, atol=0), (t - r).abs().max()
