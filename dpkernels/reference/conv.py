"""Conv1d/2d/3d weights: im2col, per-sample norms, clipped sums.

Shapes: ``x`` [B, C_in, *S] the layer input, ``g`` [B, C_out, *O] the backprop,
``weight_shape`` (C_out, C_in / G, *k) with G = ``groups``.  ``stride``, ``padding``
(symmetric zero padding per spatial dim) and ``dilation`` are tuples of ints, one per spatial
dim; string paddings and other padding modes are resolved by the layer (it pads the input
explicitly).  With im2col, group ``j`` of a conv is a Linear with T = prod(O) positions,
inputs ``a`` [B, T, d] (d = C_in / G * prod(k)) and backprops [B, T, p] (p = C_out / G), so the
per-sample weight gradient is block-diagonal over groups and its squared norm is a sum of
per-group Linear norms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpkernels.dispatch import register
from dpkernels.reference._common import acc_dtype, chunks, cudnn_exact_fp32, finish
from dpkernels.reference.linear import choose_method


@register("conv_unfold", "reference")
def conv_unfold(x, weight_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """[B, G, T, d] input patches (im2col), ordered like ``weight[o].flatten()``."""
    B, C = x.shape[:2]
    n = x.dim() - 2
    k = tuple(weight_shape[2:])
    if any(padding):
        pad = [q for i in reversed(range(n)) for q in (padding[i], padding[i])]
        x = F.pad(x, pad)
    for i in range(n):  # a strided view: [B, C, O_1, .., O_i, S_i+1, .., k_1, .., k_i]
        span = dilation[i] * (k[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    out = x.shape[2 : 2 + n]
    x = x.reshape(B, groups, C // groups, *out, *k)
    # [B, G, *O, C/G, *k]: positions first, then the patch in weight order
    x = x.permute(0, 1, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n))
    return x.reshape(B, groups, math.prod(out), (C // groups) * math.prod(k))


def _grouped_backprops(g: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C_out, *O] -> [B, G, T, p]."""
    B, C_out = g.shape[:2]
    return g.reshape(B, groups, C_out // groups, math.prod(g.shape[2:])).transpose(2, 3)


@register("conv_norm", "reference")
def conv_norm(x, g, weight_shape, stride, padding, dilation, groups,
              method: str = "auto") -> torch.Tensor:
    """[B] squared Frobenius norms of each sample's weight gradient (sum over groups)."""
    B = x.shape[0]
    dt = acc_dtype(x, g)
    out = torch.zeros(B, dtype=dt, device=x.device)
    if B == 0:
        return out
    G = groups
    T = math.prod(g.shape[2:])
    d = math.prod(weight_shape[1:])
    p = weight_shape[0] // G
    if method == "auto":
        method = choose_method(T, d, p)
    if method == "ghost":
        per_item = G * (T * d + T * p + 2 * T * T)
    elif method == "direct":
        per_item = G * (T * d + T * p + p * d)
    else:
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    for s in chunks(B, per_item):
        a = conv_unfold(x[s].to(dt), weight_shape, stride, padding, dilation, G)  # [b, G, T, d]
        gs = _grouped_backprops(g[s].to(dt), G)  # [b, G, T, p]
        if method == "ghost":
            ga = a @ a.transpose(2, 3)  # [b, G, T, T]
            gg = gs @ gs.transpose(2, 3)  # [b, G, T, T]
            out[s] = (ga * gg).sum((1, 2, 3))
        else:
            w = gs.transpose(2, 3) @ a  # [b, G, p, d]
            out[s] = w.pow(2).sum((1, 2, 3))
    return out


@register("conv_clipped_sum", "reference")
def conv_clipped_sum(x, g, c, weight_shape, stride, padding, dilation, groups, acc=None,
                     noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """``(acc + sum_b c_b W_b + noise_std z) * scale``, weight-shaped: one weight-gradient
    convolution with the backprops rescaled by ``c_b`` (no im2col)."""
    dt = acc_dtype(x, g, acc)
    n = x.dim() - 2
    if x.shape[0] == 0:
        update = torch.zeros(weight_shape, dtype=dt, device=x.device)
    else:
        gs = g.to(dt) * c.to(dt).reshape(-1, *([1] * (n + 1)))
        # only the weight's shape is read
        w = gs.new_empty(1).expand(weight_shape)
        # no TF32 (torch's cuDNN default): the sum of clipped contributions stays float32-exact
        with cudnn_exact_fp32():
            _, update, _ = torch.ops.aten.convolution_backward(
                gs, x.to(dt), w, None, list(stride), list(padding), list(dilation), False,
                [0] * n, groups, [False, True, False])
    return finish(acc, update, noise_std, seed, scale)
