"""Pure-torch implementations of every op: the CPU fallback and the oracle for the kernels.

Written to be obviously right (float64-capable, chunked over samples to bound memory),
never changed to agree with a kernel.  Importing this package registers the ops.
"""

from dpkernels.reference import dense, linear  # noqa: F401

try:  # families added by later work register themselves when present
    from dpkernels.reference import conv, embedding, norms  # noqa: F401
except ImportError:  # pragma: no cover
    pass
