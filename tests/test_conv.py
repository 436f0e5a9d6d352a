import copy

import pytest
import torch
import torch.nn.functional as F
from noise_stats import check_noise, empty_batch_noise
from oracle import RTOL_F64, ce, check_engine, oracle, rel_err
from torch import nn
from torch.func import grad, vmap

import dpkernels
from dpkernels import dispatch
from dpkernels.layers import find_handler
from dpkernels.layers.conv import ConvHandler, ConvUse
from dpkernels.reference import conv as ref
from dpkernels.reference._common import gaussian

F64 = torch.float64


def with_head(conv, x, classes=3):
    """conv -> Tanh -> flatten -> Linear: every output position reaches the loss."""
    m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(classes)).double()
    with torch.no_grad():
        m(x)  # materialise the lazy head
    return m


# (conv, input shape without batch)
CONVS = [
    pytest.param(lambda: nn.Conv1d(3, 4, 3), (3, 11), id="1d"),
    pytest.param(lambda: nn.Conv1d(4, 6, 4, stride=2, padding=2, groups=2), (4, 9),
                 id="1d-s2-p2-g2"),
    pytest.param(lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=2, bias=False), (3, 8),
                 id="1d-same-dil2-nobias"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3), (3, 6, 5), id="2d"),
    pytest.param(lambda: nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0)), (3, 7, 6),
                 id="2d-s2-rect"),
    pytest.param(lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2), (3, 6, 7),
                 id="2d-same-dil2"),
    pytest.param(lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 5, 6),
                 id="2d-same-even-kernel",  # torch warns that it pads a copy (the oracle)
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same'")),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding="valid", stride=(1, 2)), (3, 6, 7),
                 id="2d-valid-s12"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5), id="2d-g2"),
    pytest.param(lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), (4, 5, 5),
                 id="2d-depthwise-x2-nobias"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
                 (3, 6, 6), id="2d-reflect-dil2"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"),
                 (3, 5, 6), id="2d-same-circular"),
    pytest.param(lambda: nn.Conv2d(3, 4, 2, padding=(1, 0), padding_mode="replicate",
                                   groups=1), (3, 5, 4), id="2d-replicate"),
    pytest.param(lambda: nn.Conv2d(2, 3, 1), (2, 4, 4), id="2d-1x1"),
    pytest.param(lambda: nn.Conv3d(2, 3, 2), (2, 4, 3, 4), id="3d"),
    pytest.param(lambda: nn.Conv3d(4, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                                   groups=4, padding_mode="circular"), (4, 4, 5, 3),
                 id="3d-depthwise-circular"),
    pytest.param(lambda: nn.Conv3d(2, 4, 3, padding="same", dilation=(1, 2, 1), groups=2),
                 (2, 3, 5, 3), id="3d-same-dil-g2"),
]


@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("make, shape", CONVS)
def test_conv_layer(make, shape, method):
    x = torch.randn(5, *shape, dtype=F64)
    m = with_head(make(), x)
    y = torch.randint(0, 3, (5,))
    check_engine(m, ce("mean"), x, y, norm_method=method)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make, shape", [CONVS[1], CONVS[5], CONVS[9], CONVS[15]])
def test_reductions(make, shape, reduction):
    x = torch.randn(6, *shape, dtype=F64)
    m = with_head(make(), x)
    y = torch.randint(0, 3, (6,))
    check_engine(m, ce(reduction), x, y, reduction=reduction, expected_batch_size=8)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen(frozen):
    x = torch.randn(5, 3, 6, 6, dtype=F64)
    m = with_head(nn.Conv2d(3, 4, 3, stride=2, padding=1), x)
    getattr(m[0], frozen).requires_grad_(False)
    check_engine(m, ce("mean"), x, torch.randint(0, 3, (5,)))


def test_batch_of_one():
    x = torch.randn(1, 3, 6, 5, dtype=F64)
    m = with_head(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), x)
    check_engine(m, ce("mean"), x, torch.randint(0, 3, (1,)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding="same", dilation=2), nn.Tanh(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_small_cnn(reduction):
    x = torch.randn(6, 3, 8, 8, dtype=F64)
    check_engine(SmallCNN().double(), ce(reduction), x, torch.randint(0, 4, (6,)),
                 reduction=reduction)


def test_channels_last_input():
    x = torch.randn(5, 3, 6, 6, dtype=F64).to(memory_format=torch.channels_last)
    m = with_head(nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), x)
    check_engine(m.to(memory_format=torch.channels_last), ce("mean"), x,
                 torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulate_equals_one_batch(reduction):
    """Micro-batches folded with accumulate() give the one-batch step (acc path of the ops)."""
    model = SmallCNN().double()
    twin = copy.deepcopy(model)
    x = torch.randn(9, 3, 8, 8, dtype=F64)
    y = torch.randint(0, 4, (9,))
    grads = []
    for m, parts in ((model, [slice(0, 9)]), (twin, [slice(0, 4), slice(4, 5), slice(5, 9)])):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        dp = dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=0.05,
                                    expected_batch_size=12, loss_reduction=reduction)
        try:
            for s in parts:
                ce(reduction)(m(x[s]), y[s]).backward()
                dp.accumulate()
            dp.step()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        finally:
            dpkernels.detach(m)
    assert rel_err(grads[1], grads[0]) <= RTOL_F64


def test_reused_conv_cross_terms():
    """One conv weight used twice (same module) and by a second module with another stride."""
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.b = nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False)
            self.b.weight = self.a.weight
            self.head = nn.Linear(4 * 9 + 4 * 4, 3)

        def forward(self, x):
            h = torch.tanh(self.a(torch.tanh(self.a(x))))
            u = torch.tanh(self.b(h))
            return self.head(torch.cat([h[:, :, ::2, ::2].flatten(1), u.flatten(1)], 1))

    x = torch.randn(5, 4, 6, 6, dtype=F64)
    check_engine(Reuse().double(), ce("sum"), x, torch.randint(0, 3, (5,)), reduction="sum")


@pytest.mark.parametrize("cls", [nn.Conv1d, nn.Conv2d, nn.Conv3d], ids=lambda c: c.__name__)
def test_fused_handler_not_generic_fallback(cls):
    """The oracle tests would also pass on the (exact) generic fallback: make sure they don't
    run on it because layers/conv.py failed to import."""
    assert isinstance(find_handler(cls(2, 2, 1)), ConvHandler)
    assert ref.conv_norm is dispatch.resolve("conv_norm", "reference", "cpu")[0]


def test_unbatched_input_refused():
    m = nn.Conv2d(3, 4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=1.0,
                           expected_batch_size=4)
    try:
        with pytest.raises(ValueError, match=r"Conv2d.*batch dimension"):
            m(torch.randn(3, 5, 5))
    finally:
        dpkernels.detach(m)


def test_autocast_bf16_close_to_float32():
    """A bf16-autocast step against the float64 oracle of the same float32 model, C at the
    median norm (half the samples clipped): norms and every gradient.  bf16 has 8 mantissa
    bits (eps 2^-8 = 3.9e-3); a few roundings per value through five layers: 5e-2 relative
    is about 10 eps, the usual bf16 parity budget."""
    torch.manual_seed(1)
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 4, (6,))
    model = SmallCNN()
    true, _, _ = oracle(copy.deepcopy(model).double(), ce("mean"), x.double(), y, 1.0, 1,
                        "mean")
    C = true.median().item() * 1.0001
    norms, grads, _ = oracle(copy.deepcopy(model).double(), ce("mean"), x.double(), y, C, 9,
                             "mean")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=C,
                                expected_batch_size=9)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        dp.step()
        assert rel_err(dp.per_sample_norms.double(), norms) < 5e-2
        for name, p in model.named_parameters():
            assert p.grad.dtype == torch.float32
            assert rel_err(p.grad.double(), grads[name]) < 5e-2, name
    finally:
        dpkernels.detach(model)


# ---------------------------------------------------------------- kernel level

CONFS = [  # (C_in, C_out, kernel, spatial, stride, padding, dilation, groups)
    pytest.param(3, 4, (3,), (10,), (2,), (1,), (1,), 1, id="1d-s2"),
    pytest.param(4, 6, (3, 2), (7, 6), (1, 2), (2, 1), (2, 1), 2, id="2d-g2-dil"),
    pytest.param(4, 4, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 4, id="2d-depthwise"),
    pytest.param(2, 4, (2, 2, 3), (4, 5, 5), (1, 2, 1), (0, 1, 1), (2, 1, 1), 2, id="3d-g2"),
]


def per_sample_weight_grads(x, g, w, stride, padding, dilation, groups):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]

    def f(w, xb, gb):
        out = conv(xb[None], w, None, stride, padding, dilation, groups)
        return (out * gb[None]).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(w, x, g)


def make_case(C_in, C_out, k, S, stride, padding, dilation, groups, B=5):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
    x = torch.randn(B, C_in, *S, dtype=F64)
    w = torch.randn(C_out, C_in // groups, *k, dtype=F64)
    out = conv(x, w, None, stride, padding, dilation, groups)
    g = torch.randn_like(out)
    conf = (stride, padding, dilation, groups)
    return x, g, w, conf, per_sample_weight_grads(x, g, w, *conf)


@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("C_in, C_out, k, S, stride, padding, dilation, groups", CONFS)
def test_conv_norm_kernel(C_in, C_out, k, S, stride, padding, dilation, groups, method):
    x, g, w, conf, psg = make_case(C_in, C_out, k, S, stride, padding, dilation, groups)
    got = ref.conv_norm(x, g, w.shape, *conf, method=method)
    assert got.dtype == F64
    assert rel_err(got, psg.flatten(1).pow(2).sum(1)) <= RTOL_F64


@pytest.mark.parametrize("C_in, C_out, k, S, stride, padding, dilation, groups", CONFS)
def test_conv_clipped_sum_kernel(C_in, C_out, k, S, stride, padding, dilation, groups):
    x, g, w, conf, psg = make_case(C_in, C_out, k, S, stride, padding, dilation, groups)
    c = torch.rand(x.shape[0], dtype=F64)
    acc = torch.randn(w.shape, dtype=F64)
    want = (acc + torch.tensordot(c, psg, dims=1)) * 0.25
    got = ref.conv_clipped_sum(x, g, c, w.shape, *conf, acc=acc.clone(), scale=0.25)
    assert got.shape == w.shape and got.dtype == F64
    assert rel_err(got, want) <= RTOL_F64


@pytest.mark.parametrize("C_in, C_out, k, S, stride, padding, dilation, groups", CONFS)
def test_conv_unfold_and_dense(C_in, C_out, k, S, stride, padding, dilation, groups):
    """im2col reproduces the convolution, and ConvUse.raw_dense the per-sample gradients."""
    x, g, w, conf, psg = make_case(C_in, C_out, k, S, stride, padding, dilation, groups)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
    a = ref.conv_unfold(x, w.shape, *conf)  # [B, G, T, d]
    p = C_out // groups
    wg = w.reshape(groups, p, -1)  # [G, p, d]
    out = torch.einsum("bgtd,gpd->bgpt", a, wg).reshape(g.shape)
    assert rel_err(out, conv(x, w, None, *conf)) <= RTOL_F64
    dense = ConvUse(x, g, w.shape, conf).raw_dense(lambda name, *args: getattr(ref, name)(*args))
    assert rel_err(dense, psg) <= RTOL_F64


def test_float32_accumulates_in_float32():
    x = torch.randn(3, 2, 5, 5)
    g = torch.randn(3, 4, 3, 3)
    conf = ((1, 1), (0, 0), (1, 1), 2)
    for method in ("ghost", "direct"):
        assert ref.conv_norm(x, g, (4, 1, 3, 3), *conf, method=method).dtype == torch.float32
    out = ref.conv_clipped_sum(x, g, torch.ones(3), (4, 1, 3, 3), *conf)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 3, 3)


def test_empty_batch():
    """B = 0: norms of shape [0]; the clipped sum is exactly the noise draw for its seed."""
    x = torch.randn(0, 4, 5, 5, dtype=F64)
    g = torch.randn(0, 6, 3, 3, dtype=F64)
    conf = ((1, 1), (0, 0), (1, 1), 2)
    for method in ("auto", "ghost", "direct"):
        assert ref.conv_norm(x, g, (6, 2, 3, 3), *conf, method=method).shape == (0,)
    out = ref.conv_clipped_sum(x, g, torch.ones(0, dtype=F64), (6, 2, 3, 3), *conf,
                               noise_std=1.5, seed=3, scale=0.25)
    assert out.shape == (6, 2, 3, 3) and out.dtype == F64
    assert torch.equal(out, gaussian((6, 2, 3, 3), 1.5, 3, "cpu", F64) * 0.25)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_step(backend):
    """An empty Poisson batch through a CNN: every gradient is noise of std sigma C / B_exp,
    independent across parameters (the Triton conv kernel's B = 0 path included)."""
    if backend == "triton":
        pytest.importorskip("triton")
    m = nn.Sequential(nn.Conv2d(4, 32, 3), nn.Tanh(), nn.Conv2d(32, 32, 1, groups=4))
    noise, std = empty_batch_noise(m, torch.zeros(0, 4, 5, 5), backend, steps=8)
    check_noise(noise, std)
