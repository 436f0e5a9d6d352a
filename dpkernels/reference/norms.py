"""Norm layers: per-sample gradients of the affine parameters, materialised.

They are as small as the affine parameters ([B, C] or [B, *normalized_shape]), so the engine
keeps them and uses the dense ops for norms, cross terms and clipped sums.  ``x`` is the
layer input and ``g`` the backprop of its output; the normalised input ``x_hat`` is
recomputed from ``x`` (biased variance, ``eps`` inside the square root, as torch does) in the
accumulation dtype, then ``gamma_b = sum_pos g * x_hat`` and ``beta_b = sum_pos g`` over the
positions the affine parameters are broadcast over.
"""

from __future__ import annotations

import math

import torch

from dpkernels.dispatch import register
from dpkernels.reference._common import acc_dtype, chunks


def _sum_to(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # an empty dim tuple would sum over everything
    return t.sum(dims) if dims else t


def _affine_psg(x, g, norm_dims, sum_dims, out_shape, need_weight, need_bias, xhat_fn,
                absolute=False):
    """``absolute``: the sums of the terms' magnitudes instead, ``sum_pos |g * x_hat|`` and
    ``sum_pos |g|`` (what bounds the rounding error of the sums: ``affine_magnitudes``)."""
    dt = acc_dtype(x, g)
    B = x.shape[0]
    gw = torch.zeros(B, *out_shape, dtype=dt, device=x.device) if need_weight else None
    gb = torch.zeros(B, *out_shape, dtype=dt, device=x.device) if need_bias else None
    if not (need_weight or need_bias):
        return gw, gb
    for s in chunks(B, math.prod(x.shape[1:])):
        gs = g[s].to(dt)
        if absolute:
            gs = gs.abs()
        if gw is not None:
            xh = xhat_fn(x[s].to(dt), norm_dims)
            gw[s] = _sum_to(gs * (xh.abs() if absolute else xh), sum_dims).reshape(-1, *out_shape)
        if gb is not None:
            gb[s] = _sum_to(gs, sum_dims).reshape(-1, *out_shape)
    return gw, gb


def _standardize(eps):
    def f(x, dims):
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)

    return f


@register("layer_norm_psg", "reference")
def layer_norm_psg(x, g, normalized_shape, eps, need_weight=True, need_bias=True,
                   absolute=False):
    """(gw, gb), each [B, *normalized_shape] or None: LayerNorm over the last
    ``len(normalized_shape)`` dims of ``x`` [B, ..., *normalized_shape].  ``absolute``: the
    terms' magnitudes summed instead (``affine_magnitudes``)."""
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    norm_dims = tuple(range(x.dim() - k, x.dim()))
    sum_dims = tuple(range(1, x.dim() - k))
    return _affine_psg(x, g, norm_dims, sum_dims, normalized_shape, need_weight, need_bias,
                       _standardize(eps), absolute)


@register("rms_norm_psg", "reference")
def rms_norm_psg(x, g, normalized_shape, eps=None, absolute=False):
    """gw [B, *normalized_shape] for RMSNorm.  ``eps=None`` is the machine epsilon of the
    dtype torch computes in (float32 for bf16/fp16/float32 inputs, float64 for float64)."""
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if eps is None:
        eps = torch.finfo(acc_dtype(x)).eps

    def xhat(x, dims):
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)

    norm_dims = tuple(range(x.dim() - k, x.dim()))
    sum_dims = tuple(range(1, x.dim() - k))
    return _affine_psg(x, g, norm_dims, sum_dims, normalized_shape, True, False, xhat,
                       absolute)[0]


@register("group_norm_psg", "reference")
def group_norm_psg(x, g, num_groups, eps, need_weight=True, need_bias=True, absolute=False):
    """(gw, gb), each [B, C] or None: GroupNorm of ``x`` [B, C, *spatial]; InstanceNorm is
    ``num_groups = C``."""
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    stand = _standardize(eps)

    def xhat(x, dims):
        n = x.shape[0]
        return stand(x.reshape(n, num_groups, (C // num_groups) * S), (2,)).reshape(n, C, S)

    x3 = x.reshape(B, C, S)
    g3 = g.reshape(B, C, S)
    return _affine_psg(x3, g3, None, (2,), (C,), need_weight, need_bias, xhat, absolute)
