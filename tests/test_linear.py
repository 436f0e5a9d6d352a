import pytest
import torch
import torch.nn.functional as F
from oracle import ce, check_engine, mse
from torch import nn

import dpkernels

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
def test_mlp(reduction, bias, method):
    m = nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 4, bias=bias)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    check_engine(m, ce(reduction), x, y, reduction=reduction, norm_method=method)


@pytest.mark.parametrize("shape", [(5, 1, 6), (5, 3, 6), (4, 2, 3, 6)], ids=["T1", "T3", "4d"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_sequence_inputs(shape, method):
    m = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    check_engine(m, mse("mean"), x, y, norm_method=method)


def test_reused_block():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 6)
            self.block = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.block(torch.tanh(self.inp(x))))
            h = torch.tanh(self.block(h))  # same parameters twice: cross terms
            return self.out(h)

    x = torch.randn(6, 3, 5, dtype=torch.float64)
    y = torch.randn(6, 3, 2, dtype=torch.float64)
    check_engine(Twice().double(), mse("sum"), x, y, reduction="sum")


def test_frozen_parameters_untouched():
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    m[0].weight.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    check_engine(m, ce("mean"), x, y)


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("mode", ["fast", "low-memory"])
def test_norm_ops_per_linear(frozen, mode):
    """Weight and bias trainable: both norms from one linear_norms call (one pass over g);
    one of them frozen: only the other's norm; the low-memory sums pass: no norm at all.  The
    fast mode takes the weight (and bias) norms of all layers at clip time in one
    linear_norms_many call."""
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    if frozen is not None:
        for layer in (m[0], m[2]):
            getattr(layer, frozen).requires_grad_(False)
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0,
                                expected_batch_size=4, mode=mode)
    calls = []
    op = dp.engine.op

    def spy(name, *args, **kwargs):
        calls.append((dp.engine.phase, name))
        return op(name, *args, **kwargs)

    dp.engine.op = spy
    x = torch.randn(4, 5, dtype=torch.float64)
    dp.backward(F.cross_entropy(m(x), torch.tensor([0, 1, 2, 0])))
    dp.step()
    norm_ops = {"linear_norms", "linear_norm", "linear_bias_norm", "linear_norms_many"}
    got = [c for c in calls if c[1] in norm_ops]
    if mode == "fast" and frozen != "weight":
        assert got == [(None, "linear_norms_many")]
        return
    want = {None: "linear_norms", "weight": "linear_bias_norm", "bias": "linear_norm"}[frozen]
    first = "norms" if mode == "low-memory" else None
    assert got == [(first, want)] * 2
