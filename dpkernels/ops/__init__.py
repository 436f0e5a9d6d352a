"""Triton kernels, one op family per file; importing this package registers them with
:mod:`dpkernels.dispatch` under the ``"triton"`` backend."""

from dpkernels.ops import bounds, conv, dense, embedding, linear, norms  # noqa: F401
