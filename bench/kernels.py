"""Per-kernel timing of the dpkernels Triton ops against what the card can do.

GEMM-like ops (linear_norm ghost and direct, linear_clipped_sum with noise) are timed
against torch's weight-gradient GEMM of the same shape and dtype, ``g.T @ a`` over the B*T
rows (what non-private training computes for the same layer): ratio = op time / GEMM time.
The conv ops (conv_norm ghost and direct, conv_clipped_sum with noise) likewise against
torch's conv weight gradient (``aten.convolution_backward``, cuDNN) of the same layer.
Reductions (layer_norm_psg, group_norm_psg, embedding_norm) are reported as achieved
bandwidth (the fewest bytes they must move: inputs read once, outputs written once, over
the time), beside the card's measured copy bandwidth (bytes read + written by a large
device-to-device copy).  Each op's pure-torch reference is timed too (provider
``reference``).  ``secure_noise`` (the ChaCha20 normals of secure_mode, csrc/) is timed
against ``torch.randn`` of the same size, as bandwidth of the float32 noise written; it is
the one op with a compiled CPU kernel, so ``--cpu`` times it on the CPU.  Times are
``triton.testing.do_bench`` quantiles (median, 20th, 80th percentile, ms; wall clock on the
CPU); rows are appended to bench/results/<date>-<gpu>-kernels.csv.

    python bench/kernels.py                   # needs a CUDA GPU
    python bench/kernels.py --interpret-smoke # CPU: one tiny shape per op, checks the script
    python bench/kernels.py --cpu             # CPU: secure_noise against torch.randn
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

# Must precede any triton import: the interpreter is chosen when triton is first imported.
if "--interpret-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

COLUMNS = ["date", "gpu", "torch", "triton", "git_sha", "op", "shape", "dtype", "provider",
           "ms_median", "ms_p20", "ms_p80", "ratio_or_bandwidth"]
OPS = ("linear_norm", "linear_clipped_sum", "layer_norm_psg", "group_norm_psg",
       "embedding_norm", "conv_norm", "conv_clipped_sum", "secure_noise")

# The layers of the ANCHORS.md models.  linear: (B, T, d, p); layer norm: (B, T, d);
# group norm: (B, C, H, W, groups); embedding: (B, T, p, vocab).
LINEAR = {
    "gpt-qkv": (16, 256, 768, 2304),
    "gpt-fc1": (16, 256, 768, 3072),
    "gpt-fc2": (16, 256, 3072, 768),
    "gpt-head": (16, 256, 768, 16384),
    "gpt-fc1-T2048": (2, 2048, 768, 3072),
    "mlp-fc2": (1024, 1, 1024, 1024),
}
LAYER_NORM = {"gpt-ln": (16, 256, 768), "gpt-ln-T2048": (2, 2048, 768)}
GROUP_NORM = {"cnn-gn1": (256, 64, 32, 32, 32), "cnn-gn3": (256, 128, 16, 16, 32),
              "cnn-gn5": (256, 256, 8, 8, 32)}
EMBEDDING = {"gpt-tok": (16, 256, 768, 16384), "gpt-tok-T2048": (2, 2048, 768, 16384)}
# secure noise: elements drawn in one call (a parameter's noise)
SECURE_NOISE = {"mlp-fc2.weight": 1 << 20, "gpt-fc1.weight": 768 * 3072,
                "gpt-head.weight": 768 * 16384}
SECURE_NOISE_CPU = {"mlp-fc2.weight": 1 << 20}
# conv 3x3 pad 1: (B, C_in, C_out, H = W)
CONV = {"cnn-conv1": (256, 3, 64, 32), "cnn-conv2": (256, 64, 64, 32),
        "cnn-conv3": (256, 64, 128, 16), "cnn-conv4": (256, 128, 128, 16),
        "cnn-conv5": (256, 128, 256, 8)}

SMOKE = {
    "linear": {"tiny": (2, 5, 12, 7)},
    "layer_norm": {"tiny": (2, 5, 12)},
    "group_norm": {"tiny": (2, 8, 3, 3, 4)},
    "embedding": {"tiny": (2, 5, 7, 11)},
    "conv": {"tiny": (2, 3, 4, 5)},
    "secure_noise": {"tiny": 1001},
}

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class Bench:
    def __init__(self, args, device: str, torch):
        self.args = args
        self.device = device
        self.torch = torch
        self.smoke = args.interpret_smoke
        self.rows: list[list] = []
        self.t0 = time.monotonic()
        dev_label = (common.device_name("cuda:0") if device == "cuda"
                     else "cpu (TRITON_INTERPRET=1 smoke)" if self.smoke
                     else f"cpu ({os.cpu_count()} cores)")
        self.meta = {"date": common.now_utc(), "gpu": dev_label, "torch": torch.__version__,
                     "triton": common.version("triton"), "git_sha": common.git_sha()}
        if args.out:
            self.out = Path(args.out)
        elif self.smoke:
            self.out = None  # interpreter times mean nothing: no CSV unless asked for
        else:
            self.out = common.default_csv(dev_label, "-kernels")
        if self.out is not None:
            common.check_csv(self.out, COLUMNS)

    # -- timing
    def time(self, fn) -> tuple[float, float, float]:
        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
            return ms, ms, ms
        if self.device == "cpu":  # no CUDA events: wall-clock quantiles over repetitions
            fn()
            times, t_end = [], time.perf_counter() + self.args.rep_ms * 1e-3
            while len(times) < 5 or time.perf_counter() < t_end:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            times.sort()
            pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]
            return pick(0.5), pick(0.2), pick(0.8)
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=self.args.warmup_ms,
                                                rep=self.args.rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80

    def out_of_time(self) -> bool:
        b = self.args.time_budget
        return b is not None and time.monotonic() - self.t0 > b

    def record(self, op, shape, dtype, provider, q, value, extra=""):
        med, p20, p80 = q
        row = dict(self.meta, op=op, shape=shape, dtype=dtype, provider=provider,
                   ms_median=f"{med:.5f}", ms_p20=f"{p20:.5f}", ms_p80=f"{p80:.5f}",
                   ratio_or_bandwidth="" if value is None else f"{value:.4g}")
        if self.out is not None:
            common.append_row(self.out, COLUMNS, row)
        self.rows.append([op, shape, dtype, provider, common.fmt(med, 4),
                          f"{common.fmt(p20)}-{common.fmt(p80)}",
                          "" if value is None else common.fmt(value), extra])
        print(f"  {op} {shape} {dtype} {provider}: {med:.4f} ms {extra}", flush=True)

    # -- inputs: random, never zeros (zeros hide unwritten outputs and can time faster)
    def randn(self, *shape, dtype, scale=1.0):
        t = self.torch.randn(*shape, device=self.device, dtype=self.torch.float32) * scale
        return t.to(dtype)


def rel_err(out, ref) -> float:
    import torch

    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    num = den = 0.0
    for o, r in zip(outs, refs, strict=True):
        if o is None or r is None:
            continue
        num += float(torch.linalg.vector_norm(o.double() - r.double()).item()) ** 2
        den += float(torch.linalg.vector_norm(r.double()).item()) ** 2
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def triton_ops(dispatch, device: str) -> tuple[set[str], str]:
    """(ops with a Triton implementation, why none load)."""
    why = ""
    try:
        import dpkernels.ops  # noqa: F401
    except Exception as e:  # an op family that does not import yet
        why = f"dpkernels.ops does not import: {type(e).__name__}: {e}"
    have = {name for name, impl, _ in dispatch.table(device) if impl.get("triton")}
    return have, why


def bench_copy(b: Bench) -> float:
    """Device copy bandwidth, GB/s (bytes read + written)."""
    torch = b.torch
    # 512 MiB on a GPU, 64 MiB on a CPU: far beyond any cache
    n = (1 << 20) if b.smoke else (1 << 26) if b.device == "cpu" else (1 << 29)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=b.device)
    dst = torch.empty_like(src)
    q = b.time(lambda: dst.copy_(src))
    gbs = 2 * n / (q[0] * 1e-3) / 1e9
    b.record("copy", f"{n >> 20}MiB", "uint8", "torch", q, gbs)
    return gbs


def bench_secure_noise(b: Bench, sizes, copy_gbs: float) -> None:
    """float32 secure normals against torch.randn of the same size: GB/s of noise written
    (4 bytes per element), beside the copy bandwidth."""
    torch = b.torch
    from dpkernels import secure

    ok, why = secure.available()
    if not ok:
        print(f"  secure_noise skipped: {why}", flush=True)
        return
    key = os.urandom(secure.KEY_BYTES)
    for name, n in sizes.items():
        if b.out_of_time():
            return
        out = torch.empty(n, device=b.device)
        ref = torch.empty(n, device=b.device)
        q_sec = b.time(lambda out=out: secure.secure_normal_(out, key, 0, 1.0))
        q_ref = b.time(lambda n=n, ref=ref: torch.randn(n, out=ref))
        gbs = lambda q, n=n: 4 * n / (q[0] * 1e-3) / 1e9
        b.record("secure_noise", name, "fp32", "chacha20", q_sec, gbs(q_sec),
                 f"{q_sec[0] / q_ref[0]:.1f}x randn; {gbs(q_sec) / copy_gbs:.2f} of copy")
        b.record("secure_noise", name, "fp32", "torch.randn", q_ref, gbs(q_ref))


def bench_linear(b: Bench, dispatch, shapes, dtypes, have, ops) -> None:
    torch = b.torch
    for name, (B, T, d, p) in shapes.items():
        for dt_name in dtypes:
            if b.out_of_time():
                print(f"  linear {name} {dt_name}: skipped (time budget spent)")
                continue
            dt = getattr(torch, DTYPES[dt_name])
            shape = f"{name} B={B} T={T} d={d} p={p}"
            a = b.randn(B, T, d, dtype=dt)
            g = b.randn(B, T, p, dtype=dt, scale=1e-2)
            c = torch.rand(B, device=b.device, dtype=torch.float32)
            a2, g2 = a.reshape(B * T, d), g.reshape(B * T, p)
            gemm = b.time(lambda a2=a2, g2=g2: g2.T @ a2)
            flops = 2.0 * B * T * d * p
            b.record("weight_grad_gemm", shape, dt_name, "torch", gemm, 1.0,
                     f"{flops / (gemm[0] * 1e-3) / 1e12:.1f} TFLOP/s")
            jobs = []
            if "linear_norm" in ops:
                jobs += [(f"linear_norm[{m}]", "linear_norm", (a, g, m), {})
                         for m in ("ghost", "direct")]
            if "linear_clipped_sum" in ops:
                jobs.append(("linear_clipped_sum[noise]", "linear_clipped_sum", (a, g, c),
                             {"noise_std": 1.0, "seed": 0, "scale": 1.0 / B}))
            for label, op, fargs, fkw in jobs:
                run_op(b, dispatch, have, label, op, fargs, fkw, shape, dt_name,
                       baseline_ms=gemm[0])


def bench_conv(b: Bench, dispatch, shapes, dtypes, have, ops) -> None:
    torch = b.torch
    for name, (B, C_in, C_out, S) in shapes.items():
        for dt_name in dtypes:
            if b.out_of_time():
                print(f"  conv {name} {dt_name}: skipped (time budget spent)")
                continue
            dt = getattr(torch, DTYPES[dt_name])
            shape = f"{name} B={B} C_in={C_in} C_out={C_out} {S}x{S} k3 p1"
            x = b.randn(B, C_in, S, S, dtype=dt)
            g = b.randn(B, C_out, S, S, dtype=dt, scale=1e-2)
            w = b.randn(C_out, C_in, 3, 3, dtype=dt)
            c = torch.rand(B, device=b.device, dtype=torch.float32)
            conf = ((1, 1), (1, 1), (1, 1), 1)
            wgrad = b.time(lambda x=x, g=g, w=w: torch.ops.aten.convolution_backward(
                g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]))
            flops = 2.0 * B * S * S * C_in * 9 * C_out
            b.record("conv_weight_grad", shape, dt_name, "torch", wgrad, 1.0,
                     f"{flops / (wgrad[0] * 1e-3) / 1e12:.1f} TFLOP/s")
            jobs = []
            if "conv_norm" in ops:
                jobs += [(f"conv_norm[{m}]", "conv_norm", (x, g, w.shape, *conf, m), {})
                         for m in ("ghost", "direct")]
            if "conv_clipped_sum" in ops:
                jobs.append(("conv_clipped_sum[noise]", "conv_clipped_sum",
                             (x, g, c, w.shape, *conf),
                             {"noise_std": 1.0, "seed": 0, "scale": 1.0 / B}))
            for label, op, fargs, fkw in jobs:
                run_op(b, dispatch, have, label, op, fargs, fkw, shape, dt_name,
                       baseline_ms=wgrad[0])


def run_op(b: Bench, dispatch, have, label, op, fargs, fkw, shape, dt_name, *,
           baseline_ms=None, nbytes=None, copy_gbs=None) -> None:
    """Time ``op`` on both providers; the Triton one is first checked against the reference
    (noise-free, so both compute the same function)."""
    providers = [p for p in b.args.providers.split(",") if p]
    check_kw = dict(fkw, noise_std=0.0) if "noise_std" in fkw else fkw
    ref_out = None
    for prov in providers:
        if prov == "triton" and op not in have:
            print(f"  {label} {shape} {dt_name}: skipped (no Triton implementation "
                  "registered yet)", flush=True)
            continue
        extra = ""
        try:
            if prov == "triton":
                if ref_out is None:
                    ref_out = dispatch.call(op, "reference", *fargs, **check_kw)
                err = rel_err(dispatch.call(op, "triton", *fargs, **check_kw), ref_out)
                extra = f"rel_err vs reference {err:.1e}"
            q = b.time(lambda prov=prov: dispatch.call(op, prov, *fargs, **fkw))
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"  {label} {shape} {dt_name} {prov}: FAILED {msg}", flush=True)
            b.rows.append([label, shape, dt_name, prov, "failed", "", "", msg])
            continue
        if baseline_ms is not None:
            value = q[0] / baseline_ms
        else:
            value = nbytes / (q[0] * 1e-3) / 1e9
            if copy_gbs:
                extra = f"{100 * value / copy_gbs:.0f}% of copy; " + extra
        b.record(label, shape, dt_name, prov, q, value, extra.strip("; "))


def bench_reductions(b: Bench, dispatch, sets, dtypes, have, copy_gbs) -> None:
    torch = b.torch
    ln, gn, emb = sets
    for dt_name in dtypes:
        dt = getattr(torch, DTYPES[dt_name])
        es = torch.finfo(dt).bits // 8
        for name, (B, T, d) in ln.items():
            if b.out_of_time():
                break
            x, g = b.randn(B, T, d, dtype=dt), b.randn(B, T, d, dtype=dt, scale=1e-2)
            nbytes = 2 * B * T * d * es + 2 * B * d * 4  # x, g in; gw, gb out (float32)
            run_op(b, dispatch, have, "layer_norm_psg", "layer_norm_psg",
                   (x, g, (d,), 1e-5, True, True), {}, f"{name} B={B} T={T} d={d}", dt_name,
                   nbytes=nbytes, copy_gbs=copy_gbs)
        for name, (B, C, H, W, G) in gn.items():
            if b.out_of_time():
                break
            x = b.randn(B, C, H, W, dtype=dt)
            g = b.randn(B, C, H, W, dtype=dt, scale=1e-2)
            nbytes = 2 * B * C * H * W * es + 2 * B * C * 4
            run_op(b, dispatch, have, "group_norm_psg", "group_norm_psg",
                   (x, g, G, 1e-5, True, True), {},
                   f"{name} B={B} C={C} H={H} W={W} G={G}", dt_name,
                   nbytes=nbytes, copy_gbs=copy_gbs)
        for name, (B, T, p, V) in emb.items():
            if b.out_of_time():
                break
            ids = torch.randint(0, V, (B, T), device=b.device)
            g = b.randn(B, T, p, dtype=dt, scale=1e-2)
            nbytes = B * T * 8 + B * T * p * es + B * 4
            run_op(b, dispatch, have, "embedding_norm", "embedding_norm", (ids, g, None), {},
                   f"{name} B={B} T={T} p={p} V={V}", dt_name, nbytes=nbytes,
                   copy_gbs=copy_gbs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="no GPU: run one tiny shape per op in Triton's CPU interpreter to "
                         "check this script (its times mean nothing; no CSV unless --out)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of "
                    + ", ".join(OPS))
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32,bf16 (default both)")
    ap.add_argument("--providers", default="triton,reference",
                    help="triton,reference (default both; the torch baselines always run)")
    ap.add_argument("--cpu", action="store_true",
                    help="time secure_noise on the CPU (real timings; the other ops need a "
                         "GPU or --interpret-smoke)")
    ap.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--out", default=None,
                    help="CSV to append to (default bench/results/<date>-<gpu>-kernels.csv)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new shape is started")
    args = ap.parse_args(argv)

    import torch

    if args.interpret_smoke:
        device = "cpu"
    elif args.cpu:
        device = "cpu"
        args.ops = "secure_noise"
    elif not torch.cuda.is_available():
        print("bench/kernels.py times Triton kernels and needs a CUDA GPU; none is visible "
              "here.\nOn a CPU, `python bench/kernels.py --interpret-smoke` checks that the "
              "script runs (one tiny shape per op in Triton's interpreter; no timings).")
        return 0
    else:
        device = "cuda"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("TRITON_INTERPRET=1 is set: unset it to time kernels on the GPU")

    from dpkernels import dispatch

    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; known: {', '.join(OPS)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    b = Bench(args, device, torch)
    have, why = triton_ops(dispatch, device)
    print(f"# {b.meta['gpu']} | torch {b.meta['torch']} | triton {b.meta['triton']} | "
          f"git {b.meta['git_sha']} | TF32 matmul "
          f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}", flush=True)
    print(f"# Triton ops registered: {', '.join(sorted(have)) or 'none'}"
          + (f" ({why})" if why else ""), flush=True)
    missing = [o for o in ops if o not in have]
    if missing:
        print(f"# no Triton implementation (yet) for: {', '.join(missing)}; their Triton rows "
              "are skipped", flush=True)
    print(f"# CSV: {b.out if b.out is not None else 'none (smoke run)'}", flush=True)

    torch.manual_seed(0)
    if b.smoke:
        lin, ln, gn, emb, cv = (SMOKE["linear"], SMOKE["layer_norm"], SMOKE["group_norm"],
                                SMOKE["embedding"], SMOKE["conv"])
        noise_sizes = SMOKE["secure_noise"]
    else:
        lin, ln, gn, emb, cv = LINEAR, LAYER_NORM, GROUP_NORM, EMBEDDING, CONV
        noise_sizes = SECURE_NOISE_CPU if device == "cpu" else SECURE_NOISE
    copy_gbs = bench_copy(b)
    if "secure_noise" in ops:
        bench_secure_noise(b, noise_sizes, copy_gbs)
    # the reductions first: they are quick, and --time-budget then cuts linear shapes only
    red = [x if n in ops else {} for x, n in ((ln, "layer_norm_psg"), (gn, "group_norm_psg"),
                                             (emb, "embedding_norm"))]
    bench_reductions(b, dispatch, red, dtypes, have, copy_gbs)
    if {"linear_norm", "linear_clipped_sum"} & set(ops):
        bench_linear(b, dispatch, lin, dtypes, have, ops)
    if {"conv_norm", "conv_clipped_sum"} & set(ops):
        bench_conv(b, dispatch, cv, dtypes, have, ops)

    print()
    print(f"Kernel times on {b.meta['gpu']} (ms; GEMM-like ops as a ratio of torch's weight-"
          "gradient GEMM or conv of the same shape and dtype, reductions in GB/s):")
    common.print_table(["op", "shape", "dtype", "provider", "ms median", "p20-p80",
                        "ratio or GB/s", "note"], b.rows)
    print(f"\n{len(b.rows)} rows in {time.monotonic() - b.t0:.0f} s"
          + (f"; appended to {b.out}" if b.out is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
