"""One file per layer family: how to capture it and which ops compute its norms and sums.

Each handler has ``check(module, name)`` (raise a clear error for configurations it cannot
handle) and ``forward(engine, module, name, orig_forward, *args, **kwargs)`` (the module's
forward while attached).  ``find_handler`` picks the handler for a module, in the order of
DESIGN.md section 7: a module rule (registered for its class, or for a parent class whose
function it computes), else op-level capture of the ops that take its own parameters
(opcapture.py, rules in op_rules.py), which sends a module using an op no rule covers to
the generic torch.func fallback (generic.py).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from dpkernels.layers import conv, embedding, generic, linear, norms, op_rules, opcapture

_HANDLERS: list = [linear.HANDLER, *conv.HANDLERS, *embedding.HANDLERS, *norms.HANDLERS]
_BUILTIN: dict[type, object] = {t: h for h in _HANDLERS for t in h.types}
_USER: dict[type, object] = {}  # register_module_rule

# Methods a subclass may override and still compute its parent's function.
_HARMLESS = {"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__",
             "_load_from_state_dict", "__module__", "__doc__", "__qualname__"}

assert op_rules.RULES  # the op rules register on import


def _computes_parent(cls: type, base: type) -> bool:
    """True if ``cls`` overrides nothing of ``base``'s that its forward may call (forward
    included), so ``base``'s rule computes ``cls``'s function."""
    for k in cls.__mro__:
        if k is base:
            return True
        for attr, v in vars(k).items():
            if attr in _HARMLESS or not hasattr(base, attr):
                continue
            if callable(v) or isinstance(v, (property, staticmethod, classmethod)):
                return False
    return True


def find_handler(module: nn.Module):
    cls = type(module)
    if _instance_forward(module):
        # a forward replaced on the instance (accelerate hooks, adapter tricks) may compute
        # anything: capture the ops it runs, never the class's rule
        return opcapture.HANDLER
    for k in cls.__mro__:
        h = _USER.get(k) or _BUILTIN.get(k)
        if h is not None and (k is cls or _computes_parent(cls, k)):
            return h
        if h is not None:
            break  # a subclass with its own forward: its ops are captured instead
    if isinstance(module, nn.MultiheadAttention):
        return generic.WHOLE_MODULE
    return opcapture.HANDLER


def _instance_forward(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    if fwd is None:
        return False
    # a plain re-binding of the class's own forward (a detached copy) is not an override
    return getattr(fwd, "__func__", None) is not type(module).forward


def register_module_rule(cls: type, rule) -> None:
    """Capture every ``cls`` module (and subclasses that override nothing of it) by ``rule``.

    ``rule`` is either a built-in module class that ``cls`` subclasses (for example
    ``register_module_rule(MyLayerNorm, nn.LayerNorm)`` when ``MyLayerNorm`` overrides
    ``forward`` but still computes ``F.layer_norm(x, self.normalized_shape, self.weight,
    self.bias, self.eps)``), or a handler object with ``check(module, name)`` and
    ``forward(engine, module, name, orig_forward, *args, **kwargs)`` (see CONTRIBUTING.md).
    Call it before ``make_private``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"dpkernels.register_module_rule: {cls!r} is not an nn.Module class")
    if isinstance(rule, type):
        handler = _BUILTIN.get(rule)
        if handler is None:
            raise ValueError(
                f"dpkernels.register_module_rule: {rule.__name__} has no built-in rule; pass "
                f"one of {sorted(t.__name__ for t in _BUILTIN)} or a handler object"
            )
        if not issubclass(cls, rule):
            raise TypeError(
                f"dpkernels.register_module_rule: {cls.__name__} must subclass "
                f"{rule.__name__} to use its rule (the rule reads its attributes)"
            )
    elif callable(getattr(rule, "forward", None)) and callable(getattr(rule, "check", None)):
        handler = rule
    else:
        raise TypeError(
            "dpkernels.register_module_rule: rule must be a module class with a built-in rule "
            f"or an object with check(module, name) and forward(...), got {rule!r}"
        )
    _USER[cls] = handler


def refuse(module: nn.Module, name: str) -> None:
    """Errors for modules that can never be made private as they are."""
    kind = type(module).__name__
    trainable = any(p.requires_grad for p in module.parameters())
    if trainable and _batch_second(module):
        # [T, B, ...] inputs: every capture takes dim 0 as the batch, so the per-sample
        # gradients would be per time step, and silently so when T == B.
        raise ValueError(
            f"dpkernels: {name} ({kind}) has batch_first=False (torch's default), so its "
            "inputs are [T, B, ...] and per-sample gradients would be taken per time step; "
            "construct it with batch_first=True and feed [B, T, ...] inputs"
        )
    if trainable and parametrize.is_parametrized(module):
        tensors = ", ".join(module.parametrizations.keys())
        raise ValueError(
            f"dpkernels: {name} ({kind}) has parametrized tensors ({tensors}, e.g. "
            "nn.utils.parametrizations.weight_norm); per-sample gradients of their original "
            "parameters are not supported. Remove the parametrization before make_private "
            f"(nn.utils.parametrize.remove_parametrizations(module, {tensors.split(', ')[0]!r}) "
            f"on {name}) or freeze its parameters"
        )
    legacy = [h for h in module._forward_pre_hooks.values() if isinstance(h, _LEGACY_REPARAM)]
    if trainable and legacy:
        # The hook recomputes the weight from weight_g / weight_v (weight_orig) before
        # forward, outside any capture: those parameters would get a gradient of 0 silently.
        fix = ("nn.utils.remove_weight_norm" if isinstance(legacy[0], WeightNorm)
               else "nn.utils.remove_spectral_norm")
        raise ValueError(
            f"dpkernels: {name} ({kind}) uses the legacy {type(legacy[0]).__name__} hook on "
            f"{legacy[0].name!r}, which recomputes that weight outside the module's forward, "
            "so its parameters would get no per-sample gradient; remove it before "
            f"make_private ({fix}(module) on {name}) or freeze its parameters"
        )
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


_LEGACY_REPARAM = (WeightNorm, SpectralNorm)


def _batch_second(module: nn.Module) -> bool:
    """A torch module whose inputs are [T, B, ...] (batch_first=False, torch's default)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return any(_batch_second(layer) for layer in module.layers)
    return False
