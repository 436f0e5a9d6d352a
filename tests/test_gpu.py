"""Triton kernels on a CUDA GPU: precision parity (fp32, tf32, bf16), the clipping bound under
bf16, and the statistics of the fused noise epilogue.  Skipped without CUDA (conftest.py).

Tolerances: float32 follows flash-attention's rule (at most 2x torch's own float32 error
against float64, + 16 eps32).  bf16 inputs are compared on their exact float32 values: their
products are exact in float32, so the same rule holds.  With TF32 allowed the kernels use
"tf32x3" (float32-accurate, ~1e-6 here), and the float32 norm kernels always do (their own
split, ops/_common.norm_mma); plain TF32 rounds every input to a 10-bit mantissa.
On random inputs those roundings average out (simulated TF32 norms are only 3.5-8.6e-6 off),
so the TF32 test uses inputs +-(1 + 2^-12): TF32 rounds each to +-1, the same relative error
2^-12 in every product, ~5e-4 in a squared norm, while tf32x3 keeps the 2^-12 exactly.
"""

import copy
import math

import pytest
import torch
from oracle import no_tf32

import dpkernels

pytestmark = pytest.mark.gpu

EPS32 = torch.finfo(torch.float32).eps


def _ops():
    from dpkernels.ops import dense, embedding, linear, norms
    from dpkernels.ops._common import INTERPRET

    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    return dense, embedding, linear, norms


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(out, ref64, ref32, what=""):
    assert torch.isfinite(out).all(), what
    err, base = rel(out, ref64), rel(ref32, ref64)
    assert err <= 2 * base + 16 * EPS32, f"{what}: error {err:.3g}, torch float32 {base:.3g}"


SHAPES = [(4, 300, 257, 190), (2, 1, 1024, 1000), (3, 77, 768, 2304), (64, 16, 100, 10)]


@pytest.mark.parametrize("B,T,d,p", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_norm_parity(B, T, d, p, method, dtype):
    _, _, linear, _ = _ops()
    from dpkernels.reference import linear as ref

    a = torch.randn(B, T, d, device="cuda").to(dtype)
    g = torch.randn(B, T, p, device="cuda").to(dtype)
    out = linear.linear_norm(a, g, method)
    assert out.dtype == torch.float32
    check(out, ref.linear_norm(a.double(), g.double(), method),
          ref.linear_norm(a.float(), g.float(), method), f"{method} {dtype}")


def _offset(*shape):
    """+-(1 + 2^-12): exact in float32, rounded to +-1 by TF32 (see the module docstring)."""
    sign = torch.randint(0, 2, shape, device="cuda").float() * 2 - 1
    return sign * (1 + 2.0**-12)


def test_tf32_allowed_keeps_float32_accuracy():
    _, _, linear, _ = _ops()
    from dpkernels.ops import conv
    from dpkernels.reference import conv as ref_conv
    from dpkernels.reference import linear as ref

    a, g = _offset(3, 200, 300), _offset(3, 200, 260)
    c = torch.rand(3, device="cuda")
    x, gc = _offset(4, 16, 12, 12), _offset(4, 32, 12, 12)
    conf = ((1, 1), (1, 1), (1, 1), 1)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        # what plain TF32 would make of these inputs (the kernels must do 100x better)
        a_tf32 = torch.ones_like(a) * a.sign()
        g_tf32 = torch.ones_like(g) * g.sign()
        tf32_err = rel(ref.linear_norm(a_tf32.double(), g_tf32.double()),
                       ref.linear_norm(a.double(), g.double()))
        assert tf32_err > 2e-4, tf32_err
        for method in ["ghost", "direct"]:
            out = linear.linear_norm(a, g, method)
            assert rel(out, ref.linear_norm(a.double(), g.double())) < 1e-5, method
            out = conv.conv_norm(x, gc, (32, 16, 3, 3), *conf, method=method)
            want = ref_conv.conv_norm(x.double(), gc.double(), (32, 16, 3, 3), *conf)
            assert rel(out, want) < 1e-5, ("conv", method)
        out = linear.linear_clipped_sum(a, g, c)
        assert rel(out, ref.linear_clipped_sum(a.double(), g.double(), c.double())) < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _hard(B, T, d, kind, seed):
    """Rows that cancel across positions, rows spanning 50 binades, or plain Gaussian rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, d, device="cuda", dtype=torch.float64, generator=g)
    if kind == "cancel":
        x[:, 1::2] = -x[:, 0::2][:, :x[:, 1::2].shape[1]] + 1e-3 * x[:, 1::2]
        x = x * 2.0**11
    elif kind == "binades":
        x = x * torch.pow(2.0, torch.randint(-30, 21, (B, T, d), device="cuda",
                                             generator=g).double())
    return x.float()


@pytest.mark.parametrize("kind", ["cancel", "binades", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tf32", [False, True])
def test_tensor_core_norms_within_the_charged_bound(kind, dtype, tf32):
    """The norm kernels' error never exceeds what the engine charges for it: kappa u S^2
    (ghost; kappa from reference/bounds.dot_roundings on this device) or the direct form's
    (r(T) + 16) u S, whichever is larger (layers/base.cancellation_bounds), whatever torch's
    TF32 setting.  The inputs are built to make tensor-core truncation and the float32 split
    hurt (tests/test_tensor_core_norms.py checks the same model on the CPU)."""
    _, _, linear, _ = _ops()
    from dpkernels.ops import ghost_many
    from dpkernels.reference import linear as ref
    from dpkernels.reference.bounds import dot_roundings

    B, T, d, p = 6, 96, 768, 2304
    a = _hard(B, T, d, kind, 1).to(dtype)
    g = _hard(B, T, p, "cancel" if kind == "plain" else kind, 2).to(dtype)
    S = (a.double().norm(dim=-1) * g.double().norm(dim=-1)).sum(1)
    u = 2.0**-24
    ghost = (dot_roundings(d, a) + dot_roundings(p, g) + 2 * T + 16) * u * S * S
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for method in ("ghost", "direct"):
            exact = ref.linear_norm(a.double(), g.double(), method)
            e = (dot_roundings(T, g) + 16) * u * S
            bound = torch.maximum(ghost, (2.0 * exact.sqrt() + e) * e)
            out = linear.linear_norm(a, g, method).double()
            assert torch.all((out - exact).abs() <= bound), (method, (out - exact).abs() / bound)
        many = ghost_many.linear_norms_many([(a, g, "ghost", False)])[0].double()
        assert torch.all((many - exact).abs() <= bound)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_core_accumulation_keeps_enough_bits(dtype):
    """The hardware assumption behind reference/bounds.TC_CHUNK_ROUNDINGS: a tensor-core block
    FMA loses at most what truncating at the 24th bit below its largest term loses (charged
    twice).  One 64-wide chunk of the Gram of rows [1, 2^-10, ...] and [1, 2^-11, ...]: its
    small products 2^-20, 2^-21, 2^-22 are exact with 23 or more bits kept, and a tensor core
    keeping 21 or fewer would drop at least 2 * 63 * 2^-21 of the norm; at that point the
    crafted sums of tests/test_tensor_core_norms.py would exceed the charged bound."""
    _, _, linear, _ = _ops()
    from dpkernels.reference import linear as ref

    a = torch.empty(1, 2, 64, device="cuda")
    a[0, 0], a[0, 1] = 2.0**-10, 2.0**-11
    a[0, :, 0] = 1.0
    g = torch.zeros(1, 2, 16, device="cuda")
    g[0, :, 0] = 1.0  # every g_t . g_s = 1: n^2 = a0.a0 + 2 a0.a1 + a1.a1
    out = linear.linear_norm(a.to(dtype), g.to(dtype), "ghost").double()
    exact = ref.linear_norm(a.double(), g.double(), "ghost")
    lost = (exact - out).abs().item()
    assert lost < 63 * 2.0**-21, f"lost {lost / 2.0**-22:.1f} x 2^-22"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_direct_many_parity(dtype):
    """Long sequences keep W_b (ops/ghost_many.linear_direct_many): the stored W_b and its
    norms against float64, by the float32 rule."""
    _ops()
    from dpkernels.ops import ghost_many
    from dpkernels.reference import ghost_many as ref_many

    shapes = [(768, 2304), (3072, 768)]
    items = [(torch.randn(2, 1024, d, device="cuda").to(dtype),
              torch.randn(2, 1024, p, device="cuda").to(dtype), True,
              torch.empty(2, p, d, device="cuda")) for d, p in shapes]
    out = ghost_many.linear_direct_many(items)
    r64 = ref_many.linear_direct_many(
        [(a.double(), g.double(), True, torch.empty(w.shape, dtype=torch.float64,
                                                     device="cuda")) for a, g, _, w in items])
    r32 = ref_many.linear_direct_many(
        [(a.float(), g.float(), True, torch.empty(w.shape, device="cuda"))
         for a, g, _, w in items])
    for r in range(out.shape[0]):
        check(out[r], r64[r], r32[r], f"row {r}")
    for a, g, _, w in items:
        want = torch.einsum("btp,btd->bpd", g.double(), a.double())
        with no_tf32():
            base = torch.einsum("btp,btd->bpd", g.float(), a.float())
        check(w, want, base, "W_b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_sum_parity(dtype):
    _, _, linear, _ = _ops()
    from dpkernels.reference import linear as ref

    a = torch.randn(16, 256, 768, device="cuda").to(dtype)
    g = torch.randn(16, 256, 768, device="cuda").to(dtype)
    c = torch.rand(16, device="cuda")
    acc = torch.randn(768, 768, device="cuda")
    acc0 = acc.clone()
    r64 = ref.linear_clipped_sum(a.double(), g.double(), c.double(), acc.double(), 0.0, 0, 0.5)
    r32 = ref.linear_clipped_sum(a.float(), g.float(), c, acc.clone(), 0.0, 0, 0.5)
    out = linear.linear_clipped_sum(a, g, c, acc, 0.0, 0, 0.5)
    assert out is acc
    # float32, and bf16 with T = 256 (the one-pass route: exact 16-bit products, c_b applied
    # to float32 per-sample tiles) meet the float32 rule
    check(out, r64, r32)
    if dtype == torch.bfloat16:  # short samples take hi + lo (see ops/linear.py): 2^-15
        for one_pass in (False, True):
            out = linear.clipped_sum(a, g, c, acc0.clone(), 0.0, 0, 0.5, one_pass=one_pass)
            if one_pass:
                check(out, r64, r32)
            else:
                assert rel(out, r64) <= 2**-15


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_clipping_bound_bf16(method):
    """||c_b W_b|| <= C for the true per-sample gradient of the bf16 inputs the kernels see,
    with the norms (both kernels: ghost and direct) and the clipped sum from the kernels (bf16
    tensor cores) and the engine's float32 margin on the norms."""
    _, _, linear, _ = _ops()
    from dpkernels.engine import NORM_MARGIN

    B, T, d, p = 8, 128, 256, 384
    a = torch.randn(B, T, d, device="cuda").to(torch.bfloat16)
    g = (torch.randn(B, T, p, device="cuda") * torch.rand(B, 1, 1, device="cuda") * 3)
    g = g.to(torch.bfloat16)
    norms = linear.linear_norm(a, g, method).sqrt()
    C = norms.median().item()
    c = (C / (norms * (1 + NORM_MARGIN[torch.float32]) + 1e-6)).clamp(max=1.0)
    true = torch.einsum("btp,btd->bpd", g.double(), a.double()).flatten(1).norm(dim=1)
    assert (c.double() * true <= C).all(), (c.double() * true / C).max().item()
    assert (c < 1).sum() >= B // 2 - 1
    for b in range(B):
        one = torch.zeros(B, device="cuda")
        one[b] = c[b]
        contrib = linear.linear_clipped_sum(a, g, one).double().norm().item()
        assert contrib <= C * (1 + 2**-15), (b, contrib / C)


def test_fused_noise_statistics_cuda():
    dense, _, linear, _ = _ops()
    p, d, std = 1024, 1000, 0.7
    n = p * d
    a = torch.zeros(2, 3, d, device="cuda")
    g = torch.zeros(2, 3, p, device="cuda")
    c = torch.ones(2, device="cuda")
    z = linear.linear_clipped_sum(a, g, c, None, std, 2**61 + 5, 1.0).double()
    # |mean| <= 5 sigma / sqrt(n), |std / sigma - 1| <= 5 / sqrt(2n): ~6e-7 false failures each
    assert abs(z.mean().item()) <= 5 * std / math.sqrt(n)
    assert abs(z.std().item() / std - 1) <= 5 / math.sqrt(2 * n)
    # tails of a normal: P(|z| > 3 sigma) = 0.0027
    frac = (z.abs() > 3 * std).double().mean().item()
    assert abs(frac - 0.0026998) <= 5 * math.sqrt(0.0027 / n)
    assert torch.equal(z, linear.linear_clipped_sum(a, g, c, None, std, 2**61 + 5, 1.0).double())
    assert not torch.equal(z, linear.linear_clipped_sum(a, g, c, None, std, 5, 1.0).double())
    # the same noise whether or not the rows are split (keyed by element, not by program)
    z2 = linear.clipped_sum(a, g, c, None, std, 2**61 + 5, 1.0, split=2).double()
    assert torch.equal(z, z2)
    acc = torch.zeros(n, device="cuda")
    w = dense.add_noise(acc, std, 11, 2.0).double() / 2.0
    assert abs(w.std().item() / std - 1) <= 5 / math.sqrt(2 * n)


def test_engine_long_sequence_keeps_w_b_on_the_gpu():
    """A long-sequence Linear stack on the GPU (the direct form, W_b kept from the norm launch
    for the clipped sum): one DP step against the float32 oracle on the same card, by the
    float32 engine rule (tests/test_triton_engine.py: rtol 1e-4), with C above every norm
    (the clip factors are then 1 on both sides: the sum form's bound, ~1e-4 of a norm at
    T 256, would otherwise move them by more than the rule; clipping itself is checked on
    short sequences)."""
    _ops()
    from oracle import check_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 32)).cuda()
    x, y = torch.randn(6, 256, 48, device="cuda"), torch.randn(6, 256, 32, device="cuda")

    def loss(o, t):
        return ((o - t) ** 2).sum((1, 2)).mean()

    with no_tf32():
        check_engine(model, loss, x, y, backend="triton", rtol=1e-4, max_grad_norm=1e6,
                     require_mixed_clipping=False)


def test_engine_bf16_autocast_triton_clips():
    """One DP step under bf16 autocast with backend='triton' (noise 0, C at the median norm:
    half the samples clipped): float32 grads and norms within the bf16 budget (eps 2^-8; 5e-2
    is ~10 eps) of the same step in float32."""
    _ops()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 10)).cuda()
    x = torch.randn(64, 256, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    results = {}
    C = None
    for autocast in (False, True):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        dp = dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=C or 1.0,
                                    expected_batch_size=67, backend="triton", seed=0)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            if C is None:  # the float32 run: C at its median norm, then the real step
                C = dp.per_sample_norms.median().item() * 1.0001
                dp.zero_grad()
                dp.max_grad_norm = C
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
            dp.step()
            results[autocast] = (dp.per_sample_norms.clone(),
                                 [p.grad.clone() for p in m.parameters()])
            assert all(p.grad.dtype == torch.float32 for p in m.parameters())
        finally:
            dpkernels.detach(m)
    (n32, g32), (n16, g16) = results[False], results[True]
    assert ((n32 > C).sum() >= 20) and ((n32 < C).sum() >= 20)
    assert rel(n16, n32) < 5e-2
    for a, b in zip(g16, g32):
        assert torch.isfinite(a).all()
        assert rel(a, b) < 5e-2


# ---------------------------------------------------------------- conv, embedding, norms
CONV_GPU = [  # (B, C_in, spatial, C_out, kernel, stride, padding, dilation, groups)
    (8, 64, (32, 32), 128, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 96, (17, 19), 96, (3, 3), (2, 2), (1, 1), (1, 1), 96),
    (4, 32, (9, 10, 11), 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 1, 1), 4),
]


@pytest.mark.parametrize("case", CONV_GPU, ids=lambda v: f"{v[1]}x{v[2]}-g{v[-1]}")
@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_parity(case, method, dtype):
    _ops()
    from dpkernels.ops import conv
    from dpkernels.reference import conv as ref

    B, C_in, S, C_out, k, stride, padding, dilation, groups = case
    conf = (stride, padding, dilation, groups)
    ws = (C_out, C_in // groups, *k)
    x = torch.randn(B, C_in, *S, device="cuda").to(dtype)
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
          3: torch.nn.functional.conv3d}[len(S)]
    out_shape = fn(x[:1].float(), torch.zeros(ws, device="cuda"), None, *conf).shape[1:]
    g = torch.randn(B, *out_shape, device="cuda").to(dtype)
    c = torch.rand(B, device="cuda")
    with no_tf32():  # torch's own float32 error, the yardstick, must not be TF32's
        n32 = ref.conv_norm(x.float(), g.float(), ws, *conf)
        s32 = ref.conv_clipped_sum(x.float(), g.float(), c, ws, *conf)
    check(conv.conv_norm(x, g, ws, *conf, method=method),
          ref.conv_norm(x.double(), g.double(), ws, *conf), n32, f"conv_norm {method} {dtype}")
    check(conv.conv_clipped_sum(x, g, c, ws, *conf),
          ref.conv_clipped_sum(x.double(), g.double(), c.double(), ws, *conf), s32,
          f"conv_clipped_sum {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,V,p,pad", [(8, 512, 32000, 768, 0), (16, 128, 1000, 256, None)])
def test_embedding_parity(B, T, V, p, pad, dtype):
    _, embedding, _, _ = _ops()
    from dpkernels.reference import embedding as ref

    ids = torch.randint(0, V, (B, T), device="cuda")
    ids[:, :3] = ids[:, 3:6]  # repeated tokens: rows that sum within a sample
    g = torch.randn(B, T, p, device="cuda").to(dtype)
    check(embedding.embedding_norm(ids, g, pad), ref.embedding_norm(ids, g.double(), pad),
          ref.embedding_norm(ids, g.float(), pad), f"embedding_norm {dtype}")
    c = torch.rand(B, device="cuda")
    got = embedding.embedding_clipped_sum(ids, g, c, V, pad)
    check(got, ref.embedding_clipped_sum(ids, g.double(), c.double(), V, pad),
          ref.embedding_clipped_sum(ids, g.float(), c, V, pad), f"embedding_clipped_sum {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_psg_parity(dtype):
    _, _, _, norms = _ops()
    from dpkernels.reference import norms as ref

    x = torch.randn(8, 256, 768, device="cuda").to(dtype)
    g = torch.randn(8, 256, 768, device="cuda").to(dtype)
    for name, args in (("layer_norm_psg", ((768,), 1e-5, True, True)),
                       ("rms_norm_psg", ((768,), None))):
        got = getattr(norms, name)(x, g, *args)
        r64 = getattr(ref, name)(x.double(), g.double(), *args)
        r32 = getattr(ref, name)(x.float(), g.float(), *args)
        got, r64, r32 = (t if isinstance(t, tuple) else (t,) for t in (got, r64, r32))
        for i, (a, b, c) in enumerate(zip(got, r64, r32)):
            check(a, b, c, f"{name}[{i}] {dtype}")
    x = torch.randn(8, 64, 32, 32, device="cuda").to(dtype)
    g = torch.randn(8, 64, 32, 32, device="cuda").to(dtype)
    got = norms.group_norm_psg(x, g, 8, 1e-5, True, True)
    r64 = ref.group_norm_psg(x.double(), g.double(), 8, 1e-5, True, True)
    r32 = ref.group_norm_psg(x.float(), g.float(), 8, 1e-5, True, True)
    for i, (a, b, c) in enumerate(zip(got, r64, r32)):
        check(a, b, c, f"group_norm_psg[{i}] {dtype}")
