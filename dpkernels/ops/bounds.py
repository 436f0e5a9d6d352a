"""Magnitudes ``S_b = sum_t |a_t| |g_t|`` for the cancellation bounds (layers/base.py) of every
use of a micro-batch in one launch (one per pair of input dtypes), instead of two row-norm
passes and a product per use."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import INTERPRET, check_float, use_reference
from dpkernels.reference import bounds as ref

_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _row_norms(x_ptr, sxb, sxt, sxk, b, t, mt, K, BLOCK_T: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """[BLOCK_T] float32 ``|x[b, t, :]|``."""
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + k[None, :] * sxk,
                    mask=mt[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
        acc += x * x
    return tl.sqrt_rn(tl.sum(acc, axis=1))


@triton.jit
def _magnitude_many_kernel(table_ptr, part_ptr, B, n_tb, A_TYPE: tl.constexpr,
                           G_TYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``part[k, b, j] = sum_{t in block j} |a[b, t]| |g[b, t]|`` for the input in table row
    ``program_id(0)``, sample ``program_id(1)``, t-block ``program_id(2)``; 0 past T.  A row
    holds a's address, strides and width d, whether there is an a (none: ``|a_t| = 1``), g's
    address, strides and width p, T and the output row k."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 13
    b = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    T = tl.load(row + 11)
    k = tl.load(row + 12)
    s = 0.0
    if j * BLOCK_T < T:
        t = j * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        mt = t < T
        g_ptr = tl.load(row + 6).to(tl.pointer_type(G_TYPE))
        n = _row_norms(g_ptr, tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), b, t, mt,
                       tl.load(row + 10), BLOCK_T, BLOCK_K)
        if tl.load(row + 5) != 0:
            a_ptr = tl.load(row + 0).to(tl.pointer_type(A_TYPE))
            n = n * _row_norms(a_ptr, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), b,
                               t, mt, tl.load(row + 4), BLOCK_T, BLOCK_K)
        s = tl.sum(tl.where(mt, n, 0.0), axis=0)
    tl.store(part_ptr + (k * B + b) * n_tb + j, s)


@register("magnitude_many", "triton")
def magnitude_many(items: list) -> torch.Tensor:
    """[len(items), B] float32 ``sum_t |a_t| |g_t|`` of every ``(a | None, g)`` of ``items``
    (a [B, T, d], g [B, T, p]; None: ``sum_t |g_t|``): one launch per pair of input dtypes
    over a table of addresses and strides, then one sum over the t-blocks."""
    B = ref.check_items("magnitude_many", items)
    if any(use_reference(a, g) for a, g in items):
        return ref.magnitude_many(items)
    g0 = items[0][1]
    BLOCK_T, BLOCK_K = (4, 16) if INTERPRET else (16, 128)
    n_tb = max(triton.cdiv(g.shape[1], BLOCK_T) for _, g in items)
    if B == 0 or n_tb == 0:
        return torch.zeros(len(items), B, dtype=torch.float32, device=g0.device)
    part = torch.empty(len(items), B, n_tb, dtype=torch.float32, device=g0.device)
    groups: dict[tuple, list[list[int]]] = {}
    for i, (a, g) in enumerate(items):
        check_float("magnitude_many", g, *([] if a is None else [a]))
        x = g if a is None else a
        groups.setdefault((x.dtype, g.dtype), []).append([
            x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.shape[2], int(a is not None),
            g.data_ptr(), g.stride(0), g.stride(1), g.stride(2), g.shape[2], g.shape[1], i])
    for (adt, gdt), rows in groups.items():
        table = torch.tensor(rows, dtype=torch.int64).to(g0.device, non_blocking=True)
        _magnitude_many_kernel[(len(rows), B, n_tb)](
            table_ptr=table, part_ptr=part, B=B, n_tb=n_tb, A_TYPE=_TYPES[adt],
            G_TYPE=_TYPES[gdt], BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K)
    return part.sum(-1)


@triton.jit
def clip_factor(n, norms, loss_scale, one_plus_margin, max_grad_norm):
    """The clip factors of a block of samples and whether each is finite, from ``n`` (the
    squared norm plus its error bounds, >= 0 or NaN) and ``norms``: the reference
    ``clip_factors`` rules in float32 with correctly rounded sqrt and division.  Every clip
    kernel calls this one function, so the privacy rules live in one place."""
    bound = (tl.sqrt_rn(n) * loss_scale) * one_plus_margin
    fac = tl.div_rn(tl.zeros_like(n) + max_grad_norm, bound + 1e-6)
    fac = tl.where(fac > 1.0, 1.0, fac)  # clamp(max=1), NaN stays NaN
    # subnormal factors are rounded beyond the margin (reference): 0
    fac = tl.where(fac < 1.1754943508222875e-38, 0.0, fac)
    # the bound too (reference: a NaN bound with a finite norm must not give a NaN factor)
    finite = ((norms == norms) & (tl.abs(norms) != float("inf"))
              & (bound == bound) & (tl.abs(bound) != float("inf")))
    return tl.where(finite, fac, 0.0), finite


@triton.jit
def _clip_factors_kernel(nsq_ptr, err_ptr, norms_ptr, fac_ptr, ok_ptr, B, loss_scale,
                         one_plus_margin, max_grad_norm, HAS_ERR: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One program: the reference ``clip_factors`` (norm_bound, then C / (bound + 1e-6) capped
    at 1, 0 for a non-finite norm or bound) in float32 with correctly rounded sqrt and
    division; ``ok``: whether every norm and bound is finite."""
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        n = tl.load(nsq_ptr + b, mask=m, other=0.0)
        n = tl.where(n < 0.0, 0.0, n)  # clamp_min(0), NaN stays NaN
        norms = tl.sqrt_rn(n) * loss_scale
        if HAS_ERR:
            n = n + tl.load(err_ptr + b, mask=m, other=0.0)
        fac, finite = clip_factor(n, norms, loss_scale, one_plus_margin, max_grad_norm)
        cnt += tl.where(m & (finite == 0), 1, 0)
        tl.store(norms_ptr + b, norms, mask=m)
        tl.store(fac_ptr + b, fac, mask=m)
    tl.store(ok_ptr, tl.sum(cnt, axis=0) == 0)


@register("clip_factors", "triton")
def clip_factors(norm_sq: torch.Tensor, err_sq: torch.Tensor | None, loss_scale: float,
                 margin: float, max_grad_norm: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference ``clip_factors`` in one launch (float32 norms; others: the reference)."""
    if norm_sq.dtype != torch.float32 or norm_sq.dim() != 1 or (
            err_sq is not None and (err_sq.dtype != torch.float32
                                    or err_sq.shape != norm_sq.shape)):
        return ref.clip_factors(norm_sq, err_sq, loss_scale, margin, max_grad_norm)
    B = norm_sq.shape[0]
    norm_sq = norm_sq.detach().contiguous()
    err = norm_sq if err_sq is None else err_sq.detach().contiguous()
    norms = torch.empty(B, dtype=torch.float32, device=norm_sq.device)
    factors = torch.empty(B, dtype=torch.float32, device=norm_sq.device)
    ok = torch.empty((), dtype=torch.bool, device=norm_sq.device)
    _clip_factors_kernel[(1,)](
        nsq_ptr=norm_sq, err_ptr=err, norms_ptr=norms, fac_ptr=factors, ok_ptr=ok, B=B,
        loss_scale=float(loss_scale), one_plus_margin=1.0 + float(margin),
        max_grad_norm=float(max_grad_norm), HAS_ERR=err_sq is not None, BLOCK=1024)
    return norms, factors, ok
