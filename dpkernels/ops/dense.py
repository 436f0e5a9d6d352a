"""Weighted row sums with the clipped-sum epilogue: ``dense_clipped_sum`` (materialised
per-sample gradients; the Linear bias clipped sum in linear.py uses the same kernel),
``add_noise``, and the pass that folds split-K partial sums.

``x`` is read as rows r = (b, t) of width N; row r is weighted by ``c[r // T]``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import (
    SEED_ARGS,
    autotune,
    check_float,
    finish_store,
    hand_back,
    num_sms,
    philox_seed,
    prepare_out,
    use_reference,
)
from dpkernels.reference import dense as ref_dense

BLOCK_N_ROWS = 128  # column tile of the row-sum kernel (fixed: the host sizes the split on it)


@autotune(
    [
        triton.Config({"BLOCK_R": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 16}, num_warps=4),
        triton.Config({"BLOCK_R": 64}, num_warps=8),
    ],
    key=["N", "ROWS_BUCKET"],  # bucketed: Poisson batch sizes share their tuning
    restore_value=["out_ptr"],
)
@triton.jit(do_not_specialize=SEED_ARGS)
def _weighted_rows_kernel(
    x_ptr, c_ptr, out_ptr, acc_ptr, part_ptr,
    R, T, N, rows_per_split,
    sxb, sxt, sxn,
    noise_std, seed, scale, ROWS_BUCKET,
    FUSED: tl.constexpr, HAS_ACC: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]
    mn = cols < N
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)  # [BR]
        mr = rows < r_end
        b = rows // T
        t = rows % T
        cb = tl.load(c_ptr + b, mask=mr, other=0.0).to(tl.float32)  # [BR]
        ptrs = x_ptr + b[:, None] * sxb + t[:, None] * sxt + cols[None, :] * sxn
        x = tl.load(ptrs, mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)  # [BR, BN]
        acc += x * cb[:, None]
    tot = tl.sum(acc, axis=0)  # [BN]
    if FUSED:
        finish_store(tot, cols, mn, out_ptr, acc_ptr, noise_std, seed, scale, HAS_ACC, HAS_NOISE)
    else:
        tl.store(part_ptr + split * N + cols, tot, mask=mn)


@triton.jit(do_not_specialize=SEED_ARGS)
def _finish_kernel(
    out_ptr, acc_ptr, part_ptr, S, N, noise_std, seed, scale,
    HAS_ACC: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK]
    mask = offs < N
    x = tl.zeros([BLOCK], dtype=tl.float32)
    po = offs  # int64 offsets into the next split's row (s * N would be int32 and may wrap)
    for _ in range(0, S):
        x += tl.load(part_ptr + po, mask=mask, other=0.0)
        po += N
    finish_store(x, offs, mask, out_ptr, acc_ptr, noise_std, seed, scale, HAS_ACC, HAS_NOISE)


@triton.jit
def _finish_many_kernel(table_ptr, n_tensors, noise_std, scale, HAS_NOISE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``x = (x + noise_std z) * scale`` in place for tensor ``program_id(0)`` of a table
    [3, n_tensors] int64 (addresses of contiguous float32 tensors, their sizes, their seeds);
    the programs along axis 1 stride over its blocks.  The noise of element ``o`` of tensor
    ``i`` is ``tl.randn(seed_i, o)``, exactly what ``_finish_kernel`` adds to that tensor."""
    i = tl.program_id(0)
    x_ptr = tl.load(table_ptr + i).to(tl.pointer_type(tl.float32))
    n = tl.load(table_ptr + n_tensors + i)
    seed = tl.load(table_ptr + 2 * n_tensors + i)
    step = tl.num_programs(1).to(tl.int64) * BLOCK
    for start in range(tl.program_id(1).to(tl.int64) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK]
        mask = offs < n
        x = tl.zeros([BLOCK], dtype=tl.float32)
        finish_store(x, offs, mask, x_ptr, x_ptr, noise_std, seed, scale, True, HAS_NOISE)


@autotune(
    [
        triton.Config({"BLOCK_N": 1024}, num_warps=4),
        triton.Config({"BLOCK_N": 4096}, num_warps=8),
    ],
    key=["N"],
)
@triton.jit
def _dense_norm_kernel(x_ptr, out_ptr, N, sxb, sxn, BLOCK_N: tl.constexpr):
    """``out[b] = sum_n x[b, n]^2`` in float32, one program per sample."""
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]
        x = tl.load(x_ptr + b * sxb + n * sxn, mask=n < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + b, tl.sum(acc, axis=0))


@triton.jit
def _rows_many_kernel(table_ptr, c_ptr, B, X_TYPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """``out = [acc +] sum_{b,t} c_b x[b, t, cols]`` for column tile ``program_id(1)`` of
    tensor ``program_id(0)``, all rows in one program (no split, no second pass); the table row
    holds x's address, strides, T, N, out's address and whether out holds an accumulator."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 8
    N = tl.load(row + 5)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]
    if tl.program_id(1).to(tl.int64) * BLOCK_N < N:
        x_ptr = tl.load(row + 0).to(tl.pointer_type(X_TYPE))
        sxb = tl.load(row + 1)
        sxt = tl.load(row + 2)
        sxn = tl.load(row + 3)
        T = tl.load(row + 4)
        out_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        has_acc = tl.load(row + 7)
        mn = cols < N
        R = B * T
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)  # [BR]
            mr = rows < R
            b = rows // T
            t = rows % T
            cb = tl.load(c_ptr + b, mask=mr, other=0.0)  # [BR] float32
            x = tl.load(x_ptr + b[:, None] * sxb + t[:, None] * sxt + cols[None, :] * sxn,
                        mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)  # [BR, BN]
            acc += x * cb[:, None]
        tot = tl.sum(acc, axis=0)  # [BN]
        if has_acc != 0:
            tot += tl.load(out_ptr + cols, mask=mn, other=0.0)
        tl.store(out_ptr + cols, tot, mask=mn)


@triton.jit
def _norm_many_kernel(table_ptr, out_ptr, B, X_TYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[k, b] = sum_n x[b, n]^2`` for sample ``program_id(1)`` of the tensor in table row
    ``program_id(0)`` (its address, strides, width N and output row k)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    b = tl.program_id(1).to(tl.int64)
    x_ptr = tl.load(row + 0).to(tl.pointer_type(X_TYPE))
    sxb = tl.load(row + 1)
    sxn = tl.load(row + 2)
    N = tl.load(row + 3)
    k = tl.load(row + 4)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]
        x = tl.load(x_ptr + b * sxb + n * sxn, mask=n < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + k * B + b, tl.sum(acc, axis=0))


def finish(out: torch.Tensor, acc: torch.Tensor | None, parts: torch.Tensor | None,
           noise_std: float, seed: int, scale: float) -> torch.Tensor:
    """``out = (acc + sum_s parts[s] + noise_std z) * scale`` elementwise (all contiguous
    float32; ``out`` may be ``acc`` or ``parts`` itself when S == 1)."""
    N = out.numel()
    if N == 0:
        return out
    S = 0 if parts is None else parts.numel() // max(N, 1)
    BLOCK = 1024
    _finish_kernel[(triton.cdiv(N, BLOCK),)](
        out_ptr=out, acc_ptr=acc if acc is not None else out,
        part_ptr=parts if parts is not None else out, S=S, N=N,
        noise_std=float(noise_std), seed=philox_seed(seed), scale=float(scale),
        HAS_ACC=acc is not None, HAS_NOISE=bool(noise_std), BLOCK=BLOCK,
    )
    return out


def weighted_rows(x: torch.Tensor, c: torch.Tensor, acc, noise_std, seed, scale,
                  out_shape, split: int | None = None) -> torch.Tensor:
    """``(acc + sum_{b,t} c_b x[b, t, :] + noise) * scale`` for ``x`` [B, T, N]."""
    B, T, N = x.shape
    R = B * T
    device = x.device
    out, acc_in = prepare_out(acc, out_shape, device)
    c = c.to(device=device, dtype=torch.float32).contiguous()
    if N == 0:
        return hand_back(out, acc)
    n_cols = triton.cdiv(N, BLOCK_N_ROWS)
    if split is None:
        split = min(max(1, 2 * num_sms(device) // n_cols), max(1, R // 512), 64)
    rows_per_split = max(1, triton.cdiv(R, split))
    split = max(1, triton.cdiv(R, rows_per_split))
    parts = None
    if split > 1:
        parts = torch.empty(split, N, dtype=torch.float32, device=device)
    _weighted_rows_kernel[(n_cols, split)](
        x_ptr=x, c_ptr=c, out_ptr=out, acc_ptr=acc_in if acc_in is not None else out,
        part_ptr=parts if parts is not None else out,
        R=R, T=T, N=N, rows_per_split=rows_per_split,
        sxb=x.stride(0), sxt=x.stride(1), sxn=x.stride(2),
        noise_std=float(noise_std), seed=philox_seed(seed), scale=float(scale),
        ROWS_BUCKET=triton.next_power_of_2(rows_per_split),
        FUSED=parts is None, HAS_ACC=acc_in is not None, HAS_NOISE=bool(noise_std),
        BLOCK_N=BLOCK_N_ROWS,
    )
    if parts is not None:
        finish(out, acc_in, parts, noise_std, seed, scale)
    return hand_back(out, acc)


@register("dense_norm", "triton")
def dense_norm(psg: torch.Tensor) -> torch.Tensor:
    """[B] float32 squared norms of per-sample gradients ``psg`` [B, ...] in one launch (the
    norm-layer affine terms: as small as the parameter, so one program per sample)."""
    if use_reference(psg):
        return ref_dense.dense_norm(psg)
    check_float("dense_norm", psg)
    B = psg.shape[0]
    N = math.prod(psg.shape[1:])
    out = torch.empty(B, dtype=torch.float32, device=psg.device)
    if B == 0 or N == 0:
        return out.zero_()
    x = psg.reshape(B, N)  # a view for the strided norm-layer terms, else a copy
    _dense_norm_kernel[(B,)](x_ptr=x, out_ptr=out, N=N, sxb=x.stride(0), sxn=x.stride(1))
    return out


@register("dense_clipped_sum", "triton")
def dense_clipped_sum(psg, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """``(acc + sum_b c_b psg_b + noise_std z) * scale`` for ``psg`` [B, *shape]."""
    if use_reference(psg, acc):
        return ref_dense.dense_clipped_sum(psg, c, acc, noise_std, seed, scale)
    check_float("dense_clipped_sum", psg)
    x = psg.reshape(psg.shape[0], 1, math.prod(psg.shape[1:]))
    return weighted_rows(x, c, acc, noise_std, seed, scale, psg.shape[1:])


@register("add_noise", "triton")
def add_noise(acc: torch.Tensor, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """``(acc + noise_std z) * scale``, in place in ``acc``."""
    if use_reference(acc):
        return ref_dense.add_noise(acc, noise_std, seed, scale)
    if not noise_std and scale == 1.0:
        return acc
    out, acc_in = prepare_out(acc, acc.shape, acc.device)
    finish(out, acc_in, None, noise_std, seed, scale)
    return hand_back(out, acc)


@register("add_noise_many", "triton")
def add_noise_many(accs: list[torch.Tensor], noise_std=0.0, seeds=(), scale=1.0
                   ) -> list[torch.Tensor]:
    """``add_noise`` for every ``accs[i]`` with ``seeds[i]``, in one launch for all the
    contiguous float32 tensors (a table of their addresses, sizes and seeds); others, and
    float64 ones, go one at a time."""
    if len(seeds) != len(accs):
        raise ValueError(f"add_noise_many: {len(accs)} tensors but {len(seeds)} seeds")
    if not noise_std and scale == 1.0:
        return list(accs)
    group = [i for i, a in enumerate(accs) if a.dtype == torch.float32 and a.is_contiguous()
             and a.numel() and a.device == accs[0].device]
    out = list(accs)
    for i in sorted(set(range(len(accs))) - set(group)):
        out[i] = add_noise(accs[i], noise_std, seeds[i], scale)
    if not group:
        return out
    table = torch.tensor([[accs[i].data_ptr() for i in group], [accs[i].numel() for i in group],
                          [philox_seed(seeds[i]) for i in group]], dtype=torch.int64)
    table = table.to(accs[group[0]].device, non_blocking=True)
    longest = max(accs[i].numel() for i in group)
    BLOCK = 1024
    cols = max(1, min(triton.cdiv(longest, BLOCK), 2 * num_sms(accs[group[0]].device)))
    _finish_many_kernel[(len(group), cols)](
        table_ptr=table, n_tensors=len(group), noise_std=float(noise_std), scale=float(scale),
        HAS_NOISE=bool(noise_std), BLOCK=BLOCK,
    )
    return out


_X_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@register("rows_clipped_sum_many", "triton")
def rows_clipped_sum_many(items: list[tuple], c: torch.Tensor, accs: list) -> list[torch.Tensor]:
    """For every ``(x, shape)`` of ``items`` (``x`` [B, T, N]): ``acc + sum_{b,t} c_b x[b, t, :]``
    shaped ``shape`` in float32 (in place into the matching ``accs`` entry), no noise.  One
    launch per input dtype for all of them: a table of addresses, strides and sizes, one
    program per (tensor, column tile) summing every row, so no split and no second pass."""
    if len(items) != len(accs):
        raise ValueError(f"rows_clipped_sum_many: {len(items)} inputs but {len(accs)} "
                         "accumulators")
    if any(use_reference(x, a) for (x, _), a in zip(items, accs)):
        return ref_dense.rows_clipped_sum_many(items, c, accs)
    out: list = []
    groups: dict[torch.dtype, list[int]] = {}
    for i, ((x, shape), acc) in enumerate(zip(items, accs)):
        check_float("rows_clipped_sum_many", x)
        if x.dim() != 3 or x.shape[0] != c.shape[0] or x.shape[2] != math.prod(shape):
            raise ValueError(f"dpkernels.ops.rows_clipped_sum_many: input {i} has shape "
                             f"{tuple(x.shape)}, expected [{c.shape[0]}, T, {math.prod(shape)}]")
        o, acc_in = prepare_out(acc, tuple(shape), x.device)
        if acc_in is not None and acc_in is not o:  # a float32 copy of a strided acc
            o.copy_(acc_in.view(o.shape))
        out.append((o, acc_in is not None, acc))
        if x.numel() == 0 or o.numel() == 0:
            if acc_in is None:
                o.zero_()
            continue
        groups.setdefault(x.dtype, []).append(i)
    for dt, idx in groups.items():
        device = items[idx[0]][0].device
        table = torch.tensor(
            [[x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.shape[1], x.shape[2],
              out[i][0].data_ptr(), int(out[i][1])] for i in idx for x in (items[i][0],)],
            dtype=torch.int64).to(device, non_blocking=True)
        cf = c.to(device=device, dtype=torch.float32).contiguous()
        widest = max(items[i][0].shape[2] for i in idx)
        _rows_many_kernel[(len(idx), triton.cdiv(widest, BLOCK_N_ROWS))](
            table_ptr=table, c_ptr=cf, B=c.shape[0], X_TYPE=_X_TYPES[dt], BLOCK_R=32,
            BLOCK_N=BLOCK_N_ROWS,
        )
    return [hand_back(o, acc) for (o, _, acc) in out]


@register("dense_norm_many", "triton")
def dense_norm_many(rows: list[torch.Tensor]) -> torch.Tensor:
    """[len(rows), B] float32 squared norms of every ``rows[i]`` [B, N]: one launch per input
    dtype over a table of addresses, strides and widths, one program per (tensor, sample)."""
    if not rows:
        raise ValueError("dense_norm_many: no inputs")
    if any(use_reference(r) for r in rows):
        return ref_dense.dense_norm_many(rows)
    B = rows[0].shape[0]
    device = rows[0].device
    out = torch.empty(len(rows), B, dtype=torch.float32, device=device)
    groups: dict[torch.dtype, list[int]] = {}
    for i, r in enumerate(rows):
        check_float("dense_norm_many", r)
        if r.dim() != 2 or r.shape[0] != B:
            raise ValueError(f"dpkernels.ops.dense_norm_many: input {i} has shape "
                             f"{tuple(r.shape)}, expected [{B}, N]")
        if r.shape[1] == 0:
            out[i].zero_()
        else:
            groups.setdefault(r.dtype, []).append(i)
    if B == 0:
        return out
    for dt, idx in groups.items():
        table = torch.tensor([[rows[i].data_ptr(), rows[i].stride(0), rows[i].stride(1),
                               rows[i].shape[1], i] for i in idx],
                             dtype=torch.int64).to(device, non_blocking=True)
        _norm_many_kernel[(len(idx), B)](table_ptr=table, out_ptr=out, B=B,
                                         X_TYPE=_X_TYPES[dt], BLOCK_N=1024)
    return out
