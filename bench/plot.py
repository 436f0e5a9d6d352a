"""Bar charts of a bench/e2e.py results CSV: step time and peak memory of each mode as a
ratio of nonprivate training of the same case (model, dtype, batch, seq), same run.

    python bench/plot.py bench/results/<date>-<gpu>.csv            # writes <csv>.png
    python bench/plot.py results.csv --out fig.png --run 2026-11-26T12:00:00Z

A CSV can hold several runs (one ``date`` stamp each, per card); by default each case is
drawn from the latest run on its card that measured it.  Failed modes (empty numbers) are
marked on the axis.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

MODES = ("dpkernels", "opacus_hooks", "opacus_ghost")


def load(path: Path, run: str | None) -> tuple[dict, list[str]]:
    """{(gpu, model, dtype, batch, seq): {mode: (ms, mib) or None}} for the chosen runs."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if run:
        rows = [r for r in rows if r["date"] == run]
    latest: dict[tuple, str] = {}
    for r in rows:
        key = (r["gpu"], r["model"], r["dtype"], r["batch"], r["seq"])
        if r["mode"] == "nonprivate" and r["ms_median"]:
            latest[key] = max(latest.get(key, ""), r["date"])
    cases: dict[tuple, dict] = {}
    for r in rows:
        key = (r["gpu"], r["model"], r["dtype"], r["batch"], r["seq"])
        if latest.get(key) != r["date"]:
            continue
        val = (float(r["ms_median"]), float(r["peak_mib"])) if r["ms_median"] else None
        cases.setdefault(key, {})[r["mode"]] = val
    gpus = sorted({k[0] for k in cases})
    return cases, gpus


def label(key: tuple) -> str:
    _, model, dtype, batch, seq = key
    return f"{model} {dtype}\nB={batch}" + (f" T={seq}" if seq else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="a bench/e2e.py results CSV")
    ap.add_argument("--out", default=None, help="PNG to write (default: the CSV's name .png)")
    ap.add_argument("--run", default=None, help="only rows with this date stamp")
    args = ap.parse_args(argv)

    path = Path(args.csv)
    cases, gpus = load(path, args.run)
    cases = {k: v for k, v in cases.items() if v.get("nonprivate")}
    if not cases:
        print(f"{path}: no case with a measured nonprivate baseline; nothing to plot")
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib (pip install matplotlib); no picture written")
        return 0

    keys = list(cases)
    modes = [m for m in MODES if any(m in cases[k] for k in keys)]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(keys) + 2), 7), sharex=True)
    width = 0.8 / max(1, len(modes))
    for ax, idx, what in ((axes[0], 0, "step time"), (axes[1], 1, "peak memory")):
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, k in enumerate(keys):
                base = cases[k]["nonprivate"][idx]
                v = cases[k].get(mode)
                x = i + (j - (len(modes) - 1) / 2) * width
                if v is None:
                    if mode in cases[k]:  # the mode ran and failed
                        ax.text(x, 1.0, "x", ha="center", va="bottom", color="red")
                    continue
                xs.append(x)
                ys.append(v[idx] / base if base > 0 else float("nan"))
            bars = ax.bar(xs, ys, width, label=mode)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{what} / nonprivate")
    axes[1].set_xticks(range(len(keys)), [label(k) for k in keys], fontsize=8)
    axes[0].legend(fontsize=8)
    title = ", ".join(gpus)
    if any(g.startswith("cpu") for g in gpus):
        title += "  (CPU smoke run: memory = peak RSS delta)"
    axes[0].set_title(f"One DP-SGD step vs non-private (x = failed)\n{title}", fontsize=9)
    fig.tight_layout()
    out = Path(args.out) if args.out else path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
