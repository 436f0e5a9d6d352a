"""Linear layers: per-sample weight norms (ghost and direct), bias norms, cross terms between
two uses of one weight, and the clipped sums with the noise epilogue.

Shapes: ``a`` [B, T, d] inputs, ``g`` [B, T, p] backprops, ``c`` [B] clip factors.  The
per-sample weight gradient is ``W_b = sum_t g_t a_t^T`` (p x d); no kernel ever writes it
out, nor a [B, T, T] Gram matrix.  Norm kernels write one float32 partial per program into a
small [B, programs] buffer that torch sums (deterministic, no atomics).  A Linear with a bias
gets its bias norm ``||sum_t g_t||^2`` from the same pass over g (``linear_norms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import (
    INTERPRET,
    SEED_ARGS,
    autotune,
    check_float,
    device_table,
    dot_precision,
    finish_store,
    gram_tile,
    hand_back,
    keep_configs,
    mma,
    norm_mma,
    norm_precision,
    num_sms,
    philox_seed,
    prepare_out,
    same_dtype,
    smem_prune,
    stage_table,
    tile_pair,
    upper_pairs,
    use_reference,
)
from dpkernels.ops.dense import finish, weighted_rows
from dpkernels.reference import linear as ref

# ---------------------------------------------------------------------------- kernels


@autotune(
    [
        triton.Config({"BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_K": 512}, num_warps=4),
        triton.Config({"BLOCK_K": 1024}, num_warps=8),
    ],
    key=["d", "p"],
)
@triton.jit
def _row_norm_product_kernel(a_ptr, g_ptr, out_ptr, bias_ptr, d, p, sab, sak, sgb, sgk,
                             WITH_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    """T == 1: ``||W_b||^2 = ||a_b||^2 ||g_b||^2``; one program per sample.  WITH_BIAS: the
    bias norm ``||g_b||^2`` too."""
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # int64: k * stride may pass 2^31 (strided views)
    sa = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + ks
        x = tl.load(a_ptr + b * sab + k * sak, mask=k < d, other=0.0).to(tl.float32)
        sa += x * x
    sg = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        k = k0 + ks
        y = tl.load(g_ptr + b * sgb + k * sgk, mask=k < p, other=0.0).to(tl.float32)
        sg += y * y
    g_sq = tl.sum(sg, axis=0)
    tl.store(out_ptr + b, tl.sum(sa, axis=0) * g_sq)
    if WITH_BIAS:
        tl.store(bias_ptr + b, g_sq)


# Tile sizes that fix the grid (and so the partial buffer) are chosen by the launcher; the
# autotuner only picks what every config computes identically, so re-running is harmless.
@autotune(
    [
        triton.Config({"BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
    ],
    key=["T1", "T2", "d", "p", "BLOCK_T", "PRECISION"],  # tf32x3 needs more registers and smem
    # two [64, 64] float32 Gram tiles on 4 warps spilled ~90 B on sm_90 (every dtype), and
    # tf32x3 (norm_mma's float32 split) with 64-wide K tiles at any tile size (40-304 B)
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: not (args["PRECISION"] == "tf32x3" and c.kwargs["BLOCK_K"] >= 64)
        and (args["BLOCK_T"] < 64 or c.num_warps >= 8))},
)
@triton.jit
def _linear_ghost_kernel(
    a1_ptr, g1_ptr, a2_ptr, g2_ptr, pairs_ptr, part_ptr, bias_part_ptr,
    T1, T2, d, p, n_pairs, n_tiles2,
    sa1b, sa1t, sa1k, sg1b, sg1t, sg1k,
    sa2b, sa2t, sa2k, sg2b, sg2t, sg2k,
    SYMMETRIC: tl.constexpr, WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (sample, t-tile, s-tile) block of ``sum_{t,s} (a1_t.a2_s)(g1_t.g2_s)``.

    Both Gram tiles live on chip only.  SYMMETRIC (the norm, a2 = a1, g2 = g1): tiles i <= j
    from the pair table, off-diagonal ones counted twice.  Otherwise all T1 x T2 tile pairs.
    WITH_BIAS (SYMMETRIC only): also this block's share of the bias norm
    ``||sum_t g_t||^2 = sum_{t,s} g_t.g_s``, the sum of the g Gram tile, into ``bias_part``.
    """
    pid = tl.program_id(0).to(tl.int64)
    b, ti, tj = tile_pair(pid, n_pairs, n_tiles2, pairs_ptr, SYMMETRIC)
    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] rows of use 1
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] rows of use 2
    mi = ri < T1
    mj = rj < T2
    gram_a = gram_tile(a1_ptr, sa1b, sa1t, sa1k, a2_ptr, sa2b, sa2t, sa2k, b, ri, rj, mi, mj,
                       d, UPCAST, PRECISION, BLOCK_T, BLOCK_K)
    gram_g = gram_tile(g1_ptr, sg1b, sg1t, sg1k, g2_ptr, sg2b, sg2t, sg2k, b, ri, rj, mi, mj,
                       p, UPCAST, PRECISION, BLOCK_T, BLOCK_K)
    s = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    if SYMMETRIC:
        s = s * tl.where(ti == tj, 1.0, 2.0)
    tl.store(part_ptr + pid, s)
    if WITH_BIAS:
        sb = tl.sum(tl.sum(gram_g, axis=1), axis=0) * tl.where(ti == tj, 1.0, 2.0)
        tl.store(bias_part_ptr + pid, sb)


@triton.jit
def direct_tile(a_ptr, sab, sat, sak, g_ptr, sgb, sgt, sgk, b, cp, cd, mp, md, T,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, WITH_BIAS: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                NORM: tl.constexpr = True):
    """The [BP, BD] tile (rows ``cp``, columns ``cd``) of ``W_b = sum_t g_t a_t^T`` over all
    T (NORM: for a norm, ``norm_mma``; else a clipped sum's ``mma``), and WITH_BIAS the
    [BP, BT] running sum of the g tiles streamed (zeros otherwise), reduced over t by the
    caller: a tl.sum inside the loop trips an assertion in triton 3.6's
    OptimizeThreadLocality pass (float32)."""
    ts = tl.arange(0, BLOCK_T).to(tl.int64)  # int64: t * stride may pass 2^31 (strided views)
    w = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK_P, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + ts
        mt = t < T
        gt = tl.load(g_ptr + b * sgb + t[None, :] * sgt + cp[:, None] * sgk,
                     mask=mp[:, None] & mt[None, :], other=0.0)  # [BP, BT]
        x = tl.load(a_ptr + b * sab + t[:, None] * sat + cd[None, :] * sak,
                    mask=mt[:, None] & md[None, :], other=0.0)  # [BT, BD]
        if NORM:
            w = norm_mma(gt, x, w, UPCAST, PRECISION)
        else:
            w = mma(gt, x, w, UPCAST, PRECISION)
        if WITH_BIAS:
            g_acc += gt.to(tl.float32)
    return w, g_acc


@autotune(
    [
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
    ],
    key=["T1", "T2", "d", "p", "BLOCK_P", "BLOCK_D", "PRECISION"],
    # SECOND (two W tiles) with [64, 64] operand tiles on 8 warps spilled 16 B on sm_90, and
    # norm_mma's float32 split with 64-row T tiles on 4 warps (4-8 B)
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: not (args["SECOND"] and c.kwargs["BLOCK_T"] >= 64 and c.num_warps >= 8)
        and not (args["PRECISION"] == "tf32x3" and c.kwargs["BLOCK_T"] >= 64
                 and c.num_warps < 8))},
)
@triton.jit
def _linear_direct_kernel(
    a1_ptr, g1_ptr, a2_ptr, g2_ptr, part_ptr, bias_part_ptr,
    T1, T2, d, p, n_tiles, n_tiles_d,
    sa1b, sa1t, sa1k, sg1b, sg1t, sg1k,
    sa2b, sa2t, sa2k, sg2b, sg2t, sg2k,
    SECOND: tl.constexpr, WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One (sample, p-tile, d-tile) block of ``W_b = sum_t g_t a_t^T``, squared and summed on
    chip (or, with SECOND, multiplied by the same block of the second use's ``W'_b``).

    The T reduction is not split: partial sums of W cannot be squared separately.
    WITH_BIAS (not SECOND): the programs of d-tile 0 also sum the g tiles they stream over t
    and write ``||sum_t g_t||^2`` over their p-tile into ``bias_part`` [B, p-tiles]."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    q = pid % n_tiles
    cp = (q // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    cd = (q % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mp = cp < p
    md = cd < d
    w1, g_acc = direct_tile(a1_ptr, sa1b, sa1t, sa1k, g1_ptr, sg1b, sg1t, sg1k, b, cp, cd, mp,
                            md, T1, UPCAST, PRECISION, WITH_BIAS, BLOCK_P, BLOCK_D, BLOCK_T)
    if SECOND:
        w2, _ = direct_tile(a2_ptr, sa2b, sa2t, sa2k, g2_ptr, sg2b, sg2t, sg2k, b, cp, cd, mp,
                            md, T2, UPCAST, PRECISION, False, BLOCK_P, BLOCK_D, BLOCK_T)
        s = tl.sum(tl.sum(w1 * w2, axis=1), axis=0)
    else:
        s = tl.sum(tl.sum(w1 * w1, axis=1), axis=0)
    tl.store(part_ptr + pid, s)
    if WITH_BIAS:
        # every d-tile streams the same g tiles: one of them writes, so each (sample, p-tile)
        # slot is written once; pid // n_tiles_d is that slot (b * p-tiles + p-tile)
        if q % n_tiles_d == 0:
            beta = tl.sum(g_acc, axis=1)  # [BP] sum_t g_t over this p-tile
            tl.store(bias_part_ptr + pid // n_tiles_d, tl.sum(beta * beta, axis=0))


@autotune(
    [
        triton.Config({"BLOCK_T": 16}, num_warps=4),
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 64}, num_warps=8),
    ],
    key=["T", "p", "BLOCK_P"],
)
@triton.jit
def _linear_bias_norm_kernel(g_ptr, part_ptr, T, p, n_tiles, sgb, sgt, sgk,
                             BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """``sum_j (sum_t g_tj)^2`` over one p-tile of one sample (the sum over t comes first)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    cp = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    mp = cp < p
    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        y = tl.load(g_ptr + b * sgb + t[:, None] * sgt + cp[None, :] * sgk,
                    mask=(t < T)[:, None] & mp[None, :], other=0.0).to(tl.float32)  # [BT, BP]
        acc += y
    col = tl.sum(acc, axis=0)  # [BP]
    tl.store(part_ptr + pid, tl.sum(col * col, axis=0))


@autotune(
    [
        triton.Config({"BLOCK_P": 32, "BLOCK_D": 32, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4,
                      num_stages=4),
        triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8,
                      num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_K": 64}, num_warps=8,
                      num_stages=3),
    ],
    # Poisson batches change R every step: the key holds the split count and the rows per
    # split rounded up to a power of two, so batch sizes share their tuning
    key=["d", "p", "ROWS_BUCKET", "SPLIT", "PRECISION", "ONE_PASS"],
    restore_value=["out_ptr"],
    # 128 x 128 x 64 in three stages is 192 KB of float32 operand tiles (sm_90 build with
    # triton 3.6: 164 KB and 5 KB of register spills with "ieee", 197 KB with "tf32x3"):
    # 16-bit operands only.  Register spills on sm_90 (bench/compile_sm90.py): every config
    # but 32 x 32 x 32 spilled with HILO (hi + lo in registers: 0.1-2.6 KB) and with tf32x3
    # (16 B-3.7 KB); the fused noise epilogue spilled ~600 B on tiles over 64 x 64.
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: not ((args["HILO"] or args["PRECISION"] == "tf32x3")
                             and c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_D"] > 32 * 32)
        and not (args["FUSED"] and args["HAS_NOISE"]
                 and c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_D"] > 64 * 64),
        then=smem_prune("BLOCK_P", "BLOCK_D", "BLOCK_K", "a_ptr"))},
)
@triton.jit(do_not_specialize=SEED_ARGS)
def _linear_clipped_sum_kernel(
    a_ptr, g_ptr, c_ptr, out_ptr, acc_ptr, part_ptr,
    R, T, d, p, rows_per_split,
    sab, sat, sak, sgb, sgt, sgk,
    noise_std, seed, scale, ROWS_BUCKET, SPLIT,
    FUSED: tl.constexpr, HAS_ACC: tl.constexpr, HAS_NOISE: tl.constexpr,
    HILO: tl.constexpr, ONE_PASS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BP, BD] tile of ``sum_r c_{r // T} g_r a_r^T`` over the rows r of one K split.

    Rounding c_b g to 16 bits would perturb each sample's clipped contribution by up to 2^-9
    relative per element, enough to break ``||c_b W_b|| <= C`` when rows cancel, so 16-bit
    operands take one of two exact routes:

    - ONE_PASS (a split holds whole samples; the launcher picks it when T >= ONE_PASS_MIN_T):
      the K loop runs sample by sample over that sample's T rows (contiguous in B*T), the
      raw 16-bit tiles multiply into a float32 per-sample tile ``W_b`` (products of 16-bit
      values are exact in float32), and ``c_b W_b`` is added to the accumulator at the sample
      boundary: one tensor-core pass, only float32 rounding.  The last K block of a sample is
      padded when T is not a multiple of BLOCK_K: at most 2x the work for T >= 32.
    - HILO (short samples): each g row is scaled by c_b in float32 as it is loaded, split into
      hi + lo 16-bit parts and multiplied twice (~2^-17 relative per element).

    float32 operands are scaled on load and multiplied once (tf32x3 or ieee).  FUSED (one
    split): the epilogue ``(acc + . + noise) * scale`` runs here; otherwise the split's tile
    goes to ``part`` and dense.finish folds the splits.
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_tiles_d = tl.cdiv(d, BLOCK_D)
    cp = (pid // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    cd = (pid % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # [BD]
    mp = cp < p
    md = cd < d
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    if ONE_PASS:
        # rows_per_split is a multiple of T: samples r_start // T up to r_end // T
        for b in range(r_start // T, r_end // T):
            w, _ = direct_tile(a_ptr, sab, sat, sak, g_ptr, sgb, sgt, sgk, b, cp, cd, mp, md,
                               T, UPCAST, PRECISION, False, BLOCK_P, BLOCK_D, BLOCK_K,
                               NORM=False)  # this sample's W_b tile
            acc += tl.load(c_ptr + b) * w
    else:
        for r0 in range(r_start, r_end, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)  # [BK]
            mr = r < r_end
            b = r // T
            t = r % T
            cb = tl.load(c_ptr + b, mask=mr, other=0.0)  # [BK] float32
            gt = tl.load(g_ptr + b[None, :] * sgb + t[None, :] * sgt + cp[:, None] * sgk,
                         mask=mp[:, None] & mr[None, :], other=0.0)  # [BP, BK]
            x = tl.load(a_ptr + b[:, None] * sab + t[:, None] * sat + cd[None, :] * sak,
                        mask=mr[:, None] & md[None, :], other=0.0)  # [BK, BD]
            gs = gt.to(tl.float32) * cb[None, :]  # [BP, BK]
            if HILO:
                hi = gs.to(a_ptr.dtype.element_ty)
                lo = (gs - hi.to(tl.float32)).to(a_ptr.dtype.element_ty)
                acc = mma(hi, x, acc, UPCAST, PRECISION)
                acc = mma(lo, x, acc, UPCAST, PRECISION)
            else:
                acc = mma(gs, x, acc, UPCAST, PRECISION)
    offs = cp[:, None] * d + cd[None, :]  # [BP, BD] offsets in the row-major [p, d] output
    mask = mp[:, None] & md[None, :]
    if FUSED:
        finish_store(acc, offs, mask, out_ptr, acc_ptr, noise_std, seed, scale, HAS_ACC,
                     HAS_NOISE)
    else:
        tl.store(part_ptr + split * p * d + offs, acc, mask=mask)


@triton.jit
def _scale_rows_many_kernel(table_ptr, c_ptr, out_ptr, BLOCK_R: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """``out[off + r * K + k] = c_{r // T} x[r // T, r % T, k]`` in float32 for the tensor of
    table row ``program_id(0)`` (x's address, strides, T, K, R = B * T, offset ``off`` in the
    flat output); the programs along axis 1 stride over its [BLOCK_R, BLOCK_K] tiles."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 8
    x_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    sxb = tl.load(row + 1)
    sxt = tl.load(row + 2)
    sxk = tl.load(row + 3)
    T = tl.load(row + 4)
    K = tl.load(row + 5)
    R = tl.load(row + 6)
    off = tl.load(row + 7)
    n_k = tl.cdiv(K, BLOCK_K)
    n_tiles = tl.cdiv(R, BLOCK_R) * n_k
    for tile in range(tl.program_id(1), n_tiles, tl.num_programs(1)):
        r = (tile // n_k) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BR]
        k = (tile % n_k) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)  # [BK]
        mask = (r < R)[:, None] & (k < K)[None, :]
        b = r // T
        cb = tl.load(c_ptr + b, mask=r < R, other=0.0)  # [BR]
        x = tl.load(x_ptr + b[:, None] * sxb + (r % T)[:, None] * sxt + k[None, :] * sxk,
                    mask=mask, other=0.0)  # [BR, BK]
        tl.store(out_ptr + off + r[:, None] * K + k[None, :], x * cb[:, None], mask=mask)


# ---------------------------------------------------------------------------- launchers


def _s(prefix: str, x: torch.Tensor) -> dict[str, int]:
    """Strides of a [B, T, K] tensor as keyword arguments ``{prefix}b/t/k``."""
    return {prefix + "b": x.stride(0), prefix + "t": x.stride(1), prefix + "k": x.stride(2)}


def _check(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"dpkernels.ops.{name}: expected a [B, T, d] and g [B, T, p], got "
                         f"{tuple(a.shape)} and {tuple(g.shape)}")
    check_float(name, a, g)


def _tile(n: int, big: int) -> int:
    """A tile width that fixes a grid: ``big`` on the GPU when ``n`` fills it, else 32 (the
    interpreter always uses 32 so that small test shapes span several tiles)."""
    return big if (not INTERPRET and n >= big) else 32


def _row_norm_product(a: torch.Tensor, g: torch.Tensor,
                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, _, d = a.shape
    out = torch.empty(1 + with_bias, B, dtype=torch.float32, device=a.device)
    _row_norm_product_kernel[(B,)](a_ptr=a, g_ptr=g, out_ptr=out[0], bias_ptr=out[-1], d=d,
                                   p=g.shape[-1], sab=a.stride(0), sak=a.stride(2),
                                   sgb=g.stride(0), sgk=g.stride(2), WITH_BIAS=with_bias)
    return out[0], (out[1] if with_bias else None)


def _ghost(a1, g1, a2, g2, symmetric: bool,
           with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``sum_{t,s} (a1_t.a2_s)(g1_t.g2_s)``, with_bias and symmetric: ``||sum_t g1_t||^2``)."""
    B, T1, d = a1.shape
    T2, p = a2.shape[1], g1.shape[-1]
    BLOCK_T = _tile(min(T1, T2), 64)
    n1, n2 = triton.cdiv(T1, BLOCK_T), triton.cdiv(T2, BLOCK_T)
    n_pairs = n1 * (n1 + 1) // 2 if symmetric else n1 * n2
    part = torch.empty(1 + with_bias, B * n_pairs, dtype=torch.float32, device=a1.device)
    pairs = upper_pairs(n1, a1.device) if symmetric else part  # unused when not symmetric
    _linear_ghost_kernel[(B * n_pairs,)](
        a1_ptr=a1, g1_ptr=g1, a2_ptr=a2, g2_ptr=g2, pairs_ptr=pairs, part_ptr=part[0],
        bias_part_ptr=part[-1],
        T1=T1, T2=T2, d=d, p=p, n_pairs=n_pairs, n_tiles2=n2,
        **_s("sa1", a1), **_s("sg1", g1), **_s("sa2", a2), **_s("sg2", g2),
        SYMMETRIC=symmetric, WITH_BIAS=with_bias and symmetric, UPCAST=INTERPRET,
        PRECISION=norm_precision(a1.dtype), BLOCK_T=BLOCK_T,
    )
    sums = part.view(-1, B, n_pairs).sum(-1)  # [1 or 2, B]
    return sums[0], (sums[1] if with_bias and symmetric else None)


def _direct(a1, g1, a2=None, g2=None,
            with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``<W1_b, W2_b>`` or ``||W1_b||^2``, with_bias and one use: ``||sum_t g1_t||^2``)."""
    B, T1, d = a1.shape
    p = g1.shape[-1]
    second = a2 is not None
    if not second:
        a2, g2 = a1, g1
    with_bias = with_bias and not second
    BLOCK_P, BLOCK_D = _tile(p, 64), _tile(d, 64)
    n_tiles_d = triton.cdiv(d, BLOCK_D)
    n_tiles_p = triton.cdiv(p, BLOCK_P)
    n_tiles = n_tiles_p * n_tiles_d
    part = torch.empty(B * n_tiles, dtype=torch.float32, device=a1.device)
    # unused (any pointer will do) without the bias
    bias_part = (torch.empty(B * n_tiles_p, dtype=torch.float32, device=a1.device)
                 if with_bias else part)
    _linear_direct_kernel[(B * n_tiles,)](
        a1_ptr=a1, g1_ptr=g1, a2_ptr=a2, g2_ptr=g2, part_ptr=part, bias_part_ptr=bias_part,
        T1=T1, T2=a2.shape[1], d=d, p=p, n_tiles=n_tiles, n_tiles_d=n_tiles_d,
        **_s("sa1", a1), **_s("sg1", g1), **_s("sa2", a2), **_s("sg2", g2),
        SECOND=second, WITH_BIAS=with_bias, UPCAST=INTERPRET,
        PRECISION=norm_precision(a1.dtype), BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )
    w = part.view(B, n_tiles).sum(1)
    return w, (bias_part.view(B, n_tiles_p).sum(1) if with_bias else None)


@register("linear_norms", "triton")
def linear_norms(a: torch.Tensor, g: torch.Tensor, method: str = "auto",
                 with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B] float32 ``||W_b||^2``, with_bias: [B] float32 ``||sum_t g_t||^2``, else None).

    Ghost (tiled Grams) or direct (tiled W_b), never stored; the bias norm comes from the g
    tiles the weight norm reads anyway (the g Gram tiles, or the g tiles of d-tile 0)."""
    if use_reference(a, g):
        return ref.linear_norms(a, g, method, with_bias)
    _check("linear_norms", a, g)
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    B, T, d = a.shape
    p = g.shape[-1]
    if B == 0 or T == 0 or d == 0 or p == 0:
        zeros = torch.zeros(B, dtype=torch.float32, device=a.device)
        if not with_bias:
            return zeros, None
        # d == 0 leaves no weight but still a bias
        return zeros, (linear_bias_norm(g) if d == 0 else zeros.clone())
    a, g = same_dtype(a, g)
    if T == 1:
        return _row_norm_product(a, g, with_bias)
    if method == "auto":
        method = ref.choose_method(T, d, p)
    if method == "ghost":
        return _ghost(a, g, a, g, symmetric=True, with_bias=with_bias)
    return _direct(a, g, with_bias=with_bias)


@register("linear_norm", "triton")
def linear_norm(a: torch.Tensor, g: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """[B] float32 ``||W_b||^2``: ``linear_norms`` without the bias."""
    if use_reference(a, g):
        return ref.linear_norm(a, g, method)
    return linear_norms(a, g, method)[0]


@register("linear_cross", "triton")
def linear_cross(a1, g1, a2, g2) -> torch.Tensor:
    """[B] float32 ``<W1_b, W2_b>``: ghost form ``sum_{t,s} (a1_t.a2_s)(g1_t.g2_s)`` or both
    W tiles on chip, whichever costs less (T1 and T2 may differ)."""
    if use_reference(a1, g1, a2, g2):
        return ref.linear_cross(a1, g1, a2, g2)
    _check("linear_cross", a1, g1)
    _check("linear_cross", a2, g2)
    B, T1, d = a1.shape
    T2, p = a2.shape[1], g1.shape[-1]
    if a2.shape[0] != B or a2.shape[-1] != d or g2.shape[-1] != p:
        raise ValueError("dpkernels.ops.linear_cross: the two uses have different shapes")
    if B == 0 or T1 == 0 or T2 == 0 or d == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=a1.device)
    a1, g1, a2, g2 = same_dtype(a1, g1, a2, g2)
    if T1 * T2 * (d + p) < (T1 + T2) * d * p:
        return _ghost(a1, g1, a2, g2, symmetric=False)[0]
    return _direct(a1, g1, a2, g2)[0]


@register("linear_bias_norm", "triton")
def linear_bias_norm(g: torch.Tensor) -> torch.Tensor:
    """[B] float32 ``||sum_t g_t||^2`` (not ``sum_t ||g_t||^2``)."""
    if use_reference(g):
        return ref.linear_bias_norm(g)
    check_float("linear_bias_norm", g)
    B, T, p = g.shape
    if B == 0 or T == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=g.device)
    BLOCK_P = _tile(p, 128)
    n_tiles = triton.cdiv(p, BLOCK_P)
    part = torch.empty(B * n_tiles, dtype=torch.float32, device=g.device)
    _linear_bias_norm_kernel[(B * n_tiles,)](
        g_ptr=g, part_ptr=part, T=T, p=p, n_tiles=n_tiles,
        sgb=g.stride(0), sgt=g.stride(1), sgk=g.stride(2), BLOCK_P=BLOCK_P,
    )
    return part.view(B, n_tiles).sum(1)


def clipped_sum_path(dtype: torch.dtype) -> str:
    """Which GEMM computes a clipped sum of ``dtype`` operands (the documented rule).

    "gemm" (float32, TF32 not allowed: torch's default): rows of the narrower operand scaled
    by c_b in one bandwidth-bound pass, then torch's GEMM (cuBLAS SGEMM on a GPU, exact
    float32 like "ieee"), accumulating into ``acc`` in the GEMM itself.  Triton's "ieee"
    tl.dot runs on FMA units with small tiles, at about half SGEMM's rate by bench/trace_step.py's
    estimate.  "triton" otherwise: 16-bit operands (c_b g split hi + lo on tensor cores,
    exact to ~2^-17, which a 16-bit cuBLAS GEMM of rounded c_b g is not) and float32 with
    TF32 allowed ("tf32x3": float32-accurate on tensor cores, faster than SGEMM).
    """
    return "gemm" if dot_precision(dtype) == "ieee" else "triton"


@torch.no_grad()  # a, g may be saved tensors that require grad; the sum is no graph node
def _gemm_clipped_sum(a, g, c, out, acc_in, noise_std, seed, scale) -> None:
    """``out = (acc_in + (c g)^T a + noise_std z) * scale`` with torch's GEMM (float32)."""
    B, T, d = a.shape
    p = g.shape[-1]
    R = B * T
    cb = c.view(B, 1, 1)
    # c_b scales whole rows r = (b, t) of the product: scale the narrower operand
    if p <= d:
        g = g * cb
    else:
        a = a * cb
    fold_scale = not noise_std and scale != 1.0
    _gemm_into(out, acc_in, g.reshape(R, p), a.reshape(R, d), float(scale) if fold_scale else 1.0)
    if noise_std:
        finish(out, out, None, noise_std, seed, scale)


def _gemm_into(out, acc_in, g2, a2, alpha: float = 1.0) -> None:
    """``out = alpha * (acc_in + g2^T a2)`` (no acc_in: ``alpha * g2^T a2``) in the GEMM, in
    place when ``acc_in`` is ``out``."""
    out2 = out.view(g2.shape[1], a2.shape[1])
    if acc_in is None:
        torch.mm(g2.t(), a2, out=out2)
        if alpha != 1.0:
            out2.mul_(alpha)
    elif acc_in is out:
        out2.addmm_(g2.t(), a2, beta=alpha, alpha=alpha)
    else:
        torch.addmm(acc_in.view(out2.shape), g2.t(), a2, beta=alpha, alpha=alpha, out=out2)


# 16-bit clipped sums with at least this many rows per sample run the kernel's ONE_PASS
# route (per-sample float32 tiles scaled by c_b at each sample boundary): its padded last K
# block costs at most 2x the multiplies for T >= 32 with BLOCK_K <= 64, which is what the
# hi + lo split costs always.
ONE_PASS_MIN_T = 32


def clipped_sum(a, g, c, acc=None, noise_std=0.0, seed=0, scale=1.0,
                split: int | None = None, path: str | None = None,
                one_pass: bool | None = None) -> torch.Tensor:
    """linear_clipped_sum with the K split, the path and the 16-bit route exposed (tests
    force them; None picks them: ``clipped_sum_path``, a split that fills the SMs, and
    ONE_PASS for 16-bit operands when T >= ONE_PASS_MIN_T)."""
    _check("linear_clipped_sum", a, g)
    B, T, d = a.shape
    p = g.shape[-1]
    device = a.device
    out, acc_in = prepare_out(acc, (p, d), device)
    if p == 0 or d == 0:
        return hand_back(out, acc)
    a, g = same_dtype(a, g)
    c = c.to(device=device, dtype=torch.float32).contiguous()
    R = B * T
    if path is None:
        path = clipped_sum_path(a.dtype)
    if path == "gemm":
        if a.dtype != torch.float32:
            a, g = a.float(), g.float()
        _gemm_clipped_sum(a, g, c, out, acc_in, noise_std, seed, scale)
        return hand_back(out, acc)
    if path != "triton":
        raise ValueError(f"path must be 'gemm', 'triton' or None, got {path!r}")
    sixteen = a.dtype != torch.float32
    if one_pass is None:
        one_pass = sixteen and T >= ONE_PASS_MIN_T
    one_pass = bool(one_pass) and sixteen and T > 0  # float32: scaled on load, one multiply
    if split is None:
        # Few output tiles and many rows: split the rows so that every SM has work.
        tiles = triton.cdiv(p, 128) * triton.cdiv(d, 128)
        split = min(max(1, 2 * num_sms(device) // tiles), max(1, R // 1024), 32)
    if one_pass:  # ONE_PASS splits hold whole samples
        rows_per_split = max(1, triton.cdiv(B, max(1, split))) * T
    else:
        rows_per_split = max(1, triton.cdiv(R, max(1, split)))
    split = max(1, triton.cdiv(R, rows_per_split))
    parts = None
    if split > 1:
        parts = torch.empty(split, p, d, dtype=torch.float32, device=device)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(d, meta["BLOCK_D"]), split)

    _linear_clipped_sum_kernel[grid](
        a_ptr=a, g_ptr=g, c_ptr=c, out_ptr=out,
        acc_ptr=acc_in if acc_in is not None else out,
        part_ptr=parts if parts is not None else out,
        R=R, T=max(T, 1), d=d, p=p, rows_per_split=rows_per_split,
        sab=a.stride(0), sat=a.stride(1), sak=a.stride(2),
        sgb=g.stride(0), sgt=g.stride(1), sgk=g.stride(2),
        noise_std=float(noise_std), seed=philox_seed(seed), scale=float(scale),
        ROWS_BUCKET=triton.next_power_of_2(rows_per_split), SPLIT=split,
        FUSED=parts is None, HAS_ACC=acc_in is not None, HAS_NOISE=bool(noise_std),
        HILO=sixteen and not one_pass, ONE_PASS=one_pass, UPCAST=INTERPRET,
        PRECISION=dot_precision(a.dtype),
    )
    if parts is not None:
        finish(out, acc_in, parts, noise_std, seed, scale)
    return hand_back(out, acc)


@register("linear_clipped_sum", "triton")
def linear_clipped_sum(a, g, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """[p, d] float32 ``(acc + sum_b c_b W_b + noise_std z) * scale``: one GEMM over the B*T
    rows, g scaled by c_b on load, noise and scale in the epilogue; in place into ``acc``."""
    if use_reference(a, g, acc):
        return ref.linear_clipped_sum(a, g, c, acc, noise_std, seed, scale)
    return clipped_sum(a, g, c, acc, noise_std, seed, scale)


# Scratch for the c_b-scaled operands of one grouped launch: layers are taken in chunks of at
# most this many bytes, so the grouping never costs more memory than the largest layer does.
SCALE_SCRATCH_BYTES = 64 * 2**20


@register("linear_clipped_sum_many", "triton")
def linear_clipped_sum_many(items: list[tuple], c, accs: list) -> list[torch.Tensor]:
    """``linear_clipped_sum(a, g, c, acc)`` for every ``(a, g)`` of ``items``, no noise.  On the
    "gemm" path (float32) one launch scales the narrower operand of every layer of a chunk
    (at most SCALE_SCRATCH_BYTES of them) by c_b into one buffer, then each layer is one GEMM
    into its accumulator; other layers run ``clipped_sum`` one by one."""
    if len(items) != len(accs):
        raise ValueError(f"linear_clipped_sum_many: {len(items)} inputs but {len(accs)} "
                         "accumulators")
    out: list = [None] * len(items)
    reference, alone, chunks = _plan(items, accs)
    for i in reference:
        (a, g), acc = items[i], accs[i]
        out[i] = ref.linear_clipped_sum(a, g, c, acc)
    for i, a, g in alone:
        out[i] = clipped_sum(a, g, c, accs[i])
    for chunk in chunks:
        _scaled_gemms(chunk, c, accs, out)
    return out


def _plan(items: list[tuple], accs: list) -> tuple[list, list, list]:
    """How ``linear_clipped_sum_many`` takes ``items``: (indices for the reference, (index, a,
    g) for ``clipped_sum`` one by one, chunks of (index, a, g) for ``_scaled_gemms``)."""
    reference, alone, chunks = [], [], []
    chunk: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (index, a, g)
    used = 0
    for i, ((a, g), acc) in enumerate(zip(items, accs)):
        if use_reference(a, g, acc):
            reference.append(i)
            continue
        _check("linear_clipped_sum_many", a, g)
        a, g = same_dtype(a, g)
        if clipped_sum_path(a.dtype) != "gemm" or a.numel() == 0 or g.numel() == 0:
            alone.append((i, a, g))
            continue
        size = a.shape[0] * a.shape[1] * min(a.shape[2], g.shape[2]) * 4
        if used + size > SCALE_SCRATCH_BYTES and chunk:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append((i, a, g))
        used += size
    if chunk:
        chunks.append(chunk)
    return reference, alone, chunks


def _scale_table(chunk) -> list[list[int]]:
    """The ``_scale_rows_many_kernel`` table of a chunk: the narrower operand of each layer
    (address, strides, T, K, R = B * T, offset in the scratch)."""
    rows, off = [], 0
    for _, a, g in chunk:
        x = g if g.shape[2] <= a.shape[2] else a
        B, T, K = x.shape
        rows.append([x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), T, K, B * T, off])
        off += B * T * K
    return rows


def stage_clipped_sum_tables(items: list[tuple]) -> None:
    """Stage (ops/_common.py ``stage_table``) the scaling tables ``linear_clipped_sum_many``
    will upload for ``items`` (all float32 operands of one dtype, no accumulators: the first
    micro-batch of a step), so that they ride along an earlier table copy; a table that
    differs when the op runs (a sample dropped, tensors replaced) is uploaded as before."""
    if any(a.dtype != g.dtype for a, g in items):
        return  # same_dtype would cast: nothing to stage without allocating
    _, _, chunks = _plan(items, [None] * len(items))
    for chunk in chunks:
        stage_table(_scale_table(chunk), torch.int64, chunk[0][1].device)


def _scaled_gemms(chunk, c, accs, out) -> None:
    """The chunk's narrower operands scaled by c_b in one launch, then one GEMM per layer."""
    device = chunk[0][1].device
    c = c.to(device=device, dtype=torch.float32).contiguous()
    rows = _scale_table(chunk)
    off = rows[-1][7] + rows[-1][6] * rows[-1][5]
    scaled = torch.empty(off, dtype=torch.float32, device=device)
    table = device_table(rows, torch.int64, device)
    BLOCK_R, BLOCK_K = 32, 128
    widest = max(triton.cdiv(r[6], BLOCK_R) * triton.cdiv(r[5], BLOCK_K) for r in rows)
    _scale_rows_many_kernel[(len(rows), max(1, min(widest, 4 * num_sms(device))))](
        table_ptr=table, c_ptr=c, out_ptr=scaled, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
    )
    with torch.no_grad():  # a, g may be saved tensors that require grad
        for (i, a, g), r in zip(chunk, rows):
            R, p, d = r[6], g.shape[2], a.shape[2]
            xs = scaled[r[7]:r[7] + R * r[5]].view(R, r[5])
            g2, a2 = (xs, a.reshape(R, d)) if p <= d else (g.reshape(R, p), xs)
            o, acc_in = prepare_out(accs[i], (p, d), device)
            _gemm_into(o, acc_in, g2, a2)
            out[i] = hand_back(o, accs[i])


@register("linear_bias_clipped_sum", "triton")
def linear_bias_clipped_sum(g, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """[p] float32 ``(acc + sum_b c_b sum_t g_bt + noise_std z) * scale`` (row-split sum)."""
    if use_reference(g, acc):
        return ref.linear_bias_clipped_sum(g, c, acc, noise_std, seed, scale)
    check_float("linear_bias_clipped_sum", g)
    return weighted_rows(g, c, acc, noise_std, seed, scale, (g.shape[-1],))
