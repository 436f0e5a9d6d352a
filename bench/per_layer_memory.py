"""Peak memory of one training step on the bench gpt model, from the CPU allocator trace:
non-private, DP flat (default, fast), DP low-memory, DP per-layer.

``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free; the
running sum of those over one step (after a warm-up step, gradients set to None) is the
memory the step adds on top of what was live when it started (weights, optimizer state), and
its maximum is the step's peak.  Each mode runs on a fresh copy of the same model and batch.
``--explain`` also lists what is live at each mode's peak, grouped by the op (and the Python
frames of the model, dpkernels and bench code) that allocated it.

    python bench/per_layer_memory.py [--d 256 --layers 4 --heads 4 --seq 128 --vocab 8192
                                      --batch 8] [--explain]
"""

from __future__ import annotations

import argparse
import collections
import copy
import math

import torch

import dpkernels
from bench.models import spec

MODES = ("non-private", "dp-flat", "dp-low-memory", "dp-per-layer")


def step_peak(model, opt, dp, x, y, loss_fn, *, explain: bool = False):
    """Peak bytes allocated during one step above the bytes live at its start; with
    ``explain``, (peak, {allocation site: bytes live at the peak})."""
    def step():
        loss = loss_fn(model(x), y)
        if dp is None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            dp.backward(loss)
            dp.step()
            dp.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, caches
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, with_stack=explain) as prof:
        step()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocation (+bytes) and free (-bytes), wherever it sits in the tree
        node = stack.pop()
        stack.extend(node.children)
        if "Allocation" in str(node.tag) and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            allocs.append((node.start_time_ns, f.alloc_size, f.ptr,
                           _site(node.parent) if explain else None))
    allocs.sort(key=lambda a: a[0])
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for _, delta, ptr, site in allocs:
        total += delta
        if delta > 0:
            live[ptr] = (delta, site)
        else:
            live.pop(ptr, None)
        if total > peak:
            peak = total
            if explain:
                at_peak = dict(live)
    if not explain:
        return peak
    sites: collections.Counter = collections.Counter()
    for size, site in at_peak.values():
        sites[site] += size
    return peak, dict(sites)


def _site(node) -> str:
    """The allocating op and the innermost model/dpkernels/bench frames above it."""
    names = []
    while node is not None and len(names) < 4:
        name = node.name
        if not names or any(k in name for k in ("dpkernels", "bench", "models.py")):
            names.append(name.split("/")[-1][:60])
        node = node.parent
    return " <- ".join(names)


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, v in dict(d=256, layers=4, heads=4, seq=128, vocab=8192, batch=8).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--secure", action="store_true",
                    help="also per-layer with secure_mode=True (needs the C++ extension)")
    ap.add_argument("--explain", action="store_true",
                    help="list what is live at each mode's peak, by allocation site")
    a = ap.parse_args()
    s = spec("gpt", d=a.d, layers=a.layers, heads=a.heads, seq=a.seq, vocab=a.vocab)
    torch.manual_seed(0)
    base = s.model()
    x, y = s.batch(a.batch, a.seq, generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in base.parameters())
    peaks, sites = {}, {}
    for mode in MODES + (("dp-per-layer-secure",) if a.secure else ()):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        dp = None
        if mode != "non-private":
            K = sum(1 for p in model.parameters() if p.requires_grad)
            kw = dict(noise_multiplier=1.0, expected_batch_size=a.batch, seed=0,
                      backend="reference")
            if mode.startswith("dp-per-layer"):
                kw.update(clipping="per_layer", max_grad_norm=[1.0 / math.sqrt(K)] * K)
                if mode == "dp-per-layer-secure":
                    kw.update(secure_mode=True, seed=None)
            else:
                kw.update(max_grad_norm=1.0,
                          mode="low-memory" if mode == "dp-low-memory" else "fast")
            dp = dpkernels.make_private(model, opt, **kw)
        got = step_peak(model, opt, dp, x, y, s.loss, explain=a.explain)
        peaks[mode], sites[mode] = got if a.explain else (got, None)
    print(f"gpt d={a.d} layers={a.layers} heads={a.heads} seq={a.seq} vocab={a.vocab}, "
          f"batch {a.batch}, float32, {n_params / 1e6:.1f} M parameters "
          f"({n_params * 4 / 2**20:.0f} MiB); torch {torch.__version__}")
    ref = peaks["non-private"]
    for mode, p in peaks.items():
        print(f"{mode:>19}: step peak above start {p / 2**20:8.1f} MiB  "
              f"({p / ref:.3f}x non-private)")
    for mode, by_site in sites.items():
        if by_site is None:
            continue
        print(f"\n{mode}: live at the peak, largest allocation sites")
        for site, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {size / 2**20:8.1f} MiB  {site}")


if __name__ == "__main__":
    main()
