"""Magnitudes ``S_b = sum_t |a_t| |g_t|`` of per-sample gradients that are sums over
positions: what the cancellation bound of a norm is relative to (layers/base.py)."""

from __future__ import annotations

import torch

from dpkernels.dispatch import register


def magnitude(a: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """[B] ``sum_t |a_t| |g_t|`` for ``a`` [B, T, d] (None: ``|a_t| = 1``), ``g`` [B, T, p];
    float32 (float64 for float64 inputs)."""
    dt = torch.promote_types(g.dtype if a is None else torch.promote_types(a.dtype, g.dtype),
                             torch.float32)
    ng = torch.linalg.vector_norm(g, dim=-1, dtype=dt)  # [B, T]
    if a is None:
        return ng.sum(1)
    na = torch.linalg.vector_norm(a, dim=-1, dtype=dt)
    return torch.bmm(na.unsqueeze(1), ng.unsqueeze(2)).view(-1)


# Inner products on tensor cores (DESIGN.md section 6).  The cancellation bounds count the
# roundings of an inner product of length K: K for float32 FMA loops (Triton "ieee", torch on
# the CPU, cuBLAS without TF32: any summation order), what the Triton norm kernels do on a GPU
# otherwise (ops/_common.norm_mma).  There every K-chunk of at most TC_BLOCK_K_MAX products
# goes to a fresh tensor-core accumulator, float32 operands split into two TF32 parts after
# scaling their rows by powers of two, and the chunk is added to a float32 register with one
# IEEE rounding.  A tensor-core block FMA adds k exact products to its accumulator with an
# error of at most (k + 2) 2^-23 times the sum of the magnitudes of its terms (operands aligned
# to the largest exponent and truncated, the result truncated: Fasi et al. 2021 on V100/A100,
# Khattak and Mikaitis 2025 on H100/B200); a chunk's high-part dot chains BK / k of them, so
# its error is at most 3 BK 2^-23 = 6 BK u for any k >= 1 (the float32 split's two low-part
# dots run first, from zero, on terms 2^-10 of the size: they add 3 (BK + 1) 2^-23 at most
# in all, inside the factor 2); TC_CHUNK_ROUNDINGS doubles it for safety (an adversarial
# review's software tensor core exceeds it only when it keeps 21 bits or fewer, which
# tests/test_gpu.py probes on the hardware).  The
# TF32 split (hi rounded to nearest, lo truncated by the tensor core, lo * lo dropped) is off
# by at most 5 2^-22 = 20 u per product; underflow inside the scaled chunk is relative and far
# below u; TC_SPLIT_ROUNDINGS = 26 covers both.  The chunk sums add ceil(K / 16) roundings
# (tl.dot's smallest K).
TC_BLOCK_K_MAX = 64
TC_CHUNK_ROUNDINGS = 12 * TC_BLOCK_K_MAX
TC_SPLIT_ROUNDINGS = 26


def dot_roundings(K: int, t: torch.Tensor) -> int:
    """Roundings (in units of the accumulation's u) of an inner product of length ``K`` of
    rows of ``t`` and of its partner: ``K`` on the CPU; on a GPU the larger of the FMA count
    and the tensor-core count (the Triton kernels or torch, whichever the backend runs)."""
    K = int(K)
    if t.device.type == "cpu":
        return K
    return max(K, TC_CHUNK_ROUNDINGS + TC_SPLIT_ROUNDINGS + -(-K // 16))


def check_items(name: str, items: list) -> int:
    """The batch size of ``items`` [(a | None, g), ...], checked."""
    if not items:
        raise ValueError(f"dpkernels.ops.{name}: no inputs")
    B = items[0][1].shape[0]
    for i, (a, g) in enumerate(items):
        if g.dim() != 3 or g.shape[0] != B or (
                a is not None and (a.dim() != 3 or a.shape[:2] != g.shape[:2])):
            raise ValueError(
                f"dpkernels.ops.{name}: input {i} has shapes "
                f"{None if a is None else tuple(a.shape)} and {tuple(g.shape)}, expected "
                f"a [{B}, T, d] (or None) and g [{B}, T, p]")
    return B


@register("magnitude_many", "reference")
def magnitude_many(items: list) -> torch.Tensor:
    """[len(items), B] ``magnitude(a, g)`` of every ``(a | None, g)`` of ``items``, in the
    widest dtype among them (float32 unless one is float64)."""
    check_items("magnitude_many", items)
    rows = [magnitude(a, g) for a, g in items]
    dt = rows[0].dtype
    for r in rows[1:]:
        dt = torch.promote_types(dt, r.dtype)
    return torch.stack([r.to(dt) for r in rows])


def norm_bound(norm_sq: torch.Tensor, err_sq: torch.Tensor | None, loss_scale: float,
               margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] norms from raw squared norms, and an upper bound of the exact norms for the clip
    factors: the cancellation bound ``err_sq`` on the squared norm (layers/base.py), then the
    relative ``margin`` for the remaining (cancellation-free) rounding."""
    norm_sq = norm_sq.detach().clamp_min(0)
    norms = norm_sq.sqrt() * loss_scale
    if err_sq is not None:
        norm_sq = norm_sq + err_sq.detach().to(norm_sq.dtype)
    bound = (norm_sq.sqrt() * loss_scale) * (1.0 + margin)
    return norms, bound


@register("clip_factors", "reference")
def clip_factors(norm_sq: torch.Tensor, err_sq: torch.Tensor | None, loss_scale: float,
                 margin: float, max_grad_norm: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([B] norms, [B] clip factors ``min(C / (bound + 1e-6), 1)``, 0 where the norm or its
    bound is not finite or the factor is below the smallest normal number, a 0-dim bool: every
    norm and bound finite) from [B] raw squared norms (``norm_bound``)."""
    norms, bound = norm_bound(norm_sq, err_sq, loss_scale, margin)
    factors = (max_grad_norm / (bound + 1e-6)).clamp(max=1.0)
    # a subnormal factor is rounded with a relative error up to 1 (C = 1e-30, bound 1e15:
    # 1e-45 rounds to 1.4e-45), far beyond the margin: such a sample gets 0 instead
    factors = torch.where(factors < torch.finfo(factors.dtype).tiny, 0.0, factors)
    # the bound too: a finite norm can have a NaN bound (inf * 0 in a magnitude, a huge input
    # at a position whose backprop is 0), and a NaN factor would make every sum NaN
    finite = torch.isfinite(norms) & torch.isfinite(bound)
    factors = torch.where(finite, factors, torch.zeros_like(factors))
    return norms, factors, finite.all()
