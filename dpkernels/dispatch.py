"""One op interface, one implementation per backend.

Every numeric piece of the engine (per-sample norms, cross terms, clipped sums, noise) is an
op called through :func:`call`.  ``dpkernels/reference`` registers a pure-torch version of
every op; ``dpkernels/ops`` (Triton) and ``csrc`` (CUDA) register faster versions of some.
An op that a backend does not implement runs on the reference, so kernels can replace the
reference one op at a time; :func:`table` says which implementation each op gets.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")

_IMPLS: dict[tuple[str, str], Callable] = {}
_loaded: dict[str, bool] = {}


def register(name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements op ``name`` on ``backend``."""

    def deco(fn: Callable) -> Callable:
        _IMPLS[(name, backend)] = fn
        _RESOLVED.clear()
        return fn

    return deco


def op_names() -> list[str]:
    _load("reference")
    return sorted({n for (n, b) in _IMPLS if b == "reference"})


def triton_available(device_type: str) -> tuple[bool, str]:
    """Can the Triton kernels run on tensors of this device type?  (ok, reason)."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
    except Exception as e:  # pragma: no cover - broken environments
        return False, f"triton cannot be found: {e}"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda":
        if interpret:
            return False, "TRITON_INTERPRET=1 is set, so Triton cannot compile for the GPU"
        return True, ""
    if device_type == "cpu":
        if interpret:
            return True, ""
        if "triton" in sys.modules:
            return False, (
                "triton was imported without TRITON_INTERPRET=1; set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on CPU tensors"
            )
        return True, ""  # _load("triton") sets TRITON_INTERPRET=1 before importing triton
    return False, f"Triton kernels do not support device type {device_type!r}"


@functools.cache
def cuda_available() -> tuple[bool, str]:
    from dpkernels import secure

    ok, why = secure.available()
    if not ok:
        return False, f"the C++ extension (csrc/) is not built: {why}"
    if not secure.with_cuda():
        return False, "the C++ extension (csrc/) was built without its CUDA kernels"
    if not any(b == "cuda" for (_, b) in _IMPLS):
        # auto must keep picking Triton on the GPU: a "cuda" backend without ops would send
        # every op to the reference
        return False, ("no DP-SGD op has a CUDA C++ kernel yet (csrc/ ships the secure-noise "
                       "generator only)")
    return True, ""


def _load(backend: str) -> None:
    if _loaded.get(backend):
        return
    if backend == "reference":
        import dpkernels.reference  # noqa: F401  (registers its ops)
    elif backend == "triton":
        if "triton" not in sys.modules and not torch.cuda.is_available():
            # No GPU: the kernels can only run in Triton's interpreter, which must be
            # switched on before triton is first imported.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        import dpkernels.ops  # noqa: F401  (registers its ops)
    elif backend == "cuda":
        import dpkernels._C  # noqa: F401
    _loaded[backend] = True


def check_backend(backend: str, device_type: str) -> None:
    """Raise a clear error when ``backend`` was asked for explicitly and cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        ok, why = triton_available(device_type)
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run on {device_type} tensors: {why}")
    elif backend == "cuda":
        if device_type != "cuda":
            raise RuntimeError("backend='cuda' needs CUDA tensors; use 'auto' or 'reference'")
        ok, why = cuda_available()
        if not ok:
            raise RuntimeError(f"backend='cuda' cannot run: {why}")


def pick(backend: str, device_type: str) -> str:
    """The backend that actually runs for ``backend`` on tensors of ``device_type``."""
    if backend != "auto":
        return backend
    if device_type == "cuda":
        if cuda_available()[0]:
            return "cuda"
        if triton_available("cuda")[0]:
            return "triton"
    return "reference"


_RESOLVED: dict[tuple[str, str, str], tuple[Callable, str]] = {}


def resolve(name: str, backend: str, device_type: str) -> tuple[Callable, str]:
    """(implementation, backend it comes from) for op ``name`` (cached: this is on the hot
    path of every backward)."""
    key = (name, backend, device_type)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve(name, backend, device_type)
    return hit


def _resolve(name: str, backend: str, device_type: str) -> tuple[Callable, str]:
    chosen = pick(backend, device_type)
    if chosen != "reference":
        _load(chosen)
        fn = _IMPLS.get((name, chosen))
        if fn is not None:
            return fn, chosen
    _load("reference")
    fn = _IMPLS.get((name, "reference"))
    if fn is None:
        raise KeyError(f"unknown op {name!r}")
    return fn, "reference"


def _device_type(args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        # grouped ops take lists of tensors, or of tuples of operands: the first tensor
        while isinstance(a, (list, tuple)) and a:
            a = next((x for x in a if isinstance(x, (torch.Tensor, list, tuple))), None)
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def call(name: str, backend: str, *args, **kwargs):
    device_type = _device_type(args, kwargs)
    fn, chosen = resolve(name, backend, device_type)
    if chosen == "reference" and device_type != "cpu":
        # the reference multiplies float32 with torch, which may use TF32 on a GPU
        from dpkernels.reference._common import exact_fp32

        with exact_fp32():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def table(device_type: str) -> list[tuple[str, dict[str, bool], str]]:
    """Rows (op, {backend: implemented}, what 'auto' picks) for ``device_type``."""
    names = op_names()
    for b in ("triton", "cuda"):
        ok, _ = triton_available(device_type) if b == "triton" else cuda_available()
        if ok:
            try:
                _load(b)
            except Exception:
                pass
    rows = []
    for n in names:
        have = {b: (n, b) in _IMPLS for b in ("reference", "triton", "cuda")}
        _, auto = resolve(n, "auto", device_type)
        rows.append((n, have, auto))
    return rows
