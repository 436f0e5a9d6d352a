"""End-to-end DP-SGD step time and peak memory against non-private training.

One step = zero_grad, forward, loss, backward, optimizer step (SGD).  For each case (model,
dtype, batch, seq) and mode, a fresh process of this script (``--single``) builds the model,
runs ``--warmup`` steps, then times ``--steps`` steps: CUDA events around each step on a GPU,
``time.perf_counter`` on the CPU (where nothing runs asynchronously).  Reported: the median
and the 20th/80th percentiles of the step times, and the peak memory of the timed steps:
``torch.cuda.max_memory_allocated`` on a GPU (everything allocated: weights, optimizer state,
batch, activations), on the CPU the process's peak RSS minus its RSS just before the model
was built.  One process per (case, mode) keeps memory peaks, caches and compiled kernels of
one mode out of the next's numbers.

Modes: nonprivate; dpkernels (make_private, backend auto); opacus_hooks and opacus_ghost
(Opacus' PrivacyEngine; skipped when opacus is not installed).

    python bench/e2e.py                       # CPU: the cpu-small preset; GPU: anchors
    python bench/e2e.py --cases anchors --modes nonprivate,dpkernels
    python bench/e2e.py --cases gpt-tiny:bf16:8:32,mlp:fp32:256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # run as a script, sys.path[0] is bench/, whose kernels.py would shadow the ``kernels``
    # package that transformers imports: the repository root takes its place
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from bench import common  # noqa: E402

COLUMNS = ["date", "gpu", "torch", "triton", "git_sha", "model", "dtype", "batch", "seq",
           "mode", "ms_median", "ms_p20", "ms_p80", "peak_mib"]
MODES = ("nonprivate", "dpkernels", "opacus_hooks", "opacus_ghost")
# Measured only when asked for (--modes ...,dpkernels_lowmem): make_private(mode="low-memory").
EXTRA_MODES = ("dpkernels_lowmem",)

# Model labels (the CSV's model column) -> (architecture, sizes).  The plain names are the
# ANCHORS.md sizes; -tiny ones are the same architectures cut down for CPU smoke runs.
MODELS: dict[str, tuple[str, dict]] = {
    "gpt": ("gpt", {}),
    "cnn": ("cnn", {}),
    "mlp": ("mlp", {}),
    "gpt-tiny": ("gpt", {"vocab": 512, "d": 64, "layers": 2, "heads": 4}),
    "cnn-tiny": ("cnn", {"widths": (32, 32, 32, 32, 64), "size": 16}),
    "mlp-tiny": ("mlp", {"widths": (784, 256, 256, 10)}),
    # transformers models (bench/models.py): GPT-2 small (124 M) and a Llama-2-style 1.1 B
    # (TinyLlama's shape); -tiny: the same code paths at toy sizes
    "hf-gpt2": ("hf-gpt2", {}),
    "hf-llama-1b": ("hf-llama", {}),
    "hf-gpt2-tiny": ("hf-gpt2", {"vocab": 512, "d": 64, "layers": 2, "heads": 4}),
    "hf-llama-tiny": ("hf-llama", {"vocab": 512, "d": 64, "layers": 2, "heads": 4,
                                   "kv_heads": 2, "ffn": 128}),
}
SEQ_MODELS = {"gpt", "hf-gpt2", "hf-llama"}

PRESETS = {
    # shared/ANCHORS.md, on a GPU
    "anchors": ["gpt:fp32:16:256", "gpt:fp32:64:256", "gpt:fp32:2:2048", "gpt:bf16:16:256",
                "cnn:fp32:256", "mlp:fp32:1024"],
    # small enough for a 2-core CPU in about two minutes, all four modes
    "cpu-small": ["gpt-tiny:fp32:8:32", "gpt-tiny:bf16:8:32", "cnn-tiny:fp32:8",
                  "mlp:fp32:32", "hf-gpt2-tiny:fp32:4:32", "hf-llama-tiny:bf16:4:32"],
    # real architectures on a GPU (bf16 = autocast, float32 master weights); the 1.1 B
    # Llama's float32 weights, gradients and DP accumulators take about 13 GiB before
    # activations
    "hf": ["hf-gpt2:fp32:16:256", "hf-gpt2:bf16:16:256", "hf-llama-1b:bf16:4:512"],
    # one case, for tests
    "cpu-tiny": ["mlp-tiny:fp32:16"],
}


def parse_case(text: str) -> dict:
    """'model:dtype:batch[:seq]' -> case dict."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"case {text!r}: expected model:dtype:batch[:seq]")
    label, dtype, batch = parts[0], parts[1], int(parts[2])
    if label not in MODELS:
        raise ValueError(f"case {text!r}: unknown model {label!r}; known: {', '.join(MODELS)}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"case {text!r}: dtype must be fp32 or bf16 (bf16 = autocast)")
    arch = MODELS[label][0]
    if arch in SEQ_MODELS:
        if len(parts) != 4:
            raise ValueError(f"case {text!r}: {label} needs a sequence length")
        seq = int(parts[3])
    else:
        seq = None
    return {"model": label, "dtype": dtype, "batch": batch, "seq": seq}


def expand_cases(spec: str) -> list[dict]:
    cases = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        for c in PRESETS.get(item, [item]):
            cases.append(parse_case(c))
    return cases


# ------------------------------------------------------------------------------- one case


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_single(job: dict) -> dict:
    """Build, warm up and time one (case, mode) in this process."""
    import torch

    from bench import models

    device = torch.device(job["device"])
    mode = job["mode"]
    arch, sizes = MODELS[job["model"]]
    sizes = dict(sizes)
    if arch in SEQ_MODELS:
        sizes["seq"] = job["seq"]
    spec = models.spec(arch, **sizes)
    notes: list[str] = []

    if mode.startswith("opacus"):
        import opacus  # noqa: F401  (before the RSS baseline, like torch)
        from opacus import PrivacyEngine
    if mode.startswith("dpkernels"):
        import dpkernels
        from dpkernels import dispatch
    if arch.startswith("hf-"):
        # before the RSS baseline: the imports are not the model
        import transformers

        transformers.GPT2LMHeadModel, transformers.LlamaForCausalLM  # noqa: B018 (lazy modules)

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # One thread by default: with two OpenMP threads on a shared 2-core machine, one
        # busy neighbour process made steps 30x slower for whole runs (spinning barriers).
        torch.set_num_threads(job.get("cpu_threads", 1))
        # The first optimizer step imports modules worth about 150 MiB of RSS (torch 2.13),
        # whatever the model: take one step of a toy layer before the baseline, so that
        # the peak counts the model's own memory.
        toy = torch.nn.Linear(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=job["dtype"] == "bf16"):
            toy(torch.randn(4, 8)).sum().backward()
        torch.optim.SGD(toy.parameters(), lr=1e-3).step()
        del toy
    rss0 = _rss_bytes() if device.type == "cpu" else 0
    model = spec.model().to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x, y = spec.batch(job["batch"], job["seq"], device=device, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = None

    if mode.startswith("dpkernels"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                                         expected_batch_size=job["batch"],
                                         backend=job.get("backend", "auto"), seed=0,
                                         mode="low-memory" if mode.endswith("lowmem") else "fast")
        fallback = sorted({str(w.message).split(" ")[1] for w in caught
                           if "generic torch.func fallback" in str(w.message)})
        notes.append(f"backend={dispatch.pick(job.get('backend', 'auto'), device.type)}")
        if fallback:
            notes.append("generic fallback: " + " ".join(fallback))
    elif mode in ("opacus_hooks", "opacus_ghost"):
        from torch.utils.data import DataLoader, TensorDataset

        # make_private wants a loader; it is never iterated (the same batch is reused),
        # and poisson_sampling=False keeps the batch size fixed.
        loader = DataLoader(TensorDataset(x, y), batch_size=job["batch"])
        kwargs = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, poisson_sampling=False,
                      grad_sample_mode="hooks" if mode == "opacus_hooks" else "ghost")
        if mode == "opacus_ghost":
            kwargs["criterion"] = torch.nn.CrossEntropyLoss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(**kwargs)
        if mode == "opacus_ghost":
            model, opt, criterion, _ = out
        else:
            model, opt, _ = out
    elif mode != "nonprivate":
        raise ValueError(f"unknown mode {mode!r}")

    autocast = job["dtype"] == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            if criterion is None:
                loss = spec.loss(out, y)
            else:  # Opacus ghost: per-sample losses, two backward passes inside backward()
                args, kw = spec.criterion_args(out, y)
                loss = criterion(*args, **kw)
        if mode.startswith("dpkernels"):
            opt.backward(loss)  # two passes in low-memory mode
        else:
            loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(job["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(job["steps"]):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    sync()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = (_peak_rss_bytes() - rss0) / 2**20
    return {"ms_median": common.quantile(times, 0.5), "ms_p20": common.quantile(times, 0.2),
            "ms_p80": common.quantile(times, 0.8), "peak_mib": peak, "note": "; ".join(notes)}


def single_main(payload: str) -> int:
    job = json.loads(payload)
    try:
        res = run_single(job)
    except Exception as e:
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print("RESULT " + json.dumps({"status": "error", "error": msg}), flush=True)
        return 1
    res["status"] = "ok"
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------- driver


def launch(job: dict, timeout: float, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(job)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=str(common.REPO))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        p = None
        res = {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    else:
        out, err = p.stdout, p.stderr
        res = None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
        if res is None:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            res = {"status": "error", "error": f"exit {p.returncode}: {tail[:300]}"}
    if log is not None:
        log.write(f"=== {job['model']} {job['dtype']} B={job['batch']} T={job['seq']} "
                  f"{job['mode']}: {res.get('status')}\n")
        if err.strip():
            log.write(err if err.endswith("\n") else err + "\n")
        log.flush()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated presets ({', '.join(PRESETS)}) or model:dtype:batch"
                         f"[:seq] items (models: {', '.join(MODELS)}); default: anchors on "
                         "cuda, cpu-small on cpu")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                    + ", ".join(MODES + EXTRA_MODES))
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default 10 on cuda, 5 on cpu)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 3 on cuda, 2 on cpu)")
    ap.add_argument("--backend", default="auto", help="dpkernels backend (default auto)")
    ap.add_argument("--out", default=None,
                    help="CSV to append to (default bench/results/<date>-<gpu-or-cpu>.csv)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads for CPU runs (default 1: stable under contention)")
    ap.add_argument("--log", default=None, help="file for the child processes' stderr")
    ap.add_argument("--case-timeout", type=float, default=300,
                    help="seconds before one (case, mode) process is killed (default 300)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new (case, mode) is started")
    args = ap.parse_args(argv)
    if args.single is not None:
        return single_main(args.single)

    t_start = time.monotonic()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    cases = expand_cases(args.cases or ("anchors" if device == "cuda" else "cpu-small"))
    # ANCHORS.md: 3 warm-ups, 10 timed steps; fewer on a CPU, where this is a smoke run
    if args.steps is None:
        args.steps = 10 if device == "cuda" else 5
    if args.warmup is None:
        args.warmup = 3 if device == "cuda" else 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES + EXTRA_MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES + EXTRA_MODES)}")
    if "nonprivate" in modes:  # first, so a case's ratios exist even if the run is cut
        modes = ["nonprivate"] + [m for m in modes if m != "nonprivate"]
    have_opacus = importlib.util.find_spec("opacus") is not None

    dev_label = (common.device_name("cuda:0") if device == "cuda"
                 else f"cpu: {common.cpu_name()}, {args.cpu_threads} thread(s)")
    out = Path(args.out) if args.out else common.default_csv(dev_label)
    common.check_csv(out, COLUMNS)
    meta = {"date": common.now_utc(), "gpu": dev_label, "torch": torch.__version__,
            "triton": common.version("triton"), "git_sha": common.git_sha()}
    print(f"# {dev_label} | torch {meta['torch']} | triton {meta['triton']} | "
          f"opacus {common.version('opacus') if have_opacus else 'not installed'} | "
          f"git {meta['git_sha']}", flush=True)
    print(f"# {len(cases)} cases x {len(modes)} modes, {args.warmup} warm-up + {args.steps} "
          f"timed steps each, one process per (case, mode); CSV: {out}", flush=True)
    log = open(args.log, "a") if args.log else None

    # Ours before Opacus, the extra modes last: if the time budget runs out, every case still
    # has its nonprivate and dpkernels rows, then Opacus'.  The table is ordered by case.
    ours = [m for m in modes if not m.startswith("opacus") and m not in EXTRA_MODES]
    theirs = [m for m in modes if m.startswith("opacus")]
    extra = [m for m in modes if m in EXTRA_MODES]
    schedule = [(c, m) for group in (ours, theirs, extra) for c in cases for m in group]
    results = []  # (case, mode, res)
    for case, mode in schedule:
        tag = (f"{case['model']} {case['dtype']} B={case['batch']}"
               + (f" T={case['seq']}" if case["seq"] else "") + f" {mode}")
        if mode.startswith("opacus") and not have_opacus:
            res = {"status": "skipped", "error": "opacus is not installed"}
        elif args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
            res = {"status": "skipped", "error": "time budget spent"}
        else:
            job = dict(case, mode=mode, device=device, steps=args.steps,
                       warmup=args.warmup, backend=args.backend,
                       cpu_threads=args.cpu_threads)
            t0 = time.monotonic()
            res = launch(job, args.case_timeout, log)
            res["wall_s"] = time.monotonic() - t0
        if res["status"] == "ok":
            print(f"  {tag}: {res['ms_median']:.3f} ms, {res['peak_mib']:.1f} MiB "
                  f"({res['wall_s']:.1f} s)", flush=True)
        else:
            print(f"  {tag}: {res['status']}: {res.get('error', '')}", flush=True)
        # Measured rows and crashes go to the CSV (a crash is a result, with empty
        # numbers); skips (not installed, out of time) do not.
        if res["status"] != "skipped":
            row = dict(meta, model=case["model"], dtype=case["dtype"], batch=case["batch"],
                       seq=case["seq"] or "", mode=mode)
            if res["status"] == "ok":
                row.update({k: f"{res[k]:.4f}" for k in ("ms_median", "ms_p20", "ms_p80",
                                                          "peak_mib")})
            common.append_row(out, COLUMNS, row)
        results.append((case, mode, res))
    if log is not None:
        log.close()
    order = {(id(c), m): i for i, (c, m) in enumerate((c, m) for c in cases for m in modes)}
    results.sort(key=lambda r: order[(id(r[0]), r[1])])

    mem_label = "peak MiB" if device == "cuda" else "peak RSS delta MiB"
    header = ["model", "dtype", "batch", "seq", "mode", "ms median", "p20-p80", mem_label,
              "time x", "mem x", "note"]
    rows = []
    base: dict[tuple, dict] = {}
    for case, mode, res in results:
        key = (case["model"], case["dtype"], case["batch"], case["seq"])
        if mode == "nonprivate" and res["status"] == "ok":
            base[key] = res
    for case, mode, res in results:
        key = (case["model"], case["dtype"], case["batch"], case["seq"])
        b = base.get(key)
        if res["status"] == "ok":
            tx = common.fmt(res["ms_median"] / b["ms_median"]) + "x" if b else "-"
            mx = (common.fmt(res["peak_mib"] / b["peak_mib"]) + "x"
                  if b and b["peak_mib"] > 0 else "-")
            rows.append([case["model"], case["dtype"], case["batch"], case["seq"] or "-", mode,
                         common.fmt(res["ms_median"], 4),
                         f"{common.fmt(res['ms_p20'])}-{common.fmt(res['ms_p80'])}",
                         common.fmt(res["peak_mib"], 4), tx, mx, res.get("note", "")])
        else:
            rows.append([case["model"], case["dtype"], case["batch"], case["seq"] or "-", mode,
                         res["status"], "", "", "", "", res.get("error", "")])
    print()
    print(f"One training step on {dev_label}; ratios against nonprivate of the same case"
          + ("" if device == "cuda" else "; CPU memory = peak RSS minus RSS before the model "
             "was built (rough)") + ":")
    common.print_table(header, rows)
    n_ok = sum(r["status"] == "ok" for _, _, r in results)
    n_err = sum(r["status"] == "error" for _, _, r in results)
    n_skip = sum(r["status"] == "skipped" for _, _, r in results)
    print(f"\n{n_ok} measured, {n_err} failed, {n_skip} skipped in "
          f"{time.monotonic() - t_start:.0f} s; rows appended to {out}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
