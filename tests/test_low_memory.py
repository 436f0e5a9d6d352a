"""mode="low-memory": two backward passes, no kept backprops, the same gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import ce, check_engine, rel_err
from test_models import TinyLM, batch, perturbed, token_ce
from torch import nn

import dpkernels
from dpkernels.engine import derive_seed
from dpkernels.reference._common import gaussian


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("schedule", [(0, 1), (0, 1, 0)], ids=["2-blocks", "block0-twice"])
def test_tied_transformer_low_memory(schedule, reduction):
    """Tied head and a reused block: cross terms need the kept uses of pass one."""
    m = perturbed(TinyLM(schedule).double())
    x, y = batch()
    check_engine(m, token_ce(reduction), x, y, reduction=reduction, mode="low-memory")


def test_cnn_and_generic_low_memory():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x):
            return torch.addcmul(x, x, self.w)  # addcmul: no op rule, so the generic fallback

    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), Scale(), nn.Tanh(),
                      nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="generic"):
        check_engine(m, ce("mean"), x, y, mode="low-memory")


def test_low_memory_keeps_no_backprops():
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0,
                                expected_batch_size=4, mode="low-memory")
    seen = []
    record = dp.engine.record

    def spy(name, B, uses):
        record(name, B, uses)
        seen.append((dp.engine.phase, sum(len(v) for v in dp.engine.uses.values())))

    dp.engine.record = spy
    x = torch.randn(4, 5, dtype=torch.float64)
    dp.backward(F.cross_entropy(m(x), torch.tensor([0, 1, 2, 0])))
    assert [ph for ph, _ in seen] == ["norms", "norms", "sums", "sums"]
    assert all(kept == 0 for _, kept in seen)  # nothing kept: no parameter is used twice


def test_low_memory_micro_batches_and_noise_match_fast():
    """Both modes, micro-batches, noise on: the same gradients, and what the noise added is
    exactly the reference generator's draw for each parameter's seed, scaled by 1/B_exp."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    sigma, C, B_exp, seed = 0.7, 0.1, 12, 5
    grads = {}
    for mode, noise in (("fast", sigma), ("low-memory", sigma), ("low-memory", 0.0)):
        m = copy.deepcopy(base)
        dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                    noise_multiplier=noise, max_grad_norm=C,
                                    expected_batch_size=B_exp, mode=mode, backend="reference",
                                    seed=seed)
        for s in (slice(0, 4), slice(4, 9)):
            dp.backward(F.cross_entropy(m(x[s]), y[s]))
            dp.accumulate()
        dp.step()
        grads[mode, noise] = [p.grad.clone() for p in m.parameters()]
        dpkernels.detach(m)
    for i, (a, b, clean) in enumerate(zip(grads["fast", sigma], grads["low-memory", sigma],
                                          grads["low-memory", 0.0])):
        assert rel_err(b, a) < 1e-12
        z = gaussian(a.shape, sigma * C, derive_seed(seed, 0, i), "cpu", torch.float64)
        assert rel_err(b - clean, z / B_exp) < 1e-12, i


def test_low_memory_refuses_plain_backward():
    m = nn.Linear(5, 3).double()
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                expected_batch_size=4, mode="low-memory")
    with pytest.raises(RuntimeError, match=r"dp_opt.backward\(loss\)"):
        m(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    dp.zero_grad()


def test_bad_mode():
    m = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="mode"):
        dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                               expected_batch_size=4, mode="cheap")
