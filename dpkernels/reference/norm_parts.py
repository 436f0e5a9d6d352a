"""LayerNorm and RMSNorm per-sample affine terms as partial sums over blocks of positions.

``layer_norm_psg`` gives ``gw_b = sum_m g * x_hat`` and ``gb_b = sum_m g`` per sample; the
kernels compute them as S partial sums over blocks of the M positions and then add the
partials in a separate pass.  These ops return the partials unsummed, [B, S, N]: the engine
treats them like a bias backprop (``BiasUse``: norm ``||sum_s P_s||^2``, clipped sum
``sum_b c_b sum_s P_bs``, both grouped with every other use of the step), which saves the
summing pass per layer.  Its cancellation bound is that of the sum over all M positions,
relative to the terms' magnitudes (``magnitudes=True``: partials of ``sum_m |g * x_hat|`` and
``sum_m |g|``, layers/base.py ``SummedTerms``), not to the partials.  The
reference returns S = 1: the summed terms themselves.
"""

from __future__ import annotations

import math

import torch

from dpkernels.dispatch import register
from dpkernels.reference.norms import layer_norm_psg, rms_norm_psg


def _rows(t: torch.Tensor | None, B: int, N: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(B, 1, N)


@register("layer_norm_psg_parts", "reference")
def layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight=True, need_bias=True,
                         magnitudes=False):
    """(gw, gb), each [B, S, N] (N = prod(normalized_shape)) or None, whose sums over S are
    ``layer_norm_psg``'s terms; S = 1 here.  ``magnitudes``: (gw, gb, aw, ab), with the
    sums of the terms' magnitudes ``sum_pos |g * x_hat|`` and ``sum_pos |g|`` as partials
    too (the cancellation bound of the terms: layers/base.py ``SummedTerms``)."""
    gw, gb = layer_norm_psg(x, g, normalized_shape, eps, need_weight, need_bias)
    N = math.prod(tuple(normalized_shape))
    out = (_rows(gw, x.shape[0], N), _rows(gb, x.shape[0], N))
    if magnitudes:
        aw, ab = layer_norm_psg(x, g, normalized_shape, eps, need_weight, need_bias, True)
        out += (_rows(aw, x.shape[0], N), _rows(ab, x.shape[0], N))
    return out


@register("rms_norm_psg_parts", "reference")
def rms_norm_psg_parts(x, g, normalized_shape, eps=None, magnitudes=False):
    """gw [B, S, N] whose sum over S is ``rms_norm_psg``'s term; S = 1 here; ``magnitudes``:
    (gw, aw), ``aw`` the partials of ``sum_pos |g * x_hat|``."""
    N = math.prod(tuple(normalized_shape))
    gw = _rows(rms_norm_psg(x, g, normalized_shape, eps), x.shape[0], N)
    if magnitudes:
        return gw, _rows(rms_norm_psg(x, g, normalized_shape, eps, True), x.shape[0], N)
    return gw
