"""Peak memory of one training step on the bench gpt model, from the CPU allocator trace:
non-private, DP flat (default, fast), DP low-memory, DP per-layer; with ``--checkpoint``
also with activation checkpointing of every block (``torch.utils.checkpoint``, non-reentrant
and reentrant).

``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free; the
running sum of those over one step (after a warm-up step, gradients set to None) is the
memory the step adds on top of what was live when it started (weights, optimizer state), and
its maximum is the step's peak.  Each mode runs on a fresh copy of the same model and batch.

    python bench/per_layer_memory.py [--d 256 --layers 4 --heads 4 --seq 128 --vocab 8192
                                      --batch 8] [--checkpoint none,non-reentrant,reentrant]

These are CPU allocator figures (reference backend), not GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.utils.checkpoint as cp
from torch import nn

import dpkernels
from bench.models import spec

MODES = ("non-private", "dp-flat", "dp-low-memory", "dp-per-layer")
CHECKPOINT = ("none", "non-reentrant", "reentrant")


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward instead of kept."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return cp.checkpoint(self.block, x, use_reentrant=self.reentrant)


def step_peak(model, opt, dp, x, y, loss_fn) -> float:
    """Peak bytes allocated during one step above the bytes live at its start."""
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
                                profile_memory=True) as prof:
        step()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocation (+bytes) and free (-bytes), wherever it sits in the tree
        node = stack.pop()
        stack.extend(node.children)
        if "Allocation" in str(node.tag) and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, delta in sorted(allocs):
        live += delta
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, v in dict(d=256, layers=4, heads=4, seq=128, vocab=8192, batch=8).items():
        ap.add_argument(f"--{k}", type=int, default=v)
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
    s = spec("gpt", d=a.d, layers=a.layers, heads=a.heads, seq=a.seq, vocab=a.vocab)
    torch.manual_seed(0)
    base = s.model()
    x, y = s.batch(a.batch, a.seq, generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in base.parameters())
    peaks = {}
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
                if mode == "dp-per-layer":
                    kw.update(clipping="per_layer", max_grad_norm=[1.0 / math.sqrt(K)] * K)
                else:
                    kw.update(max_grad_norm=1.0,
                              mode="low-memory" if mode == "dp-low-memory" else "fast")
                dp = dpkernels.make_private(model, opt, **kw)
            peaks[ckpt, mode] = step_peak(model, opt, dp, x, y, s.loss)
    print(f"gpt d={a.d} layers={a.layers} heads={a.heads} seq={a.seq} vocab={a.vocab}, "
          f"batch {a.batch}, float32, {n_params / 1e6:.1f} M parameters "
          f"({n_params * 4 / 2**20:.0f} MiB); torch {torch.__version__}; CPU allocator")
    for (ckpt, mode), p in peaks.items():
        line = f"{mode:>14} {'checkpoint ' + ckpt:>26}: step peak above start " \
               f"{p / 2**20:8.1f} MiB"
        ref = peaks.get((ckpt, "non-private"))
        if ref:
            line += f"  ({p / ref:.3f}x non-private"
            plain = peaks.get(("none", mode))
            if ckpt != "none" and plain:
                line += f", {p / plain:.3f}x without checkpointing"
            line += ")"
        print(line)


if __name__ == "__main__":
    main()
