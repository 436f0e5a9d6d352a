import copy

import pytest
import torch
from noise_stats import check_noise, empty_batch_noise
from oracle import RTOL_F64, check_engine, mse, oracle, rel_err
from torch import nn
from torch.func import functional_call, grad, vmap

import dpkernels
from dpkernels.reference import norms as ref


class ChannelsFirst(nn.Module):
    """Linear over features, then ``norm`` on [B, C, *spatial], then a Linear head: every norm
    sits between layers with parameters, so both its input and output gradients matter."""

    def __init__(self, norm, C, spatial):
        super().__init__()
        self.spatial = spatial
        # no bias: a per-channel constant is removed by InstanceNorm (and by GroupNorm with one
        # channel per group), so its true gradient is rounding noise
        self.inp = nn.Linear(3, C, bias=False)
        self.norm = norm
        self.out = nn.Linear(C, 2)

    def forward(self, x):  # x [B, *spatial, 3]
        h = self.inp(x).movedim(-1, 1)  # [B, C, *spatial]
        h = torch.tanh(self.norm(h))
        return self.out(h.movedim(1, -1))


class LastDims(nn.Module):
    def __init__(self, norm, d, twice=False):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.norm = norm
        self.out = nn.Linear(d, 2)
        self.twice = twice

    def forward(self, x):  # x [B, ..., 3]
        h = self.norm(self.inp(x))
        if self.twice:  # the same norm twice: cross terms between its two uses
            h = self.norm(torch.tanh(h) * 2.0)
        return self.out(torch.tanh(h))


def rms(*args, **kw):
    return nn.RMSNorm(*args, **kw)


LAST_DIM_CASES = [
    pytest.param(lambda: nn.LayerNorm(4), (5, 4), id="LN-last1-T"),
    pytest.param(lambda: nn.LayerNorm(4), (), id="LN-last1-noT"),
    pytest.param(lambda: nn.LayerNorm((3, 4)), (3, 4), id="LN-last2"),
    pytest.param(lambda: nn.LayerNorm(4, bias=False), (5, 4), id="LN-nobias"),
    pytest.param(lambda: nn.LayerNorm(4, elementwise_affine=False), (5, 4), id="LN-noaffine"),
    pytest.param(lambda: rms(4), (5, 4), id="RMS-eps-None"),
    pytest.param(lambda: rms(4, eps=1e-3), (5, 4), id="RMS-eps1e-3"),
    pytest.param(lambda: rms((3, 4)), (3, 4), id="RMS-last2"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make,shape", LAST_DIM_CASES)
def test_last_dim_norms(make, shape, reduction):
    d = 4
    norm = make()
    m = LastDims(norm, d).double()
    with torch.no_grad():  # away from the identity init, so the affine terms matter
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, *shape[:-1], 3, dtype=torch.float64)
    y = torch.randn(6, *shape[:-1], 2, dtype=torch.float64)
    check_engine(m, mse(reduction), x, y, reduction=reduction)


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(4), lambda: rms(4)], ids=["LN", "RMS"])
def test_norm_used_twice(make):
    m = LastDims(make(), 4, twice=True).double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randn(6, 5, 2, dtype=torch.float64)
    check_engine(m, mse("sum"), x, y, reduction="sum")


CHANNEL_CASES = [
    pytest.param(lambda: nn.GroupNorm(1, 6), (5,), id="GN1"),
    pytest.param(lambda: nn.GroupNorm(2, 6), (5,), id="GN2"),
    pytest.param(lambda: nn.GroupNorm(6, 6), (5,), id="GN6"),
    pytest.param(lambda: nn.GroupNorm(3, 6), (), id="GN3-nospatial"),
    pytest.param(lambda: nn.GroupNorm(3, 6), (3, 4), id="GN3-2d"),
    pytest.param(lambda: nn.GroupNorm(2, 6, affine=False), (5,), id="GN-noaffine"),
    pytest.param(lambda: nn.InstanceNorm1d(6, affine=True), (5,), id="IN1d"),
    pytest.param(lambda: nn.InstanceNorm2d(6, affine=True), (3, 4), id="IN2d"),
    pytest.param(lambda: nn.InstanceNorm3d(6, affine=True), (2, 3, 2), id="IN3d"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make,spatial", CHANNEL_CASES)
def test_channel_norms(make, spatial, reduction):
    norm = make()
    m = ChannelsFirst(norm, 6, spatial).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, *spatial, 3, dtype=torch.float64)
    y = torch.randn(5, *spatial, 2, dtype=torch.float64)
    check_engine(m, mse(reduction), x, y, reduction=reduction)


def test_norm_as_first_layer():
    """Input that needs no gradient: the norm's own parameters are the first ones."""
    m = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    y = torch.randn(6, 3, 2, dtype=torch.float64)
    check_engine(m, mse("mean"), x, y)


def test_autocast_runs_in_float32():
    """Under bf16 autocast the norms run in float32 and the step matches the float64 oracle
    of the same model to the bf16 budget of the Linear before them (eps 2^-8; 5e-2 is ~10
    eps), with C at the median norm so that half the samples are clipped."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GroupNorm(1, 3), nn.Linear(8, 2))
    x = torch.randn(6, 3, 5)

    def loss_fn(out, _):
        return out.float().pow(2).sum()

    dummy = torch.zeros(6)
    true, _, _ = oracle(copy.deepcopy(m).double(), loss_fn, x.double(), dummy, 1.0, 1, "sum")
    C = true.median().item() * 1.0001
    norms, grads, psg = oracle(copy.deepcopy(m).double(), loss_fn, x.double(), dummy, C, 1,
                               "sum")
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    dp = dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=C,
                                expected_batch_size=9, loss_reduction="sum",
                                backend="reference")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m[2](m[1](m[0](x)))
            assert out.dtype == torch.float32
        # the head in float32: a bf16 head output would round the loss's gradient 2 * out,
        # whose sum over samples and positions (the head bias) cancels to 10x its error
        loss = loss_fn(m[3](out), None)
        loss.backward()
        dp.step()
        assert rel_err(dp.per_sample_norms.double(), norms) < 5e-2
    finally:
        dpkernels.detach(m)
    for name, p in m.named_parameters():
        assert p.grad.dtype == torch.float32
        # relative to the sum of the clipped contributions' sizes, not to their sum: the
        # samples' gradients partly cancel (the head bias to a tenth of that size)
        size = (c * psg[name].flatten(1).norm(dim=1)).sum()
        assert (p.grad.double() - grads[name]).norm() <= 5e-2 * size, name


# ---------------------------------------------------------------- refusals
def test_instance_norm_running_stats_refused():
    m = nn.Sequential(nn.Linear(3, 3), nn.InstanceNorm1d(4, affine=True,
                                                         track_running_stats=True))
    with pytest.raises(ValueError, match="track_running_stats=False") as e:
        dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=4)
    assert "1 (InstanceNorm1d)" in str(e.value)


@pytest.mark.parametrize("module,x", [
    pytest.param(nn.LayerNorm(4), torch.randn(4), id="LN"),
    pytest.param(nn.InstanceNorm1d(4, affine=True), torch.randn(4, 5), id="IN1d"),
    pytest.param(nn.GroupNorm(2, 4), torch.randn(4), id="GN"),
])
def test_unbatched_input_refused(module, x):
    m = nn.Sequential(module)
    dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=4)
    try:
        with pytest.raises(ValueError, match="needs a batch dimension first") as e:
            m(x)
        assert str(e.value).startswith("dpkernels: 0 (")
    finally:
        dpkernels.detach(m)


# ---------------------------------------------------------------- the reference ops
def brute(module, x, g):
    """{name: [B, *shape]} per-sample gradients of <module(x_b), g_b> from torch.func."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    if x.shape[0] == 0:
        return {k: torch.zeros(0, *v.shape, dtype=x.dtype) for k, v in params.items()}

    def f(p, xb, gb):
        return (functional_call(module, p, (xb.unsqueeze(0),)) * gb.unsqueeze(0)).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, g)


def close(a, b, rtol=RTOL_F64):
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel():
        assert rel_err(a.to(b.dtype), b) <= rtol


def randomized(module):
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


LN_KERNEL_CASES = [
    pytest.param((0, 3, 4), (4,), id="B0"),
    pytest.param((3, 1, 4), (4,), id="T1"),
    pytest.param((3, 4), (4,), id="noT"),
    pytest.param((2, 5, 3, 7), (7,), id="4d-last1"),
    pytest.param((2, 5, 3, 7), (3, 7), id="4d-last2"),
]


@pytest.mark.parametrize("shape,ns", LN_KERNEL_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_psg(shape, ns, bias):
    m = randomized(nn.LayerNorm(ns, eps=1e-3, bias=bias))
    x, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    want = brute(m, x, g)
    gw, gb = ref.layer_norm_psg(x, g, ns, 1e-3, True, bias)
    close(gw, want["weight"])
    if bias:
        close(gb, want["bias"])
    else:
        assert gb is None
    assert ref.layer_norm_psg(x, g, ns, 1e-3, False, False) == (None, None)


@pytest.mark.parametrize("shape,ns", LN_KERNEL_CASES)
@pytest.mark.parametrize("eps", [None, 1e-2])
def test_rms_norm_psg(shape, ns, eps):
    m = randomized(nn.RMSNorm(ns, eps=eps))
    x, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    close(ref.rms_norm_psg(x, g, ns, eps), brute(m, x, g)["weight"])


def test_rms_norm_default_eps_matches_torch_in_low_precision():
    # torch uses the epsilon of its float32 compute type for bf16 inputs, not bf16's own
    x = torch.full((2, 4), 1e-2).to(torch.bfloat16)
    g = torch.ones(2, 4, dtype=torch.bfloat16)
    gw = ref.rms_norm_psg(x, g, (4,), None)
    assert gw.dtype == torch.float32
    want = torch.rms_norm(x, (4,)).float()  # x_hat, since g = 1
    assert rel_err(gw, want) < 1e-2


GN_KERNEL_CASES = [
    pytest.param((0, 6, 5), 2, id="B0"),
    pytest.param((3, 6), 3, id="nospatial"),
    pytest.param((3, 6, 1), 3, id="T1"),
    pytest.param((3, 6, 5), 1, id="G1"),
    pytest.param((2, 6, 3, 4), 3, id="2d"),
    pytest.param((2, 4, 2, 3, 2), 2, id="3d"),
]


@pytest.mark.parametrize("shape,G", GN_KERNEL_CASES)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=str)
def test_group_norm_psg(shape, G, need):
    m = randomized(nn.GroupNorm(G, shape[1], eps=1e-3))
    x, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    want = brute(m, x, g)
    gw, gb = ref.group_norm_psg(x, g, G, 1e-3, *need)
    for got, key, needed in ((gw, "weight", need[0]), (gb, "bias", need[1])):
        if needed:
            close(got, want[key])
        else:
            assert got is None


@pytest.mark.parametrize("cls,shape", [
    pytest.param(nn.InstanceNorm1d, (3, 4, 5), id="1d"),
    pytest.param(nn.InstanceNorm1d, (3, 4, 2), id="1d-T2"),
    pytest.param(nn.InstanceNorm2d, (2, 4, 3, 3), id="2d"),
    pytest.param(nn.InstanceNorm3d, (2, 4, 2, 3, 2), id="3d"),
    pytest.param(nn.InstanceNorm2d, (0, 4, 3, 3), id="B0"),
])
def test_instance_norm_is_group_norm_psg(cls, shape):
    m = randomized(cls(shape[1], affine=True, eps=1e-4))
    x, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    want = brute(m, x, g)
    gw, gb = ref.group_norm_psg(x, g, shape[1], 1e-4, True, True)
    close(gw, want["weight"])
    close(gb, want["bias"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_upcast(dtype):
    x, g = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    x16, g16 = x.to(dtype), g.to(dtype)
    for got, want in (
        (ref.layer_norm_psg(x16, g16, (8,), 1e-5, True, True),
         ref.layer_norm_psg(x16.double(), g16.double(), (8,), 1e-5, True, True)),
        (ref.group_norm_psg(x16, g16, 2, 1e-5, True, True),
         ref.group_norm_psg(x16.double(), g16.double(), 2, 1e-5, True, True)),
        ((ref.rms_norm_psg(x16, g16, (8,), 1e-5),), (ref.rms_norm_psg(x16.double(), g16.double(),
                                                                      (8,), 1e-5),)),
    ):
        for a, b in zip(got, want):
            assert a.dtype == torch.float32
            assert rel_err(a.double(), b) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_step(backend):
    """An empty Poisson batch still steps: zero clipped sums, and every gradient is noise of
    std sigma C / B_exp, independent across parameters."""
    if backend == "triton":
        pytest.importorskip("triton")
    m = nn.Sequential(nn.Linear(3, 64), nn.LayerNorm(64), nn.RMSNorm(64),
                      nn.Unflatten(1, (64, 1)), nn.GroupNorm(2, 64),
                      nn.InstanceNorm1d(64, affine=True))
    noise, std = empty_batch_noise(m, torch.zeros(0, 3), backend, steps=8)
    check_noise(noise, std)
