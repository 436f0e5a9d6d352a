"""Triton kernels, one op family per file; importing this package registers them with
:mod:`dpkernels.dispatch` under the ``"triton"`` backend."""

from dpkernels.ops import (  # noqa: F401
    bounds,
    clip_many,
    conv,
    dense,
    embedding,
    ghost_many,
    linear,
    norm_parts,
    norms,
)
