"""Norm layers: per-sample gradients of the affine parameters, recomputing the normalised
input from ``x`` inside the kernel (one read of ``x`` and ``g``, no ``x_hat`` tensor).

LayerNorm / RMSNorm: ``x`` viewed as [B, M, N] (N = prod(normalized_shape)); every row is
normalised over N, and ``gw_b = sum_m g * x_hat``, ``gb_b = sum_m g``.  GroupNorm: ``x``
[B, C, S]; statistics over each group's (C / G) x S elements, sums over S per channel.
Statistics as torch computes them: biased variance, ``eps`` inside the square root.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import (
    INTERPRET,
    autotune,
    check_float,
    num_sms,
    use_reference,
    warps_prune,
)
from dpkernels.reference import norms as ref

MAX_ROW = 16384  # widest normalised row kept on chip; wider ones use the reference
MAX_GROUP_CHANNELS = 4096

# ---------------------------------------------------------------------------- kernels


@autotune(
    [
        triton.Config({}, num_warps=4),
        triton.Config({}, num_warps=8),
        triton.Config({}, num_warps=16),
    ],
    key=["N", "BLOCK_M", "BLOCK_N"],
    prune_configs_by={"early_config_prune": warps_prune("BLOCK_M", "BLOCK_N")},
)
@triton.jit
def _row_norm_psg_kernel(
    x_ptr, g_ptr, gw_ptr, gb_ptr, aw_ptr, ab_ptr, M, N, sos, rows_per_split, n_splits, eps,
    RMS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ABS: tl.constexpr, MAGS: tl.constexpr,
):
    """Rows [split * rows_per_split, ...) of sample b; whole rows (N <= BLOCK_N) on chip.
    Writes this split's partial ``sum_m g * x_hat`` / ``sum_m g`` at ``(b * n_splits +
    split) * sos`` (the outputs' split stride) of gw / gb; ``ABS``: ``sum_m |g * x_hat|`` /
    ``sum_m |g|`` instead; ``MAGS``: those too, at the same place of aw / ab (the terms'
    magnitudes, for the cancellation bound: layers/base.py ``SummedTerms``)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mn = cols < N
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    mag_w = tl.zeros([BLOCK_N], dtype=tl.float32)  # reduced per tile: no second full tile
    mag_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)  # [BM]
        mask = (m < m_end)[:, None] & mn[None, :]
        offs = (b * M + m[:, None]) * N + cols[None, :]  # [BM, BN]
        y = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ABS:  # the terms' magnitudes (affine_magnitudes)
            y = tl.abs(y)
        if NEED_W:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RMS:
                ms = tl.sum(x * x, axis=1) / N  # [BM]
                xhat = x / tl.sqrt(ms + eps)[:, None]
            else:
                mean = tl.sum(x, axis=1) / N  # [BM]
                diff = tl.where(mask, x - mean[:, None], 0.0)
                var = tl.sum(diff * diff, axis=1) / N
                xhat = diff / tl.sqrt(var + eps)[:, None]
            if ABS:
                xhat = tl.abs(xhat)
            acc_w += y * xhat
            if MAGS:
                mag_w += tl.sum(tl.abs(y * xhat), axis=0)
        if NEED_B:
            acc_b += y
            if MAGS:
                mag_b += tl.sum(tl.abs(y), axis=0)
    out = (b * n_splits + split) * sos + cols
    if NEED_W:
        tl.store(gw_ptr + out, tl.sum(acc_w, axis=0), mask=mn)
        if MAGS:
            tl.store(aw_ptr + out, mag_w, mask=mn)
    if NEED_B:
        tl.store(gb_ptr + out, tl.sum(acc_b, axis=0), mask=mn)
        if MAGS:
            tl.store(ab_ptr + out, mag_b, mask=mn)


@autotune(
    [
        # 8 warps only: on 4 warps, [4096] channels (32 a tile per thread) spilled ~110 B and
        # cnn's [8, 64] tile 4 B on sm_90; every 8-warp variant compiled without spills (the
        # launcher caps the tile at 4096 elements: 16 a tile per thread)
        triton.Config({}, num_warps=8),
    ],
    key=["Cg", "S", "BLOCK_C", "BLOCK_S"],
)
@triton.jit
def _group_norm_psg_kernel(
    x_ptr, g_ptr, gw_ptr, gb_ptr, G, Cg, S, eps,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ABS: tl.constexpr,
):
    """One (sample, group): mean, then biased variance (two passes over the group, for
    accuracy), then per-channel ``sum_s g * x_hat`` and ``sum_s g``."""
    pid = tl.program_id(0).to(tl.int64)  # = b * G + group
    base = pid * Cg * S  # contiguous [B, C, S]: a group's channels are adjacent
    ch = tl.arange(0, BLOCK_C)
    mc = ch < Cg
    n = Cg * S
    acc_w = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    if NEED_W:  # the statistics only serve gw: the bias alone needs one pass over g
        tot = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = mc[:, None] & (s < S)[None, :]
            offs = base + ch[:, None] * S + s[None, :]
            tot += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(tot, axis=1), axis=0) / n
        sq = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = mc[:, None] & (s < S)[None, :]
            offs = base + ch[:, None] * S + s[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, x - mean, 0.0)
            sq += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / n + eps)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = mc[:, None] & (s < S)[None, :]
        offs = base + ch[:, None] * S + s[None, :]
        y = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_W:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            t = y * ((x - mean) * rstd)
            if ABS:  # the terms' magnitudes (affine_magnitudes): |g * x_hat| = |g| |x_hat|
                t = tl.where(t < 0.0, -t, t)
            acc_w += t
        if NEED_B:
            acc_b += tl.where(y < 0.0, -y, y) if ABS else y
    out = pid * Cg + ch  # [B, C] row-major: (b * G + group) * Cg + channel
    if NEED_W:
        tl.store(gw_ptr + out, tl.sum(acc_w, axis=1), mask=mc)
    if NEED_B:
        tl.store(gb_ptr + out, tl.sum(acc_b, axis=1), mask=mc)


# ---------------------------------------------------------------------------- launchers


def _row_norm_psg(x, g, normalized_shape, eps, rms, need_weight, need_bias, split=None,
                  absolute=False):
    normalized_shape = tuple(normalized_shape)
    N = math.prod(normalized_shape)
    B = x.shape[0]
    device = x.device
    M = x.numel() // max(B * N, 1) if N else 0
    shape = (B, *normalized_shape)
    if not (need_weight or need_bias):
        return None, None
    if B == 0 or M == 0 or N == 0:
        zero = torch.zeros(shape, dtype=torch.float32, device=device)
        return (zero if need_weight else None), (zero.clone() if need_bias else None)
    x3 = x.reshape(B, M, N).contiguous()
    g3 = g.reshape(B, M, N).contiguous()
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = max(1, min(triton.next_power_of_2(M), 4096 // BLOCK_N))
    if split is None:
        split = min(triton.cdiv(M, BLOCK_M), max(1, 2 * num_sms(device) // B), 64)
    rows_per_split = triton.cdiv(triton.cdiv(M, split), BLOCK_M) * BLOCK_M
    split = triton.cdiv(M, rows_per_split)
    # gw and gb side by side in one buffer: one reduction over the splits folds both
    both = torch.empty(B, split, need_weight + need_bias, N, dtype=torch.float32, device=device)
    gw = both[:, :, 0] if need_weight else None
    gb = both[:, :, -1] if need_bias else None
    _row_norm_psg_kernel[(B, split)](
        x_ptr=x3, g_ptr=g3, gw_ptr=gw if gw is not None else gb,
        gb_ptr=gb if gb is not None else gw, aw_ptr=x3, ab_ptr=x3, M=M, N=N,
        sos=both.stride(1), rows_per_split=rows_per_split, n_splits=split, eps=float(eps),
        RMS=rms, NEED_W=need_weight, NEED_B=need_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        ABS=absolute, MAGS=False,
    )
    folded = both[:, 0] if split == 1 else both.sum(1)  # [B, 1 or 2, N]

    def view(k):
        return folded[:, k].reshape(shape)  # a view: folded[:, k] is [B, N] rows

    return (view(0) if need_weight else None), (view(-1) if need_bias else None)


def _check(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
    if x.shape != g.shape:
        raise ValueError(f"dpkernels.ops.{name}: x {tuple(x.shape)} and g {tuple(g.shape)} "
                         "differ")
    check_float(name, x, g)


@register("layer_norm_psg", "triton")
def layer_norm_psg(x, g, normalized_shape, eps, need_weight=True, need_bias=True,
                   absolute=False):
    """(gw, gb), each [B, *normalized_shape] float32 or None, for LayerNorm over the last
    ``len(normalized_shape)`` dims of ``x`` [B, ..., *normalized_shape]; ``absolute``: the
    terms' magnitudes summed instead (reference/norms.py)."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.layer_norm_psg(x, g, normalized_shape, eps, need_weight, need_bias,
                                  absolute)
    _check("layer_norm_psg", x, g)
    return _row_norm_psg(x, g, normalized_shape, eps, False, need_weight, need_bias,
                         absolute=absolute)


@register("rms_norm_psg", "triton")
def rms_norm_psg(x, g, normalized_shape, eps=None, absolute=False):
    """gw [B, *normalized_shape] float32 for RMSNorm; ``eps=None`` is float32's machine
    epsilon (torch computes RMSNorm of 16-bit and float32 inputs in float32)."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.rms_norm_psg(x, g, normalized_shape, eps, absolute)
    _check("rms_norm_psg", x, g)
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    return _row_norm_psg(x, g, normalized_shape, eps, True, True, False, absolute=absolute)[0]


@register("group_norm_psg", "triton")
def group_norm_psg(x, g, num_groups, eps, need_weight=True, need_bias=True, absolute=False):
    """(gw, gb), each [B, C] float32 or None, for GroupNorm of ``x`` [B, C, *spatial]."""
    B, C = x.shape[:2]
    G = int(num_groups)
    if use_reference(x, g) or C % G or C // G > MAX_GROUP_CHANNELS:
        return ref.group_norm_psg(x, g, num_groups, eps, need_weight, need_bias, absolute)
    _check("group_norm_psg", x, g)
    if not (need_weight or need_bias):
        return None, None
    device = x.device
    S = math.prod(x.shape[2:])
    Cg = C // G
    gw = torch.zeros(B, C, dtype=torch.float32, device=device) if need_weight else None
    gb = torch.zeros(B, C, dtype=torch.float32, device=device) if need_bias else None
    if B == 0 or C == 0 or S == 0:
        return gw, gb
    x3 = x.reshape(B, C, S).contiguous()
    g3 = g.reshape(B, C, S).contiguous()
    BLOCK_C = max(triton.next_power_of_2(Cg), 1)
    BLOCK_S = max(1, min(triton.next_power_of_2(S), (1024 if INTERPRET else 4096) // BLOCK_C))
    _group_norm_psg_kernel[(B * G,)](
        x_ptr=x3, g_ptr=g3, gw_ptr=gw if gw is not None else gb,
        gb_ptr=gb if gb is not None else gw, G=G, Cg=Cg, S=S, eps=float(eps),
        NEED_W=need_weight, NEED_B=need_bias, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S,
        ABS=absolute,
    )
    return gw, gb
