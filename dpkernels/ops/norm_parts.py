"""LayerNorm and RMSNorm per-sample affine terms as partial sums over blocks of positions
(reference/norm_parts.py says why): ops/norms.py's ``_row_norm_psg_kernel`` with its split
partials handed back [B, S, N] instead of summed in a second launch."""

from __future__ import annotations

import math

import torch
import triton

from dpkernels.dispatch import register
from dpkernels.ops._common import check_float, num_sms, use_reference
from dpkernels.ops.norms import MAX_ROW, _row_norm_psg_kernel
from dpkernels.reference import norm_parts as ref


def _parts(x, g, normalized_shape, eps, rms, need_weight, need_bias):
    """The split of ops/norms.py's ``_row_norm_psg``: rows of each sample in S blocks that
    fill the SMs, one program per (sample, block)."""
    N = math.prod(tuple(normalized_shape))
    B = x.shape[0]
    device = x.device
    M = x.numel() // max(B * N, 1) if N else 0
    if B == 0 or M == 0 or N == 0:
        zero = torch.zeros(B, 1, N, dtype=torch.float32, device=device)
        return (zero if need_weight else None), (zero.clone() if need_bias else None)
    x3 = x.reshape(B, M, N).contiguous()
    g3 = g.reshape(B, M, N).contiguous()
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = max(1, min(triton.next_power_of_2(M), 4096 // BLOCK_N))
    split = min(triton.cdiv(M, BLOCK_M), max(1, 2 * num_sms(device) // B), 64)
    rows_per_split = triton.cdiv(triton.cdiv(M, split), BLOCK_M) * BLOCK_M
    split = triton.cdiv(M, rows_per_split)
    both = torch.empty(B, split, need_weight + need_bias, N, dtype=torch.float32, device=device)
    gw = both[:, :, 0] if need_weight else None  # [B, S, N]
    gb = both[:, :, -1] if need_bias else None
    _row_norm_psg_kernel[(B, split)](
        x_ptr=x3, g_ptr=g3, gw_ptr=gw if gw is not None else gb,
        gb_ptr=gb if gb is not None else gw, M=M, N=N, sos=both.stride(1),
        rows_per_split=rows_per_split, n_splits=split, eps=float(eps),
        RMS=rms, NEED_W=need_weight, NEED_B=need_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    return gw, gb


def _check(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
    if x.shape != g.shape:
        raise ValueError(f"dpkernels.ops.{name}: x {tuple(x.shape)} and g {tuple(g.shape)} "
                         "differ")
    check_float(name, x, g)


@register("layer_norm_psg_parts", "triton")
def layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight=True, need_bias=True):
    """(gw, gb), each [B, S, N] float32 or None, whose sums over S are ``layer_norm_psg``'s
    terms (one launch, no summing pass)."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight, need_bias)
    _check("layer_norm_psg_parts", x, g)
    if not (need_weight or need_bias):
        return None, None
    return _parts(x, g, normalized_shape, eps, False, need_weight, need_bias)


@register("rms_norm_psg_parts", "triton")
def rms_norm_psg_parts(x, g, normalized_shape, eps=None):
    """gw [B, S, N] float32 whose sum over S is ``rms_norm_psg``'s term; ``eps=None`` is
    float32's machine epsilon."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.rms_norm_psg_parts(x, g, normalized_shape, eps)
    _check("rms_norm_psg_parts", x, g)
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    return _parts(x, g, normalized_shape, eps, True, True, False)[0]
