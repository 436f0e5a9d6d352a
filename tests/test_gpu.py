"""Triton kernels on a CUDA GPU: precision parity (fp32, tf32, bf16), the clipping bound under
bf16, and the statistics of the fused noise epilogue.  Skipped without CUDA (conftest.py).

Tolerances: float32 follows flash-attention's rule (at most 2x torch's own float32 error
against float64, + 16 eps32).  bf16 inputs are compared on their exact float32 values: their
products are exact in float32, so the same rule holds.  With TF32 allowed the kernels use
"tf32x3" (float32-accurate); plain TF32 would be ~1e-3 off, so 1e-5 tells them apart.
"""

import math

import pytest
import torch

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


def test_tf32_allowed_keeps_float32_accuracy():
    _, _, linear, _ = _ops()
    from dpkernels.reference import linear as ref

    a, g = torch.randn(3, 200, 300, device="cuda"), torch.randn(3, 200, 260, device="cuda")
    c = torch.rand(3, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for method in ["ghost", "direct"]:
            out = linear.linear_norm(a, g, method)
            assert rel(out, ref.linear_norm(a.double(), g.double())) < 1e-5, method
        out = linear.linear_clipped_sum(a, g, c)
        assert rel(out, ref.linear_clipped_sum(a.double(), g.double(), c.double())) < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_sum_parity(dtype):
    _, _, linear, _ = _ops()
    from dpkernels.reference import linear as ref

    a = torch.randn(16, 256, 768, device="cuda").to(dtype)
    g = torch.randn(16, 256, 768, device="cuda").to(dtype)
    c = torch.rand(16, device="cuda")
    acc = torch.randn(768, 768, device="cuda")
    r64 = ref.linear_clipped_sum(a.double(), g.double(), c.double(), acc.double(), 0.0, 0, 0.5)
    r32 = ref.linear_clipped_sum(a.float(), g.float(), c, acc.clone(), 0.0, 0, 0.5)
    out = linear.linear_clipped_sum(a, g, c, acc, 0.0, 0, 0.5)
    assert out is acc
    if dtype == torch.float32:
        check(out, r64, r32)
    else:
        assert rel(out, r64) <= 2**-15  # hi + lo split of c_b g (see ops/linear.py)


def test_clipping_bound_bf16():
    """||c_b W_b|| <= C for the true per-sample gradient of the bf16 inputs the kernels see,
    with the norms and the clipped sum both from the kernels (bf16 tensor cores)."""
    _, _, linear, _ = _ops()
    B, T, d, p = 8, 128, 256, 384
    a = torch.randn(B, T, d, device="cuda").to(torch.bfloat16)
    g = (torch.randn(B, T, p, device="cuda") * torch.rand(B, 1, 1, device="cuda") * 3)
    g = g.to(torch.bfloat16)
    norms = linear.linear_norm(a, g).sqrt()
    C = norms.median().item()
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    true = torch.einsum("btp,btd->bpd", g.double(), a.double()).flatten(1).norm(dim=1)
    assert (c.double() * true <= C * (1 + 2**-16)).all()
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


def test_engine_bf16_autocast_triton_clips():
    """One DP step under bf16 autocast with backend='triton': finite float32 grads, norms
    close to the float32 ones."""
    _ops()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                            torch.nn.Linear(512, 10)).cuda()
    x = torch.randn(64, 256, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    dp = dpkernels.make_private(m, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=64, backend="triton", seed=0)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        dp.step()
        for p in m.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all()
        assert torch.isfinite(dp.per_sample_norms).all()
    finally:
        dpkernels.detach(m)
