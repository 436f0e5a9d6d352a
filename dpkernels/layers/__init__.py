"""One file per layer family: how to capture it and which ops compute its norms and sums.

Each handler has ``check(module, name)`` (raise a clear error for configurations it cannot
handle) and ``forward(engine, module, name, orig_forward, *args, **kwargs)`` (the module's
forward while attached).  ``find_handler`` picks the handler for a module; modules with
trainable parameters and no handler get the generic torch.func fallback.
"""

from __future__ import annotations

from torch import nn

from dpkernels.layers import conv, embedding, generic, linear, norms

_HANDLERS: list = [linear.HANDLER, *conv.HANDLERS, *embedding.HANDLERS, *norms.HANDLERS]


def find_handler(module: nn.Module):
    for h in _HANDLERS:
        if type(module) in h.types:
            return h
    if isinstance(module, nn.MultiheadAttention):
        return generic.WHOLE_MODULE
    return generic.HANDLER


def refuse(module: nn.Module, name: str) -> None:
    """Errors for modules that can never be made private as they are."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"dpkernels: {name} is a {type(module).__name__}, which mixes samples in a batch "
            "and so breaks per-sample privacy; replace it with nn.GroupNorm (for example "
            f"nn.GroupNorm(min(32, C), C)) or nn.LayerNorm"
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        # Refused even without affine parameters: the running statistics are averages over
        # training samples, kept without clipping or noise.
        raise ValueError(
            f"dpkernels: {name} ({type(module).__name__}) has track_running_stats=True; its "
            "running statistics are averaged over training samples without clipping or noise, "
            "so they are not private; construct it with track_running_stats=False"
        )
