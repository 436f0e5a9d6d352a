"""dpkernels: fused per-sample-gradient kernels and a one-backward DP-SGD engine."""

from dpkernels import schedules
from dpkernels.accounting import epsilon, epsilon_from_history, noise_multiplier_for
from dpkernels.adaptive import AdaptiveClipping
from dpkernels.data import PoissonBatchSampler, micro_batches, poisson_loader, use_loader
from dpkernels.layers import register_module_rule
from dpkernels.optim import DPOptimizer, detach, make_private

__version__ = "0.1.0"

__all__ = [
    "DPOptimizer",
    "AdaptiveClipping",
    "make_private",
    "detach",
    "register_module_rule",
    "epsilon",
    "epsilon_from_history",
    "noise_multiplier_for",
    "PoissonBatchSampler",
    "poisson_loader",
    "micro_batches",
    "use_loader",
    "schedules",
    "__version__",
]
