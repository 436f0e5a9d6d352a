"""The fallback for any module with trainable parameters and no fused rule.

Forward runs the module with its own parameters behind a gradient block (so autograd never
hands them an un-clipped gradient) and hooks the output.  When the output's gradient
arrives, the module is re-run per sample under ``torch.func.vmap`` of a ``vjp`` with
respect to its own parameters: exact per-sample gradients, materialised, so correct but
slow.  The module must return one tensor (or a tuple with one differentiable tensor) with the
batch first, and its forward must be deterministic (no dropout inside it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpkernels.layers.base import DenseUse


class GenericHandler:
    types: tuple = ()
    generic = True

    def __init__(self, whole_module: bool = False) -> None:
        # whole_module: the module's children's parameters are its own too (nn.MultiheadAttention
        # reads out_proj.weight directly instead of calling out_proj).
        self.whole_module = whole_module

    def check(self, module: nn.Module, name: str) -> None:
        pass

    def own_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        it = module.named_parameters() if self.whole_module else module.named_parameters(
            recurse=False)
        return {n: p for n, p in it if p.requires_grad}

    def forward(self, engine, module: nn.Module, name: str, orig, *args, **kwargs):
        own = self.own_params(module)
        if not own or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        if module.training and _random_dropout(module):
            # the per-sample re-run would draw other dropout masks than this forward did, and
            # the per-sample gradients would be silently wrong
            raise ValueError(
                f"dpkernels: {name} ({type(module).__name__}) uses the generic per-sample "
                "fallback, which re-runs its forward per sample, and it applies dropout, whose "
                "masks cannot be replayed; set its dropout to 0 (for attention, build it from "
                "nn.Linear and F.scaled_dot_product_attention, which are captured exactly)"
            )
        engine.on_forward(name)
        blocked = {n: _BlockGrad.apply(p) for n, p in own.items()}
        with engine.bypassed() if self.whole_module else contextlib.nullcontext():
            out = _call_with(module, orig, blocked, args, kwargs)
        # One tensor out, or a tuple with exactly one differentiable tensor (e.g.
        # nn.MultiheadAttention's (output, None)).
        index = None
        if isinstance(out, (tuple, list)):
            live = [i for i, t in enumerate(out)
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            index = live[0] if len(live) == 1 else -1
        if index == -1 or (index is None and not isinstance(out, torch.Tensor)):
            raise TypeError(
                f"dpkernels: {name} ({type(module).__name__}) uses the generic per-sample "
                "fallback, which needs the module to return one tensor (or a tuple with one "
                f"differentiable tensor), got {type(out).__name__}; wrap it so that it returns "
                "a tensor, or freeze its parameters"
            )
        result = out if index is None else out[index]
        if not result.requires_grad:
            return out
        flat, spec = tree_flatten((args, kwargs))
        flat = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if not tensors or tensors[0].dim() == 0:
            raise ValueError(f"dpkernels: {name} got no batched tensor input")
        B = tensors[0].shape[0]
        if result.dim() == 0 or result.shape[0] != B:
            raise ValueError(
                f"dpkernels: {name} returned shape {tuple(result.shape)} for a batch of {B}; "
                "the generic fallback needs the batch as the first dimension of the output"
            )

        def hook(g):
            psg = self._per_sample_grads(engine, module, orig, own, flat, spec, B, g, index)
            engine.record(name, B, [(own[n], DenseUse(psg[n])) for n in own])

        result.register_hook(hook)
        return out

    def _per_sample_grads(self, engine, module, orig, own, flat, spec, B, g, index):
        if B == 0:
            return {n: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    for n, p in own.items()}
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B for t in flat]
        bvals = [t for t, b in zip(flat, batched) if b]
        params = {n: p.detach() for n, p in own.items()}

        def run(P, vals):
            it = iter(vals)
            full = [next(it).unsqueeze(0) if b else t for t, b in zip(flat, batched)]
            a, k = tree_unflatten(full, spec)
            with engine.bypassed():
                out = _call_with(module, orig, P, a, k)
            return out if index is None else out[index]

        def one(vals, gb):
            _, vjp_fn = torch.func.vjp(lambda P: run(P, vals), params)
            return vjp_fn(gb.unsqueeze(0).to(gb.dtype))[0]

        with torch.enable_grad():
            return torch.func.vmap(one)(bvals, g)


def _random_dropout(module: nn.Module) -> bool:
    """Dropout with p > 0 inside ``module`` (nn.Dropout* children, or MultiheadAttention's own)."""
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


class _BlockGrad(torch.autograd.Function):
    """Identity that passes no gradient back: the output still requires grad (so the module
    output gets a hook even when its input does not), the parameter never gets one."""

    @staticmethod
    def forward(ctx, p):
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        return None



def _call_with(module, orig, params, args, kwargs):
    """Run ``orig`` (the module's own forward) with ``params`` in place of its parameters."""
    saved = {}
    try:
        for n, t in params.items():
            owner, leaf = _owner(module, n)
            saved[n] = owner._parameters[leaf]
            owner._parameters[leaf] = t
        return orig(*args, **kwargs)
    finally:
        for n, t in saved.items():
            owner, leaf = _owner(module, n)
            owner._parameters[leaf] = t


def _owner(module: nn.Module, name: str):
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


HANDLER = GenericHandler()
WHOLE_MODULE = GenericHandler(whole_module=True)
