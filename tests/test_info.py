import subprocess
import sys

import torch

from dpkernels import dispatch, info


def test_info_report_lists_versions_and_ops():
    text = info.report()
    for word in ("dpkernels", "torch", "triton", "C++ extension", "GPU"):
        assert word in text
    rows = dispatch.table("cpu")
    for name, _, auto in rows:
        line = next(l for l in text.splitlines() if l.split()[:1] == [name])
        assert line.split()[-1] == auto
    if not torch.cuda.is_available():
        assert "none visible" in text


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "dpkernels.info"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "linear_norm" in out and "auto" in out


def test_grouped_ops_dispatch_on_their_operands_device():
    """Grouped ops take lists of operand tuples (``magnitude_many([(None, g), ...])``,
    ``linear_norms_many([(a, g, method, with_bias), ...])``): backend="auto" must pick the
    backend for the device of the tensors inside, not for "cpu" (on a GPU, the reference)."""
    meta = torch.empty(2, 3, 4, device="meta")
    assert dispatch._device_type(([(None, meta)],), {}) == "meta"
    assert dispatch._device_type(([(meta, meta, "auto", True)],), {}) == "meta"
    assert dispatch._device_type(([meta], 0.5), {}) == "meta"
    assert dispatch._device_type((1.0, "x"), {}) == "cpu"
