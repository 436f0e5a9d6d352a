"""pytest setup for the micro-benchmarks (bench/test_ops_bench.py): the repository root on
``sys.path`` (so this checkout's dpkernels is timed), and the versions, commit and device in
pytest-benchmark's machine info (the JSON's ``machine_info``)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

# One torch thread on a CPU (as bench/e2e.py): two OpenMP threads on a shared 2-core machine
# were slowed many times over whenever another process ran.
if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("DPKERNELS_BENCH_THREADS", "1")))


def pytest_benchmark_update_machine_info(config, machine_info):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine_info["dpkernels"] = {
        "device": common.device_name(device),
        "torch": torch.__version__,
        "triton": common.version("triton"),
        "git_sha": common.git_sha(),
        "torch_threads": torch.get_num_threads(),
        "backends": ("reference, triton" if device == "cuda"
                     else "reference (no GPU: triton skipped)"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Summary statistics only: the raw per-round timings made a CPU run's JSON 6 MB.
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
