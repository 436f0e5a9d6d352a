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


# Noise is drawn and added this many elements at a time (1 MiB of float32), so that the step
# holds the gradients plus one chunk, never a second parameter-sized tensor (with the
# gradients of every parameter live, a whole-parameter draw of the largest one, e.g. a
# 16384 x 768 head, was the step's peak: bench/per_layer_memory.py --explain).
NOISE_CHUNK_ELEMS = 1 << 18
# On a GPU each chunk is a launch or two and the card has tens of GiB: 64 MiB chunks keep the
# temporary small next to the gradients without hundreds of launches per step.
NOISE_CHUNK_ELEMS_GPU = 1 << 24


def noise_chunk_elems(device) -> int:
    """Elements of noise drawn and added at a time on ``device``."""
    return NOISE_CHUNK_ELEMS if torch.device(device).type == "cpu" else NOISE_CHUNK_ELEMS_GPU


def gaussian(shape, std: float, seed: int, device, dtype) -> torch.Tensor:
    """``std * N(0, I)`` from a generator seeded with ``seed`` (reproducible, per call)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def add_gaussian_(out: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """``out += gaussian(out.shape, std, seed, ...)`` in place, drawn in chunks of about
    NOISE_CHUNK_ELEMS elements from one generator.  On the CPU the values are exactly those of
    the one-shot ``gaussian`` (torch's CPU normal sampler consumes the generator in blocks of
    16, and every chunk but the last is a multiple of 16 long; tests/test_noise.py checks it);
    on CUDA they are a different, equally seeded draw."""
    n, chunk = out.numel(), noise_chunk_elems(out.device)
    if not out.is_contiguous() or n < 2 * chunk:
        return out.add_(gaussian(out.shape, std, seed, out.device, out.dtype))
    gen = torch.Generator(device=out.device)
    gen.manual_seed(int(seed))
    flat = out.view(-1)
    m = n // chunk  # the last chunk takes the remainder (at most 2 chunks long)
    for k in range(m):
        lo = k * chunk
        hi = n if k == m - 1 else lo + chunk
        z = torch.randn(hi - lo, generator=gen, device=out.device, dtype=out.dtype)
        flat[lo:hi].add_(z.mul_(std))
    return out


def finish(acc, update, noise_std: float, seed: int, scale: float) -> torch.Tensor:
    """``(acc + update + noise_std * z) * scale``: the epilogue every clipped sum shares."""
    out = update if acc is None else acc.add_(update)
    if noise_std:
        add_gaussian_(out, noise_std, seed)
    if scale != 1.0:
        out.mul_(scale)
    return out


@contextlib.contextmanager
def _setting(obj, name: str, value):
    """``obj.name = value`` inside the block; the old value is restored."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_tf32(backend, legacy_owner):
    """The setting that keeps ``backend``'s float32 off TF32: ``fp32_precision`` (torch >=
    2.9) or the legacy ``allow_tf32``."""
    if getattr(backend, "fp32_precision", None) is not None:
        return _setting(backend, "fp32_precision", "ieee")
    return _setting(legacy_owner, "allow_tf32", False)


@contextlib.contextmanager
def exact_fp32():
    """Float32 matmuls and convolutions without TF32 inside the block (the reference ops on a
    GPU: a norm rounded to TF32 could be 1e-3 short, beyond every bound the engine adds, and
    a clipped sum off by as much could exceed C); the user's settings are restored.  Global
    state, as torch's own settings are: not for two threads at once."""
    matmul = torch.backends.cuda.matmul
    with cudnn_exact_fp32(), _no_tf32(matmul, matmul):
        yield


def exact_fp32_on(t: torch.Tensor):
    """``exact_fp32()`` for a tensor off the CPU (a GPU), nothing on the CPU."""
    return contextlib.nullcontext() if t.device.type == "cpu" else exact_fp32()


def cudnn_exact_fp32():
    """Float32 convolutions without TF32 inside the block; the user's setting is restored."""
    return _no_tf32(getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn)
