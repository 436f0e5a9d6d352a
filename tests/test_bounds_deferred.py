"""The fast mode takes every use's cancellation bound at clip time from one grouped magnitude
op (engine ``err_sq``: ``magnitude_many`` + ``stacked_bounds``); the result must be the bound
that ``cancellation_bounds`` and ``cross_error`` give use by use (layers/base.py), the same
mathematics batched.

Tolerance rule: the two compute the same nonnegative terms and add them in another order, so
they differ by at most (number of terms + 4) unit roundoffs, relatively; the test allows
64 u (fewer than 40 terms here)."""

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.layers.base import cancellation_bounds, cross_error, unit_roundoff


class Tied(nn.Module):
    """Embedding (with a padding id) tied to the head, a Linear with a bias, a Conv1d, a
    LayerNorm and a Linear used twice: every kind of deferred bound and cross term."""

    def __init__(self, V=11, p=6):
        super().__init__()
        self.emb = nn.Embedding(V, p, padding_idx=0)
        self.fc = nn.Linear(p, p)
        self.conv = nn.Conv1d(p, p, 3, padding=1)
        self.ln = nn.LayerNorm(p)
        self.twice = nn.Linear(p, p)
        self.head = nn.Linear(p, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids)))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.twice(torch.tanh(self.twice(self.ln(h))))
        return self.head(h)


def eager_bound(engine):
    parts = []
    for uses in engine.uses.values():
        for i, use in enumerate(uses):
            terms = use.error_terms()
            if terms is not None:
                parts.append(cancellation_bounds([(*terms, use.norm_sq)]))
            for u in uses[:i]:
                e = cross_error(u, use, u.norm_sq, use.norm_sq)
                if e is not None:
                    parts.append(e)
    return torch.stack([t.double() for t in parts]).sum(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deferred_bound_is_the_eager_bound(dtype, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if dtype == torch.float64:
            pytest.skip("float64 runs on the reference")
    torch.manual_seed(0)
    model = Tied().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0,
                                loss_reduction="sum", backend=backend, seed=0)
    try:
        ids = torch.randint(0, 11, (4, 9))
        ids[:, -2:] = 0  # padding positions
        model(ids).square().sum().backward()
        engine = model._dpkernels_engine
        assert engine._err_own and engine._err_cross  # the deferred path ran
        assert engine._err_terms  # and the conv's per-use one
        got = engine.err_sq().double()
        want = eager_bound(engine)
        assert (want > 0).all()
        u = unit_roundoff(torch.empty(0, dtype=dtype))
        torch.testing.assert_close(got, want, rtol=64 * u, atol=0)
        dp.step()
    finally:
        dpkernels.detach(model)
