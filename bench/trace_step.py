"""Trace one training step on a CPU, with no GPU, and ESTIMATE its time on an H200.

What it does: builds a bench model (bench/models.py) under torch's FakeTensorMode (full-size
tensors with shapes and dtypes but no data, so a gpt step costs seconds, not minutes), runs
one DP step (``make_private(..., backend="triton")``: zero_grad, forward, loss, backward,
``dp_opt.step()``) and one non-private step of the same model and batch, and records

* every **Triton launch**: the launchers run for real (checks, allocations, grid sizing for
  an H200's 132 SMs, autotune config lists as on a GPU) but ``kernel[grid](...)`` records the
  kernel's name, grid, the config an autotuner would start from, the bytes of its tensor
  arguments and its FLOPs instead of launching;
* every **torch op** through a TorchDispatchMode: ops that launch a kernel on a GPU (views,
  ``empty`` and metadata queries do not), their bytes and FLOPs, and allocations.

Each kernel is then costed with a roofline: ``max(bytes / HBM, FLOPs / rate, floor)`` with the
rates named below (ANCHORS.md's measured H200 figures where there is one, stated assumptions
otherwise); host time is a fixed cost per launch; the step estimate is ``max(device, host)``
(perfect overlap).  Every figure this script prints is an ESTIMATE from a model, never a
measurement: confirm on a GPU with bench/e2e.py.

    python bench/trace_step.py                          # gpt B16 T256 fp32 + bf16, mlp B1024
    python bench/trace_step.py --cases gpt:fp32:16:256 --kernels   # per-kernel table
    python bench/trace_step.py --out-prefix bench/results/2026-12-02-trace-main

Writes ``<prefix>.csv`` (one row per case and mode) and ``<prefix>.md`` (the tables) when
``--out-prefix`` is given.  Needs triton importable (not its interpreter) and no GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Launchers must size for the GPU, not for the interpreter: triton is imported before
# dpkernels, without TRITON_INTERPRET, and autotune config lists are kept whole.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["DPKERNELS_AUTOTUNE"] = "1"

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from bench import common  # noqa: E402
from bench.e2e import MODELS  # noqa: E402
from bench.models import spec  # noqa: E402

# ---------------------------------------------------------------------------- the card model

CARD = "H200"
SMS = 132
HBM_BYTES_PER_S = 4.2e12  # ANCHORS.md: measured device-copy bandwidth on the H200
BF16_FLOPS = 790e12  # ANCHORS.md: measured bf16 GEMM (dense, tensor cores)
TF32_FLOPS = BF16_FLOPS / 2  # tensor-core tf32 runs at half the 16-bit rate
# cuBLAS SGEMM (no TF32), calibrated: the rate at which this model's non-private fp32 gpt
# B16 T256 step (1.4 TFLOP) comes to the 36.3 ms ANCHORS.md measured.  (ANCHORS.md measured
# ~25 on one shape and notes the step implies >= 39; the H200's fp32 FMA peak is ~67.)
FP32_GEMM_FLOPS = 39e12
# Triton tl.dot with input_precision="ieee" runs on FMA units; only 32x32 tiles build without
# spills (issue 9's ptxas review).  ASSUMED to reach this share of cuBLAS SGEMM.
TRITON_FMA_SHARE = 0.5
# Triton 16-bit tl.dot (wgmma) against cuBLAS: ASSUMED share of the measured GEMM rate.
TRITON_TC_SHARE = 0.8
# float32 non-FMA ALU/INT operations per second (132 SMs x 128 lanes x 1.98 GHz): what the norm
# kernels' float32 split (ops/_common.norm_mma: row scaling, TF32 split, scaling back, ~12
# operations per operand element and 9 per output element of a chunk) runs at, ASSUMED not to
# overlap the tensor-core work at all.
FP32_ALU_OPS = 33.5e12
# the kernels whose float32 dots go through norm_mma's split
SPLIT_NORM_KERNELS = {"_ghost_many_kernel", "_embedding_many_kernel", "_linear_ghost_kernel",
                      "_direct_many_kernel",
                      "_linear_direct_kernel", "_embedding_ghost_kernel", "_conv_ghost_kernel",
                      "_conv_direct_kernel"}
KERNEL_FLOOR_S = 2.5e-6  # least device time of any kernel, launch gap included (assumed)
# Host time per kernel-launching eager torch op, Python and autograd around it included,
# calibrated: ANCHORS.md's non-private gpt bf16 step (11.1 ms, 332 ops here, host-bound) and
# mlp B1024 step (0.92 ms, 25 ops) both give ~33 us per op.
HOST_TORCH_OP_S = 33e-6
# Host time per Triton launch: the launcher's Python, triton's argument binding and
# specialisation key, the autotuner's lookup (ASSUMED; torch ops the launcher makes are
# counted as torch ops).
HOST_TRITON_LAUNCH_S = 40e-6

# Torch ops that launch no kernel on a GPU (besides every view op, which OpOverload.is_view
# reports): allocation, metadata, aliasing.
NO_KERNEL = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach",
    "alias", "_local_scalar_dense", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "set_", "resize_", "device",
    "_has_compatible_shallow_copy_type", "_unsafe_view", "promote_types",
}
ALLOCATING = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


@dataclass
class Launch:
    kind: str  # "triton" or "torch"
    name: str
    phase: str
    bytes: float
    flops: float
    rate: float  # FLOP/s this kernel's FLOPs run at
    grid: tuple = ()
    config: str = ""

    @property
    def seconds(self) -> float:
        t = self.bytes / HBM_BYTES_PER_S
        if self.flops:
            t = max(t, self.flops / self.rate)
        return max(t, KERNEL_FLOOR_S)


@dataclass
class Trace:
    launches: list[Launch] = field(default_factory=list)
    allocations: int = 0
    syncs: int = 0  # device-to-host reads (.item(), bool(tensor)): each stalls the host
    phase: str = "setup"

    def count(self, kind: str | None = None, phase: str | None = None) -> int:
        return sum(1 for x in self.launches
                   if (kind is None or x.kind == kind) and (phase is None or x.phase == phase))

    def device_s(self) -> float:
        return sum(x.seconds for x in self.launches)

    def host_s(self) -> float:
        return (self.count("torch") * HOST_TORCH_OP_S
                + self.count("triton") * HOST_TRITON_LAUNCH_S)

    def step_s(self) -> float:
        return max(self.device_s(), self.host_s())


TRACE: Trace | None = None


def _nbytes(xs) -> float:
    seen, total = set(), 0
    for x in xs:
        if isinstance(x, torch.Tensor) and id(x) not in seen:
            seen.add(id(x))
            total += x.numel() * x.element_size()
    return float(total)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


# ---------------------------------------------------------------------------- torch ops


def _gemm_rate(dtype: torch.dtype) -> float:
    return BF16_FLOPS if dtype in (torch.bfloat16, torch.float16) else FP32_GEMM_FLOPS


def _torch_flops(name: str, args, out) -> float:
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        return 2.0 * a.numel() * b.shape[-1]
    if name.startswith("_scaled_dot_product") and isinstance(args[0], torch.Tensor):
        q, k = args[0], args[1]
        if "backward" in name:  # grad_out, q, k, v, ...
            q, k = args[1], args[2]
        B, H, T, D = q.shape
        f = 4.0 * B * H * T * k.shape[-2] * D
        causal = any(a is True for a in args[3:])
        f *= 0.5 if causal else 1.0
        return f * (2.5 if "backward" in name else 1.0)
    return 0.0


class CountOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tr = TRACE
        if name == "_local_scalar_dense":
            # a host sync (.item(), bool(t)): fake tensors hold no value, so the trace answers
            # 1 / True, the value of a healthy step (all norms finite, no stale gradient)
            if tr is not None:
                tr.syncs += 1
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        if tr is None:
            return out
        if name in ("lift_fresh", "lift_fresh_copy"):
            # torch.tensor(data): on a GPU a host-to-device copy (the grouped ops' tables)
            tr.launches.append(Launch("torch", "h2d_copy", tr.phase, _nbytes([out]), 0.0, 1.0))
            return out
        if name in ALLOCATING:
            tr.allocations += 1
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        outs = list(_tensors(out))
        if (getattr(func, "is_view", False) or name in NO_KERNEL
                or not (outs or name.endswith("_"))  # in-place foreach ops return nothing
                or func.namespace != "aten" or name.startswith("_record_function")):
            return out
        if not name.endswith("_") and "out" not in kwargs:
            tr.allocations += len(outs)
        flops = _torch_flops(name, args, out)
        dt = ins[0].dtype if ins else torch.float32
        tr.launches.append(Launch("torch", name, tr.phase, _nbytes(ins + outs), flops,
                                  _gemm_rate(dt)))
        return out


# ---------------------------------------------------------------------------- Triton launches


def _base(fn):
    while not hasattr(fn, "__name__") or isinstance(fn, Autotuner):
        fn = fn.fn
    return fn


def _split_alu_share(name: str, kw) -> float:
    """ALU time of norm_mma's float32 split per unit of its tensor-core time, for the chunk
    shape of ``name`` (operands M x K and K x N, output M x N)."""
    if name in ("_linear_direct_kernel", "_conv_direct_kernel", "_direct_many_kernel"):
        M, N, K = kw.get("BLOCK_P", 64), kw.get("BLOCK_D", 64), kw.get("BLOCK_T", 32)
    else:
        M = N = kw.get("BLOCK_T", 64)
        K = kw.get("BLOCK_K", 32)
    alu_s = (12.0 * (M * K + K * N) + 9.0 * M * N) / FP32_ALU_OPS
    tc_s = 6.0 * M * N * K / (TF32_FLOPS * TRITON_TC_SHARE)
    return alu_s / tc_s


def _dot_rate(kw, name: str = "") -> float:
    a = kw.get("a_ptr", kw.get("a1_ptr", kw.get("g1_ptr")))
    if a is not None and a.dtype in (torch.bfloat16, torch.float16):
        return BF16_FLOPS * TRITON_TC_SHARE
    if str(kw.get("TYPE")) in ("bf16", "fp16"):  # table-driven kernels name their dtype
        return BF16_FLOPS * TRITON_TC_SHARE
    if kw.get("PRECISION") == "tf32x3":
        rate = TF32_FLOPS * TRITON_TC_SHARE / 3
        if name in SPLIT_NORM_KERNELS:
            rate /= 1.0 + _split_alu_share(name, kw)
        return rate
    return FP32_GEMM_FLOPS * TRITON_FMA_SHARE


def _triton_flops(name: str, kw, programs: int) -> float:
    if name == "_linear_clipped_sum_kernel":
        return 2.0 * kw["R"] * kw["p"] * kw["d"] * (2 if kw["HILO"] else 1)
    if name == "_linear_ghost_kernel":
        bt = kw["BLOCK_T"]
        return programs * 2.0 * bt * bt * (kw["d"] + kw["p"])
    if name == "_linear_direct_kernel":
        return (programs * 2.0 * kw["T1"] * kw["BLOCK_P"] * kw["BLOCK_D"]
                * (2 if kw["SECOND"] else 1))
    if name == "_embedding_ghost_kernel":
        bt = kw["BLOCK_T"]
        return programs * 2.0 * bt * bt * kw["p"]
    return 0.0


def _config(kernel, kw):
    """The config an autotuner would keep first after its pruning (what a launch with tuning
    off runs); the estimate's costs do not depend on it, only the grid may."""
    if not isinstance(kernel, Autotuner):
        return None
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, kw)
    return configs[-1]


def _record_launch(self, grid):
    def launch(*args, **kw):
        if args:
            raise RuntimeError("dpkernels launchers pass keyword arguments only")
        cfg = _config(self, kw)
        meta = dict(kw)
        if cfg is not None:
            meta.update(cfg.kwargs)
        g = grid(meta) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(g))
        programs = g[0] * g[1] * g[2]
        name = _base(self).__name__
        desc = ""
        if cfg is not None:
            desc = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            desc += f" w{cfg.num_warps} s{cfg.num_stages}"
        nbytes, flops = _nbytes(_tensors(kw)), _triton_flops(name, meta, programs)
        if name in NOTED_KERNELS:  # the operands its table points at: noted by the launcher
            nbytes, flops = _NOTED.pop()
        tr = TRACE
        if tr is not None:
            tr.launches.append(Launch("triton", name, tr.phase, nbytes, flops,
                                      _dot_rate(meta, name), g, desc))

    return launch


# ---------------------------------------------------------------------------- driver


# (bytes, FLOPs) that the launchers of table-driven kernels note before a launch: the table's
# contents (the operands' addresses and shapes) cannot be read from a traced launch's fake
# tensors
NOTED_KERNELS = {"_ghost_many_kernel", "_row_product_many_kernel", "_bias_many_kernel",
                 "_embedding_many_kernel", "_direct_many_kernel"}
_NOTED: list[tuple[float, float]] = []


def _install() -> None:
    from dpkernels import dispatch
    from dpkernels.ops import _common, ghost_many

    KernelInterface.__getitem__ = _record_launch
    _common.SM_COUNT = SMS
    ghost_many._note_cost = lambda nbytes, flops: _NOTED.append((nbytes, flops))
    # The launchers run on (fake) CPU tensors; nothing is launched, so Triton "runs" there.
    dispatch.triton_available = lambda device_type: (True, "")
    # Fake tensors all report data_ptr() 0, so the address tables of layers of one shape came
    # out byte-identical and table staging (ops/_common.py device_table) took them for one
    # table: an address per storage, as real tensors have, keeps them apart.
    FakeTensor.data_ptr = _fake_data_ptr


def _fake_data_ptr(self) -> int:
    return self.untyped_storage()._cdata + self.storage_offset() * self.element_size()


def trace_case(model_name: str, dtype: str, batch: int, seq: int | None,
               private: bool) -> Trace:
    global TRACE
    import dpkernels

    if model_name not in MODELS:
        raise SystemExit(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    arch, sizes = MODELS[model_name]
    if seq is not None and arch in ("gpt", "hf-gpt2", "hf-llama"):
        sizes = {**sizes, "seq": max(seq, sizes.get("seq", 0))}  # position table long enough
    sp = spec(arch, **sizes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else None
    with FakeTensorMode(allow_non_fake_inputs=False), warnings.catch_warnings():
        # the grouped ops put tensor addresses in a table: harmless on fake tensors (the
        # kernels are not launched), but torch warns about it
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        torch.manual_seed(0)
        model = sp.model()
        x, y = sp.batch(batch, seq)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
        if private:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = dpkernels.make_private(model, opt, noise_multiplier=1.0,
                                             max_grad_norm=1.0, expected_batch_size=batch,
                                             backend="triton", seed=0)
        tr = TRACE = Trace()
        with CountOps():
            tr.phase = "forward"
            opt.zero_grad()
            if autocast is not None:
                with autocast:
                    loss = sp.loss(model(x), y)
            else:
                loss = sp.loss(model(x), y)
            tr.phase = "backward"
            loss.backward()
            tr.phase = "step"
            opt.step()
        TRACE = None
        if private:
            dpkernels.detach(model)
    return tr


CASES = {"default": ["gpt:fp32:16:256", "gpt:bf16:16:256", "mlp:fp32:1024"],
         # ANCHORS.md's long-sequence row: the norms take the direct form there
         "long": ["gpt:fp32:2:2048", "gpt:bf16:2:2048"]}
COLUMNS = ["date", "card", "torch", "triton", "git_sha", "model", "dtype", "batch", "seq",
           "mode", "triton_launches", "torch_kernels", "extra_launches", "allocations",
           "gbytes", "tflop", "est_device_ms", "est_host_ms", "est_step_ms", "est_ratio"]


def parse_case(s: str):
    parts = s.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"--cases item {s!r}: expected model:dtype:batch[:seq]")
    model, dtype, b = parts[:3]
    if dtype not in ("fp32", "bf16"):
        raise SystemExit(f"--cases item {s!r}: dtype must be fp32 or bf16")
    return model, dtype, int(b), int(parts[3]) if len(parts) == 4 else None


def kernel_table(tr: Trace, top: int = 25) -> list[list[str]]:
    agg: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for x in tr.launches:
        a = agg[(x.kind, x.name, x.phase)]
        a[0] += 1
        a[1] += x.seconds
        a[2] += x.bytes
        a[3] += x.flops
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return [[k[0], k[1], k[2], str(v[0]), f"{v[1] * 1e3:.3f}", f"{v[2] / 1e9:.3f}",
             f"{v[3] / 1e12:.3f}"] for k, v in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="default",
                    help="comma-separated model:dtype:batch[:seq] items, or a preset: "
                         "'default', 'long'")
    ap.add_argument("--out-prefix", help="write <prefix>.csv and <prefix>.md")
    ap.add_argument("--kernels", action="store_true", help="print the per-kernel tables")
    ap.add_argument("--label", default="", help="a note for the markdown header")
    args = ap.parse_args(argv)
    _install()
    items = []
    for c in args.cases.split(","):
        items += CASES.get(c, [c])
    date, sha = common.now_utc(), common.git_sha()
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    rows, md = [], []
    md.append(f"# Step trace: an ESTIMATE for an {CARD}, not a measurement\n")
    md.append(f"{date}, commit {sha}, {versions}. {args.label}\n")
    md.append(
        "Made by `bench/trace_step.py` on a CPU (no GPU): one step traced with fake tensors, "
        "Triton launchers sizing grids for 132 SMs without launching; each kernel costed "
        f"max(bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / rate, "
        f"{KERNEL_FLOOR_S * 1e6:.1f} us); rates: bf16 {BF16_FLOPS / 1e12:.0f}, fp32 cuBLAS "
        f"{FP32_GEMM_FLOPS / 1e12:.0f}, Triton fp32 ieee x{TRITON_FMA_SHARE}, Triton 16-bit "
        f"x{TRITON_TC_SHARE} TFLOP/s, Triton tf32x3 (3 TF32 dots) at TF32 "
        f"{TF32_FLOPS / 1e12:.0f} x{TRITON_TC_SHARE} / 3, the norm kernels' float32 split "
        f"slowed further by its ALU work at {FP32_ALU_OPS / 1e12:.1f} Tops/s, not overlapped; "
        f"host {HOST_TORCH_OP_S * 1e6:.0f} us per torch op, "
        f"{HOST_TRITON_LAUNCH_S * 1e6:.0f} us per Triton launch; step = max(device, host).\n")
    md.append("| model | dtype | B | T | mode | Triton launches | torch kernels | extra launches "
              "| allocations | GB | TFLOP | est. device ms | est. host ms | est. step ms "
              "| est. ratio |")
    md.append("| --- " * 15 + "|")
    tables = []
    for item in items:
        model, dtype, b, seq = parse_case(item)
        base = trace_case(model, dtype, b, seq, private=False)
        dp = trace_case(model, dtype, b, seq, private=True)
        for mode, tr in (("nonprivate", base), ("dpkernels", dp)):
            extra = len(tr.launches) - len(base.launches)
            row = {
                "date": date, "card": CARD, "torch": torch.__version__,
                "triton": triton.__version__, "git_sha": sha, "model": model, "dtype": dtype,
                "batch": b, "seq": seq or "", "mode": mode,
                "triton_launches": tr.count("triton"), "torch_kernels": tr.count("torch"),
                "extra_launches": extra, "allocations": tr.allocations,
                "gbytes": f"{sum(x.bytes for x in tr.launches) / 1e9:.2f}",
                "tflop": f"{sum(x.flops for x in tr.launches) / 1e12:.3f}",
                "est_device_ms": f"{tr.device_s() * 1e3:.2f}",
                "est_host_ms": f"{tr.host_s() * 1e3:.2f}",
                "est_step_ms": f"{tr.step_s() * 1e3:.2f}",
                "est_ratio": f"{tr.step_s() / base.step_s():.3f}",
            }
            rows.append(row)
            md.append("| " + " | ".join(str(row[k]) for k in (
                "model", "dtype", "batch", "seq", "mode", "triton_launches", "torch_kernels",
                "extra_launches", "allocations", "gbytes", "tflop", "est_device_ms",
                "est_host_ms", "est_step_ms", "est_ratio")) + " |")
            phases = ", ".join(f"{p} {tr.count(phase=p)}" for p in ("forward", "backward", "step"))
            print(f"{model} {dtype} B{b}{' T' + str(seq) if seq else ''} {mode}: "
                  f"{tr.count('triton')} Triton + {tr.count('torch')} torch kernels "
                  f"({phases}; {extra:+d} vs non-private), {tr.allocations} allocations, "
                  f"{tr.syncs} host syncs, "
                  f"ESTIMATED device {tr.device_s() * 1e3:.2f} ms, host "
                  f"{tr.host_s() * 1e3:.2f} ms, step {tr.step_s() * 1e3:.2f} ms, "
                  f"ratio {tr.step_s() / base.step_s():.3f}x (estimate)")
            if mode == "dpkernels":
                tables.append((item, kernel_table(tr)))
    header = ["kind", "kernel", "phase", "launches", "est. ms", "GB", "TFLOP"]
    for item, t in tables:
        md.append(f"\n## {item}: DP step, costliest kernels (estimate)\n")
        md.append("| " + " | ".join(header) + " |")
        md.append("| --- " * len(header) + "|")
        md += ["| " + " | ".join(r) + " |" for r in t]
        if args.kernels:
            print(f"\n{item} (DP step, estimate):")
            common.print_table(header, t)
    if args.out_prefix:
        prefix = Path(args.out_prefix)
        csv_path = prefix.with_suffix(".csv")
        common.check_csv(csv_path, COLUMNS)
        for row in rows:
            common.append_row(csv_path, COLUMNS, row)
        prefix.with_suffix(".md").write_text("\n".join(md) + "\n")
        print(f"wrote {csv_path} and {prefix.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
