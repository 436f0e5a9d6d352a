"""``python -m dpkernels.info``: versions, GPU, C++/CUDA extension, and which backend runs each op.

Never imports triton itself (importing it before ``TRITON_INTERPRET`` is decided would pin
the wrong mode); the op table loads a backend only where :mod:`dpkernels.dispatch` says it
can run.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from dpkernels import dispatch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import dpkernels

    lines = [
        f"dpkernels      {dpkernels.__version__}",
        f"python         {platform.python_version()} ({sys.platform})",
        f"torch          {torch.__version__}",
        f"triton         {_version('triton')}",
        f"dp-accounting  {_version('dp-accounting')}",
        f"CUDA (torch)   {torch.version.cuda or 'none (CPU build)'}",
    ]
    gpu = torch.cuda.is_available()
    if gpu:
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            lines.append(f"GPU {i}          {torch.cuda.get_device_name(i)} (sm {cap})")
    else:
        lines.append("GPU            none visible to torch")
    from dpkernels import secure

    ok, why = secure.available()
    if ok:
        kernels = "CPU and CUDA kernels" if secure.with_cuda() else "CPU kernels only"
        lines.append(f"C++ extension  built ({kernels}): secure_mode=True available")
    else:
        lines.append(f"C++ extension  not built, secure_mode=True unavailable: {why}")
    from dpkernels import layers
    from dpkernels.layers import op_rules

    # which capture each module gets (DESIGN.md section 7): module rules, then op rules
    lines.append("module rules   " + ", ".join(sorted(t.__name__ for t in layers._BUILTIN)))
    rules = sorted({f.__name__ for f in op_rules.RULES.values()})
    lines.append("op rules       " + ", ".join(rules))
    devices = ["cpu"] + (["cuda"] if gpu else [])
    for dev in devices:
        ok, why = dispatch.triton_available(dev)
        lines.append(f"triton on {dev:<4} {'usable' if ok else 'not usable: ' + why}")
    backends = ("reference", "triton", "cuda")
    for dev in devices:
        try:
            rows = dispatch.table(dev)
        except Exception as e:  # a broken optional backend must not hide the rest
            lines += ["", f"op table for {dev}: unavailable ({type(e).__name__}: {e})"]
            continue
        width = max([len("op")] + [len(r[0]) for r in rows])
        lines += ["", f"ops on {dev} tensors (yes: implemented; auto: what backend='auto' runs)",
                  f"  {'op':<{width}}  " + "  ".join(f"{b:<9}" for b in backends) + "  auto"]
        for name, have, auto in rows:
            cells = "  ".join(f"{'yes' if have[b] else '-':<9}" for b in backends)
            lines.append(f"  {name:<{width}}  {cells}  {auto}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
