"""Compile every dpkernels Triton kernel variant for sm_90 (H100/H200) on a machine with no
GPU, and report shared memory, registers and spills per variant.

The CPU interpreter does not check what the real compiler does (power-of-two aranges, dot
shapes and dtypes, shared-memory and register budgets, int32 overflow in addresses), and device
time is scarce, so run this before a GPU session.  It fakes the driver (target cuda/90),
calls the real launchers on CPU tensors and compiles each autotune config (after the kernel's
own early pruning) without launching.  Two sources of launches:

* **models**: one DP step of each ANCHORS.md bench model (gpt B16 T256 fp32 and bf16, gpt
  B64 T256 fp32, gpt B2 T2048 fp32 and bf16, cnn B256, mlp B1024), traced as
  bench/trace_step.py does
  (fake tensors, launchers sizing grids for an H200's 132 SMs); every launch is replayed on
  small real tensors of the same dtypes with the same scalar arguments, so each variant the
  bench models launch is compiled;
* **shapes**: a fixed list of odd shapes, every op, float32/bf16/fp16, TF32 on and off.

Every variant is compiled with ``ptxas -v`` for sm_90a; the table lists registers, spill
stores and spill loads per variant (a stack frame without spill stores is call frames: the
Philox normal's math calls).

Use the triton the GPU machine has (3.6 at the time of writing), next to any torch:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > /tmp/t36/lib/python3.11/site-packages/zz_torch.pth   # reuse this venv's torch
    /tmp/t36/bin/python bench/compile_sm90.py --out bench/results/<date>-compile-sm90.md

``--only models`` or ``--only shapes`` runs one source (the models alone take a few minutes
on 2 cores, everything 20-30 with a cold cache; compiled kernels are cached in
$TRITON_CACHE_DIR).  Exit status 1 if any variant fails to compile or spills, if a norm
kernel's tensor-core chunk accumulates into anything but zero (``chunk_check``), or if a
clip-path kernel's PTX flushes subnormals (``FTZ_FREE``).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback
import warnings

os.environ.pop("TRITON_INTERPRET", None)
os.environ["DPKERNELS_AUTOTUNE"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dpk-sm90-cache"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

print("triton", triton.__version__, triton.__file__)


class Fake:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(Fake())
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
SEEN = {}
FAIL = []
orig = JITFunction.run


def res_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    line = [ln for ln in out.splitlines() if "REG:" in ln]
    return line[0].strip() if line else out[-200:]


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")


def spill_report(ptx: str) -> str:
    """ptxas -v's register and spill line: a stack frame alone may be call frames (the Philox
    normal's math calls), spill stores are what count."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    lines = [ln.split("ptxas info    :")[-1].strip() for ln in out.stderr.splitlines()
             if "spill" in ln or "Used" in ln]
    return "; ".join(lines) or out.stderr[-300:]


def _field(ru: str, name: str) -> int:
    m = re.search(name + r":(\d+)", ru)
    return int(m.group(1)) if m else 0


def _spill(ru: str, what: str) -> int:
    m = re.search(r"(\d+) bytes spill " + what, ru)
    return int(m.group(1)) if m else 0


# Kernels whose tensor-core dots compute norms through ops/_common.norm_mma: every chunk must
# start from a zero accumulator (or continue a chain of dots of the same chunk), never from
# the running Gram or W tile, or the cancellation bounds (reference/bounds.dot_roundings) do
# not hold.  Triton folds ``acc + tl.dot(x, y)`` into ``tl.dot(x, y, acc)``; norm_mma avoids
# that form, and this check reads the compiled TTGIR to make sure no compiler does it anyway.
NORM_KERNELS = {"_ghost_many_kernel", "_embedding_many_kernel", "_linear_ghost_kernel",
                "_direct_many_kernel",
                "_linear_direct_kernel", "_embedding_ghost_kernel", "_conv_ghost_kernel",
                "_conv_direct_kernel"}
CHUNK_FAIL: list[tuple] = []
# Kernels on the clip path whose float32 arithmetic must keep subnormals (the bounds treat a
# flush as an error of eta only where a tensor core may do it): no ``.ftz`` instruction in
# their PTX (Triton sets FTZ for libdevice calls; plain add/mul/fma/div.rn/sqrt.rn keep
# subnormals).
FTZ_FREE = NORM_KERNELS | {"_clip_from_parts_kernel", "_clip_factors_kernel",
                           "_magnitude_many_kernel", "_row_product_many_kernel"}
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")


def chunk_check(ttgir: str) -> str | None:
    """None when every tensor-core dot of ``ttgir`` accumulates into a zero constant or into
    the result of another dot of the same chunk, at most 3 dots per chain (norm_mma's float32
    split); otherwise the offending line."""
    zeros, depth, bad, n = set(), {}, None, 0
    for line in ttgir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        operands = [o.split("#")[0] for o in re.findall(r"%[\w.#]+", rest.split("{")[0])]
        if op == "arith.constant" and re.match(r"dense<0\.0+e\+00>", rest):
            zeros.add(name)
        elif op in ("ttng.warp_group_dot", "tt.dot"):
            n += 1
            acc = operands[2] if len(operands) > 2 else None
            d = 1 if acc in zeros else depth.get(acc, 0) + 1 if acc in depth else None
            if (d is None or d > 3) and bad is None:
                bad = line.strip()[:200]
            depth[name] = d or 99
        elif op in ("ttng.warp_group_dot_wait", "ttg.convert_layout") and operands and (
                operands[0] in depth):
            depth[name] = depth[operands[0]]
    if n == 0:
        return "no tensor-core dot found"
    return bad


PHASE = "shapes"  # which source the launches come from now
SOURCES: dict[tuple, set] = {}


def run(self, *args, grid, warmup, **kwargs):
    ce = {k: v for k, v in kwargs.items() if k.isupper() and not isinstance(v, torch.Tensor)}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    tag = (self.__name__, tuple(sorted(ce.items())), tuple(sorted(opts.items())),
           tuple(str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor))[:2])
    SOURCES.setdefault(tag, set()).add(PHASE)
    try:
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        FAIL.append((tag, "".join(traceback.format_exception_only(e))[-1500:]))
        print("FAIL", tag, str(e)[-1500:], flush=True)
        return None
    if tag not in SEEN:
        if self.__name__ in NORM_KERNELS and ce.get("PRECISION", "ieee") != "ieee":
            bad = chunk_check(k.asm["ttgir"])
            if bad:
                CHUNK_FAIL.append((tag, bad))
                print("CHUNK", tag, bad, flush=True)
        if self.__name__ in FTZ_FREE:
            ftz = sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*",
                                        k.asm["ptx"])))
            if ftz:
                CHUNK_FAIL.append((tag, "flushes subnormals: " + ", ".join(ftz)))
                print("FTZ", tag, ftz, flush=True)
        ru = res_usage(k.asm["cubin"])
        if _field(ru, "STACK") or _field(ru, "LOCAL"):
            ru += " | " + spill_report(k.asm["ptx"])
        SEEN[tag] = (k.metadata.shared, ru)
        print(f"ok {tag} shared={k.metadata.shared} {ru}", flush=True)
    return k


def at_run(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    dropped = [c for c in self.configs if c not in configs]
    if dropped:
        print("pruned", self.base_fn.__name__, [str(c) for c in dropped], flush=True)
    for c in configs:
        self.fn.run(*args, **kwargs, **c.all_kwargs())
    self.nargs = None


JITFunction.run = run
Autotuner.run = at_run

from dpkernels.ops import (  # noqa: E402
    _common,
    clip_many,
    conv,
    dense,
    embedding,
    ghost_many,
    linear,
    norm_parts,
    norms,
)

assert not _common.INTERPRET and _common.AUTOTUNE


def R(*s, dt=torch.float32):
    return torch.randn(*s).to(dt)


def shapes() -> None:
    """Every op on a fixed list of odd shapes, each dtype, TF32 off and on."""
    for dt in [torch.float32, torch.bfloat16, torch.float16]:
        for B, T, d, p in [(4, 300, 257, 190), (2, 1, 1024, 1000), (3, 77, 768, 2304)]:
            a, g = R(B, T, d, dt=dt), R(B, T, p, dt=dt)
            for m in ["ghost", "direct"]:
                linear.linear_norm(a, g, m)
                linear.linear_norms(a, g, m, True)
            linear.linear_cross(a, g, R(B, T + 5, d, dt=dt), R(B, T + 5, p, dt=dt))
            linear.linear_cross(a[:, :5], g[:, :5], a[:, :9], g[:, :9])
            linear.linear_bias_norm(g)
        ghost_many.linear_norms_many(
            [(R(4, 300, 257, dt=dt), R(4, 300, 190, dt=dt), "ghost", True),
             (R(4, 77, 768, dt=dt), R(4, 77, 16384, dt=dt), "ghost", False),
             (R(4, 1, 1024, dt=dt), R(4, 1, 1000, dt=dt), "auto", True)])
        ghost_many.linear_norms_many([(R(4, 40, 257, dt=dt), R(4, 40, 190, dt=dt), "ghost", True),
                                      (None, R(4, 16, 768, dt=dt), "auto", True),
                                      (torch.randint(0, 100, (4, 300)), R(4, 300, 768, dt=dt),
                                       "embedding", 0),
                                      (torch.randint(0, 100, (4, 40)), R(4, 40, 64, dt=dt),
                                       "embedding", None)])
        a, g, c = R(16, 256, 768, dt=dt), R(16, 256, 768, dt=dt), torch.rand(16)
        linear.linear_clipped_sum(a, g, c)
        linear.linear_clipped_sum(a, g, c, torch.randn(768, 768), 0.5, 2**61 + 5, 0.5)
        linear.clipped_sum(a, g, c, None, 0.7, 5, 1.0, split=2)
        linear.linear_clipped_sum_many([(a, g), (R(16, 30, 100, dt=dt), R(16, 30, 50, dt=dt))], c,
                                       [None, torch.randn(50, 100)])
        linear.linear_bias_clipped_sum(g, c, torch.randn(768), 0.3, 2**40, 0.5)
        dense.dense_clipped_sum(R(16, 3, 5, 7, dt=dt), c, None, 1.0, 3, 1.0)
        ids = torch.randint(0, 100, (4, 300))
        embedding.embedding_norm(ids, R(4, 300, 64, dt=dt), 0)
        embedding.embedding_cross(ids, R(4, 300, 64, dt=dt), ids[:, :70], R(4, 70, 64, dt=dt))
        embedding.embedding_clipped_sum(ids, R(4, 300, 64, dt=dt), torch.rand(4), 100, 0, None,
                                        0.5, 7, 0.5)
        for N in [768, 16384]:
            x = R(4, 33, N, dt=dt)
            norms.layer_norm_psg(x, x, (N,), 1e-5)
            norms.layer_norm_psg(x, x, (N,), 1e-5, True, False)
            norms.layer_norm_psg(x, x, (N,), 1e-5, False, True)
            norms.rms_norm_psg(x, x, (N,))
            norm_parts.layer_norm_psg_parts(x, x, (N,), 1e-5)
            norm_parts.layer_norm_psg_parts(x, x, (N,), 1e-5, True, False)
            norm_parts.rms_norm_psg_parts(x, x, (N,))
        for shape, G in [((4, 64, 32, 32), 32), ((2, 4096, 3), 1), ((3, 8, 5), 8)]:
            x = R(*shape, dt=dt)
            norms.group_norm_psg(x, x, G, 1e-5)
            norms.group_norm_psg(x, x, G, 1e-5, False, True)
        dense.add_noise(torch.zeros(1000), 0.7, 11, 2.0)
        dense.add_noise_many([torch.zeros(1000), torch.zeros(3, 5)], 0.7, [11, 2**61 + 3], 2.0)
        dense.rows_clipped_sum_many(
            [(R(16, 256, 768, dt=dt), (768,)), (R(16, 1, 300, dt=dt), (300,))],
            c, [None, torch.randn(300)])
        dense.dense_norm(R(16, 768, dt=dt))
        dense.dense_norm_many([R(16, 768, dt=dt), R(16, 2, 300, dt=dt)[:, 1]])
        for xs, ws, st, pad, dil, grp in [
                ((2, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1),
                ((2, 32, 9, 9), (32, 1, 3, 3), (2, 2), (1, 1), (1, 1), 32),
                ((2, 6, 20), (8, 3, 5), (1,), (4,), (2,), 2),
                ((1, 4, 5, 6, 7), (6, 4, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)]:
            x = R(*xs, dt=dt)
            fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
                  5: torch.nn.functional.conv3d}[len(xs)]
            y = fn(x.float(), torch.randn(ws), stride=st, padding=pad, dilation=dil, groups=grp)
            g = R(*y.shape, dt=dt)
            for m in ["ghost", "direct"]:
                conv.conv_norm(x, g, ws, st, pad, dil, grp, m)
            conv.conv_clipped_sum(x, g, torch.rand(xs[0]), ws, st, pad, dil, grp, None, 0.5, 9, 0.5)

    for B in (16, 3000):
        # the bounds' table with constant factors (an embedding's T in its underflow term)
        clip_many.clip_from_parts(torch.rand(5, B), [torch.rand(B)], torch.rand(3, B),
                                  torch.rand(2, B), [(0, 1e-4, 1e-5), (2, 2e-4, 1e-5)],
                                  [(1, 2, 1e-4), (12.0, 1, 2.0**-126)], 16.0, 2.0**-16, 1.0)
        clip_many.clip_from_parts(torch.rand(5, B), [], None, None, [], [], 1.0, 2.0**-16, 1.0)

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    a, g, c = R(3, 200, 300), R(3, 200, 260), torch.rand(3)
    for m in ["ghost", "direct"]:
        linear.linear_norm(a, g, m)
        linear.linear_norms(a, g, m, True)
    linear.linear_clipped_sum(a, g, c)
    linear.linear_clipped_sum(R(16, 256, 768), R(16, 256, 768), torch.rand(16))
    ghost_many.linear_norms_many([(a, g, "ghost", True), (a[:, :40], g[:, :40], "ghost", True),
                                  (torch.randint(0, 100, (3, 200)), g, "embedding", 0)])
    embedding.embedding_norm(torch.randint(0, 100, (4, 300)), R(4, 300, 64), 0)
    torch.backends.cuda.matmul.allow_tf32 = old


# ANCHORS.md's bench models (bench/e2e.py's "anchors" preset), and gpt B2 T2048 in bf16 too
MODEL_CASES = ["gpt:fp32:16:256", "gpt:bf16:16:256", "gpt:fp32:64:256", "gpt:fp32:2:2048",
               "gpt:bf16:2:2048", "cnn:fp32:256", "mlp:fp32:1024"]


class _TensorArg:
    """A traced (fake) tensor argument: only its dtype matters to the compiler."""

    def __init__(self, dtype):
        self.dtype = dtype


def _replay_arg(v):
    """A small real tensor for a traced tensor argument: the kernel sees only its dtype and
    its address's alignment (fresh allocations: 16-byte aligned, as on a GPU)."""
    if isinstance(v, _TensorArg):
        return torch.empty(16, dtype=v.dtype)
    return v


def models(cases: list[str]) -> None:
    """Trace one DP step of each case (bench/trace_step.py: fake tensors, an H200's 132 SMs),
    recording every Triton launch, then compile each recorded launch's variants."""
    from triton.runtime.jit import KernelInterface

    from bench import trace_step

    launches = []

    def record(self, grid):
        def launch(**kw):
            launches.append((self, {k: _TensorArg(v.dtype) if isinstance(v, torch.Tensor)
                                    else v for k, v in kw.items()}))
        return launch

    getitem = KernelInterface.__getitem__
    trace_step._install()
    KernelInterface.__getitem__ = record
    try:
        for case in cases:
            n0 = len(launches)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trace_step.trace_case(*trace_step.parse_case(case), private=True)
            print(f"traced {case}: {len(launches) - n0} Triton launches", flush=True)
    finally:
        KernelInterface.__getitem__ = getitem
    for kernel, kw in launches:
        kernel[(1,)](**{k: _replay_arg(v) for k, v in kw.items()})


def report(out: str | None) -> int:
    rows = []
    for tag, (shared, ru) in SEEN.items():
        name, ce, opts, dts = tag
        cfg = " ".join(f"{k}={v}" for k, v in ce if k.startswith("BLOCK_"))
        flags = " ".join(f"{k}={v}" for k, v in ce if not k.startswith("BLOCK_"))
        o = dict(opts)
        rows.append([",".join(sorted(SOURCES.get(tag, ()))), name,
                     f"{cfg} w{o.get('num_warps', 4)} s{o.get('num_stages', 3)}", flags,
                     "/".join(d.replace("torch.", "") for d in dts), str(shared),
                     str(_field(ru, "REG")), str(_field(ru, "STACK")),
                     str(_spill(ru, "stores")), str(_spill(ru, "loads"))])
    rows.sort(key=lambda r: ("models" not in r[0], r[1], r[4], r[3], r[2]))
    spilling = [r for r in rows if int(r[8]) or int(r[9])]
    in_models = [r for r in rows if "models" in r[0]]
    head = ["source", "kernel", "config", "flags", "dtypes", "smem B", "regs", "stack B",
            "spill st B", "spill ld B"]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    summary = (f"variants {len(rows)} (bench models: {len(in_models)}), failures {len(FAIL)}, "
               f"spilling {len(spilling)} (bench models: "
               f"{sum('models' in r[0] for r in spilling)}), clip-path kernels whose tensor-core "
               f"chunks accumulate into anything but zero or that flush subnormals: "
               f"{len(CHUNK_FAIL)}")
    print("\n".join(md))
    for r in spilling:
        print("SPILLS", r[0], r[1], r[2], r[3], r[4], f"{r[8]} B stores, {r[9]} B loads")
    for tag, err in FAIL:
        print("FAILED", tag, err)
    for tag, line in CHUNK_FAIL:
        print("CHUNK", tag, line)
    print(summary)
    if out:
        with open(out, "w") as f:
            f.write("# sm_90a compile report: registers and spills per kernel variant\n\n")
            f.write(f"triton {triton.__version__}, torch {torch.__version__}, ptxas -v "
                    "--gpu-name sm_90a, made by `bench/compile_sm90.py` on a CPU (no GPU: "
                    "compiled, never run).  source: `models` = launched by one DP step of "
                    f"{', '.join(MODEL_CASES)}; `shapes` = the fixed list of odd shapes.  "
                    "config: tile sizes, warps, pipeline stages; flags: the other "
                    "specialisation constants.\n\n")
            f.write("**" + summary + "**\n\n")
            f.write("\n".join(md) + "\n")
            if FAIL:
                f.write("\n## Failures\n\n")
                f.write("\n".join(f"- {t}: {e}" for t, e in FAIL) + "\n")
            if CHUNK_FAIL:
                f.write("\n## Clip-path kernels with an accumulating tensor-core chunk or a "
                        "flush to zero\n\n")
                f.write("\n".join(f"- {t}: `{ln}`" for t, ln in CHUNK_FAIL) + "\n")
    return 1 if FAIL or spilling or CHUNK_FAIL else 0


def main(argv=None) -> int:
    global PHASE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["models", "shapes"], help="one source of launches")
    ap.add_argument("--cases", default=",".join(MODEL_CASES),
                    help="model:dtype:batch[:seq] items for the models source")
    ap.add_argument("--out", help="write the table as markdown here")
    args = ap.parse_args(argv)
    if args.only != "shapes":
        PHASE = "models"
        models(args.cases.split(","))
    if args.only != "models":
        PHASE = "shapes"
        shapes()
    return report(args.out)


if __name__ == "__main__":
    sys.exit(main())
