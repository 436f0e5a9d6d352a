"""The weight and bias norms of every Linear and Embedding use of a micro-batch, one launch
per kind.

``linear_norms_many`` computes what ``linear_norms`` (ops/linear.py) and ``embedding_norm``
(ops/embedding.py) compute per layer, for all uses the engine deferred to clip time: one
launch for the ghost-form Linear uses (T > 1, the same tiled Gram products as
``_linear_ghost_kernel``), one for the T == 1 uses (products of row norms), one for biases
alone (``||sum_t g_t||^2``: a Linear with a frozen weight, a norm layer's per-sample terms
kept as partial sums), one for Embeddings (the tiled ``sum_{t,s} [x_t = x_s] (g_t.g_s)``), one
table of addresses and strides for all launches, and one sum of the per-tile partials for all
of them.  Direct-form uses (long sequences: ``T (d + p) >= d p``) take one launch per shape
(``W_b`` tiles squared on chip, as ``_linear_direct_kernel``), one sum per launch and one
scatter into the output rows.  Empty uses run ``linear_norms`` one by one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops import bounds, embedding, linear
from dpkernels.ops._common import (
    INTERPRET,
    autotune,
    check_float,
    device_table,
    gram_tile,
    keep_configs,
    norm_precision,
    same_dtype,
    stage_table,
    upper_pairs,
    use_reference,
)
from dpkernels.reference import ghost_many as ref
from dpkernels.reference.linear import choose_method

_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_IDS_TYPES = {torch.int64: tl.int64, torch.int32: tl.int32, torch.int16: tl.int16,
              torch.int8: tl.int8, torch.uint8: tl.uint8}

# A table row: a's address, strides (b, t, k) and width d; g's address, strides and width p;
# T; the output row of the weight norm and of the bias norm (-1: none); for T == 1 uses, the
# output rows of the magnitudes ||a||, ||g|| and ||a|| ||g|| (-1: none; ``mags``).
_ROW = 16


def _no_spill(configs, named_args, **kwargs):
    """Drops the configs that spill registers (sm_90, triton 3.6, bench/compile_sm90.py): with
    float32 operands, 4 warps ("ieee": 56-128 bytes at BLOCK_T 64), BLOCK_K 64 with "tf32x3"
    (350 bytes) and BLOCK_K 64 at BLOCK_T 32 (4 bytes); with 16-bit operands, BLOCK_K 64 on 4
    warps."""
    args = {**named_args, **kwargs}
    prec, bt = args["PRECISION"], args["BLOCK_T"]

    def fits(c):
        wide = c.kwargs["BLOCK_K"] > 32
        if prec == "tf32":  # 16-bit operands
            return c.num_warps >= 8 or not wide
        return c.num_warps >= 8 and not (wide and (prec == "tf32x3" or bt < 64))

    return [c for c in configs if fits(c)] or configs[:1]


@triton.jit
def _use_tile_pair(table_ptr, pairs_ptr, n_pairs, BLOCK_T: tl.constexpr):
    """What a ghost-form program (sample ``program_id(0)``, use ``program_id(1)``, partial
    ``q = program_id(2)``) works on: its table row, q, whether tile pair q (from the pair
    table of the longest use of the launch) lies within this use's T, the pair's position
    rows and masks [BT], and its weight (2 off the diagonal, 1 on it)."""
    b = tl.program_id(0).to(tl.int64)
    row = table_ptr + tl.program_id(1).to(tl.int64) * 16
    q = tl.program_id(2).to(tl.int64)
    T = tl.load(row + 10)
    qp = tl.minimum(q, n_pairs - 1)
    ti = tl.load(pairs_ptr + 2 * qp).to(tl.int64)
    tj = tl.load(pairs_ptr + 2 * qp + 1).to(tl.int64)
    active = (q < n_pairs) & (tj * BLOCK_T < T)
    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    return b, row, q, active, ri, rj, ri < T, rj < T, tl.where(ti == tj, 1.0, 2.0)


@autotune(
    [
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
    ],
    key=["n_pairs", "BLOCK_T", "PRECISION"],
    prune_configs_by={"early_config_prune": _no_spill},
)
@triton.jit
def _ghost_many_kernel(table_ptr, pairs_ptr, part_ptr, B, n_pairs, n_part,
                       TYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sample ``program_id(0)``, use ``program_id(1)``, partial ``q = program_id(2)`` < n_part:
    tile pair q (i <= j, from the pair table of the longest use of the launch, n_pairs
    entries; a pair past this use's T, or q >= n_pairs, contributes 0):
    ``part[w, b, q] = (1 or 2) sum_{t in i, s in j} (a_t.a_s)(g_t.g_s)`` and, with a bias row,
    ``part[k, b, q] = (1 or 2) sum_{t in i, s in j} g_t.g_s``; off-diagonal pairs count twice."""
    b, row, q, active, ri, rj, mi, mj, twice = _use_tile_pair(table_ptr, pairs_ptr, n_pairs,
                                                               BLOCK_T)
    kw = tl.load(row + 11)
    kb = tl.load(row + 12)
    s = 0.0
    sb = 0.0
    if active:
        a_ptr = tl.load(row + 0).to(tl.pointer_type(TYPE))
        sab, sat, sak = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
        gram_a = gram_tile(a_ptr, sab, sat, sak, a_ptr, sab, sat, sak, b, ri, rj, mi, mj,
                           tl.load(row + 4), UPCAST, PRECISION, BLOCK_T, BLOCK_K)  # [BT, BT]
        g_ptr = tl.load(row + 5).to(tl.pointer_type(TYPE))
        sgb, sgt, sgk = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
        gram_g = gram_tile(g_ptr, sgb, sgt, sgk, g_ptr, sgb, sgt, sgk, b, ri, rj, mi, mj,
                           tl.load(row + 9), UPCAST, PRECISION, BLOCK_T, BLOCK_K)  # [BT, BT]
        s = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0) * twice
        sb = tl.sum(tl.sum(gram_g, axis=1), axis=0) * twice
    tl.store(part_ptr + (kw * B + b) * n_part + q, s)
    if kb >= 0:
        tl.store(part_ptr + (kb * B + b) * n_part + q, sb)


@autotune(
    [
        triton.Config({"BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_K": 1024}, num_warps=8),
    ],
    key=["TYPE"],
)
@triton.jit
def _row_product_many_kernel(table_ptr, part_ptr, B, n_part, TYPE: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """T == 1, sample ``program_id(0)``, use ``program_id(1)``: ``part[w, b, 0] = ||a_b||^2
    ||g_b||^2``, with a bias row ``part[k, b, 0] = ||g_b||^2``, and with magnitude rows
    ``||a_b||``, ``||g_b||``, ``||a_b|| ||g_b||``."""
    b = tl.program_id(0).to(tl.int64)
    row = table_ptr + tl.program_id(1).to(tl.int64) * 16
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # int64: k * stride may pass 2^31
    a_ptr = tl.load(row + 0).to(tl.pointer_type(TYPE))
    sab, sak, d = tl.load(row + 1), tl.load(row + 3), tl.load(row + 4)
    sa = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + ks
        x = tl.load(a_ptr + b * sab + k * sak, mask=k < d, other=0.0).to(tl.float32)
        sa += x * x
    g_ptr = tl.load(row + 5).to(tl.pointer_type(TYPE))
    sgb, sgk, p = tl.load(row + 6), tl.load(row + 8), tl.load(row + 9)
    sg = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        k = k0 + ks
        y = tl.load(g_ptr + b * sgb + k * sgk, mask=k < p, other=0.0).to(tl.float32)
        sg += y * y
    a_sq = tl.sum(sa, axis=0)
    g_sq = tl.sum(sg, axis=0)
    kw = tl.load(row + 11)
    kb = tl.load(row + 12)
    _store_first(part_ptr + (kw * B + b) * n_part, a_sq * g_sq, n_part)
    if kb >= 0:
        _store_first(part_ptr + (kb * B + b) * n_part, g_sq, n_part)
    # the magnitudes sum_t |a_t|, sum_t |g_t|, sum_t |a_t| |g_t| of T == 1 (magnitude_many's
    # row norms, correctly rounded sqrt)
    na = tl.sqrt_rn(a_sq)
    ng = tl.sqrt_rn(g_sq)
    ka, kg, kag = tl.load(row + 13), tl.load(row + 14), tl.load(row + 15)
    if ka >= 0:
        _store_first(part_ptr + (ka * B + b) * n_part, na, n_part)
    if kg >= 0:
        _store_first(part_ptr + (kg * B + b) * n_part, ng, n_part)
    if kag >= 0:
        _store_first(part_ptr + (kag * B + b) * n_part, ng * na, n_part)


@autotune(
    [
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
    ],
    key=["n_pairs", "BLOCK_T", "PRECISION"],
    prune_configs_by={"early_config_prune": _no_spill},
)
@triton.jit
def _embedding_many_kernel(table_ptr, pairs_ptr, part_ptr, B, n_pairs, n_part,
                           IDS_TYPE: tl.constexpr, TYPE: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """An Embedding use (ids in the table's a slots, the padding id in slot 4, -1: none), as
    ``_ghost_many_kernel``: ``part[w, b, q] = (1 or 2) sum_{t in i, s in j} [x_t = x_s]
    (g_t.g_s)`` over non-padding positions."""
    b, row, q, active, ri, rj, mi, mj, twice = _use_tile_pair(table_ptr, pairs_ptr, n_pairs,
                                                               BLOCK_T)
    kw = tl.load(row + 11)
    s = 0.0
    if active:
        ids_ptr = tl.load(row + 0).to(tl.pointer_type(IDS_TYPE))
        sib, sit, pad = tl.load(row + 1), tl.load(row + 2), tl.load(row + 4)
        xi = tl.load(ids_ptr + b * sib + ri * sit, mask=mi, other=0).to(tl.int64)  # [BT]
        xj = tl.load(ids_ptr + b * sib + rj * sit, mask=mj, other=0).to(tl.int64)  # [BT]
        eq = (xi[:, None] == xj[None, :]) & mi[:, None] & mj[None, :] & (xi[:, None] != pad)
        g_ptr = tl.load(row + 5).to(tl.pointer_type(TYPE))
        sgb, sgt, sgk = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
        gram = gram_tile(g_ptr, sgb, sgt, sgk, g_ptr, sgb, sgt, sgk, b, ri, rj, mi, mj,
                         tl.load(row + 9), UPCAST, PRECISION, BLOCK_T, BLOCK_K)  # [BT, BT]
        s = tl.sum(tl.sum(tl.where(eq, gram, 0.0), axis=1), axis=0) * twice
    tl.store(part_ptr + (kw * B + b) * n_part + q, s)


@triton.jit
def _store_first(ptr, value, n_part):
    """``ptr[0] = value`` and ``ptr[1:n_part] = 0``: a use with a single partial."""
    tl.store(ptr, value)
    for q in range(1, n_part):
        tl.store(ptr + q, 0.0)


@autotune(
    [
        triton.Config({"BLOCK_P": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 512}, num_warps=4),
    ],
    key=["TYPE"],
)
@triton.jit
def _bias_many_kernel(table_ptr, part_ptr, B, n_part, TYPE: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    """A bias alone, sample ``program_id(0)``, use ``program_id(1)``: ``part[k, b, 0] =
    ||sum_t g_bt||^2`` (a sum over t for every column, then the squares)."""
    b = tl.program_id(0).to(tl.int64)
    row = table_ptr + tl.program_id(1).to(tl.int64) * 16
    g_ptr = tl.load(row + 5).to(tl.pointer_type(TYPE))
    sgb, sgt, sgk = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
    p, T = tl.load(row + 9), tl.load(row + 10)
    ks = tl.arange(0, BLOCK_P).to(tl.int64)
    sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(0, p, BLOCK_P):
        k = k0 + ks
        col = tl.zeros([BLOCK_P], dtype=tl.float32)
        for t in range(0, T):
            col += tl.load(g_ptr + b * sgb + t * sgt + k * sgk, mask=k < p,
                           other=0.0).to(tl.float32)
        sq += col * col
    _store_first(part_ptr + (tl.load(row + 12) * B + b) * n_part, tl.sum(sq, axis=0), n_part)


@autotune(
    [
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
    ],
    key=["n_q", "BLOCK_P", "BLOCK_D", "WITH_BIAS", "STORE_W", "PRECISION"],
    # as _linear_direct_kernel: norm_mma's float32 split with 64-row T tiles on 4 warps spilled;
    # STORE_W on 4 warps too (40-180 B, bf16 and float32)
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: c.num_warps >= 8 or not (
            args["STORE_W"] or (args["PRECISION"] == "tf32x3" and c.kwargs["BLOCK_T"] >= 64)))},
)
@triton.jit
def _direct_many_kernel(table_ptr, part_ptr, B, n_q, n_td, TYPE: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, WITH_BIAS: tl.constexpr,
                        STORE_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """Direct-form uses of one shape (``_linear_direct_kernel`` for all of them): sample
    ``program_id(0)``, use ``program_id(1)``, (p-tile, d-tile) ``q = program_id(2)``:
    ``part[u, b, q] = ||W_b tile||^2`` with ``W_b = sum_t g_t a_t^T``, and WITH_BIAS
    ``part[k, b, q] = ||sum_t g_t||^2`` over the p-tile from the d-tile-0 programs (0 from
    the others), k the table row's slot 13.  STORE_W: the tile itself, the very values
    squared, into the contiguous float32 [B, p, d] tensor at the row's slot 14."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64)
    q = tl.program_id(2).to(tl.int64)
    row = table_ptr + u * 16
    a_ptr = tl.load(row + 0).to(tl.pointer_type(TYPE))
    sab, sat, sak, d = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    g_ptr = tl.load(row + 5).to(tl.pointer_type(TYPE))
    sgb, sgt, sgk, p = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9)
    T = tl.load(row + 10)
    cp = (q // n_td) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    cd = (q % n_td) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # [BD]
    mp = cp < p
    md = cd < d
    w, g_acc = linear.direct_tile(a_ptr, sab, sat, sak, g_ptr, sgb, sgt, sgk, b, cp, cd, mp,
                                  md, T, UPCAST, PRECISION, WITH_BIAS, BLOCK_P, BLOCK_D,
                                  BLOCK_T)
    tl.store(part_ptr + (u * B + b) * n_q + q, tl.sum(tl.sum(w * w, axis=1), axis=0))
    if STORE_W:
        w_ptr = tl.load(row + 14).to(tl.pointer_type(tl.float32))
        tl.store(w_ptr + (b * p + cp[:, None]) * d + cd[None, :], w,
                 mask=mp[:, None] & md[None, :])
    if WITH_BIAS:
        beta = tl.sum(g_acc, axis=1)  # [BP] sum_t g_t over this p-tile
        sb = tl.where(q % n_td == 0, tl.sum(beta * beta, axis=0), 0.0)
        tl.store(part_ptr + (tl.load(row + 13) * B + b) * n_q + q, sb)


def _direct_tile() -> int:
    """The W tile of the direct-form launches: 64 on the GPU, 32 in the interpreter."""
    return 32 if INTERPRET else 64


def _plan_direct(direct: dict, device) -> tuple[list, list[int]]:
    """For the direct-form table rows grouped by (dtype, d, p, with bias): per launch (key,
    (p-tile, d-tile) pairs, d-tiles, partial rows, their output rows), the bias rows' partial
    slots set in the table rows (slot 13), and all output rows in launch order, staged to
    ride along the next table copy (the scatter's index)."""
    bd = _direct_tile()
    plan = []
    for key, rows in direct.items():
        _, d, p, with_bias = key
        n_u = len(rows)
        for j, r in enumerate(rows):
            r[13] = n_u + j if with_bias else -1
        targets = [r[11] for r in rows] + ([r[12] for r in rows] if with_bias else [])
        n_td = triton.cdiv(d, bd)
        plan.append((key, n_td * triton.cdiv(p, bd), n_td, len(targets), targets))
    targets = [k for *_, t in plan for k in t]
    if targets:
        stage_table([targets], torch.int64, device)
    return plan, targets


def _run_direct(plan, direct, targets, slices, out, B, device, store_w: bool) -> None:
    """One ``_direct_many_kernel`` launch per planned shape (table slices from ``slices``),
    one partial sum each, and one scatter of all of them into their rows of ``out``."""
    bd = _direct_tile()
    sums = []
    for (key, n_q, n_td, n_rows_d, _), rows in zip(plan, direct.values()):
        dt, d, p, with_bias = key
        dpart = torch.empty(n_rows_d, B, n_q, dtype=torch.float32, device=device)
        _note_cost(sum((r[10] * (d + p)) * B * 4.0 for r in rows)
                   + (B * p * d * 4.0 * len(rows) if store_w else 0.0),
                   sum(2.0 * B * n_q * bd * bd * r[10] for r in rows))
        _direct_many_kernel[(B, len(rows), n_q)](
            table_ptr=next(slices), part_ptr=dpart, B=B, n_q=n_q, n_td=n_td,
            TYPE=_TYPES[dt], UPCAST=INTERPRET, PRECISION=norm_precision(dt),
            WITH_BIAS=with_bias, STORE_W=store_w, BLOCK_P=bd, BLOCK_D=bd)
        sums.append(dpart.sum(-1))
    if sums:
        idx = device_table([targets], torch.int64, device).view(-1)
        out.index_copy_(0, idx, sums[0] if len(sums) == 1 else torch.cat(sums))


@register("linear_direct_many", "triton")
def linear_direct_many(items: list) -> torch.Tensor:
    """[rows, B] float32 norms of every ``(a, g, with_bias, W)`` of ``items`` (the weight row,
    then the bias row when with_bias), and ``W`` [B, p, d] (float32, contiguous) filled with
    the per-sample weight gradients ``W_b = sum_t g_t a_t^T`` whose squares the weight rows
    sum: the direct form, materialised, so that the clipped sum is ``sum_b c_b W_b`` (no
    second pass over a and g).  One launch per shape, as ``linear_norms_many``'s direct
    uses."""
    B = ref.check_direct_items("linear_direct_many", items)
    if any(use_reference(a, g, w) for a, g, _, w in items):
        return ref.linear_direct_many(items)
    device = items[0][1].device
    out = torch.empty(sum(1 + bool(wb) for _, _, wb, _ in items), B, dtype=torch.float32,
                      device=device)
    direct: dict[tuple, list] = {}
    keep, k = [], 0
    for a, g, with_bias, w in items:
        check_float("linear_direct_many", a, g)
        a, g = same_dtype(a, g)
        keep.append((a, g))
        kw, kb = k, (k + 1 if with_bias else -1)
        k += 1 + bool(with_bias)
        if B == 0:
            continue
        T, d, p = a.shape[1], a.shape[2], g.shape[2]
        if T == 0 or d == 0 or p == 0:
            w.zero_()
            out[kw].zero_()
            if with_bias:
                out[kb].zero_()
            continue
        direct.setdefault((a.dtype, d, p, bool(with_bias)), []).append(
            [a.data_ptr(), a.stride(0), a.stride(1), a.stride(2), d, g.data_ptr(),
             g.stride(0), g.stride(1), g.stride(2), p, T, kw, kb, -1, w.data_ptr(), -1])
    if not direct:
        return out
    plan, targets = _plan_direct(direct, device)
    slices = _table_slices(list(direct.values()), device)
    _run_direct(plan, direct, targets, slices, out, B, device, store_w=True)
    return out


def _table_slices(groups, device):
    """One table of every launch's rows (``groups``: lists of table rows, one per launch),
    uploaded in one copy (``device_table``); an iterator over each launch's slice."""
    starts = [0]
    for rows in groups:
        starts.append(starts[-1] + len(rows))
    if not groups:
        return iter(())
    table = device_table([r for rows in groups for r in rows], torch.int64, device)
    return iter([table[a:b] for a, b in zip(starts, starts[1:])])


def _block_t(T: int) -> int:
    """The Gram tile width ``linear_norms`` uses: 64 on the GPU when T fills it, else 32 (the
    interpreter always uses 32 so that small test shapes span several tiles)."""
    return 64 if (not INTERPRET and T >= 64) else 32


def _note_cost(nbytes: float, flops: float) -> None:
    """bench/trace_step.py replaces this to cost the next launch it records (the bytes and
    FLOPs of a table-driven launch depend on the table's contents, which a traced launch
    cannot read)."""




@register("linear_norms_many", "triton")
def linear_norms_many(items: list, mags: list | None = None) -> torch.Tensor:
    """[rows (+ len(mags)), B] float32 ``linear_norms(a, g, method, with_bias)`` of every
    ``(a, g, method, with_bias)`` of ``items`` (weight row, then the bias row when with_bias;
    ``a`` None: the bias row alone), then the magnitude rows ``mags`` asks for (the
    reference's): one launch per kind (ghost, T == 1, bias alone) and dtype, one sum over the
    tile partials; direct-form uses one launch per shape, their sums scattered by one copy.
    The T == 1 launch writes the magnitudes of its uses from the row norms it computes
    anyway; those of other uses come from ``magnitude_many``."""
    B, n_rows = ref.check_items("linear_norms_many", items)
    mags = ref.check_mags("linear_norms_many", items, mags)
    if any(use_reference(a, g) for a, g, _, _ in items):
        return ref.linear_norms_many(items, mags)
    device = items[0][1].device
    out_rows = ref.out_rows(items)
    # (item, kind) -> its output row; duplicates are copies of the first
    mag_rows: dict[tuple[int, str], int] = {}
    mag_copies: list[tuple[int, int]] = []  # (row, row it copies)
    for j, key in enumerate(mags):
        if key in mag_rows:
            mag_copies.append((n_rows + j, mag_rows[key]))
        else:
            mag_rows[key] = n_rows + j
    n_out = n_rows + len(mags)
    ghost: dict[tuple, list] = {}  # (dtype, BLOCK_T) -> table rows
    prods: dict[torch.dtype, list] = {}  # T == 1: dtype -> table rows
    biases: dict[torch.dtype, list] = {}  # a bias alone: dtype -> table rows
    embs: dict[tuple, list] = {}  # (ids dtype, dtype, BLOCK_T) -> table rows
    direct: dict[tuple, list] = {}  # (dtype, d, p, with bias) -> table rows
    alone: list[int] = []  # items computed by linear_norms one by one
    keep = []  # operands cast here must live until their launch
    n_tiles: dict[tuple, int] = {}  # the most t-tiles of a use of the launch
    cost: dict = {}  # launch key -> [bytes of the operands, FLOPs]
    for i, (a, g, method, with_bias) in enumerate(items):
        if method == "embedding":
            check_float("linear_norms_many", g)
            T, p = g.shape[1], g.shape[2]
            if B == 0 or T == 0 or p == 0 or a.dtype not in _IDS_TYPES:
                alone.append(i)
                continue
            bt = _block_t(T)
            key = ("embedding", a.dtype, g.dtype, bt)
            pad = -1 if with_bias is None else int(with_bias)
            embs.setdefault(key, []).append(
                [a.data_ptr(), a.stride(0), a.stride(1), 0, pad, g.data_ptr(), g.stride(0),
                 g.stride(1), g.stride(2), p, T, out_rows[i][0], -1, -1, -1, -1])
            n = triton.cdiv(T, bt)
            n_tiles[key] = max(n_tiles.get(key, 0), n)
            c = cost.setdefault(key, [0.0, 0.0])
            c[0] += a.numel() * a.element_size() + g.numel() * g.element_size()
            c[1] += B * n * (n + 1) // 2 * 2.0 * bt * bt * p
            continue
        if a is None:
            check_float("linear_norms_many", g)
            if B and g.shape[1] and g.shape[2]:
                biases.setdefault(g.dtype, []).append(
                    [0, 0, 0, 0, 0, g.data_ptr(), g.stride(0), g.stride(1), g.stride(2),
                     g.shape[2], g.shape[1], -1, out_rows[i][1], -1, -1, -1])
                c = cost.setdefault(("bias", g.dtype), [0.0, 0.0])
                c[0] += g.numel() * g.element_size()
            else:
                alone.append(i)
            continue
        check_float("linear_norms_many", a, g)
        T, d, p = a.shape[1], a.shape[2], g.shape[2]
        if B == 0 or T == 0 or d == 0 or p == 0:
            alone.append(i)
            continue
        is_direct = T > 1 and (choose_method(T, d, p) if method == "auto"
                               else method) != "ghost"
        if is_direct and method not in ("auto", "direct"):
            alone.append(i)  # linear_norms refuses an unknown method
            continue
        a, g = same_dtype(a, g)
        keep.append((a, g))
        kw, kb = out_rows[i]
        entry = [a.data_ptr(), a.stride(0), a.stride(1), a.stride(2), d,
                 g.data_ptr(), g.stride(0), g.stride(1), g.stride(2), p, T, kw, kb, -1, -1, -1]
        if is_direct:
            direct.setdefault((a.dtype, d, p, kb >= 0), []).append(entry)
            continue
        if T == 1:
            for kind, slot in (("a", 13), ("g", 14), ("ag", 15)):
                r = mag_rows.pop((i, kind), None)
                if r is not None:
                    entry[slot] = r
            prods.setdefault(a.dtype, []).append(entry)
            c = cost.setdefault(a.dtype, [0.0, 0.0])
            c[0] += (a.numel() + g.numel()) * a.element_size()
            continue
        bt = _block_t(T)
        key = (a.dtype, bt)
        ghost.setdefault(key, []).append(entry)
        n = triton.cdiv(T, bt)
        n_tiles[key] = max(n_tiles.get(key, 0), n)
        c = cost.setdefault(key, [0.0, 0.0])
        c[0] += (a.numel() + g.numel()) * a.element_size()
        c[1] += B * n * (n + 1) // 2 * 2.0 * bt * bt * (d + p)
    n_pairs = {k: n * (n + 1) // 2 for k, n in n_tiles.items()}
    # every launch writes all n_part partials of its rows (0 where it has none)
    n_part = max([1, *n_pairs.values()])
    part = torch.empty(n_out, B, n_part, dtype=torch.float32, device=device)
    # the rows of every launch in one table: one host-to-device copy, a slice per launch
    direct_plan, targets = _plan_direct(direct, device)
    launches = [*ghost.values(), *embs.values(), *prods.values(), *biases.values(),
                *direct.values()]
    slices = _table_slices(launches, device)
    for (dt, bt), rows in ghost.items():
        pairs = upper_pairs(n_tiles[(dt, bt)], device)
        _note_cost(*cost[(dt, bt)])
        _ghost_many_kernel[(B, len(rows), n_part)](
            table_ptr=next(slices), pairs_ptr=pairs, part_ptr=part, B=B,
            n_pairs=n_pairs[(dt, bt)], n_part=n_part, TYPE=_TYPES[dt], UPCAST=INTERPRET,
            PRECISION=norm_precision(dt), BLOCK_T=bt)
    for (_, it, dt, bt), rows in embs.items():
        key = ("embedding", it, dt, bt)
        pairs = upper_pairs(n_tiles[key], device)
        _note_cost(*cost[key])
        _embedding_many_kernel[(B, len(rows), n_part)](
            table_ptr=next(slices), pairs_ptr=pairs, part_ptr=part, B=B,
            n_pairs=n_pairs[key], n_part=n_part, IDS_TYPE=_IDS_TYPES[it], TYPE=_TYPES[dt],
            UPCAST=INTERPRET, PRECISION=norm_precision(dt), BLOCK_T=bt)
    for dt, rows in prods.items():
        _note_cost(*cost[dt])
        _row_product_many_kernel[(B, len(rows))](
            table_ptr=next(slices), part_ptr=part, B=B, n_part=n_part,
            TYPE=_TYPES[dt])
    for dt, rows in biases.items():
        _note_cost(*cost[("bias", dt)])
        _bias_many_kernel[(B, len(rows))](
            table_ptr=next(slices), part_ptr=part, B=B, n_part=n_part,
            TYPE=_TYPES[dt])
    out = part.view(n_out, B) if n_part == 1 else part.sum(-1)
    _run_direct(direct_plan, direct, targets, slices, out, B, device, store_w=False)
    for i in alone:
        a, g, method, with_bias = items[i]
        kw, kb = out_rows[i]
        if method == "embedding":
            out[kw].copy_(embedding.embedding_norm(a, g, with_bias))
            continue
        if a is None:
            out[kb].copy_(linear.linear_bias_norm(g))
            continue
        w, b = linear.linear_norms(a, g, method, bool(with_bias))
        out[kw].copy_(w)
        if with_bias:
            out[kb].copy_(b)
    if mag_rows:  # magnitudes of uses outside the T == 1 launch
        rest = list(mag_rows.items())
        M = bounds.magnitude_many([ref.mag_operands(items[i], kind) for (i, kind), _ in rest])
        for j, (_, r) in enumerate(rest):
            out[r].copy_(M[j])
    for r, r0 in mag_copies:
        out[r].copy_(out[r0])
    return out
