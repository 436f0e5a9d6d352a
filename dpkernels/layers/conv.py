"""nn.Conv1d/2d/3d: per-sample norms from (input, backprop), no weight-gradient convolution in
backward.

Any stride, dilation and groups.  Padding reaches the ops as symmetric zero padding per
spatial dim; everything else (``padding_mode`` other than ``"zeros"``, the odd side of
``padding="same"`` with an even span) is applied to the input with ``F.pad`` before the
captured convolution, exactly as torch does it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers.base import BiasUse, Op, Use, underflow_eta
from dpkernels.layers.linear import cast_for_autocast, check_input_dtype
from dpkernels.reference._common import exact_fp32_on
from dpkernels.reference.bounds import dot_roundings

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, record):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.record = record
        return _CONV[x.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = None
        if ctx.needs_input_grad[0]:
            gx, _, _ = torch.ops.aten.convolution_backward(
                g, x, weight.to(g.dtype), None, list(stride), list(padding), list(dilation),
                False, [0] * len(stride), groups, [True, False, False])
        ctx.record(x, g)
        return gx, None, None, None, None, None, None, None


class ConvUse(Use):
    """``G_b`` = weight gradient of sample b for input ``x`` [B, C_in, *S] and backprop
    ``g`` [B, C_out, *O]; ``conf`` = (stride, padding, dilation, groups)."""

    def __init__(self, x, g, weight_shape, conf, method: str = "auto") -> None:
        super().__init__()
        self.x, self.g, self.weight_shape, self.conf, self.method = (
            x, g, tuple(weight_shape), conf, method)

    def unfold(self, op: Op) -> torch.Tensor:
        return op("conv_unfold", self.x, self.weight_shape, *self.conf)  # [B, G, T, d]

    def grouped_backprops(self) -> torch.Tensor:
        B, C_out = self.g.shape[:2]
        G = self.conf[3]
        T = math.prod(self.g.shape[2:])  # not -1: ambiguous when B = 0
        return self.g.reshape(B, G, C_out // G, T).transpose(2, 3)  # [B, G, T, p]

    def raw_norm(self, op: Op) -> torch.Tensor:
        return op("conv_norm", self.x, self.g, self.weight_shape, *self.conf, self.method)

    def _row_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, G, T] norms of the input patches (a convolution of ``x^2`` with a kernel of
        ones, never an unfold) and of the backprop rows, per group, in float32 or wider."""
        stride, padding, dilation, G = self.conf
        dt = torch.promote_types(self.x.dtype, torch.float32)
        x2 = self.x.to(dt).square()
        ones = torch.ones(G, *self.weight_shape[1:], dtype=dt, device=x2.device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[x2.dim() - 3]
        patch = conv(x2, ones, None, stride, padding, dilation, G).clamp_min(0).sqrt()
        B = self.x.shape[0]
        T = math.prod(self.g.shape[2:])  # not -1: ambiguous when B = 0
        gn = self.g.to(dt).reshape(B, G, self.g.shape[1] // G, T).norm(dim=2)
        return patch.reshape(B, G, T), gn

    def group_magnitudes(self) -> torch.Tensor:
        """[B, G] ``S_bj = sum_t |patch_t| |g_t|`` per group j (cancellation bound, base.py)."""
        patch, gn = self._row_norms()
        return (patch * gn).sum(-1)

    def magnitude(self) -> torch.Tensor:
        return self.group_magnitudes().sum(1)

    def underflow_sums(self):
        """Per group j: X = sum_t |g_tj|, Y = sum_t |patch_tj| (``underflow_own``)."""
        patch, gn = self._row_norms()
        G = self.conf[3]
        return (gn.sum(-1), patch.sum(-1), self.weight_shape[0] // G,
                math.prod(self.weight_shape[1:]), underflow_eta(self.x.dtype, self.g.dtype))

    def kappa(self) -> int:
        T = math.prod(self.g.shape[2:])
        return (dot_roundings(math.prod(self.weight_shape[1:]), self.x)
                + dot_roundings(self.weight_shape[0] // self.conf[3], self.g) + 2 * T + 16)

    def error_terms(self):
        T = math.prod(self.g.shape[2:])
        if T <= 1 and self.g.device.type == "cpu":
            # (a.a)(g.g): sums of squares, relative rounding within the margin; on a GPU the
            # kernels sum them on tensor cores, whose chunk error (dot_roundings) the margin
            # does not cover
            return None
        # the norm is a sum of per-group Linear norms, each bounded on its own
        return self.group_magnitudes(), self.kappa(), dot_roundings(T, self.g)

    def raw_dense(self, op: Op) -> torch.Tensor:
        dt = torch.promote_types(self.x.dtype, torch.float32)
        a = self.unfold(op).to(dt)
        with exact_fp32_on(a):
            w = torch.einsum("bgtp,bgtd->bgpd", self.grouped_backprops().to(dt), a)
        return w.reshape(self.x.shape[0], *self.weight_shape)

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        if not (isinstance(other, ConvUse) and other.weight_shape == self.weight_shape
                and other.conf[3] == self.conf[3]):
            return None
        a1, g1 = self.unfold(op), self.grouped_backprops()
        a2, g2 = other.unfold(op), other.grouped_backprops()
        return sum(op("linear_cross", a1[:, j], g1[:, j], a2[:, j], g2[:, j])
                   for j in range(self.conf[3]))

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        return op("conv_clipped_sum", self.x, self.g, c, self.weight_shape, *self.conf, acc,
                  noise_std, seed, scale)


def _explicit_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as torch applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        out = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(q, q) for q in module.padding]


def _pad_arg(pairs: list[tuple[int, int]]) -> list[int]:
    """F.pad's order: last spatial dim first."""
    return [q for pair in reversed(pairs) for q in pair]


class ConvHandler:
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def check(self, module: nn.modules.conv._ConvNd, name: str) -> None:
        pass

    def forward(self, engine, module: nn.modules.conv._ConvNd, name: str, orig, x, *rest, **kw):
        w, b = module.weight, module.bias
        needs = w.requires_grad or (b is not None and b.requires_grad)
        if rest or kw or not torch.is_grad_enabled() or not needs:
            return orig(x, *rest, **kw)
        n = len(module.kernel_size)
        kind = type(module).__name__
        if x.dim() == n + 1:
            raise ValueError(
                f"dpkernels: {name} ({kind}) got unbatched input of shape {tuple(x.shape)}; "
                f"DP training needs a batch dimension first ([B, C, {n} spatial dims])"
            )
        if x.dim() != n + 2:
            return orig(x)  # torch raises its own error for the wrong rank
        check_input_dtype(name, kind, x, w)
        engine.check_device(x.device)
        engine.on_forward(name)

        pairs = _explicit_padding(module)
        if module.padding_mode != "zeros":
            x = F.pad(x, _pad_arg(pairs), mode=module.padding_mode)
            padding = (0,) * n
        else:
            if any(lo != hi for lo, hi in pairs):  # "same" with an even span: one more right
                x = F.pad(x, _pad_arg([(0, hi - lo) for lo, hi in pairs]))
            padding = tuple(lo for lo, _ in pairs)
        conf = (tuple(module.stride), padding, tuple(module.dilation), module.groups)

        def record(x_saved, g):
            B = x_saved.shape[0]
            uses = []
            if w.requires_grad:
                uses.append((w, ConvUse(x_saved, g, w.shape, conf, engine.norm_method)))
            if b is not None and b.requires_grad:
                # T spelled out, not -1: an empty batch (B = 0) leaves -1 ambiguous
                T = math.prod(g.shape[2:])
                uses.append((b, BiasUse(g.reshape(B, g.shape[1], T).transpose(1, 2))))
            engine.record(name, B, uses)

        dt, (xc, wc, bc) = cast_for_autocast(x, w, b)
        if dt is None:
            return _ConvFn.apply(x, w, b, *conf, record)
        with torch.autocast(x.device.type, enabled=False):
            return _ConvFn.apply(xc, wc, bc, *conf, record)


HANDLERS = [ConvHandler()]
