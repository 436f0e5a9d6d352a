"""Every Triton op against its reference, on CPU tensors through Triton's interpreter.

Tolerance rule (flash-attention's): with float32 inputs the kernel's relative error against
the float64 reference may be at most twice what torch itself makes when it computes the same
op in float32 (the reference op on float32 inputs), plus 16 eps32 for cases where torch is
exact by luck.  Errors are norm-wise, ``||out - ref|| / ||ref||``.  16-bit inputs are compared
on their exactly representable float32 values, so the same rule applies (their products are
exact in float32; only the accumulation rounds).

Without a GPU the module switches the interpreter on before triton is first imported.  On a
GPU machine where the kernels were already compiled for CUDA (another test module imported
dpkernels.ops first) the same tests run on CUDA tensors instead.

Outputs: every float buffer the launchers allocate with ``torch.empty`` is poisoned with NaN
first (the ``poison`` fixture), so an element a kernel forgets to write fails the test.
"""

import os

import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernel_check import DEVICE, EPS32, check, on_device, poison, rel  # noqa: E402, F401
from noise_stats import check_noise  # noqa: E402

from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import dense, embedding, linear, norms  # noqa: E402
from dpkernels.reference import dense as ref_dense  # noqa: E402
from dpkernels.reference import embedding as ref_emb  # noqa: E402
from dpkernels.reference import linear as ref_lin  # noqa: E402
from dpkernels.reference import norms as ref_norms  # noqa: E402


def pair(*ts):
    """(float64 copies, float32 copies) of 16-bit or float32 inputs, same values."""
    return [t.double() for t in ts], [t.float() for t in ts]


LIN_SHAPES = [
    pytest.param(3, 63, 33, 17, id="B3-T63-d33-p17"),
    pytest.param(2, 1, 7, 5, id="B2-T1-d7-p5"),
    pytest.param(1, 40, 70, 45, id="B1-T40-d70-p45"),
    pytest.param(0, 5, 3, 4, id="B0-T5-d3-p4"),
]


# ---------------------------------------------------------------------------- linear


@pytest.mark.parametrize("B,T,d,p", LIN_SHAPES)
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
def test_linear_norm(B, T, d, p, method):
    a, g = torch.randn(B, T, d), torch.randn(B, T, p)
    out = linear.linear_norm(a, g, method)
    check(out, ref_lin.linear_norm(a.double(), g.double(), method),
          ref_lin.linear_norm(a, g, method), method)


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_norm_strided_bf16(method):
    # non-contiguous a (a transposed view), bf16 g: promoted to one dtype, strides honoured
    a = torch.randn(3, 35, 33).transpose(1, 2)  # [3, 33, 35], stride 1 along T
    g = torch.randn(3, 33, 18).to(torch.bfloat16)
    (a64, g64), (a32, g32) = pair(a, g)
    check(linear.linear_norm(a, g, method), ref_lin.linear_norm(a64, g64, method),
          ref_lin.linear_norm(a32, g32, method))
    ab, gb = a.to(torch.bfloat16), g
    (a64, g64), (a32, g32) = pair(ab, gb)
    check(linear.linear_norm(ab, gb, method), ref_lin.linear_norm(a64, g64, method),
          ref_lin.linear_norm(a32, g32, method))


@pytest.mark.parametrize("B,T,d,p", LIN_SHAPES)
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["w", "w+b"])
@pytest.mark.parametrize("mean", [0.0, 0.3], ids=["g0", "g.3"])
def test_linear_norms(B, T, d, p, method, with_bias, mean):
    # mean 0.3: sum_t g_t != sum_t ||g_t|| matters; mean 0: sum_t g_t cancels (in the ghost
    # kernel the bias norm is a sum of Gram entries that cancel too)
    a, g = torch.randn(B, T, d), torch.randn(B, T, p) + mean
    w, bn = linear.linear_norms(a, g, method, with_bias)
    w64, b64 = ref_lin.linear_norms(a.double(), g.double(), method, with_bias)
    w32, b32 = ref_lin.linear_norms(a, g, method, with_bias)
    check(w, w64, w32, f"{method} weight")
    if with_bias:
        check(bn, b64, b32, f"{method} bias")
    else:
        assert bn is None


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_norms_bf16_strided(method):
    a = torch.randn(3, 35, 33).transpose(1, 2).to(torch.bfloat16)  # [3, 33, 35], T stride 1
    g = (torch.randn(3, 33, 18) + 0.2).to(torch.bfloat16)
    (a64, g64), (a32, g32) = pair(a, g)
    w, bn = linear.linear_norms(a, g, method, True)
    w64, b64 = ref_lin.linear_norms(a64, g64, method, True)
    w32, b32 = ref_lin.linear_norms(a32, g32, method, True)
    check(w, w64, w32, "weight")
    check(bn, b64, b32, "bias")


@pytest.mark.parametrize("d,p", [(70, 100), (20, 40)], ids=["d70-p100", "d20-p40"])
def test_linear_norms_direct_tiles(d, p):
    # one or several d-tiles per p-tile: only the d-tile-0 programs write bias partials, and
    # every (sample, p-tile) slot is written
    a, g = torch.randn(2, 9, d), torch.randn(2, 9, p) + 0.1
    w, bn = linear.linear_norms(a, g, "direct", True)
    w64, b64 = ref_lin.linear_norms(a.double(), g.double(), "direct", True)
    w32, b32 = ref_lin.linear_norms(a, g, "direct", True)
    check(w, w64, w32, "weight")
    check(bn, b64, b32, "bias")


def test_linear_norms_no_inputs():
    # d == 0: no weight, but the bias still has a gradient
    a, g = torch.randn(3, 4, 0), torch.randn(3, 4, 5)
    w, bn = linear.linear_norms(a, g, "auto", True)
    assert torch.equal(w, torch.zeros(3))
    check(bn, ref_lin.linear_bias_norm(g.double()), ref_lin.linear_bias_norm(g))


@pytest.mark.parametrize("T1,T2,d,p", [(5, 9, 40, 36), (70, 33, 6, 5)],
                         ids=["ghost-cheaper", "direct-cheaper"])
def test_linear_cross(T1, T2, d, p):
    B = 3
    a1, g1 = torch.randn(B, T1, d), torch.randn(B, T1, p)
    a2, g2 = torch.randn(B, T2, d), torch.randn(B, T2, p)
    r64 = ref_lin.linear_cross(a1.double(), g1.double(), a2.double(), g2.double())
    r32 = ref_lin.linear_cross(a1, g1, a2, g2)
    check(linear.linear_cross(a1, g1, a2, g2), r64, r32, "auto")
    check(linear._ghost(a1, g1, a2, g2, symmetric=False)[0], r64, r32, "ghost")
    check(linear._direct(a1, g1, a2, g2)[0], r64, r32, "direct")


@pytest.mark.parametrize("B,T,d,p", LIN_SHAPES)
def test_linear_bias_norm(B, T, d, p):
    g = torch.randn(B, T, p) + 0.3  # a mean, so that sum_t g_t != sum_t ||g_t|| matters
    check(linear.linear_bias_norm(g), ref_lin.linear_bias_norm(g.double()),
          ref_lin.linear_bias_norm(g))


# float32 clipped sums run on torch's GEMM ("gemm") by default; the Triton kernel ("triton")
# keeps float32 for TF32-allowed runs (tf32x3), so both paths are tested with every epilogue.
CLIPPED_PATHS = [pytest.param("triton", None, id="triton"), pytest.param("triton", 3, id="split3"),
                 pytest.param("gemm", None, id="gemm")]


@pytest.mark.parametrize("B,T,d,p", LIN_SHAPES + [pytest.param(2, 5, 40, 9, id="B2-T5-d40-p9")])
@pytest.mark.parametrize("path,split", CLIPPED_PATHS)
def test_linear_clipped_sum(B, T, d, p, path, split):
    a, g, c = torch.randn(B, T, d), torch.randn(B, T, p), torch.rand(B)
    acc = torch.randn(p, d)
    r64 = ref_lin.linear_clipped_sum(a.double(), g.double(), c.double(), acc.double(), 0.0, 0,
                                     0.25)
    r32 = ref_lin.linear_clipped_sum(a, g, c, acc.clone(), 0.0, 0, 0.25)
    out = linear.clipped_sum(a, g, c, acc, 0.0, 0, 0.25, split=split, path=path)
    assert out is acc  # folded in place
    check(out, r64, r32, "with acc")
    out = linear.clipped_sum(a, g, c, split=split, path=path)
    check(out, ref_lin.linear_clipped_sum(a.double(), g.double(), c.double()),
          ref_lin.linear_clipped_sum(a, g, c), "fresh")
    # a strided accumulator is read through a float32 copy and updated in place
    acc_t = torch.randn(d, p).t()
    want64 = ref_lin.linear_clipped_sum(a.double(), g.double(), c.double(), acc_t.double(), 0.0,
                                        0, 0.5)
    want32 = ref_lin.linear_clipped_sum(a, g, c, acc_t.clone(), 0.0, 0, 0.5)
    out = linear.clipped_sum(a, g, c, acc_t, 0.0, 0, 0.5, split=split, path=path)
    assert out is acc_t
    check(out, want64, want32, "strided acc")


def test_clipped_sum_path_rule():
    assert linear.clipped_sum_path(torch.float32) == "gemm"  # torch's default: no TF32
    assert linear.clipped_sum_path(torch.bfloat16) == "triton"
    assert linear.clipped_sum_path(torch.float16) == "triton"
    with pytest.raises(ValueError, match="path must be"):
        linear.clipped_sum(torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.ones(1),
                           path="cublas")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_clipped_sum_16bit(dtype):
    # c_b g is formed in float32 and split hi + lo into 16-bit parts: no 2^-9 rounding of c_b g
    a, g = torch.randn(4, 19, 21).to(dtype), torch.randn(4, 19, 34).to(dtype)
    c = torch.rand(4) * 0.9 + 0.05
    (a64, g64), (a32, g32) = pair(a, g)
    out = linear.clipped_sum(a, g, c, split=2)
    r64 = ref_lin.linear_clipped_sum(a64, g64, c.double())
    if dtype == torch.bfloat16:
        # hi + lo carry 2 x 8 mantissa bits: ~2^-17 per element, the size of float32's own
        # worst-case accumulation error over a few hundred rows (rounding c_b g to bf16
        # alone would give ~2^-9); 2^-15 leaves 4x
        assert rel(out, r64) <= 2**-15
    else:
        check(out, r64, ref_lin.linear_clipped_sum(a32, g32, c))  # fp16: 2 x 11 bits


# 16-bit operands with T >= ONE_PASS_MIN_T rows per sample: raw tiles into a float32
# per-sample tile, c_b applied at each sample boundary.  Only float32 accumulation rounds, so
# the float32 rule holds (stricter than the hi + lo bound of 2^-15 above); forced on short
# samples and off on long ones, with splits, an accumulator, noise-free scale.
ONE_PASS_CASES = [
    pytest.param(3, 40, 21, 34, None, None, id="B3-T40-auto"),
    pytest.param(5, 33, 40, 9, 2, None, id="B5-T33-split2"),
    pytest.param(4, 70, 17, 45, 3, None, id="B4-T70-split3"),
    pytest.param(3, 5, 21, 34, None, True, id="B3-T5-forced"),
    pytest.param(2, 1, 7, 5, 2, True, id="B2-T1-forced-split2"),
    pytest.param(0, 40, 7, 5, None, None, id="B0"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,d,p,split,one_pass", ONE_PASS_CASES)
def test_linear_clipped_sum_16bit_one_pass(B, T, d, p, split, one_pass, dtype):
    a, g = torch.randn(B, T, d).to(dtype), (torch.randn(B, T, p) + 0.1).to(dtype)
    c = torch.rand(B) * 0.9 + 0.05
    (a64, g64), (a32, g32) = pair(a, g)
    acc = torch.randn(p, d)
    r64 = ref_lin.linear_clipped_sum(a64, g64, c.double(), acc.double(), 0.0, 0, 0.25)
    r32 = ref_lin.linear_clipped_sum(a32, g32, c, acc.clone(), 0.0, 0, 0.25)
    out = linear.clipped_sum(a, g, c, acc, 0.0, 0, 0.25, split=split, one_pass=one_pass)
    assert out is acc
    check(out, r64, r32, "with acc")
    out = linear.clipped_sum(a, g, c, split=split, one_pass=one_pass)
    check(out, ref_lin.linear_clipped_sum(a64, g64, c.double()),
          ref_lin.linear_clipped_sum(a32, g32, c), "fresh")


def test_linear_clipped_sum_one_pass_rule():
    """ONE_PASS is the default for 16-bit operands with T >= ONE_PASS_MIN_T, hi + lo below
    (the kernels are deterministic: the default equals the forced route bit for bit)."""
    c = torch.rand(3)
    for T, want in [(linear.ONE_PASS_MIN_T, True), (linear.ONE_PASS_MIN_T - 1, False)]:
        a, g = torch.randn(3, T, 20).to(torch.bfloat16), torch.randn(3, T, 12).to(torch.bfloat16)
        auto = linear.clipped_sum(a, g, c)
        assert torch.equal(auto, linear.clipped_sum(a, g, c, one_pass=want)), T
        assert not torch.equal(auto, linear.clipped_sum(a, g, c, one_pass=not want)), T


@pytest.mark.parametrize("B,T,p", [(3, 63, 17), (2, 1, 5), (0, 4, 3), (600, 2, 3)],
                         ids=["B3-T63", "T1", "B0", "B600-split"])
def test_linear_bias_clipped_sum(B, T, p):
    g, c, acc = torch.randn(B, T, p), torch.rand(B), torch.randn(p)
    r64 = ref_lin.linear_bias_clipped_sum(g.double(), c.double(), acc.double(), 0.0, 0, 0.5)
    r32 = ref_lin.linear_bias_clipped_sum(g, c, acc.clone(), 0.0, 0, 0.5)
    out = linear.linear_bias_clipped_sum(g, c, acc, 0.0, 0, 0.5)
    assert out is acc
    check(out, r64, r32)


@pytest.mark.parametrize("shape", [(5, 3, 7), (1, 130), (0, 4), (4, 2, 2, 2)])
@pytest.mark.parametrize("split", [None, 2])
def test_dense_clipped_sum(shape, split):
    psg, c = torch.randn(shape), torch.rand(shape[0])
    out = dense.weighted_rows(psg.reshape(shape[0], 1, math.prod(shape[1:])), c, None, 0.0, 0, 0.5,
                              shape[1:], split=split)
    check(out, ref_dense.dense_clipped_sum(psg.double(), c.double(), None, 0.0, 0, 0.5),
          ref_dense.dense_clipped_sum(psg, c, None, 0.0, 0, 0.5))
    check(dense.dense_clipped_sum(psg, c), ref_dense.dense_clipped_sum(psg.double(), c.double()),
          ref_dense.dense_clipped_sum(psg, c))


def test_float64_goes_to_reference():
    a, g, c = torch.randn(2, 3, 4).double(), torch.randn(2, 3, 5).double(), torch.rand(2).double()
    out = linear.linear_norm(a, g)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_lin.linear_norm(a, g), rtol=0, atol=0)
    assert linear.linear_clipped_sum(a, g, c).dtype == torch.float64
    w, bn = linear.linear_norms(a, g, "auto", True)
    assert w.dtype == bn.dtype == torch.float64
    torch.testing.assert_close(bn, ref_lin.linear_bias_norm(g), rtol=0, atol=0)


def test_registered():
    for name in ["linear_norm", "linear_norms", "linear_cross", "linear_bias_norm",
                 "linear_clipped_sum", "linear_bias_clipped_sum", "dense_clipped_sum", "add_noise",
                 "add_noise_many", "dense_norm", "dense_norm_many", "rows_clipped_sum_many",
                 "linear_clipped_sum_many",
                 "embedding_norm", "embedding_cross", "embedding_clipped_sum", "layer_norm_psg",
                 "rms_norm_psg", "group_norm_psg"]:
        fn, backend = dispatch.resolve(name, "triton", DEVICE)
        assert backend == "triton" and fn.__module__.startswith("dpkernels.ops"), name


# ---------------------------------------------------------------------------- noise

# The noise z is Philox normal noise keyed by (seed, element offset).  Statistical checks use
# n = 64 * 80 = 5120 draws: |mean| <= 5 sigma / sqrt(n) and |std / sigma - 1| <= 5 / sqrt(2n)
# (the sample std's standard error is ~ sigma / sqrt(2n)); each fails by chance with
# probability ~6e-7 for a correct generator, and the seeds are fixed, so the test is stable.
N_NOISE = 64 * 80


def _noise_linear(seed, std=1.5, split=None, path=None):
    a, g, c = torch.zeros(2, 3, 80), torch.zeros(2, 3, 64), torch.ones(2)
    return linear.clipped_sum(a, g, c, None, std, seed, 1.0, split=split, path=path)


def test_noise_statistics():
    std = 1.5
    z = _noise_linear(12345, std).double()
    assert abs(z.mean().item()) <= 5 * std / math.sqrt(N_NOISE)
    assert abs(z.std().item() / std - 1) <= 5 / math.sqrt(2 * N_NOISE)
    # neighbouring elements are independent: lag-1 correlation ~ N(0, 1/n)
    f = z.flatten()
    corr = torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1].item()
    assert abs(corr) <= 5 / math.sqrt(N_NOISE)


def test_noise_seeds():
    z1, z2 = _noise_linear(7), _noise_linear(7)
    assert torch.equal(z1, z2)  # reproducible
    assert torch.equal(z1, _noise_linear(7, split=2, path="triton"))  # keyed by element,
    assert torch.equal(z1, _noise_linear(7, path="triton"))  # not by tiling or path
    assert not torch.equal(z1, _noise_linear(8))
    big = 2**61 + 7  # engine seeds are 62-bit: the high bits must change the noise
    assert not torch.equal(_noise_linear(big), z1)
    assert torch.equal(_noise_linear(big), _noise_linear(big))


def test_noise_epilogues_everywhere():
    """Every clipped sum adds noise_std * z, then scales; the update itself is unchanged.
    Statistics from noise_stats.py: each check fails by chance with probability 5.7e-7 and
    catches a noise std off by sqrt(2) with probability >= 0.999 (it refuses fewer than 256
    draws); here 1024 to 2048 draws per epilogue, independent across epilogues."""
    std, seed, scale = 2.0, 99, 0.5
    g, c = torch.randn(3, 4, 1024), torch.rand(3)
    exact = ref_lin.linear_bias_clipped_sum(g.double(), c.double())
    z = {}
    for split in [1, 3]:
        out = dense.weighted_rows(g, c, None, std, seed, scale, (1024,), split=split).double()
        z[f"weighted_rows split={split}"] = (out / scale - exact) / std
    # the same draws however the rows are split (keyed by element); the sums round differently
    assert rel(z.pop("weighted_rows split=3"), z["weighted_rows split=1"]) < 1e-6
    acc = torch.randn(40, 50)
    before = acc.clone()
    out = dense.add_noise(acc, std, seed + 1, scale)
    assert out is acc
    z["add_noise"] = ((out.double() / scale) - before.double()) / std
    ids = torch.randint(0, 32, (2, 5))
    ge = torch.randn(2, 5, 64)
    out = embedding.embedding_clipped_sum(ids, ge, c[:2], 32, None, None, std, seed + 2, scale)
    exact = ref_emb.embedding_clipped_sum(ids, ge.double(), c[:2].double(), 32)
    z["embedding_clipped_sum"] = ((out.double() / scale) - exact) / std
    check_noise({k: v.flatten() for k, v in z.items()}, 1.0)


# ---------------------------------------------------------------------------- embedding

EMB_CASES = [
    pytest.param(3, 63, 17, 11, 0, id="B3-T63-p17-pad0"),
    pytest.param(2, 1, 5, 4, None, id="T1-nopad"),
    pytest.param(1, 40, 33, 7, 3, id="B1-T40-pad3"),
    pytest.param(0, 4, 3, 5, None, id="B0"),
]


@pytest.mark.parametrize("B,T,p,V,pad", EMB_CASES)
def test_embedding_norm_and_cross(B, T, p, V, pad):
    ids, g = torch.randint(0, V, (B, T)), torch.randn(B, T, p)
    check(embedding.embedding_norm(ids, g, pad), ref_emb.embedding_norm(ids, g.double(), pad),
          ref_emb.embedding_norm(ids, g, pad))
    ids2, g2 = torch.randint(0, V, (B, T + 3)), torch.randn(B, T + 3, p)
    check(embedding.embedding_cross(ids, g, ids2, g2, pad),
          ref_emb.embedding_cross(ids, g.double(), ids2, g2.double(), pad),
          ref_emb.embedding_cross(ids, g, ids2, g2, pad))


def test_embedding_norm_noncontiguous_ids():
    ids = torch.randint(0, 6, (45, 2)).t()  # [2, 45], strides (1, 2): Opacus crashes here
    g = torch.randn(2, 45, 9).to(torch.bfloat16)
    check(embedding.embedding_norm(ids, g, 2), ref_emb.embedding_norm(ids, g.double(), 2),
          ref_emb.embedding_norm(ids, g.float(), 2))


@pytest.mark.parametrize("B,T,p,V,pad", EMB_CASES)
def test_embedding_clipped_sum(B, T, p, V, pad):
    ids, g, c = torch.randint(0, V, (B, T)), torch.randn(B, T, p), torch.rand(B)
    acc = torch.randn(V, p)
    r64 = ref_emb.embedding_clipped_sum(ids, g.double(), c.double(), V, pad, acc.double(),
                                        0.0, 0, 0.5)
    r32 = ref_emb.embedding_clipped_sum(ids, g, c, V, pad, acc.clone(), 0.0, 0, 0.5)
    out = embedding.embedding_clipped_sum(ids, g, c, V, pad, acc, 0.0, 0, 0.5)
    assert out is acc
    check(out, r64, r32)
    if pad is not None:
        assert torch.equal(embedding.embedding_clipped_sum(ids, g, c, V, pad)[pad],
                           torch.zeros(p, device=DEVICE))


# ---------------------------------------------------------------------------- norms


@pytest.mark.parametrize("shape,ns", [((3, 5, 7, 10), (10,)), ((2, 9), (9,)),
                                      ((2, 4, 3, 5), (3, 5)), ((1, 33, 70), (70,)),
                                      ((0, 3, 4), (4,))],
                         ids=["B3-M35-N10", "M1-N9", "N3x5", "B1-M33-N70", "B0"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)],
                         ids=["wb", "w", "b"])
def test_layer_norm_psg(shape, ns, need):
    x, g = torch.randn(shape) * 2 + 1, torch.randn(shape)
    out = norms.layer_norm_psg(x, g, ns, 1e-5, *need)
    r64 = ref_norms.layer_norm_psg(x.double(), g.double(), ns, 1e-5, *need)
    r32 = ref_norms.layer_norm_psg(x, g, ns, 1e-5, *need)
    for o, a, b in zip(out, r64, r32):
        assert (o is None) == (a is None)
        if o is not None:
            check(o, a, b)


def test_layer_norm_psg_split_bf16():
    x, g = (torch.randn(3, 50, 24) * 3).to(torch.bfloat16), torch.randn(3, 50, 24)
    (x64, g64), (x32, g32) = pair(x, g)
    gw, gb = norms._row_norm_psg(x, g, (24,), 1e-5, False, True, True, split=3)
    rw, rb = ref_norms.layer_norm_psg(x64, g64, (24,), 1e-5)
    sw, sb = ref_norms.layer_norm_psg(x32, g32, (24,), 1e-5)
    check(gw, rw, sw)
    check(gb, rb, sb)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_psg(eps):
    x, g = torch.randn(2, 7, 3, 6), torch.randn(2, 7, 3, 6)
    eps64 = torch.finfo(torch.float32).eps if eps is None else eps  # what torch uses for fp32
    check(norms.rms_norm_psg(x, g, (3, 6), eps),
          ref_norms.rms_norm_psg(x.double(), g.double(), (3, 6), eps64),
          ref_norms.rms_norm_psg(x, g, (3, 6), eps))


@pytest.mark.parametrize("shape,G", [((3, 6, 5, 7), 3), ((2, 4), 2), ((2, 8, 10), 8),
                                     ((1, 6, 33), 1), ((0, 4, 3), 2)],
                         ids=["B3-C6-G3-5x7", "no-spatial", "instance", "G1-S33", "B0"])
@pytest.mark.parametrize("need", [(True, True), (False, True)], ids=["wb", "b"])
def test_group_norm_psg(shape, G, need):
    x, g = torch.randn(shape) * 2 + 1, torch.randn(shape)
    out = norms.group_norm_psg(x, g, G, 1e-5, *need)
    r64 = ref_norms.group_norm_psg(x.double(), g.double(), G, 1e-5, *need)
    r32 = ref_norms.group_norm_psg(x, g, G, 1e-5, *need)
    for o, a, b in zip(out, r64, r32):
        assert (o is None) == (a is None)
        if o is not None:
            check(o, a, b)


# ---------------------------------------------------------------------------- compile stalls


def _kernels():
    """(name, autotuner or None, base jit function) of every Triton kernel in dpkernels.ops."""
    import inspect

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    from dpkernels.ops import conv

    for mod in (dense, embedding, linear, norms, conv):
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                tuner = obj if isinstance(obj, Autotuner) else None
                base = obj.fn if tuner is not None else obj
                yield name, tuner, base, list(inspect.signature(base.fn).parameters)


def _not_specialised(base) -> set:
    """Names of the arguments Triton does not specialise (JIT or interpreted function)."""
    if hasattr(base, "params"):
        return {p.name for p in base.params if p.do_not_specialize}
    names = list(base.arg_names)
    return {names[i] if isinstance(i, int) else i
            for i in base.kwargs.get("do_not_specialize") or []}


def test_seeds_are_not_specialised():
    # a 62-bit seed divisible by 16 would otherwise compile a new variant mid-training
    seen = 0
    for name, _, base, args in _kernels():
        if "seed" in args:
            seen += 1
            assert "seed" in _not_specialised(base), name
    assert seen >= 3


def test_autotune_keys_are_bucketed():
    # every Poisson batch size would re-tune a key holding the row count
    for name, tuner, _, _ in _kernels():
        if tuner is not None:
            assert not {"R", "rows_per_split"} & set(tuner.keys), (name, tuner.keys)


def test_add_noise_many_is_add_noise_per_tensor():
    # one launch for all parameters must add exactly the noise add_noise adds to each, with
    # its seed (62-bit seeds, sizes that are not multiples of the block, a strided and a
    # float64 tensor that take the one-at-a-time path)
    shapes = [(3,), (40, 70), (1,), (2049,), (5, 7)]
    accs = [torch.randn(s) for s in shapes]
    accs.append(torch.randn(6, 4).t())
    accs.append(torch.randn(9, dtype=torch.float64))
    seeds = [2**61 + 7, 5, 16, 2**40, 3, 11, 12]
    want = [dense.add_noise(a.clone(), 1.5, s, 0.25) for a, s in zip(accs, seeds)]
    got = dense.add_noise_many([a.clone() for a in accs], 1.5, seeds, 0.25)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    inplace = [a.clone() for a in accs[:2]]
    out = dense.add_noise_many(inplace, 1.0, seeds[:2], 1.0)
    assert out[0] is inplace[0] and out[1] is inplace[1]
    assert not torch.equal(inplace[0], accs[0])
    with pytest.raises(ValueError, match="2 tensors but 1 seeds"):
        dense.add_noise_many(accs[:2], 1.0, seeds[:1], 1.0)
    ref = ref_dense.add_noise_many([a.clone().double() for a in accs[:2]], 0.0, seeds[:2], 0.5)
    torch.testing.assert_close(ref[1], accs[1].double() * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("B", [3, 1, 0])
def test_rows_clipped_sum_many(B):
    # biases ([B, T, p], one strided like a conv's), norm-layer terms ([B, 1, N]), 16-bit rows,
    # widths that are not multiples of the column tile, with and without accumulators
    c = torch.rand(B)
    xs = [torch.randn(B, 63, 17), torch.randn(B, 1, 300), torch.randn(B, 5, 130).to(torch.bfloat16),
          torch.randn(B, 7, 4).transpose(1, 2), torch.randn(B, 2, 6)]
    shapes = [(17,), (3, 100), (130,), (7,), (2, 3)]
    accs = [None, torch.randn(3, 100), None, torch.randn(7), torch.randn(3, 2).t()]
    r64 = ref_dense.rows_clipped_sum_many(
        [(x.double(), s) for x, s in zip(xs, shapes)], c.double(),
        [a.double() if a is not None else None for a in accs])
    r32 = ref_dense.rows_clipped_sum_many(
        [(x.float(), s) for x, s in zip(xs, shapes)], c,
        [a.clone() if a is not None else None for a in accs])
    keep = list(accs)
    out = dense.rows_clipped_sum_many(list(zip(xs, shapes)), c, accs)
    for i, (o, w64, w32) in enumerate(zip(out, r64, r32)):
        assert o.dtype == torch.float32 and o.shape == w64.shape, i
        if keep[i] is not None:
            assert o is keep[i]  # folded in place
        check(o, w64, w32, f"tensor {i}")
    with pytest.raises(ValueError, match="expected"):
        dense.rows_clipped_sum_many([(torch.randn(B, 2, 5), (4,))], c, [None])


@pytest.mark.parametrize("B", [3, 1, 0])
def test_dense_norm_many(B):
    rows = [torch.randn(B, 17), torch.randn(B, 2, 3000)[:, 1], torch.randn(B, 0),
            torch.randn(B, 130).to(torch.bfloat16), torch.randn(B, 1)]
    out = dense.dense_norm_many(rows)
    assert out.shape == (len(rows), B)
    for i, r in enumerate(rows):
        check(out[i], ref_dense.dense_norm(r.double()), ref_dense.dense_norm(r.float()),
              f"tensor {i}")
    with pytest.raises(ValueError, match="expected"):
        dense.dense_norm_many([torch.randn(B, 3), torch.randn(B + 1, 3)])


@pytest.mark.parametrize("shape", [(5, 3, 7), (1, 130), (0, 4), (3, 5000), (4, 2, 2, 2)])
def test_dense_norm(shape):
    psg = torch.randn(shape)
    check(dense.dense_norm(psg), ref_dense.dense_norm(psg.double()), ref_dense.dense_norm(psg))
    strided = torch.randn(shape[0], 2, math.prod(shape[1:]))[:, 1]  # like a norm-layer term
    check(dense.dense_norm(strided), ref_dense.dense_norm(strided.double()),
          ref_dense.dense_norm(strided))


@pytest.mark.parametrize("scratch", [64 * 2**20, 1], ids=["one-chunk", "chunk-per-layer"])
def test_linear_clipped_sum_many(scratch, monkeypatch):
    # float32 layers share one scaling launch (p <= d scales g, p > d scales a; strided
    # inputs; accumulators absent, in place, strided); a bf16 layer takes the Triton kernel
    monkeypatch.setattr(linear, "SCALE_SCRATCH_BYTES", scratch)
    B = 3
    c = torch.rand(B)
    items = [(torch.randn(B, 63, 33), torch.randn(B, 63, 17)),
             (torch.randn(B, 5, 9), torch.randn(B, 5, 40)),
             (torch.randn(B, 70, 7).transpose(1, 2), torch.randn(B, 7, 12)),
             (torch.randn(B, 4, 21).to(torch.bfloat16), torch.randn(B, 4, 34).to(torch.bfloat16)),
             (torch.randn(B, 1, 6), torch.randn(B, 1, 5))]
    accs = [None, torch.randn(40, 9), torch.randn(70, 12).t(), None, torch.randn(5, 6)]
    keep = list(accs)
    want64 = [ref_lin.linear_clipped_sum(a.double(), g.double(), c.double(),
                                         acc.double() if acc is not None else None)
              for (a, g), acc in zip(items, accs)]
    want32 = [ref_lin.linear_clipped_sum(a.float(), g.float(), c,
                                         acc.clone() if acc is not None else None)
              for (a, g), acc in zip(items, accs)]
    out = linear.linear_clipped_sum_many(items, c, accs)
    for i, (o, w64, w32) in enumerate(zip(out, want64, want32)):
        if keep[i] is not None:
            assert o is keep[i]  # folded in place
        if i == 3:  # bf16: hi + lo, ~2^-17 per element (test_linear_clipped_sum_16bit)
            assert rel(o, w64) <= 2**-15
        else:
            check(o, w64, w32, f"layer {i}")
    with pytest.raises(ValueError, match="2 inputs but 1"):
        linear.linear_clipped_sum_many(items[:2], c, accs[:1])
