"""LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d: materialised per-sample gradients of
the affine parameters (they are as small as the parameters), dense ops for the rest.

LayerNorm's forward is ``torch.native_layer_norm``, and its backward gets the input gradient
from the saved mean and rstd with torch's own ``native_layer_norm_backward`` (no recomputed
forward); the others recompute the norm on the saved input and differentiate it with autograd
(exactly torch's own rule).  All record ``SummedDenseUse``s (or ``PartsUse``s) built by
the ``*_psg`` ops from (input, backprop), with the terms' magnitudes for their cancellation
bound.  Under autocast the norm runs in float32 like torch's ``layer_norm`` and
``group_norm`` do; the input is kept in its own dtype for the backward.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers.base import BiasUse, SummedDenseUse, SummedTerms, autocast_dtype
from dpkernels.layers.linear import check_input_dtype


class PartsUse(SummedTerms, BiasUse):
    """A norm layer's per-sample affine term kept as partial sums ``g`` [B, S, N] over blocks
    of positions (``*_psg_parts``): the term is ``sum_s g_s``, so its norm and clipped sum are
    a bias's; ``shape`` is the parameter's.  Its cancellation bound is that of the sum over
    all ``terms`` positions with magnitudes ``mag`` [B, S, N] (partials of ``sum_pos |term|``,
    ``SummedTerms``): each partial is itself a sum of products that can cancel, which a bound
    relative to ``sum_s |g_s|`` would miss."""

    def __init__(self, g: torch.Tensor, shape, norm=None, mag=None, terms: int = 1) -> None:
        super().__init__(g, norm=norm)
        self.shape = tuple(shape)
        self.mag, self.terms = mag, int(terms)

    def _mag_rows(self):
        # [B, S, N] partials: sum_s ||mag_s|| >= ||sum_s mag_s||, an upper bound of S_b
        return self.mag

    def raw_dense(self, op):
        return super().raw_dense(op).reshape(self.g.shape[0], *self.shape)

    def group(self):
        return "rows_clipped_sum_many", (self.g, self.shape)


def positions(x: torch.Tensor, param: torch.Tensor) -> int:
    """How many positions a per-sample affine term of ``param`` sums over for input ``x``
    [B, ...]: the elements of one sample per element of the parameter."""
    return math.prod(x.shape[1:]) // max(param.numel(), 1)


def _cast(dt, *ts):
    if dt is None:
        return ts
    return tuple(t.to(dt) if t is not None else None for t in ts)


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fn, dt, record, ln=None):
        ctx.fn, ctx.dt, ctx.record, ctx.ln = fn, dt, record, ln
        if ln is not None:
            # LayerNorm: torch's own forward, whose saved mean and rstd give the input
            # gradient in the backward without recomputing the forward
            xc, wc, bc = _cast(dt, x, weight, bias)
            out, mean, rstd = torch.native_layer_norm(xc, ln[0], wc, bc, ln[1])
            ctx.save_for_backward(x, weight, bias, mean, rstd)
            return out
        ctx.save_for_backward(x, weight, bias)
        return fn(*_cast(dt, x, weight, bias))

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, *stats = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            xc, wc, bc = _cast(ctx.dt, x.detach(), weight, bias)
            if ctx.ln is not None:  # torch's rule on the saved statistics (autograd's own)
                gx = torch.ops.aten.native_layer_norm_backward(
                    g, xc, ctx.ln[0], *stats, wc, bc, [True, False, False])[0]
            else:
                with torch.enable_grad():
                    xr = xc.detach().requires_grad_()
                    out = ctx.fn(xr, *(t.detach() if t is not None else None
                                       for t in (wc, bc)))
                    (gx,) = torch.autograd.grad(out, xr, g)
            gx = gx.to(x.dtype)
        ctx.record(x, g)
        return gx, None, None, None, None, None, None


class _NormHandler:
    kind = ""

    def check(self, module: nn.Module, name: str) -> None:
        pass

    def check_batched(self, module, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def fn(self, module):
        """``f(x, weight, bias)``: the module's forward with its parameters passed in."""
        raise NotImplementedError

    def psg(self, engine, module, x, g, need_weight: bool, need_bias: bool, absolute=False):
        """(weight psg | None, bias psg | None), each [B, *param.shape]; ``absolute``: the
        sums of the terms' magnitudes instead (``SummedTerms``)."""
        raise NotImplementedError

    def forward(self, engine, module, name: str, orig, x, *rest, **kw):
        w = module.weight
        b = getattr(module, "bias", None)
        need_w = w is not None and w.requires_grad
        need_b = b is not None and b.requires_grad
        if rest or kw or not torch.is_grad_enabled() or not (need_w or need_b):
            return orig(x, *rest, **kw)
        self.check(module, name)
        self.check_batched(module, name, x)
        check_input_dtype(name, self.kind, x, w if w is not None else b)
        engine.check_device(x.device)
        engine.on_forward(name)
        engine.note_batch(x.shape[0])

        def record(x_saved, g):
            parts = (self.parts(engine, module, x_saved, g, need_w, need_b)
                     if engine.defers_norms() else None)
            # the sums' rounding error is relative to sum_pos |g * x_hat| and sum_pos |g|
            # (SummedTerms): those magnitudes (partials from the same launch as the terms'),
            # and how many positions each term sums
            terms = positions(x_saved, w if w is not None else b)
            uses = []
            if parts is not None:
                # partial sums, their norms taken at clip time with every other deferred one
                for param, need, rows, mag in ((w, need_w, parts[0], parts[2]),
                                               (b, need_b, parts[1], parts[3])):
                    if need:
                        (held,) = engine.defer_norm("linear_norms_many",
                                                    (None, rows, "auto", True), 1)
                        uses.append((param, PartsUse(rows, param.shape, norm=held, mag=mag,
                                                     terms=terms)))
                engine.record(name, x_saved.shape[0], uses)
                return
            gw, gb = self.psg(engine, module, x_saved, g, need_w, need_b)
            mags = self.psg(engine, module, x_saved, g, need_w, need_b, absolute=True)
            if need_w:
                uses.append((w, SummedDenseUse(gw, mags[0], terms)))
            if need_b:
                uses.append((b, SummedDenseUse(gb, mags[1], terms)))
            engine.record(name, x_saved.shape[0], uses)

        dt = None
        if autocast_dtype(x.device.type) is not None and x.is_floating_point():
            dt = torch.promote_types(x.dtype, torch.float32)
        off = torch.autocast(x.device.type, enabled=False)
        with off if dt is not None else contextlib.nullcontext():
            return _NormFn.apply(x, w, b, self.fn(module), dt, record, self.stats(module))

    def parts(self, engine, module, x, g, need_weight: bool, need_bias: bool):
        """(weight, bias, weight magnitudes, bias magnitudes): per-sample terms and the sums of
        their terms' magnitudes as partial sums [B, S, N] (None where not needed), or None
        where the layer has no such op (then ``psg``)."""
        return None

    def stats(self, module):
        """(normalized_shape, eps) where the forward is ``torch.native_layer_norm`` (its
        saved statistics then give the input gradient), else None (recomputed forward)."""
        return None

    def _batch_error(self, name: str, x: torch.Tensor, expected: str) -> ValueError:
        return ValueError(
            f"dpkernels: {name} ({self.kind}) got input of shape {tuple(x.shape)}; DP training "
            f"needs a batch dimension first ({expected}); add one with x.unsqueeze(0)"
        )



class LayerNormHandler(_NormHandler):
    types = (nn.LayerNorm,)
    kind = "LayerNorm"

    def check_batched(self, module, name, x):
        if x.dim() <= len(module.normalized_shape):
            raise self._batch_error(name, x, "[B, ..., *normalized_shape]")

    def fn(self, module):
        shape, eps = module.normalized_shape, module.eps
        return lambda x, w, b: F.layer_norm(x, shape, w, b, eps)

    def stats(self, module):
        return list(module.normalized_shape), module.eps

    def psg(self, engine, module, x, g, need_weight, need_bias, absolute=False):
        return engine.op("layer_norm_psg", x, g, module.normalized_shape, module.eps,
                         need_weight, need_bias, absolute)

    def parts(self, engine, module, x, g, need_weight, need_bias):
        return engine.op("layer_norm_psg_parts", x, g, module.normalized_shape, module.eps,
                         need_weight, need_bias, True)


class RMSNormHandler(_NormHandler):
    types = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    kind = "RMSNorm"

    def check_batched(self, module, name, x):
        if x.dim() <= len(module.normalized_shape):
            raise self._batch_error(name, x, "[B, ..., *normalized_shape]")

    def fn(self, module):
        shape, eps = module.normalized_shape, module.eps
        return lambda x, w, b: F.rms_norm(x, shape, w, eps)

    def psg(self, engine, module, x, g, need_weight, need_bias, absolute=False):
        return engine.op("rms_norm_psg", x, g, module.normalized_shape, module.eps,
                         absolute), None

    def parts(self, engine, module, x, g, need_weight, need_bias):
        gw, aw = engine.op("rms_norm_psg_parts", x, g, module.normalized_shape, module.eps, True)
        return gw, None, aw, None


class GroupNormHandler(_NormHandler):
    types = (nn.GroupNorm,)
    kind = "GroupNorm"

    def check_batched(self, module, name, x):
        if x.dim() < 2:
            raise self._batch_error(name, x, "[B, C, *spatial]")

    def fn(self, module):
        groups, eps = module.num_groups, module.eps
        return lambda x, w, b: F.group_norm(x, groups, w, b, eps)

    def psg(self, engine, module, x, g, need_weight, need_bias, absolute=False):
        return engine.op("group_norm_psg", x, g, module.num_groups, module.eps, need_weight,
                         need_bias, absolute)


class InstanceNormHandler(_NormHandler):
    types = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    kind = "InstanceNorm"

    def check(self, module, name):
        if module.track_running_stats:
            raise ValueError(
                f"dpkernels: {name} ({type(module).__name__}) has track_running_stats=True; "
                "its running statistics are averaged over training samples without clipping "
                "or noise, so they are not private; construct it with "
                "track_running_stats=False"
            )

    def check_batched(self, module, name, x):
        if x.dim() == module._get_no_batch_dim():
            raise self._batch_error(name, x, "[B, C, *spatial]")
        module._check_input_dim(x)

    def fn(self, module):
        eps = module.eps

        def f(x, w, b):
            if x.shape[0] == 0:  # torch's instance_norm fails on an empty (Poisson) batch
                return F.group_norm(x, x.shape[1], w, b, eps)
            return F.instance_norm(x, None, None, w, b, True, 0.0, eps)

        return f

    def psg(self, engine, module, x, g, need_weight, need_bias, absolute=False):
        return engine.op("group_norm_psg", x, g, x.shape[1], module.eps, need_weight,
                         need_bias, absolute)


HANDLERS = [LayerNormHandler(), RMSNormHandler(), GroupNormHandler(), InstanceNormHandler()]
