"""LayerNorm and RMSNorm per-sample affine terms as partial sums over blocks of positions.

``layer_norm_psg`` gives ``gw_b = sum_m g * x_hat`` and ``gb_b = sum_m g`` per sample; the
kernels compute them as S partial sums over blocks of the M positions and then add the
partials in a separate pass.  These ops return the partials unsummed, [B, S, N]: the engine
treats them like a bias backprop (``BiasUse``: norm ``||sum_s P_s||^2``, clipped sum
``sum_b c_b sum_s P_bs``, both grouped with every other use of the step, and the
cancellation bound of a sum over S terms), which saves the summing pass per layer.  The
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
def layer_norm_psg_parts(x, g, normalized_shape, eps, need_weight=True, need_bias=True):
    """(gw, gb), each [B, S, N] (N = prod(normalized_shape)) or None, whose sums over S are
    ``layer_norm_psg``'s terms; S = 1 here."""
    gw, gb = layer_norm_psg(x, g, normalized_shape, eps, need_weight, need_bias)
    N = math.prod(tuple(normalized_shape))
    return _rows(gw, x.shape[0], N), _rows(gb, x.shape[0], N)


@register("rms_norm_psg_parts", "reference")
def rms_norm_psg_parts(x, g, normalized_shape, eps=None):
    """gw [B, S, N] whose sum over S is ``rms_norm_psg``'s term; S = 1 here."""
    gw = rms_norm_psg(x, g, normalized_shape, eps)
    return _rows(gw, x.shape[0], math.prod(tuple(normalized_shape)))
