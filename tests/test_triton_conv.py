"""The conv Triton ops against the reference, on CPU tensors through Triton's interpreter.

Tolerance rule (as in test_triton_ops.py, flash-attention's): the kernel's norm-wise relative
error against the float64 reference may be at most twice what torch makes computing the same
op in float32 (the reference op on float32 copies of the inputs), plus 16 eps32.  16-bit
inputs are compared on their exactly representable float32 values.  Every float buffer the
launchers allocate with ``torch.empty`` is poisoned with NaN first, so an unwritten partial
fails the test.  The engine check at the end uses test_triton_engine.py's float32 tolerance.
"""

import os

import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from kernel_check import DEVICE, EPS32, check, on_device, poison, rel  # noqa: E402, F401
from oracle import check_engine  # noqa: E402
from torch import nn  # noqa: E402

from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import conv, dense  # noqa: E402
from dpkernels.reference import conv as ref  # noqa: E402

RTOL_F32 = 1e-4  # test_triton_engine.py's float32 engine tolerance (reason given there)


def make(B, C_in, S, C_out, k, stride, padding, dilation, groups, dtype=torch.float32):
    """Random x and a backprop g of the right output shape."""
    x = torch.randn(B, C_in, *S).to(dtype)
    w = torch.empty(C_out, C_in // groups, *k)
    out = [(s + 2 * q - dl * (kk - 1) - 1) // st + 1
           for s, q, dl, kk, st in zip(S, padding, dilation, k, stride)]
    g = torch.randn(B, C_out, *out).to(dtype)
    return x, g, w.shape


def norms(x, g, ws, conf, method):
    """(kernel, float64 reference, float32 reference) for one conv_norm call."""
    out = conv.conv_norm(x, g, ws, *conf, method)
    r64 = ref.conv_norm(x.double(), g.double(), ws, *conf, method)
    r32 = ref.conv_norm(x.float(), g.float(), ws, *conf, method)
    return out, r64, r32


# (B, C_in, spatial, C_out, kernel, stride, padding, dilation, groups)
CASES = [
    pytest.param(3, 5, (17,), 7, (3,), (1,), (1,), (1,), 1, id="1d-B3-C5-L17-k3-p1"),
    pytest.param(2, 3, (9, 9), 5, (3, 3), (2, 2), (1, 1), (1, 1), 1, id="2d-s2-p1"),
    pytest.param(2, 4, (10, 9), 6, (3, 3), (1, 1), (0, 0), (2, 2), 1, id="2d-p0-dil2"),
    pytest.param(2, 6, (7, 8), 10, (3, 3), (1, 1), (1, 1), (1, 1), 2, id="2d-groups2-odd"),
    pytest.param(2, 5, (8, 8), 5, (3, 3), (1, 1), (1, 1), (1, 1), 5, id="2d-depthwise"),
    pytest.param(2, 7, (6, 5), 9, (1, 1), (1, 1), (0, 0), (1, 1), 1, id="2d-1x1"),
    pytest.param(3, 4, (4, 4), 6, (4, 4), (1, 1), (0, 0), (1, 1), 1, id="2d-T1"),
    pytest.param(1, 3, (12, 11), 17, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="2d-B1-T132"),
    pytest.param(2, 3, (5, 6, 4), 4, (2, 3, 2), (2, 1, 1), (1, 1, 0), (1, 2, 1), 1,
                 id="3d-s2-dil2"),
    pytest.param(0, 3, (5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="B0"),
]


@pytest.mark.parametrize("B,C_in,S,C_out,k,stride,padding,dilation,groups", CASES)
@pytest.mark.parametrize("method", ["direct", "ghost", "auto"])
def test_conv_norm(B, C_in, S, C_out, k, stride, padding, dilation, groups, method):
    x, g, ws = make(B, C_in, S, C_out, k, stride, padding, dilation, groups)
    check(*norms(x, g, ws, (stride, padding, dilation, groups), method), method)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_norm_explicit_asymmetric_padding():
    # padding="same" with an even kernel: the layer pads one more on the right explicitly
    # (F.pad) and passes the symmetric part; the kernel sees an already padded input
    x0 = torch.randn(2, 3, 7, 6)
    x = F.pad(x0, [0, 1, 0, 1])
    g = torch.randn(2, 4, 7, 6)
    ws = (4, 3, 4, 4)
    y = F.conv2d(x0, torch.randn(ws), padding="same")
    assert y.shape == g.shape
    for method in ("direct", "ghost"):
        check(*norms(x, g, ws, ((1, 1), (1, 1), (1, 1), 1), method), method)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_conv_norm_16bit_channels_last(dtype, method):
    x, g, ws = make(2, 6, (7, 9), 8, (3, 3), (2, 1), (1, 1), (1, 1), 2, dtype)
    x = x.to(memory_format=torch.channels_last)
    g = g.to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check(*norms(x, g, ws, ((2, 1), (1, 1), (1, 1), 2), method), method)


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_conv_norm_strided_views(method):
    # a channels-last 3-d input, a W-strided slice, mixed dtypes (promoted to one for tl.dot)
    x, g, ws = make(2, 3, (4, 5, 6), 5, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    x = x.to(memory_format=torch.channels_last_3d)
    check(*norms(x, g.to(torch.bfloat16), ws, ((1,) * 3, (1,) * 3, (1,) * 3, 1), method))
    x = torch.randn(2, 4, 23)[:, :, ::2]  # [2, 4, 12], stride 2 along L
    g = torch.randn(2, 6, 5)
    check(*norms(x, g, (6, 2, 3), ((2,), (0,), (1,), 2), method))


def test_conv_norm_float64_and_checks():
    x, g, ws = make(2, 3, (5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float64)
    conf = ((1, 1), (1, 1), (1, 1), 1)
    out = conv.conv_norm(x, g, ws, *conf)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.conv_norm(x, g, ws, *conf), rtol=0, atol=0)
    with pytest.raises(ValueError, match="method"):
        conv.conv_norm(x.float(), g.float(), ws, *conf, "fast")
    with pytest.raises(ValueError, match="inconsistent"):
        conv.conv_norm(x.float(), g.float(), (4, 3, 3, 3), *conf[:3], 2)


def test_registered():
    for name in ["conv_norm", "conv_clipped_sum"]:
        fn, backend = dispatch.resolve(name, "triton", DEVICE)
        assert backend == "triton" and fn.__module__ == "dpkernels.ops.conv", name


# ---------------------------------------------------------------------------- clipped sum

SUM_CASES = [
    pytest.param(3, 4, (9, 8), 6, (3, 3), (2, 1), (1, 0), (1, 2), 2, id="2d-groups2"),
    pytest.param(2, 3, (11,), 5, (3,), (1,), (1,), (1,), 1, id="1d"),
    pytest.param(0, 3, (5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="B0"),
]


@pytest.mark.parametrize("B,C_in,S,C_out,k,stride,padding,dilation,groups", SUM_CASES)
def test_conv_clipped_sum(B, C_in, S, C_out, k, stride, padding, dilation, groups):
    x, g, ws = make(B, C_in, S, C_out, k, stride, padding, dilation, groups)
    conf = (stride, padding, dilation, groups)
    c, acc = torch.rand(B), torch.randn(ws)
    r64 = ref.conv_clipped_sum(x.double(), g.double(), c.double(), ws, *conf, acc.double(),
                               0.0, 0, 0.25)
    r32 = ref.conv_clipped_sum(x, g, c, ws, *conf, acc.clone(), 0.0, 0, 0.25)
    out = conv.conv_clipped_sum(x, g, c, ws, *conf, acc, 0.0, 0, 0.25)
    assert out is acc  # folded in place
    check(out, r64, r32, "with acc")
    check(conv.conv_clipped_sum(x, g, c, ws, *conf),
          ref.conv_clipped_sum(x.double(), g.double(), c.double(), ws, *conf),
          ref.conv_clipped_sum(x, g, c, ws, *conf), "fresh")


def test_conv_clipped_sum_16bit_strided_acc():
    # bf16 operands summed in float32 (c_b g never rounded to 16 bits); a non-contiguous
    # acc is updated through a float32 copy and handed back
    x, g, ws = make(3, 4, (6, 7), 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    conf = ((1, 1), (1, 1), (1, 1), 1)
    c = torch.rand(3)
    acc = torch.randn(ws[1], ws[0], 3, 3).transpose(0, 1)
    r64 = ref.conv_clipped_sum(x.double(), g.double(), c.double(), ws, *conf, acc.double())
    r32 = ref.conv_clipped_sum(x.float(), g.float(), c, ws, *conf, acc.clone())
    out = conv.conv_clipped_sum(x, g, c, ws, *conf, acc)
    assert out is acc
    check(out.contiguous(), r64, r32)


def _noise(seed, std=1.5, scale=1.0, B=2):
    # zero inputs: the output is the noise alone; 64 x 80 = 5120 draws
    x, g = torch.zeros(B, 16, 6, 3), torch.zeros(B, 64, 2, 3)
    return conv.conv_clipped_sum(x, g, torch.ones(B), (64, 16, 5, 1), (1, 1), (0, 0), (1, 1),
                                 1, None, std, seed, scale)


def test_conv_noise():
    # |mean| <= 5 sigma / sqrt(n), |std / sigma - 1| <= 5 / sqrt(2n) (see test_triton_ops.py)
    std, n = 1.5, 64 * 80
    z = _noise(12345, std).double()
    assert z.shape == (64, 16, 5, 1)
    assert abs(z.mean().item()) <= 5 * std / math.sqrt(n)
    assert abs(z.std().item() / std - 1) <= 5 / math.sqrt(2 * n)
    f = z.flatten()
    assert abs(torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1].item()) <= 5 / math.sqrt(n)
    assert torch.equal(_noise(7), _noise(7))  # reproducible
    assert not torch.equal(_noise(7), _noise(8))
    assert not torch.equal(_noise(2**61 + 7), _noise(7))  # the high seed bits count
    # the Philox stream of every Triton clipped sum, keyed by the row-major element offset
    # (also for an empty batch: noise is added once per step regardless)
    same = dense.add_noise(torch.zeros(64, 16, 5, 1), 1.5, 7, 0.5)
    assert torch.equal(_noise(7, scale=0.5, B=0), same)


def test_conv_noise_epilogue_with_acc():
    std, seed, scale = 2.0, 99, 0.5
    x, g, ws = make(3, 4, (6, 6), 8, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    conf = ((1, 1), (1, 1), (1, 1), 2)
    c, acc = torch.rand(3), torch.randn(ws)
    exact = ref.conv_clipped_sum(x.double(), g.double(), c.double(), ws, *conf, acc.double())
    out = conv.conv_clipped_sum(x, g, c, ws, *conf, acc, std, seed, scale)
    z = ((out.double() / scale) - exact) / std
    n = z.numel()
    assert abs(z.mean().item()) <= 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) <= 5 / math.sqrt(2 * n)


# ---------------------------------------------------------------------------- engine


class SmallCNN(nn.Module):
    """Conv2d (reflect padding), a strided grouped conv, GroupNorm, an even-kernel
    padding="same" conv (explicit right pad), a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.gn = nn.GroupNorm(4, 8)
        self.c3 = nn.Conv2d(8, 6, 2, padding="same", bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.gn(self.c2(h)))
        h = torch.tanh(self.c3(h))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
def test_cnn_engine_float32(method):
    torch.manual_seed(3)
    m = SmallCNN().to(DEVICE)
    x = torch.randn(5, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 3, (5,), device=DEVICE)
    check_engine(m, lambda out, yy: F.cross_entropy(out, yy), x, y, backend="triton",
                 rtol=RTOL_F32, norm_method=method)
