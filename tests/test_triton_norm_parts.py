"""LayerNorm and RMSNorm per-sample terms as unsummed partials (``*_psg_parts``): their sums
over the partials against the reference terms (``layer_norm_psg``, ``rms_norm_psg``), through
Triton's interpreter; tolerance rule of tests/kernel_check.py."""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from kernel_check import DEVICE, check, on_device, poison  # noqa: E402, F401
from torch import nn  # noqa: E402

from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import norm_parts  # noqa: E402
from dpkernels.reference import norms as ref  # noqa: E402

CASES = [pytest.param((3, 37, 24), (24,), id="B3-T37-d24"),
         pytest.param((5, 2, 7, 6), (7, 6), id="B5-two-dims"),
         pytest.param((1, 130, 16), (16,), id="B1-T130"),
         pytest.param((4, 24), (24,), id="no-positions"),
         pytest.param((0, 9, 8), (8,), id="B0")]


@pytest.mark.parametrize("shape,norm_shape", CASES)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)],
                         ids=["both", "weight", "bias"])
def test_layer_norm_psg_parts(shape, norm_shape, need):
    torch.manual_seed(len(shape) + shape[0])
    x, g = torch.randn(*shape) * 3 + 1, torch.randn(*shape)
    parts = norm_parts.layer_norm_psg_parts(x, g, norm_shape, 1e-5, *need)
    r64 = ref.layer_norm_psg(x.double(), g.double(), norm_shape, 1e-5, *need)
    r32 = ref.layer_norm_psg(x, g, norm_shape, 1e-5, *need)
    B, N = shape[0], math.prod(norm_shape)
    for p, e64, e32, on in zip(parts, r64, r32, need):
        if not on:
            assert p is None
            continue
        assert p.dim() == 3 and p.shape[0] == B and p.shape[2] == N
        check(p.sum(1), e64.reshape(B, N), e32.reshape(B, N))


@pytest.mark.parametrize("shape,norm_shape", CASES)
def test_rms_norm_psg_parts(shape, norm_shape):
    torch.manual_seed(shape[0])
    x, g = torch.randn(*shape), torch.randn(*shape)
    p = norm_parts.rms_norm_psg_parts(x, g, norm_shape)
    B = shape[0]
    e64 = ref.rms_norm_psg(x.double(), g.double(), norm_shape, torch.finfo(torch.float32).eps)
    e32 = ref.rms_norm_psg(x, g, norm_shape)
    N = math.prod(norm_shape)
    check(p.sum(1), e64.reshape(B, N), e32.reshape(B, N))


def test_psg_parts_split_over_positions():
    """Enough positions per sample for several partials (the case the op exists for)."""
    x, g = torch.randn(2, 300, 64), torch.randn(2, 300, 64)
    gw, gb = norm_parts.layer_norm_psg_parts(x, g, (64,), 1e-5)
    assert gw.shape[1] > 1 and gb.shape[1] > 1
    e64 = ref.layer_norm_psg(x.double(), g.double(), (64,), 1e-5)
    e32 = ref.layer_norm_psg(x, g, (64,), 1e-5)
    for p, w64, w32 in zip((gw, gb), e64, e32):
        check(p.sum(1), w64, w32)


def test_psg_parts_resolve_to_triton():
    for name in ("layer_norm_psg_parts", "rms_norm_psg_parts"):
        fn, backend = dispatch.resolve(name, "triton", DEVICE)
        assert backend == "triton" and fn.__module__.startswith("dpkernels.ops")


class Norms(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.out = nn.Linear(d, 3)
        self.out2 = nn.Linear(d, 3)

    def forward(self, x):  # [B, T, d]
        return self.out(self.ln(x)) + self.out2(self.rms(x))


def test_engine_with_partial_norm_terms_matches_the_oracle():
    """LayerNorm and RMSNorm terms as partials (S > 1 here: 40 positions of 256 features, 3
    samples on the interpreter's 4 SMs), through the engine: per-sample norms and summed
    gradients against the float32 oracle (tests/test_triton_engine.py's rule).  No sample is
    clipped: with random targets the cancellation bounds of this model's Linears are ~3e-4 of
    the norms, so the engine's (deliberately conservative) factors of clipped samples would
    differ from the oracle's exact ones by more than the rule; the norms and sums are what
    the partials change."""
    from oracle import check_engine

    import dpkernels
    from dpkernels.layers.norms import PartsUse

    torch.manual_seed(0)
    model = Norms()
    x, y = torch.randn(3, 40, 256) * 2 + 0.5, torch.randint(0, 3, (3, 40))

    def ce(out, t):
        return F.cross_entropy(out.reshape(-1, 3), t.reshape(-1))

    probe = Norms()
    dp = dpkernels.make_private(probe, torch.optim.SGD(probe.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3,
                                backend="triton")
    ce(probe(x), y).backward()
    uses = [u for us in probe._dpkernels_engine.uses.values() for u in us]
    parts = [u for u in uses if isinstance(u, PartsUse)]
    assert len(parts) == 3 and all(u.g.shape[1] > 1 for u in parts)
    dp.step()
    dpkernels.detach(probe)
    check_engine(model, ce, x, y, backend="triton", rtol=1e-4, max_grad_norm=1e6,
                 require_mixed_clipping=False)
