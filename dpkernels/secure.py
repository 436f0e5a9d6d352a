"""Cryptographically secure Gaussian noise for ``make_private(..., secure_mode=True)``.

The generator is ChaCha20 (RFC 8439) in the C++ extension ``dpkernels._C`` (csrc/), the
same source compiled for CPU and, where built, CUDA.  Each step draws a fresh 256-bit key
from ``os.urandom``; parameter ``i`` uses stream (nonce) ``i`` of that key, so no two draws
share keystream.  Normals are made in float64 from 53-bit uniforms (two Box-Muller draws
summed, Holohan & Braghin 2021) and rounded to the accumulator's dtype only at the end;
docs/DESIGN.md ("Secure noise") says why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

KEY_BYTES = 32
NONCE_BYTES = 12
STREAM_ELEMS = 1 << 33  # 2^32 ChaCha20 blocks of two normals
# Noise is drawn and added this many elements at a time, so that a step holds one chunk of
# noise on top of the gradients, never a parameter-sized noise tensor (as the reference's
# Philox noise: dpkernels/reference/_common.py).  Any chunking gives the same bits.
NOISE_CHUNK_ELEMS = 1 << 18
NOISE_CHUNK_ELEMS_GPU = 1 << 24  # a GPU: fewer launches, still small next to the gradients
_STATUS_FILE = Path(__file__).with_name("_build_status.txt")


@functools.cache
def available() -> tuple[bool, str]:
    """(built, reason): whether the ``dpkernels._C`` ops can be called, and if not, why."""
    try:
        from dpkernels import _C  # noqa: F401  (registers the torch.library ops)
    except Exception as e:
        recorded = ""
        if _STATUS_FILE.exists():
            recorded = _STATUS_FILE.read_text().strip()
        why = f"the C++ extension dpkernels._C cannot be imported ({type(e).__name__}: {e})"
        if recorded:
            why += f"; at install time setup.py reported: {recorded}"
        return False, why
    if not hasattr(torch.ops.dpkernels, "secure_normal_"):
        return False, "dpkernels._C was imported but does not register dpkernels::secure_normal_"
    args = [a.name for a in torch.ops.dpkernels.secure_normal_.default._schema.arguments]
    if "offset" not in args:  # a build from before the noise was drawn in chunks
        return False, ("dpkernels._C is out of date: it was built from an older csrc/ (its "
                       "secure_normal_ takes no stream offset); rebuild it with python setup.py "
                       "build_ext --inplace")
    return True, ""


@functools.cache
def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return available()[0] and bool(torch.ops.dpkernels.with_cuda())


def require() -> None:
    """Raise a RuntimeError that says why secure noise is unavailable and what to do."""
    ok, why = available()
    if not ok:
        raise RuntimeError(
            f"dpkernels: secure_mode=True needs the C++ extension: {why}. Reinstall with a "
            "C++ compiler and torch present: pip install --no-build-isolation -e . "
            "(python -m dpkernels info shows what is built)"
        )


def _words(data: bytes, n_bytes: int, name: str) -> list[int]:
    if not isinstance(data, (bytes, bytearray)) or len(data) != n_bytes:
        size = len(data) if hasattr(data, "__len__") else "?"
        raise ValueError(f"dpkernels.secure: {name} must be {n_bytes} bytes, got "
                         f"{type(data).__name__} of length {size}")
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, n_bytes, 4)]


def chacha20_keystream(key: bytes, nonce: bytes, counter: int, num_blocks: int) -> bytes:
    """Blocks ``counter .. counter + num_blocks - 1`` of the RFC 8439 ChaCha20 keystream."""
    require()
    k, n = _words(key, KEY_BYTES, "key"), _words(nonce, NONCE_BYTES, "nonce")
    out = torch.ops.dpkernels.chacha20_keystream(k, n, int(counter), int(num_blocks))
    return out.numpy().tobytes()


def secure_normal_(out: torch.Tensor, key: bytes, stream: int, std: float,
                   offset: int = 0) -> torch.Tensor:
    """Fill ``out`` (contiguous float32/float64, CPU or CUDA) with ``std * z``, where ``z`` is
    elements ``offset .. offset + out.numel() - 1`` of the N(0, 1) sequence of stream
    ``stream`` of ChaCha20 key ``key`` (32 bytes); returns ``out``.  ChaCha20 is counter-based,
    so a draw in chunks (each at its offset) equals the whole draw bit for bit."""
    require()
    if not isinstance(out, torch.Tensor):
        raise TypeError("dpkernels.secure_normal_: out must be a tensor, got "
                        f"{type(out).__name__}")
    if out.dtype not in (torch.float32, torch.float64):
        raise ValueError("dpkernels.secure_normal_: out must be float32 or float64, got "
                         f"{out.dtype}")
    if not out.is_contiguous():
        raise ValueError("dpkernels.secure_normal_: out must be contiguous")
    if out.device.type not in ("cpu", "cuda"):
        raise ValueError(f"dpkernels.secure_normal_: out must be on the CPU or a CUDA device, "
                         f"got {out.device}")
    if out.device.type == "cuda" and not with_cuda():
        raise RuntimeError("dpkernels.secure_normal_: the C++ extension was built without its "
                           "CUDA kernel; pass a CPU tensor, or rebuild where nvcc and a CUDA "
                           "torch are present (DPKERNELS_BUILD_CUDA=1 pip install "
                           "--no-build-isolation -e .)")
    if not 0 <= int(stream) < 1 << 63:
        raise ValueError(f"dpkernels.secure_normal_: stream must be in [0, 2^63), got {stream}")
    if not 0 <= int(offset) <= STREAM_ELEMS - out.numel():
        raise ValueError(f"dpkernels.secure_normal_: offset must be >= 0 and offset + "
                         f"out.numel() <= 2^33 (one stream's length), got offset={offset}, "
                         f"numel={out.numel()}")
    std = float(std)
    if not (std >= 0 and std != float("inf")):
        raise ValueError(f"dpkernels.secure_normal_: std must be finite and >= 0, got {std}")
    torch.ops.dpkernels.secure_normal_(out, _words(key, KEY_BYTES, "key"), int(stream), std,
                                       int(offset))
    return out


class StepNoise:
    """The noise of one step: a fresh key from ``os.urandom``; parameter ``index`` draws from
    stream ``index``.  Call it once per parameter: ``noise(index, acc)`` adds ``std * z`` to
    ``acc`` in place (float32 noise for a float32 accumulator, float64 for float64), drawn in
    chunks of NOISE_CHUNK_ELEMS elements at their offsets in the stream: the same bits as one
    whole draw, without a second parameter-sized tensor."""

    def __init__(self, std: float) -> None:
        require()
        self.std = float(std)
        self._key = os.urandom(KEY_BYTES)
        self._used: set[int] = set()

    def __call__(self, index: int, acc: torch.Tensor) -> torch.Tensor:
        if index in self._used:  # two draws from one stream would be the same noise
            raise RuntimeError(f"dpkernels: secure noise stream {index} was drawn twice in one "
                               "step")
        self._used.add(index)
        if self.std == 0:
            return acc
        # Without the CUDA kernel, CUDA accumulators get the CPU op's noise (the same bits).
        device = acc.device if acc.device.type == "cpu" or with_cuda() else "cpu"
        n = acc.numel()
        if not acc.is_contiguous():  # (the engine's sums are contiguous) one whole draw
            z = torch.empty(acc.shape, dtype=acc.dtype, device=device)
            secure_normal_(z, self._key, index, self.std)
            return acc.add_(z.to(acc.device))
        flat = acc.view(-1)
        chunk = max(1, int(NOISE_CHUNK_ELEMS if torch.device(device).type == "cpu"
                           else NOISE_CHUNK_ELEMS_GPU))
        buf = torch.empty(min(n, chunk), dtype=acc.dtype, device=device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            z = secure_normal_(buf[:hi - lo], self._key, index, self.std, offset=lo)
            flat[lo:hi].add_(z.to(acc.device))
        return acc


def no_noise(index: int, acc: torch.Tensor) -> torch.Tensor:
    """The noise source of the processes that do not draw (distributed secure mode)."""
    return acc
