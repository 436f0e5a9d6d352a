"""The grouped magnitude op (``magnitude_many``: ``S_b = sum_t |a_t| |g_t|`` of every use of a
micro-batch, for the cancellation bounds) against its reference, through Triton's interpreter;
tolerance rule of tests/kernel_check.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernel_check import DEVICE, check, on_device, poison  # noqa: E402, F401

from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import bounds  # noqa: E402
from dpkernels.reference import bounds as ref  # noqa: E402


def _items(B):
    g_t = torch.randn(B, 8, 6).transpose(1, 2)  # [B, 6, 8], strided like a conv backprop
    return [
        (torch.randn(B, 7, 5), torch.randn(B, 7, 9)),
        (None, torch.randn(B, 10, 33)),  # a bias: |a_t| = 1
        (torch.randn(B, 3, 40).to(torch.bfloat16), torch.randn(B, 3, 3).to(torch.bfloat16)),
        (torch.randn(B, 3, 4), torch.randn(B, 3, 5).to(torch.bfloat16)),  # mixed dtypes
        (None, torch.randn(B, 0, 3)),  # T = 0
        (torch.randn(B, 5, 0), torch.randn(B, 5, 4)),  # d = 0
        (torch.randn(B, 6, 2, 8)[:, :, 1], g_t),
        (torch.randn(B, 1, 70), torch.randn(B, 1, 2)),  # T = 1
    ]


@pytest.mark.parametrize("B", [3, 1, 0])
def test_magnitude_many(B):
    torch.manual_seed(B)
    items = _items(B)
    out = bounds.magnitude_many(items)
    assert out.shape == (len(items), B)
    for i, (a, g) in enumerate(items):
        a64 = None if a is None else a.double()
        a32 = None if a is None else a.float()
        check(out[i], ref.magnitude(a64, g.double()), ref.magnitude(a32, g.float()),
              f"input {i}")


def test_magnitude_many_refuses_bad_shapes():
    with pytest.raises(ValueError, match="input 1 has shapes"):
        bounds.magnitude_many([(None, torch.randn(2, 3, 4)), (None, torch.randn(3, 3, 4))])
    with pytest.raises(ValueError, match="no inputs"):
        bounds.magnitude_many([])
    with pytest.raises(TypeError, match="unsupported dtype"):
        bounds.magnitude_many([(None, torch.ones(2, 3, 4, dtype=torch.int32))])


def test_magnitude_many_float64_is_the_reference():
    items = [(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5,
                                                                      dtype=torch.float64))]
    out = bounds.magnitude_many(items)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.magnitude_many(items), rtol=0, atol=0)


def test_magnitude_many_resolves_to_triton():
    fn, backend = dispatch.resolve("magnitude_many", "triton", DEVICE)
    assert backend == "triton" and fn.__module__.startswith("dpkernels.ops")


@pytest.mark.parametrize("with_err", [True, False])
@pytest.mark.parametrize("B", [0, 5, 1500])  # 1500: more than one block of the loop
def test_clip_factors_matches_the_reference_exactly(with_err, B):
    """The fused clip factors are the reference's float32 arithmetic: NaN, infinities, zeros
    and whether every norm is finite must agree exactly.  Values: each output is at most four
    float32 operations (sqrt, two products, a division), each within 1 ulp in the kernel
    (correctly rounded) and in torch (its CPU sqrt is not always correctly rounded), so they
    may differ by 8 eps32 relatively; the 2^-16 margin of the bound is 2^8 times wider."""
    torch.manual_seed(B)
    nsq = torch.randn(B).abs() * 10.0 ** torch.randint(-8, 8, (B,)).float()
    err = torch.rand(B) * 1e-3
    if B >= 5:
        nsq[:5] = torch.tensor([float("nan"), float("inf"), -1e-9, 0.0, 1e30])
        err[3] = float("nan")  # a NaN bound with a finite norm: NaN factor, like torch
    e = err if with_err else None
    for scale in (1.0, 37.0):
        n, f, ok = bounds.clip_factors(nsq, e, scale, 2.0**-16, 0.7)
        rn, rf, rok = ref.clip_factors(nsq, e, scale, 2.0**-16, 0.7)
        for out, want in ((n, rn), (f, rf)):
            assert torch.equal(out.isnan(), want.isnan())
            assert torch.equal(out.isinf(), want.isinf()) and torch.equal(out == 0, want == 0)
            torch.testing.assert_close(out, want, rtol=8 * 2.0**-24, atol=0, equal_nan=True)
        assert ok.dtype == rok.dtype == torch.bool and ok.dim() == 0
        assert bool(ok) == bool(rok) == (B < 5)
