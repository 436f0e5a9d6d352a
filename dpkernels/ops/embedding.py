"""Embeddings: per-sample norms and cross terms from equal ids, and the clipped sum as an
index-add of ``c_b g_t`` rows followed by the noise epilogue.

Shapes: ``ids`` [B, T] integer ids, ``g`` [B, T, p] backprops, ``c`` [B].  The per-sample
gradient ``E_b = sum_t e_{x_t} g_t^T`` is never formed: ``||E_b||^2 = sum_{t,s} [x_t = x_s]
(g_t.g_s)``, tiled over (t, s) blocks with the equality mask built on chip.  Positions whose
id is ``padding_idx`` get no gradient in torch and contribute nothing here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import (
    INTERPRET,
    autotune,
    check_float,
    gram_tile,
    norm_precision,
    tile_pair,
    upper_pairs,
    use_reference,
)
from dpkernels.ops.dense import finish
from dpkernels.reference import embedding as ref

# ---------------------------------------------------------------------------- kernels


@autotune(
    [
        triton.Config({"BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    ],
    key=["T1", "T2", "p", "BLOCK_T", "PRECISION"],  # tf32x3 needs more registers and smem
)
@triton.jit
def _embedding_ghost_kernel(
    ids1_ptr, g1_ptr, ids2_ptr, g2_ptr, pairs_ptr, part_ptr,
    T1, T2, p, n_pairs, n_tiles2, pad,
    si1b, si1t, sg1b, sg1t, sg1k,
    si2b, si2t, sg2b, sg2t, sg2k,
    SYMMETRIC: tl.constexpr, HAS_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (sample, t-tile, s-tile) block of ``sum_{t,s} [x1_t = x2_s] (g1_t.g2_s)``.
    SYMMETRIC (the norm): tiles i <= j, off-diagonal ones counted twice."""
    pid = tl.program_id(0).to(tl.int64)
    b, ti, tj = tile_pair(pid, n_pairs, n_tiles2, pairs_ptr, SYMMETRIC)
    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mi = ri < T1
    mj = rj < T2
    xi = tl.load(ids1_ptr + b * si1b + ri * si1t, mask=mi, other=0).to(tl.int64)  # [BT]
    xj = tl.load(ids2_ptr + b * si2b + rj * si2t, mask=mj, other=0).to(tl.int64)  # [BT]
    eq = (xi[:, None] == xj[None, :]) & mi[:, None] & mj[None, :]  # [BT, BT]
    if HAS_PAD:
        eq = eq & (xi[:, None] != pad)
    gram = gram_tile(g1_ptr, sg1b, sg1t, sg1k, g2_ptr, sg2b, sg2t, sg2k, b, ri, rj, mi, mj, p,
                     UPCAST, PRECISION, BLOCK_T, BLOCK_K)  # [BT, BT]
    s = tl.sum(tl.sum(tl.where(eq, gram, 0.0), axis=1), axis=0)
    if SYMMETRIC:
        s = s * tl.where(ti == tj, 1.0, 2.0)
    tl.store(part_ptr + pid, s)


# Not autotuned: the atomics make a re-run add twice, and the kernel is bandwidth-bound.
@triton.jit
def _embedding_index_add_kernel(
    ids_ptr, g_ptr, c_ptr, out_ptr, R, T, p, V, pad,
    sib, sit, sgb, sgt, sgk,
    HAS_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``out[x_r] += c_{r // T} g_r`` for a block of rows r and a p-tile (float32 atomics)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BR]
    cp = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    b = r // T
    t = r % T
    mr = r < R
    x = tl.load(ids_ptr + b * sib + t * sit, mask=mr, other=0).to(tl.int64)  # [BR]
    mr = mr & (x >= 0) & (x < V)
    if HAS_PAD:
        mr = mr & (x != pad)
    cb = tl.load(c_ptr + b, mask=mr, other=0.0)  # [BR]
    mask = mr[:, None] & (cp < p)[None, :]
    y = tl.load(g_ptr + b[:, None] * sgb + t[:, None] * sgt + cp[None, :] * sgk,
                mask=mask, other=0.0).to(tl.float32)  # [BR, BP]
    tl.atomic_add(out_ptr + x[:, None] * p + cp[None, :], y * cb[:, None], mask=mask)


# ---------------------------------------------------------------------------- launchers


def _check(name: str, ids: torch.Tensor, g: torch.Tensor) -> None:
    if ids.dim() != 2 or g.dim() != 3 or ids.shape != g.shape[:2]:
        raise ValueError(f"dpkernels.ops.{name}: expected ids [B, T] and g [B, T, p], got "
                         f"{tuple(ids.shape)} and {tuple(g.shape)}")
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"dpkernels.ops.{name}: ids must be integers, got {ids.dtype}")
    check_float(name, g)


def _ghost(ids1, g1, ids2, g2, padding_idx, symmetric: bool) -> torch.Tensor:
    B, T1 = ids1.shape
    T2, p = ids2.shape[1], g1.shape[-1]
    BLOCK_T = 64 if (not INTERPRET and min(T1, T2) >= 64) else 32
    n1, n2 = triton.cdiv(T1, BLOCK_T), triton.cdiv(T2, BLOCK_T)
    n_pairs = n1 * (n1 + 1) // 2 if symmetric else n1 * n2
    part = torch.empty(B * n_pairs, dtype=torch.float32, device=g1.device)
    pairs = upper_pairs(n1, g1.device) if symmetric else part  # unused when not symmetric
    if g1.dtype != g2.dtype:
        g1, g2 = g1.float(), g2.float()
    _embedding_ghost_kernel[(B * n_pairs,)](
        ids1_ptr=ids1, g1_ptr=g1, ids2_ptr=ids2, g2_ptr=g2, pairs_ptr=pairs, part_ptr=part,
        T1=T1, T2=T2, p=p, n_pairs=n_pairs, n_tiles2=n2,
        pad=int(padding_idx) if padding_idx is not None else 0,
        si1b=ids1.stride(0), si1t=ids1.stride(1),
        sg1b=g1.stride(0), sg1t=g1.stride(1), sg1k=g1.stride(2),
        si2b=ids2.stride(0), si2t=ids2.stride(1),
        sg2b=g2.stride(0), sg2t=g2.stride(1), sg2k=g2.stride(2),
        SYMMETRIC=symmetric, HAS_PAD=padding_idx is not None,
        UPCAST=INTERPRET, PRECISION=norm_precision(g1.dtype), BLOCK_T=BLOCK_T,
    )
    return part.view(B, n_pairs).sum(1)


@register("embedding_norm", "triton")
def embedding_norm(ids: torch.Tensor, g: torch.Tensor, padding_idx=None) -> torch.Tensor:
    """[B] float32 ``||E_b||^2 = sum_{t,s} [x_t = x_s] (g_t.g_s)`` over non-padding
    positions; no [B, T, T] tensor (cost O(T^2 p) per sample, on tensor cores)."""
    if use_reference(g):
        return ref.embedding_norm(ids, g, padding_idx)
    _check("embedding_norm", ids, g)
    B, T, p = g.shape
    if B == 0 or T == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=g.device)
    return _ghost(ids, g, ids, g, padding_idx, symmetric=True)


@register("embedding_cross", "triton")
def embedding_cross(ids1, g1, ids2, g2, padding_idx=None) -> torch.Tensor:
    """[B] float32 ``<E1_b, E2_b> = sum_{t,s} [x1_t = x2_s] (g1_t.g2_s)``."""
    if use_reference(g1, g2):
        return ref.embedding_cross(ids1, g1, ids2, g2, padding_idx)
    _check("embedding_cross", ids1, g1)
    _check("embedding_cross", ids2, g2)
    B = ids1.shape[0]
    if B == 0 or ids1.shape[1] == 0 or ids2.shape[1] == 0 or g1.shape[-1] == 0:
        return torch.zeros(B, dtype=torch.float32, device=g1.device)
    return _ghost(ids1, g1, ids2, g2, padding_idx, symmetric=False)


@register("embedding_clipped_sum", "triton")
def embedding_clipped_sum(ids, g, c, num_embeddings, padding_idx=None, acc=None, noise_std=0.0,
                          seed=0, scale=1.0) -> torch.Tensor:
    """[V, p] float32 ``(acc + sum_b c_b E_b + noise_std z) * scale``: atomic index-add of the
    ``c_b g_t`` rows into ``acc`` (in place) or a zero buffer, then the noise/scale pass."""
    if use_reference(g, acc):
        return ref.embedding_clipped_sum(ids, g, c, num_embeddings, padding_idx, acc,
                                         noise_std, seed, scale)
    _check("embedding_clipped_sum", ids, g)
    B, T, p = g.shape
    V = int(num_embeddings)
    device = g.device
    if acc is not None and acc.numel() != V * p:
        raise ValueError(f"acc has {acc.numel()} elements, expected {V * p} ({V}, {p})")
    if acc is not None and acc.dtype == torch.float32 and acc.is_contiguous():
        out = acc
    elif acc is not None:
        out = acc.to(torch.float32, copy=True).contiguous().view(V, p)
    else:
        out = torch.zeros(V, p, dtype=torch.float32, device=device)
    c = c.to(device=device, dtype=torch.float32).contiguous()
    R = B * T
    if R and p:
        BLOCK_R, BLOCK_P = 16, 64 if INTERPRET else 128
        _embedding_index_add_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(p, BLOCK_P))](
            ids_ptr=ids, g_ptr=g, c_ptr=c, out_ptr=out, R=R, T=T, p=p, V=V,
            pad=int(padding_idx) if padding_idx is not None else 0,
            sib=ids.stride(0), sit=ids.stride(1),
            sgb=g.stride(0), sgt=g.stride(1), sgk=g.stride(2),
            HAS_PAD=padding_idx is not None, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P,
        )
    if noise_std or scale != 1.0:
        finish(out, out, None, noise_std, seed, scale)
    if acc is not None and out is not acc:
        acc.copy_(out.view(acc.shape))
        return acc
    return out
