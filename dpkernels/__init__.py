"""dpkernels: fused per-sample-gradient kernels and a one-backward DP-SGD engine."""

from dpkernels.optim import DPOptimizer, detach, make_private

__version__ = "0.1.0"

__all__ = ["DPOptimizer", "make_private", "detach", "__version__"]
