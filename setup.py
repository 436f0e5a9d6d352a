"""Builds the C++ extension ``dpkernels._C`` (csrc/: the secure-noise ops) when it can.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch that
is already installed: a torch extension must be compiled against the torch it runs with, and
with build isolation pip would build in a fresh environment without torch (the extension is
then skipped, with a warning) or, were torch listed as a build requirement, download an
unpinned one (a CUDA build of several GB).

- CPU kernels: built whenever torch is importable and a C++ compiler is found.
- CUDA kernels (``csrc/*.cu``) too when torch has CUDA and nvcc is found;
  ``DPKERNELS_BUILD_CUDA=1`` forces them (fails loudly if it cannot), ``DPKERNELS_SKIP_CUDA=1``
  leaves them out.
- ``DPKERNELS_SKIP_EXT=1`` builds nothing (what an install without a compiler gets).

A skipped build never fails the install: the package works without ``_C`` except
``secure_mode=True``, which then raises with the reason recorded here in
``dpkernels/_build_status.txt`` (``python -m dpkernels info`` shows it).
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

STATUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpkernels",
                           "_build_status.txt")


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(cxx) or shutil.which("c++") or shutil.which("g++")


def _skip(reason: str):
    print(f"dpkernels: not building the C++ extension: {reason}", file=sys.stderr)
    return [], {}, f"not built: {reason}"


def extensions():
    force_cuda = os.environ.get("DPKERNELS_BUILD_CUDA") == "1"
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if os.environ.get("DPKERNELS_SKIP_EXT") == "1":
        if force_cuda:
            raise RuntimeError("DPKERNELS_BUILD_CUDA=1 contradicts DPKERNELS_SKIP_EXT=1")
        return _skip("DPKERNELS_SKIP_EXT=1 was set")
    if not cpp:
        return _skip("csrc/ has no C++ sources (incomplete source tree)")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:
        if force_cuda:
            raise
        return _skip(f"torch cannot be imported at build time ({e}); install torch first, "
                     "then this package with pip install --no-build-isolation")
    if _compiler() is None:
        if force_cuda:
            raise RuntimeError("DPKERNELS_BUILD_CUDA=1 but no C++ compiler was found")
        return _skip("no C++ compiler found (set CXX or install g++)")
    # -ffp-contract=off: no fused multiply-add, so the CPU noise equals the CUDA noise bit
    # for bit (secure_noise.h).
    cxx = ["-O3", "-ffp-contract=off"]
    with_cuda = bool(cu) and os.environ.get("DPKERNELS_SKIP_CUDA") != "1" and (
        force_cuda or (CUDA_HOME is not None and torch.version.cuda is not None))
    if with_cuda:
        ext = CUDAExtension("dpkernels._C", cpp + cu, define_macros=[("DPK_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
        what = f"built (CPU and CUDA kernels, torch {torch.__version__})"
    else:
        ext = CppExtension("dpkernels._C", cpp, extra_compile_args={"cxx": cxx})
        what = f"built (CPU kernels only, torch {torch.__version__})"
    return [ext], {"build_ext": BuildExtension}, what


ext_modules, cmdclass, status = extensions()
try:
    with open(STATUS_FILE, "w") as f:
        f.write(status + "\n")
except OSError:  # a read-only source tree: the run-time message is then less specific
    pass
setup(ext_modules=ext_modules, cmdclass=cmdclass)
