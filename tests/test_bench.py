"""The benchmark scripts still run: bench/e2e.py end to end on one tiny CPU case (its own
processes, its CSV contract, Opacus reported as skipped when it is missing), and every
bench/models.py model through one forward."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import e2e, models  # noqa: E402

HAVE_OPACUS = importlib.util.find_spec("opacus") is not None


def test_e2e_cpu_tiny(tmp_path):
    out = tmp_path / "e2e.csv"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "e2e.py"), "--device", "cpu", "--cases",
         "cpu-tiny", "--modes", "nonprivate,dpkernels,opacus_hooks,opacus_ghost",
         "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == e2e.COLUMNS
    assert rows[0] == ["date", "gpu", "torch", "triton", "git_sha", "model", "dtype", "batch",
                       "seq", "mode", "ms_median", "ms_p20", "ms_p80", "peak_mib"]
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    by_mode = {r["mode"]: r for r in body}
    for mode in ("nonprivate", "dpkernels"):
        r = by_mode[mode]
        assert (r["model"], r["dtype"], r["batch"], r["seq"]) == ("mlp-tiny", "fp32", "16", "")
        assert r["gpu"].startswith("cpu")
        assert r["torch"] == torch.__version__
        ms = [float(r[k]) for k in ("ms_p20", "ms_median", "ms_p80")]
        assert 0 < ms[0] <= ms[1] <= ms[2], r
        float(r["peak_mib"])
    assert len({r["date"] for r in body}) == 1  # one stamp per run
    table = p.stdout
    assert "time x" in table and "nonprivate" in table and "dpkernels" in table
    if not HAVE_OPACUS:
        assert set(by_mode) == {"nonprivate", "dpkernels"}  # skips are not CSV rows
        lines = [ln for ln in table.splitlines() if "opacus_" in ln and "skipped" in ln]
        assert any("opacus_hooks" in ln for ln in lines), table
        assert any("opacus_ghost" in ln for ln in lines), table
        assert "opacus is not installed" in table


def test_e2e_case_parsing():
    assert e2e.parse_case("gpt:bf16:16:256") == {"model": "gpt", "dtype": "bf16",
                                                  "batch": 16, "seq": 256}
    assert e2e.parse_case("mlp:fp32:1024")["seq"] is None
    assert len(e2e.expand_cases("anchors")) == 6
    with pytest.raises(ValueError, match="gpt needs a sequence length"):
        e2e.parse_case("gpt:fp32:16")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        e2e.parse_case("resnet:fp32:16")


@pytest.mark.parametrize("name,sizes,batch,seq,out_shape", [
    ("gpt", {"vocab": 97, "d": 32, "layers": 2, "heads": 4, "seq": 16}, 3, 16, (3, 16, 97)),
    ("cnn", {"widths": (32, 32, 32, 32, 64), "size": 16}, 2, None, (2, 10)),
    ("mlp", {"widths": (784, 64, 64, 10)}, 4, None, (4, 10)),
])
def test_models_forward(name, sizes, batch, seq, out_shape):
    spec = models.spec(name, **sizes)
    model = spec.model()
    x, y = spec.batch(batch, seq)
    out = model(x)
    assert out.shape == out_shape
    loss = spec.loss(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    args, kwargs = spec.criterion_args(out, y)
    per_sample = torch.nn.functional.cross_entropy(*args, reduction="none")
    assert per_sample.shape[0] == (batch * seq if seq else batch)


@pytest.mark.parametrize("label", ["hf-gpt2-tiny", "hf-llama-tiny"])
def test_hf_models_on_the_fast_path(label):
    """The tiny transformers cases of bench/e2e.py build, run a DP step and use no generic
    fallback (a fallback would make their timings meaningless)."""
    pytest.importorskip("transformers")
    import warnings

    import dpkernels

    arch, sizes = e2e.MODELS[label]
    spec = models.spec(arch, **sizes, seq=16)
    torch.manual_seed(0)
    model = spec.model()
    x, y = spec.batch(3, 16)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=3,
                                backend="reference")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        out = model(x)
        assert out.shape == (3, 16, sizes["vocab"])
        spec.loss(out, y).backward()
        dp.step()
    assert dp.per_sample_norms.shape == (3,)


def test_hf_model_sizes():
    """hf-gpt2 is GPT-2 small (124.4 M parameters), hf-llama-1b TinyLlama's 1.10 B shape
    (built on the meta device: nothing allocated)."""
    pytest.importorskip("transformers")
    counts = {}
    for label in ("hf-gpt2", "hf-llama-1b"):
        arch, sizes = e2e.MODELS[label]
        with torch.device("meta"):
            m = models.spec(arch, **sizes, seq=256).model()
        counts[label] = sum(p.numel() for p in m.parameters())
    assert counts == {"hf-gpt2": 124_439_808, "hf-llama-1b": 1_100_048_384}


def test_model_sizes_match_anchors():
    gpt = models.gpt(seq=256)
    n = sum(p.numel() for p in gpt.parameters())
    # 6 blocks of 12 d^2 + 13 d, embeddings V d + T d, head d V + V, final LN 2 d
    d, V, T = 768, 16384, 256
    assert n == 6 * (12 * d * d + 13 * d) + V * d + T * d + d * V + V + 2 * d
    cnn = models.cnn()
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256]
    assert all(m.num_groups == 32 for m in cnn.modules() if isinstance(m, torch.nn.GroupNorm))
    assert cnn(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    widths = [m.out_features for m in models.mlp().modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 1024, 10]


def test_e2e_failing_case_is_reported(tmp_path):
    """A case that crashes gives an error line and a CSV row with empty numbers; the run
    goes on (here it is the only case, so the exit status says nothing was measured)."""
    out = tmp_path / "e2e.csv"
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "e2e.py"), "--device", "cpu", "--cases",
         "cpu-tiny", "--modes", "dpkernels", "--backend", "no-such-backend", "--steps", "1",
         "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert "error" in p.stdout and "no-such-backend" in p.stdout
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["mode"] == "dpkernels"
    assert rows[0]["ms_median"] == "" and rows[0]["peak_mib"] == ""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernels_interpret_smoke(tmp_path):
    """bench/kernels.py runs one tiny shape per op in Triton's interpreter (checks the script,
    not the kernels' speed) and writes its CSV contract."""
    out = tmp_path / "kernels.csv"
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels.py"), "--interpret-smoke", "--out",
         str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["date", "gpu", "torch", "triton", "git_sha", "op", "shape",
                             "dtype", "provider", "ms_median", "ms_p20", "ms_p80",
                             "ratio_or_bandwidth"]
    ops = {r["op"] for r in rows}
    assert {"copy", "weight_grad_gemm"} <= ops
    assert any(r["op"].startswith("linear_norm") and r["provider"] == "reference" for r in rows)
    if importlib.util.find_spec("dpkernels._C") is not None:  # secure noise: the C++ build
        assert {r["provider"] for r in rows if r["op"] == "secure_noise"} == {"chacha20",
                                                                              "torch.randn"}


def test_kernels_refuses_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py")],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert p.returncode == 0 and "needs a CUDA GPU" in p.stdout


def test_ops_bench_covers_every_op():
    """bench/test_ops_bench.py has a CPU and a GPU case for every registered op (a new op
    needs a micro-benchmark), and a reference and a Triton provider for each."""
    from bench import test_ops_bench as ob
    from dpkernels import dispatch

    names = set(dispatch.op_names())
    assert names - set(ob.CPU) == set()
    assert names - set(ob.GPU) == set()
    ids = {p.id for p in ob._params()}
    for op in names:
        for provider in ("reference", "triton"):
            assert any(i.startswith(op + "-") and i.endswith("-fp32-" + provider) for i in ids)


def test_ops_bench_runs_one_case(tmp_path):
    """`pytest bench/ --benchmark-only` collects, runs a tiny case on the reference, skips the
    Triton one without a GPU, and writes pytest-benchmark's JSON with our machine info."""
    out = tmp_path / "ops.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p",
         "no:cacheprovider", "-k", "test_op and dense_norm- and fp32",
         "--benchmark-max-time=0.05", "--benchmark-min-rounds=2", "--benchmark-warmup=off",
         f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["machine_info"]["dpkernels"]["torch"] == torch.__version__
    done = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert "reference" in done
    assert all(b["stats"]["rounds"] >= 2 and b["stats"]["median"] > 0
               for b in data["benchmarks"])
    if not torch.cuda.is_available():
        assert done == {"reference"}
        assert "1 skipped" in p.stdout  # the Triton case, reported as skipped
