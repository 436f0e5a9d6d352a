"""Pure-torch implementations of every op: the CPU fallback and the oracle for the kernels.

Written to be obviously right (float64-capable, chunked over samples to bound memory),
never changed to agree with a kernel.  Importing this package registers the ops.
"""

from dpkernels.reference import (  # noqa: F401
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
