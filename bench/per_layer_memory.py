"""Peak memory of one training step on the bench gpt model, from the CPU allocator trace:
non-private, DP flat (default, fast), DP low-memory, DP per-layer; with ``--checkpoint``
also with activation checkpointing of every block (``torch.utils.checkpoint``, non-reentrant
and reentrant).

``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free; the
running sum of those over one step (after a warm-up step, gradients set to None) is the
memory the step adds on top of what was live when it started (weights, optimizer state), and
its maximum is the step's peak.  Each mode runs on a fresh copy of the same model and batch.
``--explain`` also lists what is live at each mode's peak, grouped by the op (and the Python
frames of the model, dpkernels and bench code) that allocated it.

    python bench/per_layer_memory.py [--d 256 --layers 4 --heads 4 --seq 128 --vocab 8192
                                      --batch 8] [--explain] [--secure]
                                      [--checkpoint none,non-reentrant,reentrant]

These are CPU allocator figures (reference backend), not GPU memory.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, not bench/, on the path
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
import torch.utils.checkpoint as cp  # noqa: E402
from torch import nn  # noqa: E402

import dpkernels  # noqa: E402
from bench.models import spec  # noqa: E402

MODES = ("non-private", "dp-flat", "dp-low-memory", "dp-per-layer")
CHECKPOINT = ("none", "non-reentrant", "reentrant")


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward instead of kept."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return cp.checkpoint(self.block, x, use_reentrant=self.reentrant)


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
    ap.add_argument("--checkpoint", default="none",
                    help=f"comma-separated subset of {', '.join(CHECKPOINT)}: activation "
                         "checkpointing of every block (default none)")
    ap.add_argument("--modes", default=",".join(MODES), help=", ".join(MODES))
    a = ap.parse_args()
    ckpts = [c for c in a.checkpoint.split(",") if c]
    modes = [m for m in a.modes.split(",") if m]
    for c in ckpts:
        if c not in CHECKPOINT:
            raise SystemExit(f"--checkpoint {c!r}: expected {', '.join(CHECKPOINT)}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes {m!r}: expected {', '.join(MODES)}")
    if a.secure:
        modes.append("dp-per-layer-secure")
    s = spec("gpt", d=a.d, layers=a.layers, heads=a.heads, seq=a.seq, vocab=a.vocab)
    torch.manual_seed(0)
    base = s.model()
    x, y = s.batch(a.batch, a.seq, generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in base.parameters())
    peaks, sites = {}, {}
    for ckpt in ckpts:
        for mode in modes:
            model = copy.deepcopy(base)
            if ckpt != "none":
                model.blocks = nn.ModuleList(Checkpointed(b, ckpt == "reentrant")
                                             for b in model.blocks)
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
            peaks[ckpt, mode], sites[ckpt, mode] = got if a.explain else (got, None)
    print(f"gpt d={a.d} layers={a.layers} heads={a.heads} seq={a.seq} vocab={a.vocab}, "
          f"batch {a.batch}, float32, {n_params / 1e6:.1f} M parameters "
          f"({n_params * 4 / 2**20:.0f} MiB); torch {torch.__version__}; CPU allocator")
    for (ckpt, mode), p in peaks.items():
        line = f"{mode:>19} {'checkpoint ' + ckpt:>26}: step peak above start " \
               f"{p / 2**20:8.1f} MiB"
        ref = peaks.get((ckpt, "non-private"))
        if ref:
            line += f"  ({p / ref:.3f}x non-private"
            plain = peaks.get(("none", mode))
            if ckpt != "none" and plain:
                line += f", {p / plain:.3f}x without checkpointing"
            line += ")"
        print(line)
    for (ckpt, mode), by_site in sites.items():
        if by_site is None:
            continue
        print(f"\n{mode} (checkpoint {ckpt}): live at the peak, largest allocation sites")
        for site, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {size / 2**20:8.1f} MiB  {site}")

if __name__ == "__main__":
    main()
