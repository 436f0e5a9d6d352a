"""Compile every dpkernels Triton kernel variant for sm_90 (H100/H200) on a machine with no
GPU, and report shared memory, registers and spills per variant.

The CPU interpreter does not check what the real compiler does (power-of-two aranges, dot
shapes and dtypes, shared-memory and register budgets, int32 overflow in addresses), and device
time is scarce, so run this before a GPU session.  It fakes the driver (target cuda/90),
calls the real launchers on CPU tensors and compiles each autotune config without launching.
A variant whose cuobjdump resource usage has a STACK or LOCAL frame is recompiled with
``ptxas -v`` for its spill stores and loads; the last lines list the variants that spill and
count variants, failures and spilling variants.
Use the triton the GPU machine has (3.6 at the time of writing), next to any torch:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > /tmp/t36/lib/python3.11/site-packages/zz_torch.pth   # reuse this venv's torch
    /tmp/t36/bin/python bench/compile_sm90.py            # a few minutes on 2 cores

Exit status 1 if any variant fails to compile.
"""

import os
import re
import subprocess
import sys
import tempfile
import traceback

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


def _spills(ru: str) -> int:
    return sum(int(x) for x in re.findall(r"(\d+) bytes spill", ru))


def run(self, *args, grid, warmup, **kwargs):
    ce = {k: v for k, v in kwargs.items() if k.isupper() and not isinstance(v, torch.Tensor)}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    tag = (self.__name__, tuple(sorted(ce.items())), tuple(sorted(opts.items())),
           tuple(str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor))[:2])
    try:
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        FAIL.append((tag, "".join(traceback.format_exception_only(e))[-1500:]))
        print("FAIL", tag, str(e)[-1500:], flush=True)
        return None
    if tag not in SEEN:
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
    norms,
)

assert not _common.INTERPRET and _common.AUTOTUNE


def R(*s, dt=torch.float32):
    return torch.randn(*s).to(dt)


for dt in [torch.float32, torch.bfloat16, torch.float16]:
    for B, T, d, p in [(4, 300, 257, 190), (2, 1, 1024, 1000), (3, 77, 768, 2304)]:
        a, g = R(B, T, d, dt=dt), R(B, T, p, dt=dt)
        for m in ["ghost", "direct"]:
            linear.linear_norm(a, g, m)
            linear.linear_norms(a, g, m, True)
        linear.linear_cross(a, g, R(B, T + 5, d, dt=dt), R(B, T + 5, p, dt=dt))
        linear.linear_cross(a[:, :5], g[:, :5], a[:, :9], g[:, :9])
        linear.linear_bias_norm(g)
    ghost_many.linear_norms_many([(R(4, 300, 257, dt=dt), R(4, 300, 190, dt=dt), "ghost", True),
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
    for shape, G in [((4, 64, 32, 32), 32), ((2, 4096, 3), 1), ((3, 8, 5), 8)]:
        x = R(*shape, dt=dt)
        norms.group_norm_psg(x, x, G, 1e-5)
        norms.group_norm_psg(x, x, G, 1e-5, False, True)
    dense.add_noise(torch.zeros(1000), 0.7, 11, 2.0)
    dense.add_noise_many([torch.zeros(1000), torch.zeros(3, 5)], 0.7, [11, 2**61 + 3], 2.0)
    dense.rows_clipped_sum_many([(R(16, 256, 768, dt=dt), (768,)), (R(16, 1, 300, dt=dt), (300,))],
                                c, [None, torch.randn(300)])
    dense.dense_norm(R(16, 768, dt=dt))
    dense.dense_norm_many([R(16, 768, dt=dt), R(16, 2, 300, dt=dt)[:, 1]])
    for xs, ws, st, pad, dil, grp in [((2, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1),
                                       ((2, 32, 9, 9), (32, 1, 3, 3), (2, 2), (1, 1), (1, 1), 32),
                                       ((2, 6, 20), (8, 3, 5), (1,), (4,), (2,), 2),
                                       ((1, 4, 5, 6, 7), (6, 4, 3, 3, 3), (1, 1, 1), (1, 1, 1),
                                        (1, 1, 1), 1)]:
        x = R(*xs, dt=dt)
        fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
              5: torch.nn.functional.conv3d}[len(xs)]
        y = fn(x.float(), torch.randn(ws), stride=st, padding=pad, dilation=dil, groups=grp)
        g = R(*y.shape, dt=dt)
        for m in ["ghost", "direct"]:
            conv.conv_norm(x, g, ws, st, pad, dil, grp, m)
        conv.conv_clipped_sum(x, g, torch.rand(xs[0]), ws, st, pad, dil, grp, None, 0.5, 9, 0.5)

for B in (16, 3000):
    clip_many.clip_from_parts(torch.rand(5, B), [torch.rand(B)], torch.rand(3, B),
                              torch.rand(2, B), [(0, 1e-4, 1e-5), (2, 2e-4, 1e-5)],
                              [(1, 2, 1e-4)], 16.0, 2.0**-16, 1.0)
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

spills = {t: ru for t, (_, ru) in SEEN.items() if _spills(ru)}
for tag, ru in spills.items():
    print("SPILLS", tag, ru)
print("variants", len(SEEN), "failures", len(FAIL), "spilling", len(spills))
for tag, err in FAIL:
    print("FAILED", tag, err)
sys.exit(1 if FAIL else 0)
