"""What every Triton op family shares: the autotune switch, dtype and precision policy, the
Philox seed, and the clipped-sum epilogue ``(acc + update + noise_std * z) * scale``.

Importing this module imports triton; ``dispatch._load("triton")`` sets
``TRITON_INTERPRET=1`` first when there is no GPU.
"""

from __future__ import annotations

import functools
import os
from array import array

import torch
import triton
import triton.language as tl

from dpkernels.reference.bounds import TC_BLOCK_K_MAX

# The CPU interpreter runs a kernel once per program with numpy: it cannot autotune, and its
# tl.dot multiplies bfloat16 (stored as uint16) as integers, so operands are upcast first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# DPKERNELS_AUTOTUNE=0 (or the interpreter) keeps only the first config of every list.
AUTOTUNE = os.environ.get("DPKERNELS_AUTOTUNE", "1") != "0" and not INTERPRET

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autotune(configs: list[triton.Config], key: list[str], **kw):
    """``triton.autotune`` over ``configs`` (after the kernel's early pruning, which drops the
    configs that spill registers or overflow shared memory on sm_90: bench/compile_sm90.py).
    The interpreter keeps ``configs[:1]``; DPKERNELS_AUTOTUNE=0 on a GPU keeps the first
    config that survives the pruning."""
    if INTERPRET:
        return triton.autotune(configs=configs[:1], key=key, **kw)
    if not AUTOTUNE:
        by = dict(kw.get("prune_configs_by") or {})
        prune = by.get("early_config_prune")

        def first(configs, named_args, **kwargs):
            if prune is not None:
                configs = prune(configs, named_args, **kwargs)
            return configs[:1]

        by["early_config_prune"] = first
        kw["prune_configs_by"] = by
    return triton.autotune(configs=configs, key=key, **kw)


def keep_configs(keep, then=None):
    """An ``early_config_prune``: the configs (after the prune ``then``, if any) for which
    ``keep(config, args)`` holds, ``args`` being the launch's arguments by name; the first
    of them when none does.  The rules come from bench/compile_sm90.py's spill report."""

    def prune(configs, named_args, **kwargs):
        if then is not None:
            configs = then(configs, named_args, **kwargs)
        args = {**named_args, **kwargs}
        return [c for c in configs if keep(c, args)] or configs[:1]

    return prune


# Shared memory one program may use for its pipelined tl.dot operand tiles.  An H100 block
# gets at most 227 KB; the rest is left for layout-conversion scratch and the tf32x3 operand
# splits.  A config over it is at best a slow, spilling variant and at worst OutOfResources:
# either way seconds of compile time spent while tuning.
SMEM_BUDGET = 160 * 1024


def smem_prune(rows: str, cols: str, inner: str, ptr: str):
    """An ``early_config_prune`` for a kernel accumulating [rows, inner] @ [inner, cols] tiles
    (block sizes named by config keys) of the element type of tensor argument ``ptr``: drops
    the configs whose ``num_stages`` operand copies exceed SMEM_BUDGET, keeping the smallest
    when none fits."""

    def need(cfg: triton.Config, size: int) -> int:
        k = cfg.kwargs
        return cfg.num_stages * (k[rows] + k[cols]) * k[inner] * size

    def prune(configs, named_args, **kwargs):
        size = {**named_args, **kwargs}[ptr].element_size()
        fit = [c for c in configs if need(c, size) <= SMEM_BUDGET]
        return fit or [min(configs, key=lambda c: need(c, size))]

    return prune


def warps_prune(*blocks: str, per_thread: int = 32):
    """An ``early_config_prune`` for a kernel holding a few float32 tiles of the shape given by
    the constexpr arguments ``blocks``: drops the num_warps that would leave more than
    ``per_thread`` elements of each tile per thread (a [1, 16384] row on 4 warps is 128
    registers a tile: it spills, and ptxas takes long to find out), keeping the widest."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        tile = 1
        for b in blocks:
            tile *= args[b]
        fit = [c for c in configs if tile <= per_thread * 32 * c.num_warps]
        return fit or [max(configs, key=lambda c: c.num_warps)]

    return prune


def use_reference(*tensors: torch.Tensor | None) -> bool:
    """float64 inputs are the oracle's business: the launchers hand them to the reference."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def check_float(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dpkernels.ops.{name}: unsupported dtype {t.dtype}")


def same_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Operands of one tl.dot must share a dtype: promote when they differ (rare)."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t.to(dt) for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32 operands, following torch's own matmul setting.

    Default torch (allow_tf32=False) multiplies float32 exactly: "ieee".  When the user allows
    TF32 we still do not round norms or clipped sums to 10-bit mantissas (that could shrink a
    norm by ~1e-3 and weaken the clipping bound): "tf32x3" is float32-accurate on tensor cores.
    16-bit operands (whose products are exact in float32) get "tf32", tl.dot's default, which
    Triton ignores for them: the ordinary tensor-core path.
    """
    if dtype != torch.float32:
        return "tf32"
    if tf32_allowed() and not INTERPRET:
        return "tf32x3"
    return "ieee"


# What the norm kernels run in the interpreter (tests set "tf32x3" to run the GPU's split and
# scaling arithmetic on the CPU; numpy's products are exact there, its sums IEEE).
NORM_PRECISION_INTERPRET = "ieee"
_TC_BLOCK_K_MAX = tl.constexpr(TC_BLOCK_K_MAX)


def norm_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the *norm* kernels (``norm_mma``).  A norm only sets a clip
    factor, and its error is bounded (reference/bounds.dot_roundings), so float32 norms run on
    tensor cores whatever torch's TF32 setting ("tf32x3": an exact-enough two-part split), as
    fast as 16-bit ones and more accurately than FMA loops for long K; clipped sums keep
    ``dot_precision``."""
    if dtype != torch.float32:
        return "tf32"
    if INTERPRET:
        return NORM_PRECISION_INTERPRET
    # Triton takes TF32 dots on NVIDIA GPUs only (and one AMD chip): FMA loops elsewhere
    return "ieee" if torch.version.hip is not None else "tf32x3"


def tf32_allowed() -> bool:
    """Whether torch's float32 matmuls may use TF32.  torch >= 2.9 keeps the setting in
    ``matmul.fp32_precision`` (which also reflects the legacy ``allow_tf32``); reading
    ``allow_tf32`` there raises RuntimeError once the user has set the new API, so it is
    read only on older torch."""
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is not None:
        return prec == "tf32"
    return bool(matmul.allow_tf32)


# Kernels take the noise seed as a plain argument that Triton must not specialise: a 62-bit
# seed divisible by 16 would otherwise compile a second variant mid-training.
SEED_ARGS = ["seed"]


def philox_seed(seed: int) -> int:
    """The engine's seeds are 62-bit; tl.randn takes any integer up to 64 bits and keys Philox
    with both 32-bit halves, so only the sign bit is dropped (keeps it a valid int64)."""
    return int(seed) & (2**63 - 1)


# bench/trace_step.py sets this to size every grid for a card that is not there (an H200's
# 132 SMs) while it records launches instead of making them.
SM_COUNT: int | None = None


def num_sms(device: torch.device) -> int:
    if SM_COUNT is not None:
        return SM_COUNT
    return _device_sms(device)


@functools.cache
def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, enough to exercise the split paths


_PAIRS: dict[tuple[int, str], torch.Tensor] = {}


def upper_pairs(n: int, device: torch.device) -> torch.Tensor:
    """[n(n+1)/2, 2] int32 tile pairs (i, j), i <= j: the blocks of a symmetric T x T sum."""
    k = (n, str(device))
    if k not in _PAIRS:
        ij = torch.triu_indices(n, n)
        _PAIRS[k] = ij.t().contiguous().to(torch.int32).to(device)
    return _PAIRS[k]


# ---------------------------------------------------------------------------- table uploads
#
# The grouped ops read small tables (addresses, strides, constants) that each cost a
# host-to-device copy.  A caller that knows a later op's table in advance (the engine, at clip
# time, knows the clip op's bounds table and the weights' clipped-sum scaling table)
# ``stage_table``s it; the next ``device_table`` upload on that device carries every staged
# table along in the same copy, and a later ``device_table`` call whose table has exactly
# the bytes of a carried one gets that device copy instead of a copy of its own.  The match is
# on the full contents (every address, stride and constant, as the bytes the device holds), so
# a carried copy is never stale: a table that differs in anything (a tensor reallocated, a
# constant changed) is uploaded on its own, as without staging.  ``drop_staged`` forgets what
# was not used (the engine calls it after each micro-batch's clip factors and clipped sums).

_TABLE_CODES = {torch.int64: "q", torch.float32: "f"}
_TABLE_SIZES = {torch.int64: 8, torch.float32: 4}
_STAGED: dict[str, list[tuple]] = {}  # device -> [(dtype, shape, bytes)] awaiting an upload
_CARRIED: dict[tuple, torch.Tensor] = {}  # (device, dtype, shape, bytes) -> its device copy


def _table_key(rows: list, dtype: torch.dtype, device) -> tuple | None:
    """(device, dtype, shape, the bytes the device holds) of a rectangular table, or None
    when it cannot be packed (an unsupported dtype, ragged rows)."""
    code = _TABLE_CODES.get(dtype)
    if code is None or not rows:
        return None
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        return None
    try:
        data = array(code, [v for r in rows for v in r]).tobytes()
    except (OverflowError, TypeError):  # an int64 out of range: torch.tensor raises for it
        return None
    return str(torch.device(device)), dtype, (len(rows), width), data


def stage_table(rows: list, dtype: torch.dtype, device) -> None:
    """Announce a table that an op will upload later in this step: the next
    ``device_table`` upload on ``device`` copies it along."""
    key = _table_key(rows, dtype, device)
    if key is not None and key not in _CARRIED:
        _STAGED.setdefault(key[0], []).append(key)


def drop_staged() -> None:
    """Forget the staged and carried tables (the next uploads copy their own)."""
    _STAGED.clear()
    _CARRIED.clear()


def device_table(rows: list, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(rows, dtype=dtype)`` on ``device`` (rows: a list of equal-length lists):
    a carried copy with exactly these bytes if there is one (``stage_table``), otherwise one
    host-to-device copy that also carries the tables staged for ``device``."""
    key = _table_key(rows, dtype, device)
    if key is None:
        return torch.tensor(rows, dtype=dtype).to(device, non_blocking=True)
    hit = _CARRIED.pop(key, None)
    if hit is not None:
        return hit
    pack = [key] + [k for k in _STAGED.pop(key[0], []) if k != key]
    words: list[int] = []
    where = []
    for *_, data in pack:
        where.append(len(words))
        data = data + bytes(-len(data) % 16)  # every table 16-byte aligned
        words.extend(array("q", data))
    flat = torch.tensor(words, dtype=torch.int64).to(device, non_blocking=True)
    out = None
    for k, start in zip(pack, where):
        _, dt, shape, data = k
        n = len(data) // _TABLE_SIZES[dt]
        t = flat[start:start + (len(data) + 7) // 8].view(dt)[:n].view(shape)
        if out is None:
            out = t
        else:
            _CARRIED[k] = t
    return out


@triton.jit
def mma(x, y, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + x @ y`` with float32 accumulation."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _pow2_scale(m):
    """A power of two ``s`` (a normal float) with ``m * s`` in [1, 4) for a normal ``m`` >= 0
    (``s`` = 2^126 for 0 or a subnormal ``m``; inf and NaN give 2^-126), and the biased
    exponent ``e`` in [1, 253] with ``1 / s`` = 2^(e - 127)."""
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 1), 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True), e


@triton.jit
def _unscale(blk, ex, ey):
    """``blk[i, j] * 2^(ex[i] - 127) * 2^(ey[j] - 127)``, exactly unless the result overflows
    or underflows: the combined power of two is applied in two halves, each a normal float,
    so that no intermediate overflows or underflows before the result does."""
    e = ex[:, None] + ey[None, :] - 254  # in [-252, 252]
    h = e >> 1  # floor(e / 2), in [-126, 126]
    f1 = ((h + 127) << 23).to(tl.float32, bitcast=True)
    f2 = ((e - h + 127) << 23).to(tl.float32, bitcast=True)
    return (blk * f1) * f2


@triton.jit
def _tf32_split(x):
    """``(hi, lo)`` with ``hi`` = x rounded to TF32 (10 mantissa bits, to nearest, ties away
    from zero) and ``lo`` = x - hi (exact) truncated to TF32, as the tensor core reads it."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    lo = ((x - hi).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def norm_mma(x, y, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + x @ y`` for the norm kernels, with the error reference/bounds.dot_roundings
    charges.  "ieee": FMA loops, one rounding per product.  Otherwise this K-chunk (at most
    TC_BLOCK_K_MAX wide) goes to a fresh tensor-core accumulator and is added to ``acc`` with
    one IEEE rounding, so the tensor core's truncating accumulation never spans more than one
    chunk.  "tf32x3" (float32): rows of x and columns of y are scaled by powers of two to a
    largest element in [1, 4) (underflow inside the chunk becomes relative and negligible, and
    no low part is subnormal), each operand is split into two TF32 parts, and
    ``lo x hi + hi x lo + hi x hi`` is accumulated small terms first; the chunk is scaled
    back exactly (``_unscale``).  16-bit operands: their products are exact in float32."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    if PRECISION != "ieee":
        tl.static_assert(x.shape[1] <= _TC_BLOCK_K_MAX)
    if PRECISION == "ieee":
        out = tl.dot(x, y, acc, input_precision="ieee")
    elif PRECISION == "tf32x3":
        sx, ex = _pow2_scale(tl.max(tl.abs(x), axis=1))  # [M]
        sy, ey = _pow2_scale(tl.max(tl.abs(y), axis=0))  # [N]
        xh, xl = _tf32_split(x * sx[:, None])
        yh, yl = _tf32_split(y * sy[None, :])
        blk = tl.dot(xl, yh, input_precision="tf32")
        blk = tl.dot(xh, yl, blk, input_precision="tf32")
        blk = tl.dot(xh, yh, blk, input_precision="tf32")
        out = acc + _unscale(blk, ex, ey)
    else:
        blk = tl.dot(x, y)
        out = tl.fma(blk, 1.0, acc)  # not acc + blk: Triton folds that into tl.dot(x, y, acc)
    return out


@triton.jit
def tile_pair(pid, n_pairs, n_tiles2, pairs_ptr, SYMMETRIC: tl.constexpr):
    """(sample b, tile i, tile j) of program ``pid`` in a per-sample T1 x T2 tile grid: the
    upper triangle i <= j from the pair table when SYMMETRIC, all pairs otherwise."""
    b = pid // n_pairs
    q = pid % n_pairs
    if SYMMETRIC:
        ti = tl.load(pairs_ptr + 2 * q).to(tl.int64)
        tj = tl.load(pairs_ptr + 2 * q + 1).to(tl.int64)
    else:
        ti = q // n_tiles2
        tj = q % n_tiles2
    return b, ti, tj


@triton.jit
def gram_tile(x_ptr, sxb, sxt, sxk, y_ptr, syb, syt, syk, b, ri, rj, mi, mj, K,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """[BT, BT] float32 ``x_{b,ri} . y_{b,rj}``: one tile of a per-sample Gram matrix, reduced
    over K in BLOCK_K chunks, never leaving the chip."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # int64: k * stride may pass 2^31 (strided views)
    gram = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        mk = k < K
        x = tl.load(x_ptr + b * sxb + ri[:, None] * sxt + k[None, :] * sxk,
                    mask=mi[:, None] & mk[None, :], other=0.0)  # [BT, BK]
        y = tl.load(y_ptr + b * syb + k[:, None] * syk + rj[None, :] * syt,
                    mask=mk[:, None] & mj[None, :], other=0.0)  # [BK, BT]
        gram = norm_mma(x, y, gram, UPCAST, PRECISION)
    return gram


@triton.jit
def finish_store(x, offs, mask, out_ptr, acc_ptr, noise_std, seed, scale,
                 HAS_ACC: tl.constexpr, HAS_NOISE: tl.constexpr):
    """Store ``(acc + x + noise_std * z) * scale`` at element offsets ``offs`` (int64) of a
    contiguous float32 output.  ``z`` is Philox normal noise keyed by (seed, element offset):
    the same for every tiling, split and config, fresh for every seed."""
    if HAS_ACC:
        x += tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_NOISE:
        x += noise_std * tl.randn(seed, offs)
    x = x * scale
    tl.store(out_ptr + offs, x, mask=mask)


def prepare_out(acc: torch.Tensor | None, shape,
                device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, acc to read) for a clipped sum: in place into ``acc`` when it is a contiguous
    float32 tensor of the right size, otherwise a fresh float32 buffer."""
    numel = 1
    for s in shape:
        numel *= s
    if acc is not None:
        if acc.numel() != numel:
            raise ValueError(f"acc has {acc.numel()} elements, expected {numel} ({tuple(shape)})")
        if acc.dtype == torch.float32 and acc.is_contiguous():
            return acc, acc
        return torch.empty(acc.shape, dtype=torch.float32, device=device), acc.float().contiguous()
    return torch.empty(shape, dtype=torch.float32, device=device), None


def hand_back(out: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """Return ``acc`` (updated in place) when one was given, like the reference does."""
    if acc is None or out is acc:
        return out
    acc.copy_(out.reshape(acc.shape))
    return acc
