"""nn.Linear: per-sample norms from (input, backprop), no weight-gradient GEMM in backward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers.base import BiasUse, LinearUse, autocast_dtype


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record):
        ctx.save_for_backward(x, weight)
        ctx.record = record
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        ctx.record(x, g)
        return gx, None, None, None


def cast_for_autocast(x, *params):
    """Cast to the autocast dtype by hand (the Function then runs with autocast off), so the
    saved activations and backprops are kept in the compute dtype."""
    dt = autocast_dtype(x.device.type)
    if dt is None or not x.is_floating_point():
        return dt, (x, *params)
    return dt, tuple(t.to(dt) if t is not None else None for t in (x, *params))


def check_input_dtype(name: str, kind: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if autocast_dtype(x.device.type) is None and x.dtype != weight.dtype:
        raise TypeError(
            f"dpkernels: {name} ({kind}) got input of dtype {x.dtype} but its weight is "
            f"{weight.dtype}; cast the input or the model (model.to(dtype)), or run under "
            "torch.autocast"
        )


class LinearHandler:
    types = (nn.Linear,)

    def check(self, module: nn.Linear, name: str) -> None:
        pass

    def forward(self, engine, module: nn.Linear, name: str, orig, x, *rest, **kw):
        w, b = module.weight, module.bias
        needs = w.requires_grad or (b is not None and b.requires_grad)
        if rest or kw or not torch.is_grad_enabled() or not needs:
            return orig(x, *rest, **kw)
        if x.dim() < 2:
            raise ValueError(
                f"dpkernels: {name} (Linear) got input of shape {tuple(x.shape)}; DP training "
                "needs a batch dimension first ([B, ..., in_features])"
            )
        check_input_dtype(name, "Linear", x, w)
        engine.check_device(x.device)
        engine.on_forward(name)
        engine.note_batch(x.shape[0])

        def record(x_saved, g):
            B, d, p = x_saved.shape[0], x_saved.shape[-1], g.shape[-1]
            T = math.prod(x_saved.shape[1:-1])  # explicit: B = 0 makes -1 ambiguous
            a2 = x_saved.reshape(B, T, d)
            g2 = g.reshape(B, T, p)
            w_on, b_on = w.requires_grad, b is not None and b.requires_grad
            w_norm = b_norm = None
            dense = None
            if w_on and engine.defers_norms() and engine.instantiates(
                    T, d, p, min(a2.element_size(), g2.element_size())):
                # direct form: W_b materialised with its norm, at clip time, one launch per
                # shape; the clipped sum reads it too (engine.instantiate_direct)
                dense = torch.empty(B, p, d, device=g2.device, dtype=torch.promote_types(
                    torch.promote_types(a2.dtype, g2.dtype), torch.float32))
                w_norm, *b_norm = engine.defer_norm("linear_direct_many",
                                                    (a2, g2, b_on, dense), 1 + b_on)
                b_norm = b_norm[0] if b_on else None
            elif w_on and engine.defers_norms():
                # taken at clip time with every other Linear's, in one grouped op
                w_norm, *b_norm = engine.defer_norm("linear_norms_many",
                                                    (a2, g2, engine.norm_method, b_on),
                                                    1 + b_on)
                b_norm = b_norm[0] if b_on else None
            elif w_on and b_on and engine.phase != "sums":
                # Both trainable: both norms from one pass over g.  The low-memory mode's
                # second pass ("sums") needs no norms at all.
                w_norm, b_norm = engine.op("linear_norms", a2, g2, engine.norm_method, True)
            uses = []
            if w_on:
                uses.append((w, LinearUse(a2, g2, engine.norm_method, norm=w_norm,
                                          dense=dense)))
            if b_on:
                # with a direct-form weight the bias norm comes from the same kernel's sum of
                # the g tiles (or the reference's sum): the sum form's bound
                direct = w_on and uses[0][1].direct_form()
                uses.append((b, BiasUse(g2, norm=b_norm, gram=not direct)))
            engine.record(name, B, uses)

        dt, (xc, wc, bc) = cast_for_autocast(x, w, b)
        if dt is None:
            return _LinearFn.apply(x, w, b, record)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearFn.apply(xc, wc, bc, record)


HANDLER = LinearHandler()
