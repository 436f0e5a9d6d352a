"""Builds the optional CUDA extension (csrc/) only when it can and should.

- ``DPKERNELS_BUILD_CUDA=1`` forces the build (fails loudly if it cannot);
- ``DPKERNELS_SKIP_CUDA=1`` skips it;
- otherwise it is built when csrc/ has sources, torch is importable with CUDA and nvcc is
  found.  A CPU-only install never fails here: the Triton and reference backends cover every
  op, and ``python -m dpkernels.info`` reports whether the extension is there.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    force = os.environ.get("DPKERNELS_BUILD_CUDA") == "1"
    if os.environ.get("DPKERNELS_SKIP_CUDA") == "1" or not sources:
        if force and not sources:
            raise RuntimeError("DPKERNELS_BUILD_CUDA=1 but csrc/ has no sources")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        if force:
            raise
        return [], {}
    if not force and (CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    ext = CUDAExtension(
        "dpkernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
