"""What the Triton op tests share: the device, the NaN-poisoning fixture and the tolerance rule.

Tolerance rule (flash-attention's): with float32 inputs the kernel's relative error against
the float64 reference may be at most twice what torch itself makes when it computes the same
op in float32 (the reference op on float32 inputs), plus 16 eps32 for cases where torch is
exact by luck.  Errors are norm-wise, ``||out - ref|| / ||ref||``.

Import this only after TRITON_INTERPRET is settled (the test modules set it first).
"""

import pytest
import torch

from dpkernels.ops._common import INTERPRET

EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def on_device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every float buffer a launcher allocates with ``torch.empty`` starts as NaN, so an
    element a kernel forgets to write fails the test."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(out, ref64, ref32, what=""):
    """The tolerance rule above, plus dtype, shape and 'every element written'."""
    assert out.dtype == torch.float32, (what, out.dtype)
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten) elements"
    if ref64.numel() == 0 or ref64.norm() == 0:
        assert out.numel() == 0 or out.abs().max().item() == 0, what
        return
    err, base = rel(out, ref64), rel(ref32, ref64)
    assert err <= 2 * base + 16 * EPS32, f"{what}: error {err:.3g}, torch float32 {base:.3g}"
