"""What every benchmark script records beside its numbers: the card, the versions, the
commit, and how to append rows to a results CSV."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def now_utc() -> str:
    """One timestamp per run, shared by all its rows (plot.py groups a run by it)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The card's name (``torch.cuda.get_device_name``), or ``cpu: <model>``."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {cpu_name()}"


def slug(name: str) -> str:
    """A file-name-safe short form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    if name.startswith("cpu"):
        return "cpu"
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def git_sha() -> str:
    """Short commit of the checkout, ``-dirty`` if tracked files differ from it.

    The device machine gets a copy of the working tree that may have no .git; then
    ``DPKERNELS_GIT_SHA`` (set by whoever starts the run) is used, else 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO,
                                   capture_output=True, timeout=10).returncode != 0
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DPKERNELS_GIT_SHA", "unknown")


def default_csv(device_label: str, suffix: str = "") -> Path:
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS / f"{day}-{slug(device_label)}{suffix}.csv"


def check_csv(path: Path, columns: list[str]) -> None:
    """Refuse to append to a CSV whose header is not ``columns``."""
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != columns:
            raise SystemExit(f"{path} has the header {header}, expected {columns}; "
                             "pass --out with another file")


def append_row(path: Path, columns: list[str], row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (numpy's default method)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt(x, digits: int = 3) -> str:
    if x is None or x == "":
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if v != v:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)), flush=True)
