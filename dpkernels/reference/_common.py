"""Small helpers shared by the reference ops."""

from __future__ import annotations

import contextlib

import torch

# Per-chunk budget (elements) for the intermediates the reference materialises, so that the
# CPU fallback stays within memory on real models: samples are processed in chunks.
CHUNK_ELEMS = 1 << 24


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (the oracle tests), float32 otherwise."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def chunks(n: int, per_item: int):
    """Yield slices over ``n`` samples so that each chunk holds about CHUNK_ELEMS elements."""
    step = max(1, CHUNK_ELEMS // max(1, per_item))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def gaussian(shape, std: float, seed: int, device, dtype) -> torch.Tensor:
    """``std * N(0, I)`` from a generator seeded with ``seed`` (reproducible, per call)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def finish(acc, update, noise_std: float, seed: int, scale: float) -> torch.Tensor:
    """``(acc + update + noise_std * z) * scale``: the epilogue every clipped sum shares."""
    out = update if acc is None else acc.add_(update)
    if noise_std:
        out.add_(gaussian(out.shape, noise_std, seed, out.device, out.dtype))
    if scale != 1.0:
        out.mul_(scale)
    return out


@contextlib.contextmanager
def cudnn_exact_fp32():
    """Float32 convolutions without TF32 inside the block; the user's setting is restored."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if getattr(conv, "fp32_precision", None) is not None:
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old
