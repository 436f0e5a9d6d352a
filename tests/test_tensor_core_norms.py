"""Norms on tensor cores: the float32 split-and-scale path of ``ops/_common.norm_mma`` and the
error the cancellation bounds charge for it (``reference/bounds.dot_roundings``).

On a GPU the Triton norm kernels multiply float32 operands on tensor cores (each K-chunk in a
fresh accumulator, rows scaled by powers of two, each operand split into two TF32 parts) and
16-bit operands on tensor cores with the same chunking.  Three things are checked here on the
CPU:

* the split and scaling arithmetic, run by the interpreter (``NORM_PRECISION_INTERPRET``),
  is within the split's own error (26 u per product) of float64 on inputs that cancel, span
  100 binades within a row, underflow or are zero, and propagates inf and NaN;
* a pessimistic software model of a tensor core (operands aligned to the largest exponent and
  truncated, the sum truncated, no extra bits) chunked as ``norm_mma`` chunks stays within
  ``TC_CHUNK_ROUNDINGS`` for every block size, on inputs built to make truncation hurt;
* ``dot_roundings`` charges K on the CPU and the tensor-core count on any other device, and
  the engine's bounds use it.

What the hardware does is checked by tests/test_gpu.py when a GPU is lent.
"""

import math

import pytest
import torch

from dpkernels import dispatch
from dpkernels.layers.base import BiasUse, LinearUse
from dpkernels.layers.conv import ConvUse
from dpkernels.layers.embedding import EmbeddingUse
from dpkernels.reference import bounds as rb
from dpkernels.reference import linear as ref_linear

dispatch._load("triton")

from dpkernels.ops import _common  # noqa: E402
from dpkernels.ops import conv as tconv  # noqa: E402
from dpkernels.ops import embedding as temb  # noqa: E402
from dpkernels.ops import ghost_many as tmany  # noqa: E402
from dpkernels.ops import linear as tlinear  # noqa: E402
from dpkernels.reference import conv as ref_conv  # noqa: E402
from dpkernels.reference import embedding as ref_emb  # noqa: E402

U = 2.0**-24


@pytest.fixture
def split_path(monkeypatch):
    """The interpreter runs the GPU's float32 norm arithmetic (exact products, IEEE sums)."""
    if not _common.INTERPRET:
        pytest.skip("the interpreter's switch; on a GPU the kernels take this path anyway")
    monkeypatch.setattr(_common, "NORM_PRECISION_INTERPRET", "tf32x3")


def hard_inputs(B, T, d, seed, kind):
    """[B, T, d] float32 rows that make a split or a scaling go wrong if it can."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    if kind == "cancel":  # position 1 nearly cancels position 0: tiny norm, huge terms
        x[:, 1] = -x[:, 0] + 1e-3 * torch.randn(B, d, generator=g, dtype=torch.float64)
        x[:, :2] *= 2.0**11
    elif kind == "binades":  # each row spans 2^-60 .. 2^40: lo parts far below the row max
        x = x * torch.pow(2.0, torch.randint(-60, 41, (B, T, d), generator=g).double())
    elif kind == "tiny":  # small rows, and every third row subnormal (a scale of 2^126)
        x = x * 2.0**-60
        x[:, ::3] *= 2.0**-70
    elif kind == "huge":  # rows up to 1.5 * 2^127: the largest exponent the scaling clamps
        x = x.clamp(-1.9, 1.9) * 2.0**126
        x[:, :, 0] = 1.5 * 2.0**127
    elif kind == "zeros":
        x[:, ::2] = 0.0
        x[0] = 0.0
    return x.float()


def split_tolerance(x_abs_rows, y_abs_rows, K_x, K_y, T):
    """The split's error (TC_SPLIT_ROUNDINGS per product) plus what IEEE sums of exact
    products add (K per inner product, 2T + 16 for the pair sums), times S^2 = (sum_t
    |a_t| |g_t|)^2."""
    S = (x_abs_rows * y_abs_rows).sum(-1)
    kappa = 2 * rb.TC_SPLIT_ROUNDINGS + K_x + K_y + 2 * T + 16
    return kappa * U * S * S


@pytest.mark.parametrize("kind", ["cancel", "binades", "tiny", "zeros"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_split_linear_norm_within_the_split_error(split_path, kind, method):
    B, T, d, p = 3, 40, 48, 20
    a = hard_inputs(B, T, d, 1, kind)
    gr = hard_inputs(B, T, p, 2, "cancel" if kind == "zeros" else "plain")
    n, nb = tlinear.linear_norms(a, gr, method, True)
    exact = ref_linear.linear_norm(a.double(), gr.double(), method)
    exact_b = ref_linear.linear_bias_norm(gr.double())
    tol = split_tolerance(a.double().norm(dim=-1), gr.double().norm(dim=-1), d, p, T)
    tol_b = split_tolerance(torch.ones(B, T, dtype=torch.float64), gr.double().norm(dim=-1),
                            0, p, T)
    assert torch.all((n.double() - exact).abs() <= tol + 1e-30), (n, exact, tol)
    assert torch.all((nb.double() - exact_b).abs() <= tol_b + 1e-30)


def test_split_scales_rows_up_to_the_float32_maximum(split_path):
    """Direct form (the ghost form's Gram of such rows overflows in float32 anyway)."""
    B, T, d, p = 2, 12, 40, 24
    a = hard_inputs(B, T, d, 12, "huge")
    gr = (hard_inputs(B, T, p, 13, "plain").double() * 2.0**-140).float()
    n, _ = tlinear.linear_norms(a, gr, "direct", False)
    exact = ref_linear.linear_norm(a.double(), gr.double(), "direct")
    tol = split_tolerance(a.double().norm(dim=-1), gr.double().norm(dim=-1), d, p, T)
    assert torch.all(exact > 0) and torch.all((n.double() - exact).abs() <= tol)


def test_split_actually_keeps_the_low_parts(split_path):
    """Dropping the TF32 low parts (plain TF32) is ~2^-11 off per product: far outside."""
    B, T, d, p = 2, 8, 64, 32
    a = hard_inputs(B, T, d, 3, "plain")
    gr = hard_inputs(B, T, p, 4, "plain")
    n, _ = tlinear.linear_norms(a, gr, "ghost", False)
    exact = ref_linear.linear_norm(a.double(), gr.double(), "ghost")
    assert torch.all((n.double() - exact).abs() <= 1e-5 * exact)


def test_split_ghost_many_and_embedding_and_conv(split_path):
    B, T, d, p, V = 2, 33, 24, 40, 11
    a = hard_inputs(B, T, d, 5, "binades")
    gr = hard_inputs(B, T, p, 6, "cancel")
    norms = tmany.linear_norms_many([(a, gr, "ghost", False)])
    exact = ref_linear.linear_norm(a.double(), gr.double(), "ghost")
    tol = split_tolerance(a.double().norm(dim=-1), gr.double().norm(dim=-1), d, p, T)
    assert torch.all((norms[0].double() - exact).abs() <= tol)

    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    e = temb.embedding_norm(ids, gr, None)
    e_exact = ref_emb.embedding_norm(ids, gr.double(), None)
    tol_e = split_tolerance(torch.ones(B, T, dtype=torch.float64), gr.double().norm(dim=-1),
                            0, p, T)
    assert torch.all((e.double() - e_exact).abs() <= tol_e)

    x = hard_inputs(B, 3, 64, 8, "binades").reshape(B, 3, 8, 8)
    gc = hard_inputs(B, 4, 36, 9, "plain").reshape(B, 4, 6, 6)
    for method in ("ghost", "direct"):
        c = tconv.conv_norm(x, gc, (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1, method)
        c_exact = ref_conv.conv_norm(x.double(), gc.double(), (4, 3, 3, 3), (1, 1), (0, 0),
                                     (1, 1), 1, method)
        assert torch.allclose(c.double(), c_exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_split_propagates_non_finite_inputs(split_path, bad):
    a = hard_inputs(2, 5, 16, 10, "plain")
    gr = hard_inputs(2, 5, 16, 11, "plain")
    a[1, 2, 3] = bad
    for method in ("ghost", "direct"):
        n, _ = tlinear.linear_norms(a, gr, method, False)
        assert torch.isfinite(n[0]) and not torch.isfinite(n[1])


# ------------------------------------------------------------- a pessimistic tensor core


def _truncate(v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``v`` (float64) truncated toward zero to a multiple of 2^(e - 23)."""
    q = torch.pow(2.0, e - 23)
    return torch.trunc(v / q) * q


def _exponent(v: torch.Tensor) -> torch.Tensor:
    return torch.frexp(v)[1].double() - 1  # v in [2^e, 2^(e+1))


def tc_block_fma(acc: torch.Tensor, prods: torch.Tensor) -> torch.Tensor:
    """One block FMA of a pessimistic tensor core: ``acc`` [R] plus ``prods`` [R, k] exact
    products, every term aligned to the largest exponent and truncated to 24 bits, the exact
    sum of the aligned terms truncated to 24 significant bits."""
    terms = torch.cat([acc[:, None], prods], 1)
    e = _exponent(terms.abs().amax(1).clamp_min(2.0**-126))[:, None]
    s = _truncate(terms, e).sum(1)
    return _truncate(s, _exponent(s.abs().clamp_min(2.0**-126)))


def tc_chunked_dot(x: torch.Tensor, y: torch.Tensor, BK: int, k: int) -> torch.Tensor:
    """[R] ``x . y`` (float32 values, [R, K]) as norm_mma computes it for 16-bit-exact
    operands: chunks of BK in a fresh accumulator, k products per block FMA, each chunk added
    to a float32 accumulator with one IEEE rounding."""
    R, K = x.shape
    out = torch.zeros(R, dtype=torch.float32)
    for c0 in range(0, K, BK):
        blk = torch.zeros(R, dtype=torch.float64)
        for k0 in range(c0, min(K, c0 + BK), k):
            p = x[:, k0:min(K, c0 + BK, k0 + k)].double() * y[:, k0:min(K, c0 + BK, k0 + k)]
            blk = tc_block_fma(blk, p)
        out = out + blk.float()
    return out


@pytest.mark.parametrize("BK", [16, 32, 64])
@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_chunk_roundings_cover_a_truncating_tensor_core(BK, k):
    """Adversarial sums for truncation: one large product then many just below the
    alignment step, alternating signs that cancel the large part, and random rows."""
    g = torch.Generator().manual_seed(BK * 100 + k)
    R, K = 64, 4 * BK + 5
    # bf16-exact operands so that products are exact in float64, as on the tensor core
    x = torch.randn(R, K, generator=g).bfloat16().float()
    y = torch.randn(R, K, generator=g).bfloat16().float()
    x[:16, 0] = 2.0**12
    y[:16, 0] = 1.0
    x[:16, 1:] = (1.0 - 2.0**-7) * 2.0**-12
    y[:16, 1:] = 1.0
    x[16:32, ::2] = 2.0**9
    x[16:32, 1::2] = -(2.0**9) + 1.0
    y[16:32] = 1.0
    got = tc_chunked_dot(x, y, BK, k).double()
    exact = (x.double() * y.double()).sum(1)
    mag = (x.double() * y.double()).abs().sum(1)
    err = (got - exact).abs()
    assert torch.all(err <= rb.TC_CHUNK_ROUNDINGS * U * mag), (err / (U * mag)).max()
    # the model is not vacuous: truncation costs several u on these rows
    assert float((err / (U * mag)).max()) > 2.0


def test_dot_roundings_by_device():
    cpu = torch.zeros(1)
    other = torch.zeros(1, device="meta")
    for K in (1, 16, 768, 3072, 16384):
        assert rb.dot_roundings(K, cpu) == K
        tc = rb.TC_CHUNK_ROUNDINGS + rb.TC_SPLIT_ROUNDINGS + math.ceil(K / 16)
        assert rb.dot_roundings(K, other) == max(K, tc)
    # a GPU may run either (the reference backend multiplies with cuBLAS FMA loops)
    assert rb.dot_roundings(16, other) > 16 and rb.dot_roundings(16384, other) == 16384


def test_engine_bounds_use_the_device_roundings():
    B, T, d, p = 2, 7, 30, 900
    a, g = torch.randn(B, T, d), torch.randn(B, T, p)
    use = LinearUse(a, g)
    assert use.kappa() == d + p + 2 * T + 16
    assert use.bound_constants() == (use.kappa(), T)
    meta = LinearUse(a.to("meta"), g.to("meta"))
    assert meta.kappa() == (rb.dot_roundings(d, meta.a) + rb.dot_roundings(p, meta.g)
                            + 2 * T + 16)
    assert meta.bound_constants()[1] == rb.dot_roundings(T, meta.g)
    assert BiasUse(g.to("meta")).kappa() == rb.dot_roundings(p, meta.g) + 2 * T + 16


def test_one_position_norms_are_bounded_on_a_gpu():
    """T = 1 Embedding and Conv norms are sums of squares: relative rounding, within the
    margin on the CPU; on a GPU the kernels sum them on tensor cores, whose chunk error the
    margin does not cover, so they carry the bound there (reviewer's finding)."""
    ids, g = torch.zeros(3, 1, dtype=torch.long), torch.randn(3, 1, 8)
    assert EmbeddingUse(ids, g, None, 5).bound_constants() is None
    emb = EmbeddingUse(ids.to("meta"), g.to("meta"), None, 5)
    assert emb.bound_constants() == (emb.kappa(), rb.dot_roundings(1, emb.g))
    x, gc = torch.randn(3, 2, 3, 3), torch.randn(3, 4, 1, 1)
    conf = ((1, 1), (0, 0), (1, 1), 1)
    assert ConvUse(x, gc, (4, 2, 3, 3), conf).error_terms() is None
    conv = ConvUse(x.to("meta"), gc.to("meta"), (4, 2, 3, 3), conf)
    S, kappa, chain = conv.error_terms()
    assert S.shape == (3, 1) and kappa == conv.kappa() and chain == rb.dot_roundings(1, conv.g)


def test_reference_ops_off_the_cpu_run_without_tf32(monkeypatch):
    """On a GPU the reference multiplies with torch, which may use TF32 (1e-3 short, beyond
    every bound): dispatch turns it off around every reference op there, and restores it."""
    seen = []

    def probe(x):
        seen.append((torch.backends.cuda.matmul.fp32_precision,
                     torch.backends.cudnn.conv.fp32_precision))
        return x

    monkeypatch.setitem(dispatch._IMPLS, ("_probe_tf32", "reference"), probe)
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        dispatch._RESOLVED.clear()
        dispatch.call("_probe_tf32", "reference", torch.zeros(1, device="meta"))
        dispatch.call("_probe_tf32", "reference", torch.zeros(1))
        after = matmul.fp32_precision, conv.fp32_precision
    finally:
        matmul.fp32_precision, conv.fp32_precision = old
        dispatch._RESOLVED.clear()
    assert seen == [("ieee", "ieee"), ("tf32", "tf32")]
    assert after == ("tf32", "tf32")


def test_split_scales_back_without_an_intermediate_overflow(split_path):
    """Activations ~2^-125 next to backprops ~2^125: each chunk's scale factors are 2^125 and
    2^-125 apart, and applying them one after the other overflowed (reviewer's case)."""
    B, T, d, p = 1, 64, 16, 16
    a = torch.full((B, T, d), 1.5 * 2.0**-125)
    g = torch.full((B, T, p), 1.5 * 2.0**125)
    exact = ref_linear.linear_norm(a.double(), g.double(), "direct")
    n, _ = tlinear.linear_norms(a, g, "direct", False)
    assert torch.allclose(n.double(), exact, rtol=1e-6)
    x, gc = a.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()
    c = tconv.conv_norm(x, gc, (p, d, 1), (1,), (0,), (1,), 1, "direct")
    assert torch.allclose(c.double(), exact, rtol=1e-6)


def test_direct_form_uses_are_charged_the_sum_form_bound_only():
    """A norm computed as the sum of squares of W_b (the direct form) is off by the sum form's
    error alone; charging the ghost form's kappa u S^2 too (S^2 ~ T n^2) inflated long
    sequences' norms (T 1024: +0.30% against +0.04%)."""
    B, T, d, p = 2, 300, 8, 6  # T (d + p) >= d p: direct under "auto"
    a, g = torch.randn(B, T, d), torch.randn(B, T, p)
    direct = LinearUse(a, g, "auto")
    assert direct.direct_form() and direct.bound_constants() == (0, T)
    assert direct.kappa() > 0  # cross terms (Gram-form sums) keep it
    ghost = LinearUse(a, g, "ghost")
    assert not ghost.direct_form() and ghost.bound_constants() == (ghost.kappa(), T)
    assert LinearUse(a[:, :2], g[:, :2], "auto").bound_constants()[0] > 0  # short: ghost
    assert BiasUse(g, gram=False).bound_constants() == (0, T)
    assert BiasUse(g).bound_constants() == (BiasUse(g).kappa(), T)


def test_linear_bias_charged_by_its_weights_form():
    from torch import nn

    import dpkernels

    for T, gram in ((300, False), (2, True)):
        model = nn.Linear(8, 6)
        dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    noise_multiplier=0.0, max_grad_norm=1.0, seed=0,
                                    loss_reduction="sum")
        try:
            model(torch.randn(2, T, 8)).sum().backward()
            (_, bias_use), = [(p, u) for p, us in dp.engine.uses.items() for u in us
                              if isinstance(u, BiasUse)]
            assert bias_use.gram is gram
        finally:
            dpkernels.detach(model)
