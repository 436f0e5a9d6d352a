"""The noise of a DP step, per backend and for empty and non-empty batches: every trainable
parameter gets N(0, (sigma C / B_expected)^2) exactly once, independent of every other
parameter's, on a model whose parameters invite the classic mistakes: a table used twice
(tied embedding and head: noise must be added once, not once per use) and two Linears of the
same shape (the same seed for both would give them identical noise).  The statistics and their
false-failure rates and power are in noise_stats.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from noise_stats import check_noise  # noqa: E402
from torch import nn  # noqa: E402

import dpkernels  # noqa: E402

V, D, B, T = 32, 32, 5, 3
SIGMA, C = 1.3, 0.7
B_EXPECTED = B + 3  # never the realised batch: dividing by B instead must show
# the smallest parameters (the biases, 32 values) need 256 draws for power 0.999
STEPS = 8


class TiedTwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lin1 = nn.Linear(D, D)
        self.lin2 = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.lin1(self.emb(ids)))
        return self.head(torch.tanh(self.lin2(h)))


def _grads(model, backend, sigma, steps, ids, y):
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=sigma, max_grad_norm=C,
                                expected_batch_size=B_EXPECTED, backend=backend, seed=2024)
    out = {name: [] for name, _ in model.named_parameters()}
    try:
        for _ in range(steps):
            logits = model(ids)
            if len(ids):
                loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            else:  # an empty Poisson batch: the backward still runs through every layer
                loss = logits.sum()
            loss.backward()
            dp.step()
            for name, p in model.named_parameters():
                out[name].append(p.grad.detach().flatten().clone())
            dp.zero_grad()
    finally:
        dpkernels.detach(model)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("batch", ["nonempty", "empty"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_noise_once_per_parameter_independent(backend, batch):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = TiedTwin()
    assert model.head.weight is model.emb.weight
    n = B if batch == "nonempty" else 0
    ids = torch.randint(0, V, (n, T))
    y = torch.randint(0, V, (n, T))
    noisy = _grads(model, backend, SIGMA, STEPS, ids, y)
    # the clipped sum without noise (lr=0: the model does not move, every step sees the same
    # signal); float32 rounding of signal + noise is ~1e-7 of the noise, far below the bands
    clean = _grads(model, backend, 0.0, 1, ids, y)
    if batch == "empty":
        assert all(not g.any() for g in clean.values())
    else:
        assert all(g.any() for g in clean.values())
    noise = {k: noisy[k] - clean[k] for k in noisy}
    check_noise(noise, SIGMA * C / B_EXPECTED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [5, 4095, 8192, 8192 + 7, 3 * 4096 + 15, 50001])
def test_chunked_noise_equals_the_one_shot_draw(monkeypatch, n, dtype):
    """The reference draws noise in chunks (so a step never holds a second parameter-sized
    tensor) with exactly the values of the one-shot ``gaussian`` on the CPU: chunks of 4096
    here, lengths below two chunks, exact multiples, and remainders shorter than 16 that the
    last chunk absorbs."""
    from dpkernels.reference import _common

    monkeypatch.setattr(_common, "NOISE_CHUNK_ELEMS", 4096)
    acc = torch.randn(n, 3, dtype=dtype)
    want = acc + _common.gaussian(acc.shape, 0.7, 123, "cpu", dtype)
    got = _common.add_gaussian_(acc.clone(), 0.7, 123)
    assert torch.equal(got, want)
