"""LayerNorm and RMSNorm per-sample affine terms as partial sums over blocks of positions
(reference/norm_parts.py says why): ops/norms.py's ``_row_norm_psg_kernel`` with its split
partials handed back [B, S, N] instead of summed in a second launch."""

from __future__ import annotations

import math

import torch
import triton

from dpkernels.dispatch import register
from dpkernels.ops._common import num_sms, use_reference
from dpkernels.ops.norms import MAX_ROW, _check, _row_norm_psg_kernel
from dpkernels.reference import norm_parts as ref


def _parts(x, g, normalized_shape, eps, rms, need_weight, need_bias, magnitudes=False):
    """The split of ops/norms.py's ``_row_norm_psg``: rows of each sample in S blocks that
    fill the SMs, one program per (sample, block).  (gw, gb), and with ``magnitudes`` the
    partial sums of the terms' magnitudes (aw, ab) from the same launch."""
    N = math.prod(tuple(normalized_shape))
    B = x.shape[0]
    device = x.device
    M = x.numel() // max(B * N, 1) if N else 0
    if B == 0 or M == 0 or N == 0:
        zero = torch.zeros(B, 1, N, dtype=torch.float32, device=device)
        out = [zero if need_weight else None, zero.clone() if need_bias else None]
        if magnitudes:
            out += [t.clone() if t is not None else None for t in out]
        return tuple(out)
    x3 = x.reshape(B, M, N).contiguous()
    g3 = g.reshape(B, M, N).contiguous()
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = max(1, min(triton.next_power_of_2(M), 4096 // BLOCK_N))
    split = min(triton.cdiv(M, BLOCK_M), max(1, 2 * num_sms(device) // B), 64)
    rows_per_split = triton.cdiv(triton.cdiv(M, split), BLOCK_M) * BLOCK_M
    split = triton.cdiv(M, rows_per_split)
    k = need_weight + need_bias
    both = torch.empty(B, split, k * (1 + magnitudes), N, dtype=torch.float32, device=device)
    gw = both[:, :, 0] if need_weight else None  # [B, S, N]
    gb = both[:, :, k - 1] if need_bias else None
    aw = both[:, :, k] if magnitudes and need_weight else None
    ab = both[:, :, 2 * k - 1] if magnitudes and need_bias else None
    _row_norm_psg_kernel[(B, split)](
        x_ptr=x3, g_ptr=g3, gw_ptr=gw if gw is not None else gb,
        gb_ptr=gb if gb is not None else gw, aw_ptr=aw if aw is not None else both,
        ab_ptr=ab if ab is not None else both, M=M, N=N, sos=both.stride(1),
        rows_per_split=rows_per_split, n_splits=split, eps=float(eps),
        RMS=rms, NEED_W=need_weight, NEED_B=need_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        ABS=False, MAGS=bool(magnitudes),
    )
    return (gw, gb, aw, ab) if magnitudes else (gw, gb)


@register("layer_norm_psg_parts", "triton")
def layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight=True, need_bias=True,
                         magnitudes=False):
    """(gw, gb), each [B, S, N] float32 or None, whose sums over S are ``layer_norm_psg``'s
    terms (one launch, no summing pass); ``magnitudes``: (gw, gb, aw, ab), the partial sums of
    the terms' magnitudes too (reference/norm_parts.py)."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight, need_bias,
                                        magnitudes)
    _check("layer_norm_psg_parts", x, g)
    if not (need_weight or need_bias):
        return (None,) * (4 if magnitudes else 2)
    return _parts(x, g, normalized_shape, eps, False, need_weight, need_bias, magnitudes)


@register("rms_norm_psg_parts", "triton")
def rms_norm_psg_parts(x, g, normalized_shape, eps=None, magnitudes=False):
    """gw [B, S, N] float32 whose sum over S is ``rms_norm_psg``'s term; ``eps=None`` is
    float32's machine epsilon; ``magnitudes``: (gw, aw), the partial sums of the terms'
    magnitudes too."""
    if use_reference(x, g) or math.prod(tuple(normalized_shape)) > MAX_ROW:
        return ref.rms_norm_psg_parts(x, g, normalized_shape, eps, magnitudes)
    _check("rms_norm_psg_parts", x, g)
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    out = _parts(x, g, normalized_shape, eps, True, True, False, magnitudes)
    return (out[0], out[2]) if magnitudes else out[0]
