"""ops/_common.py's table uploads: ``device_table`` is ``torch.tensor(rows)`` on the device,
and a table staged in advance (``stage_table``) rides along another table's copy and is handed
out only when a later table has exactly its bytes (never a stale copy)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

from dpkernels.ops import _common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTS = [[7, -1, 2**40, 3], [0, 5, -(2**62), 9]]
FLOATS = [[1.0, 2.5e-38, -3.0], [float("inf"), 1e300, 2.0**-126]]  # 1e300 -> inf in float32


@pytest.fixture(autouse=True)
def clean():
    _common.drop_staged()
    yield
    _common.drop_staged()


def _same(t, rows, dtype):
    exp = torch.tensor(rows, dtype=dtype)
    assert t.dtype == dtype and t.shape == exp.shape and t.device.type == DEVICE
    assert torch.equal(t.cpu(), exp), (t, exp)


def test_device_table_is_torch_tensor():
    _same(_common.device_table(INTS, torch.int64, DEVICE), INTS, torch.int64)
    _same(_common.device_table(FLOATS, torch.float32, DEVICE), FLOATS, torch.float32)


def test_staged_tables_ride_along_one_copy():
    odd = [[1.5, 2.5, 3.5]]  # 12 bytes: the next table must still start 16-byte aligned
    _common.stage_table(FLOATS, torch.float32, DEVICE)
    _common.stage_table(odd, torch.float32, DEVICE)
    _common.stage_table(INTS, torch.int64, DEVICE)
    first = _common.device_table([[1, 2, 3]], torch.int64, DEVICE)
    _same(first, [[1, 2, 3]], torch.int64)
    base = first.untyped_storage().data_ptr()
    for rows, dt in [(INTS, torch.int64), (odd, torch.float32), (FLOATS, torch.float32)]:
        t = _common.device_table(rows, dt, DEVICE)
        _same(t, rows, dt)
        assert t.untyped_storage().data_ptr() == base  # the same copy
        assert t.data_ptr() % 16 == 0
    # each carried copy is handed out once; then a table is uploaded on its own again
    again = _common.device_table(INTS, torch.int64, DEVICE)
    _same(again, INTS, torch.int64)
    assert again.untyped_storage().data_ptr() != base


def test_a_changed_table_is_never_the_staged_copy():
    _common.stage_table(INTS, torch.int64, DEVICE)
    _common.stage_table(FLOATS, torch.float32, DEVICE)
    first = _common.device_table([[0]], torch.int64, DEVICE)
    base = first.untyped_storage().data_ptr()
    changed = [r[:] for r in INTS]
    changed[1][3] += 1  # one entry differs (a tensor reallocated elsewhere)
    t = _common.device_table(changed, torch.int64, DEVICE)
    _same(t, changed, torch.int64)
    assert t.untyped_storage().data_ptr() != base
    nudged = [r[:] for r in FLOATS]
    nudged[0][0] = 1.0 + 2.0**-23  # a different float32
    t = _common.device_table(nudged, torch.float32, DEVICE)
    _same(t, nudged, torch.float32)
    assert t.untyped_storage().data_ptr() != base
    # the same values in another dtype are another table
    t = _common.device_table(INTS, torch.float32, DEVICE)
    _same(t, INTS, torch.float32)
    assert t.untyped_storage().data_ptr() != base


def test_drop_staged_forgets_carried_copies():
    _common.stage_table(INTS, torch.int64, DEVICE)
    first = _common.device_table([[0]], torch.int64, DEVICE)
    _common.drop_staged()
    t = _common.device_table(INTS, torch.int64, DEVICE)
    _same(t, INTS, torch.int64)
    assert t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()


def test_unpackable_tables_upload_as_before():
    big = [[2**63]]  # out of int64: torch.tensor refuses it, so must device_table
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        _common.device_table(big, torch.int64, DEVICE)
    _same(_common.device_table([[1, 2]], torch.int32, DEVICE), [[1, 2]], torch.int32)
