"""mode="low-memory": two backward passes, no kept backprops, the same gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import ce, check_engine, rel_err
from test_models import TinyLM, batch, perturbed, token_ce
from torch import nn

import dpkernels


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
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    grads = {}
    for mode in ("fast", "low-memory"):
        m = copy.deepcopy(base)
        dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                    noise_multiplier=0.0, max_grad_norm=0.1,
                                    expected_batch_size=9, mode=mode, backend="reference")
        for s in (slice(0, 4), slice(4, 9)):
            dp.backward(F.cross_entropy(m(x[s]), y[s]))
            dp.accumulate()
        dp.step()
        grads[mode] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["fast"], grads["low-memory"]):
        assert rel_err(b, a) < 1e-12


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
