"""bench/trace_step.py holds the launch budget: kernels a DP step launches beyond the
non-private step of the same model (Triton launches and kernel-launching torch ops, counted by
tracing one step with fake tensors, launchers sizing for an H200 without launching; no GPU).

The budgets are what a step launches with the Linear and Embedding norms (and the norm
layers' terms, kept as unsummed partials) deferred to clip time and taken in one grouped op
(linear_norms_many), and the norm sum, the cancellation bounds and the clip factors in one op
(clip_from_parts) (2026-12-05, branch h-launches2: gpt-tiny fp32 +26, bf16 +8, mlp-tiny +6;
branch h-launches before it: +51 / +33 / +10, with the bounds deferred to one grouped
magnitude op and one stacked pass and LayerNorm's input gradient from its saved statistics;
main c0e84a7 before that: +333 / +340 / +24).  Merged with main's privacy fixes (4f908b6, the
underflow bound of Gram-form norms, DESIGN.md section 6): its terms are rows of the one
magnitude op and entries of clip_from_parts' table, so gpt-tiny is unchanged; mlp-tiny, whose
T = 1 Linears had no deferred bound before, now runs magnitude_many (a launch, its table's
copy and its sum) and copies the clip op's table: +4, constant per step (mlp-tiny 10).
Then (branch h-mlp): T = 1 uses' magnitudes as extra rows of linear_norms_many (no
magnitude_many when every deferred magnitude is of a T = 1 Linear), and the clip op's bounds
table and the weights' clipped-sum scaling table staged to ride along the norms' table copy:
gpt-tiny fp32 24, bf16 7, mlp-tiny 5.  Then the trace gave fake tensors distinct addresses
(all fake data_ptr()s were 0, so same-shape layers' tables looked like one staged table and
were counted as extra copies): gpt-tiny fp32 16, bf16 -1; and a long sequence (T = 200, the
direct norm form) whose direct-form norms are one launch per shape: +26, then +18 with
those uses' per-sample gradients kept for the clipped sum (no scaling launch and GEMM per
layer; linear_direct_many).  A change that
adds launches per layer fails here; lower a budget when launches are removed, never raise it
without saying why in the commit.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
BUDGET = {("gpt-tiny", "fp32", "32"): 16, ("gpt-tiny", "bf16", "32"): -1,
          ("mlp-tiny", "fp32", ""): 5, ("gpt-tiny", "fp32", "200"): 18}


def test_launch_budget(tmp_path):
    # its own process: the trace imports triton without the interpreter and patches launches
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "trace_step.py"), "--cases",
         "gpt-tiny:fp32:4:32,gpt-tiny:bf16:4:32,mlp-tiny:fp32:16,gpt-tiny:fp32:2:200",
         "--out-prefix",
         str(tmp_path / "trace")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "trace.csv").open()))
    dp = {(r["model"], r["dtype"], r["seq"]): r for r in rows if r["mode"] == "dpkernels"}
    assert set(dp) == set(BUDGET)
    for key, budget in BUDGET.items():
        r = dp[key]
        assert int(r["triton_launches"]) > 0, key  # the Triton launchers ran (traced)
        assert int(r["extra_launches"]) <= budget, (key, r["extra_launches"], budget)
    md = (tmp_path / "trace.md").read_text()
    assert "ESTIMATE" in md and "not a measurement" in md
