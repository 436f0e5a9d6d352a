"""Conv1d/2d/3d weights: per-sample norms (direct and ghost) with the im2col done inside the
kernels, and the clipped sum (a native weight-gradient convolution + the Triton epilogue).

Shapes: ``x`` [B, C_in, *S] the layer input (explicit non-zero padding already applied by the
layer), ``g`` [B, C_out, *O] the backprop, ``weight_shape`` (C_out, C_in / G, *k).  Group j of
the conv is a Linear with T = prod(O) positions, patch rows ``a_t`` of width
d = C_in / G * prod(k) (in ``weight[o].flatten()`` order: channel, then kernel offsets) and
backprop rows of width p = C_out / G; the norm is the sum of the per-group Linear norms, and
no cross-group product is ever formed.

Every conv is treated as 3-d: a 1-d or 2-d tensor gets leading spatial dims of size 1 (stride
0, kernel 1, stride 1, no padding, dilation 1) through the sizes and strides passed to the
kernels, without a copy.  A patch element (t, k) is decoded from the output position
t -> (od, oh, ow) and the patch index k -> (c, kd, kh, kw), and read from
``x[b, j * C_in / G + c, od * s - pad + kd * dil, ...]``, masked where that falls into the
zero padding: ``unfold`` (prod(k) times the input) is never materialised.
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
    hand_back,
    keep_configs,
    norm_mma,
    norm_precision,
    prepare_out,
    same_dtype,
    upper_pairs,
    use_reference,
)
from dpkernels.ops.dense import finish
from dpkernels.reference import conv as ref
from dpkernels.reference._common import cudnn_exact_fp32
from dpkernels.reference.linear import choose_method

# ---------------------------------------------------------------------------- kernels


@triton.jit
def _out_coords(t, OH, OW, SD, SH, SW, PD, PH, PW):
    """Output positions t (int32, any shape) -> the input coordinates of their patch's
    first element (kernel offset 0), which may be negative (inside the zero padding)."""
    ow = t % OW
    r = t // OW
    oh = r % OH
    od = r // OH
    return od * SD - PD, oh * SH - PH, ow * SW - PW


@triton.jit
def _patch_coords(k, Cg, KD, KH, KW, DD, DH, DW, c0, sxc):
    """Patch indices k (int32, any shape) -> (int64 channel offset in x, kernel offsets in
    input coordinates) for weight order (c, kd, kh, kw); ``c0`` is the group's first channel.
    Indices are decoded in int32 (int64 division is emulated on GPUs, and T, d < 2^31);
    only addresses are int64."""
    kw = k % KW
    r = k // KW
    kh = r % KH
    r = r // KH
    kd = r % KD
    c = r // KD
    return (c0 + c).to(tl.int64) * sxc, kd * DD, kh * DH, kw * DW


@triton.jit
def _g_offsets(t, OH, OW, sgd, sgh, sgw):
    """Output positions t (int32) -> int64 element offsets in one channel of g."""
    ow = t % OW
    r = t // OW
    return (r // OH).to(tl.int64) * sgd + (r % OH).to(tl.int64) * sgh + ow.to(tl.int64) * sgw


@triton.jit
def _gather(xb_ptr, id0, ih0, iw0, mt, c_off, kd, kh, kw, mk, D, H, W, sxd, sxh, sxw):
    """One tile of sample b's implicit im2col matrix: the t-parts (id0, ih0, iw0, mt) and
    k-parts (c_off, kd, kh, kw, mk) broadcast against each other ([BT, 1] x [1, BK] or
    [1, BT] x [BK, 1]); out-of-range coordinates are the zero padding."""
    i_d = id0 + kd
    i_h = ih0 + kh
    i_w = iw0 + kw
    m = (mt & mk & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H)
         & (i_w >= 0) & (i_w < W))
    off = c_off + i_d.to(tl.int64) * sxd + i_h.to(tl.int64) * sxh + i_w.to(tl.int64) * sxw
    return tl.load(xb_ptr + off, mask=m, other=0.0)


# Tile sizes that fix the grid (and so the partial buffer) are chosen by the launcher; the
# autotuner only picks what every config computes identically, so re-running is harmless.
@autotune(
    [
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
    ],
    key=["T", "d", "p", "KD", "KH", "KW", "BLOCK_P", "BLOCK_D", "PRECISION"],
    # tf32x3 and 16-bit operands with 64-row tiles on 4 warps spilled on sm_90 (64 B to 1 KB);
    # norm_mma's float32 split with 16 x 64 W tiles also at 32 rows on 4 warps (8 B) and 64 on
    # 8 (16 B): it keeps 32 rows on 8 warps
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: args["PRECISION"] == "ieee" or (
            (c.kwargs["BLOCK_T"] < 64 or c.num_warps >= 8)
            and (args["PRECISION"] != "tf32x3" or (c.kwargs["BLOCK_T"] < 64
                                                   and c.num_warps >= 8))))},
)
@triton.jit
def _conv_direct_kernel(
    x_ptr, g_ptr, part_ptr,
    T, d, p, G, Cg, n_tiles, n_tiles_d,
    D, H, W, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (sample, group, p-tile, d-tile) block of the group's ``W_b = sum_t g_t a_t^T``,
    squared and summed on chip; the patch rows ``a_t`` are gathered from x as they are
    loaded.  The T reduction is not split: partial sums of W cannot be squared separately."""
    pid = tl.program_id(0).to(tl.int64)
    bj = pid // n_tiles
    b = bj // G
    j = bj % G
    q = pid % n_tiles
    cp = (q // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    cd = (q % n_tiles_d).to(tl.int32) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mp = cp < p
    md = cd < d
    xb_ptr = x_ptr + b * sxb
    gb_ptr = g_ptr + b * sgb + (j * p + cp[:, None]) * sgc  # [BP, 1]
    # the d-tile's patch coordinates do not depend on t: decoded once
    c_off, kd, kh, kw = _patch_coords(cd[None, :], Cg, KD, KH, KW, DD, DH, DW, j * Cg,
                                      sxc)  # [1, BD] each
    ts = tl.arange(0, BLOCK_T)
    w = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + ts  # [BT]
        mt = t < T
        g_off = _g_offsets(t, OH, OW, sgd, sgh, sgw)  # [BT] int64
        gt = tl.load(gb_ptr + g_off[None, :], mask=mp[:, None] & mt[None, :],
                     other=0.0)  # [BP, BT]
        id0, ih0, iw0 = _out_coords(t[:, None], OH, OW, SD, SH, SW, PD, PH, PW)  # [BT, 1]
        a = _gather(xb_ptr, id0, ih0, iw0, mt[:, None], c_off, kd, kh, kw, md[None, :],
                    D, H, W, sxd, sxh, sxw)  # [BT, BD]
        w = norm_mma(gt, a, w, UPCAST, PRECISION)
    tl.store(part_ptr + pid, tl.sum(tl.sum(w * w, axis=1), axis=0))


@autotune(
    [
        triton.Config({"BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
    ],
    key=["T", "d", "p", "KD", "KH", "KW", "BLOCK_T", "PRECISION"],  # tf32x3: more registers
    # on sm_90, tf32x3 spilled with 64-wide K tiles (any warps) and with 64-row T tiles on 4
    # warps, norm_mma's float32 split also with 32-row tiles on 4 warps (20 B); 16-bit
    # operands with 64 x 64 tiles on 4 warps
    prune_configs_by={"early_config_prune": keep_configs(
        lambda c, args: args["PRECISION"] == "ieee" or (
            (c.kwargs["BLOCK_K"] < 64 or args["PRECISION"] != "tf32x3")
            and (args["BLOCK_T"] < 64 or c.num_warps >= 8)
            and (args["PRECISION"] != "tf32x3" or c.num_warps >= 8)))},
)
@triton.jit
def _conv_ghost_kernel(
    x_ptr, g_ptr, pairs_ptr, part_ptr,
    T, d, p, G, Cg, n_pairs,
    D, H, W, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (sample, group, t-tile i <= s-tile j) block of ``sum_{t,s} (a_t.a_s)(g_t.g_s)``
    for that group; both Gram tiles live on chip only, the patches are gathered from x, and
    off-diagonal blocks are counted twice (the Grams are symmetric)."""
    pid = tl.program_id(0).to(tl.int64)
    bj = pid // n_pairs
    b = bj // G
    j = bj % G
    q = pid % n_pairs
    ti = tl.load(pairs_ptr + 2 * q)  # int32 tile indices
    tj = tl.load(pairs_ptr + 2 * q + 1)
    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] rows t
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] columns s
    mi = ri < T
    mj = rj < T
    xb_ptr = x_ptr + b * sxb
    gb_ptr = g_ptr + b * sgb + j * p * sgc
    id_i, ih_i, iw_i = _out_coords(ri[:, None], OH, OW, SD, SH, SW, PD, PH, PW)  # [BT, 1]
    id_j, ih_j, iw_j = _out_coords(rj[None, :], OH, OW, SD, SH, SW, PD, PH, PW)  # [1, BT]
    gi_off = _g_offsets(ri, OH, OW, sgd, sgh, sgw)  # [BT] int64
    gj_off = _g_offsets(rj, OH, OW, sgd, sgh, sgw)  # [BT] int64
    ks = tl.arange(0, BLOCK_K)

    gram_a = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + ks  # [BK]
        mk = k < d
        c_off, kd, kh, kw = _patch_coords(k[None, :], Cg, KD, KH, KW, DD, DH, DW, j * Cg,
                                          sxc)  # [1, BK]
        ai = _gather(xb_ptr, id_i, ih_i, iw_i, mi[:, None], c_off, kd, kh, kw, mk[None, :],
                     D, H, W, sxd, sxh, sxw)  # [BT, BK]
        c_off, kd, kh, kw = _patch_coords(k[:, None], Cg, KD, KH, KW, DD, DH, DW, j * Cg,
                                          sxc)  # [BK, 1]
        aj = _gather(xb_ptr, id_j, ih_j, iw_j, mj[None, :], c_off, kd, kh, kw, mk[:, None],
                     D, H, W, sxd, sxh, sxw)  # [BK, BT]
        gram_a = norm_mma(ai, aj, gram_a, UPCAST, PRECISION)

    gram_g = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        k = k0 + ks  # [BK]
        mk = k < p
        kc = k.to(tl.int64) * sgc
        gi = tl.load(gb_ptr + kc[None, :] + gi_off[:, None],
                     mask=mi[:, None] & mk[None, :], other=0.0)  # [BT, BK]
        gj = tl.load(gb_ptr + kc[:, None] + gj_off[None, :],
                     mask=mk[:, None] & mj[None, :], other=0.0)  # [BK, BT]
        gram_g = norm_mma(gi, gj, gram_g, UPCAST, PRECISION)

    s = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    s = s * tl.where(ti == tj, 1.0, 2.0)
    tl.store(part_ptr + pid, s)


# ---------------------------------------------------------------------------- launchers


def _tile(n: int, big: int) -> int:
    """A power-of-two tile of at least 16 (tl.dot's minimum) that covers ``n`` up to ``big``
    on the GPU, up to 32 in the interpreter (so that small test shapes span several tiles)."""
    cap = 32 if INTERPRET else big
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _as_3d(vals, fill) -> tuple[int, ...]:
    """Per-spatial-dim values of a 1-d/2-d conv with leading dims filled in (3 values)."""
    vals = tuple(int(v) for v in vals)
    return (fill,) * (3 - len(vals)) + vals


def _geometry(x, g, weight_shape, stride, padding, dilation) -> dict[str, int]:
    """The kernels' size, stride and conv arguments, every conv viewed as 3-d."""
    D, H, W = _as_3d(x.shape[2:], 1)
    _, OH, OW = _as_3d(g.shape[2:], 1)
    KD, KH, KW = _as_3d(weight_shape[2:], 1)
    SD, SH, SW = _as_3d(stride, 1)
    PD, PH, PW = _as_3d(padding, 0)
    DD, DH, DW = _as_3d(dilation, 1)
    sxd, sxh, sxw = _as_3d(x.stride()[2:], 0)
    sgd, sgh, sgw = _as_3d(g.stride()[2:], 0)
    return dict(D=D, H=H, W=W, OH=OH, OW=OW, KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW,
                PD=PD, PH=PH, PW=PW, DD=DD, DH=DH, DW=DW,
                sxb=x.stride(0), sxc=x.stride(1), sxd=sxd, sxh=sxh, sxw=sxw,
                sgb=g.stride(0), sgc=g.stride(1), sgd=sgd, sgh=sgh, sgw=sgw)


def _check(name, x, g, weight_shape, stride, padding, dilation, groups) -> None:
    n = x.dim() - 2
    ok = (1 <= n <= 3 and g.dim() == x.dim() and len(weight_shape) == n + 2
          and len(stride) == len(padding) == len(dilation) == n
          and g.shape[0] == x.shape[0] and groups >= 1
          and x.shape[1] == weight_shape[1] * groups and g.shape[1] == weight_shape[0]
          and weight_shape[0] % groups == 0)
    if not ok:
        raise ValueError(
            f"dpkernels.ops.{name}: inconsistent conv shapes: x {tuple(x.shape)}, "
            f"g {tuple(g.shape)}, weight {tuple(weight_shape)}, stride {stride}, padding "
            f"{padding}, dilation {dilation}, groups {groups}")
    check_float(name, x, g)


def _direct(x, g, geo, T, d, p, G, Cg) -> torch.Tensor:
    B = x.shape[0]
    BLOCK_P, BLOCK_D = _tile(p, 64), _tile(d, 64)
    n_tiles_d = triton.cdiv(d, BLOCK_D)
    n_tiles = triton.cdiv(p, BLOCK_P) * n_tiles_d
    part = torch.empty(B * G * n_tiles, dtype=torch.float32, device=x.device)
    _conv_direct_kernel[(B * G * n_tiles,)](
        x_ptr=x, g_ptr=g, part_ptr=part, T=T, d=d, p=p, G=G, Cg=Cg, n_tiles=n_tiles,
        n_tiles_d=n_tiles_d, **geo, UPCAST=INTERPRET, PRECISION=norm_precision(x.dtype),
        BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )
    return part.view(B, G * n_tiles).sum(1)


def _ghost(x, g, geo, T, d, p, G, Cg) -> torch.Tensor:
    B = x.shape[0]
    BLOCK_T = _tile(T, 64)
    n = triton.cdiv(T, BLOCK_T)
    n_pairs = n * (n + 1) // 2
    part = torch.empty(B * G * n_pairs, dtype=torch.float32, device=x.device)
    _conv_ghost_kernel[(B * G * n_pairs,)](
        x_ptr=x, g_ptr=g, pairs_ptr=upper_pairs(n, x.device), part_ptr=part,
        T=T, d=d, p=p, G=G, Cg=Cg, n_pairs=n_pairs, **geo,
        UPCAST=INTERPRET, PRECISION=norm_precision(x.dtype), BLOCK_T=BLOCK_T,
    )
    return part.view(B, G * n_pairs).sum(1)


@register("conv_norm", "triton")
def conv_norm(x, g, weight_shape, stride, padding, dilation, groups,
              method: str = "auto") -> torch.Tensor:
    """[B] float32 squared norms of each sample's weight gradient, summed over groups: direct
    (W_b tiles on chip) or ghost (Gram tiles on chip), patches gathered in the kernel."""
    if use_reference(x, g):
        return ref.conv_norm(x, g, weight_shape, stride, padding, dilation, groups, method)
    _check("conv_norm", x, g, weight_shape, stride, padding, dilation, groups)
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    B = x.shape[0]
    T = math.prod(g.shape[2:])
    d = math.prod(weight_shape[1:])
    G = groups
    p = weight_shape[0] // G
    if B == 0 or T == 0 or d == 0 or p == 0:  # CUDA rejects empty grids
        return torch.zeros(B, dtype=torch.float32, device=x.device)
    x, g = same_dtype(x, g)
    geo = _geometry(x, g, weight_shape, stride, padding, dilation)
    if method == "auto":
        method = choose_method(T, d, p)
    run = _ghost if method == "ghost" else _direct
    return run(x, g, geo, T, d, p, G, weight_shape[1])


@register("conv_clipped_sum", "triton")
def conv_clipped_sum(x, g, c, weight_shape, stride, padding, dilation, groups, acc=None,
                     noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """Weight-shaped float32 ``(acc + sum_b c_b W_b + noise_std z) * scale``; in place into
    ``acc`` when it is contiguous float32.

    The GEMM stays a native weight-gradient convolution (cuDNN's implicit GEMM on a GPU, on
    the backprops rescaled by c_b): unlike the norm it is the very op non-private training
    runs, over all B*T rows at once, so a Triton copy could at best match it, and it must
    handle every stride/dilation/group layout cuDNN already tunes for.  It runs in float32
    with cuDNN's TF32 off: TF32 would round c_b g to 10-bit mantissas and let a sample's
    clipped contribution exceed C by ~1e-3 relative (the linear kernels use "ieee" or
    "tf32x3" for the same reason).  The epilogue (acc, Philox noise keyed by the element
    offset in the row-major weight, scale) is the Triton finish pass every clipped sum uses.
    """
    if use_reference(x, g, acc):
        return ref.conv_clipped_sum(x, g, c, weight_shape, stride, padding, dilation, groups,
                                    acc, noise_std, seed, scale)
    _check("conv_clipped_sum", x, g, weight_shape, stride, padding, dilation, groups)
    device = x.device
    n = x.dim() - 2
    if x.shape[0] == 0:
        update = torch.zeros(weight_shape, dtype=torch.float32, device=device)
    else:
        c = c.to(device=device, dtype=torch.float32)
        gs = g.float() * c.reshape(-1, *([1] * (n + 1)))
        w = torch.empty(weight_shape, dtype=torch.float32, device=device)  # only its shape
        with cudnn_exact_fp32():
            _, update, _ = torch.ops.aten.convolution_backward(
                gs, x.float(), w, None, list(stride), list(padding), list(dilation), False,
                [0] * n, groups, [False, True, False])
        update = update.contiguous()
    if acc is None:
        if noise_std or scale != 1.0:
            finish(update, None, update, noise_std, seed, scale)  # in place
        return update
    out, acc_in = prepare_out(acc, tuple(weight_shape), device)
    finish(out, acc_in, update, noise_std, seed, scale)
    return hand_back(out, acc)
