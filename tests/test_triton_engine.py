"""The engine with backend="triton" against the per-sample-gradient oracle, float32 models.

Tolerance: both sides compute in float32 (the oracle runs torch.func on the same float32
model), so each makes relative rounding errors of about K * eps32 ~ 1e-5 for the sums over
K <= ~100 terms here; rtol 1e-4 leaves a factor of ten.  The clipping threshold is the median
true norm * 1.0001, so no sample sits within 1e-4 of it and both sides clip the same samples.
Runs through Triton's interpreter on CPU (on CUDA when the kernels were compiled for it).
"""

import os

import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from oracle import check_engine  # noqa: E402
from torch import nn  # noqa: E402

from dpkernels.ops._common import INTERPRET  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
RTOL_F32 = 1e-4


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_mlp_float32(method):
    m = nn.Sequential(nn.Linear(20, 33), nn.Tanh(), nn.Linear(33, 5)).to(DEVICE)
    x = torch.randn(9, 20, device=DEVICE)
    y = torch.randint(0, 5, (9,), device=DEVICE)
    check_engine(m, ce, x, y, backend="triton", rtol=RTOL_F32, norm_method=method)


class TinyLM(nn.Module):
    """Embedding (with padding), LayerNorm, a block whose Linear is used twice (cross terms),
    RMSNorm, a head; sequence length 37 is not a multiple of any block size."""

    def __init__(self, V=13, d=24):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.block = nn.Linear(d, d)
        self.rms = nn.RMSNorm(d)
        self.head = nn.Linear(d, V)

    def forward(self, ids):
        h = self.ln(self.emb(ids))
        h = torch.tanh(self.block(h))
        h = torch.tanh(self.block(h))
        return self.head(self.rms(h))


@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
def test_sequence_model_float32(method):
    torch.manual_seed(1)
    m = TinyLM().to(DEVICE)
    ids = torch.randint(0, 13, (5, 37), device=DEVICE)
    ids[:, -4:] = 0  # padding positions
    y = torch.randint(0, 13, (5, 37), device=DEVICE)
    check_engine(m, ce, ids, y, backend="triton", rtol=RTOL_F32, norm_method=method)


def test_group_norm_model_float32():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8, bias=False)
            self.gn = nn.GroupNorm(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):  # [B, S, 3]
            h = self.inp(x).movedim(-1, 1)  # [B, 8, S]
            h = torch.tanh(self.gn(h))
            return self.out(h.movedim(1, -1)).mean(1)

    m = Net().to(DEVICE)
    x = torch.randn(6, 11, 3, device=DEVICE)
    y = torch.randint(0, 2, (6,), device=DEVICE)
    check_engine(m, ce, x, y, backend="triton", rtol=RTOL_F32)
