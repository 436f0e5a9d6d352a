"""Linear layers: per-sample weight and bias norms, cross terms, clipped sums.

Shapes: ``a`` [B, T, d] layer inputs, ``g`` [B, T, p] backprops (gradient of the loss with
respect to the layer output), ``c`` [B] per-sample factors.  The per-sample weight gradient
is ``W_b = sum_t g_t a_t^T`` (p x d) and the bias gradient ``beta_b = sum_t g_t``.
"""

from __future__ import annotations

import torch

from dpkernels.dispatch import register
from dpkernels.reference._common import acc_dtype, chunks, finish


def choose_method(T: int, d: int, p: int) -> str:
    """Ghost (Gram matrices, ~T^2 (d+p)) when cheaper than direct (W_b itself, ~T d p)."""
    return "ghost" if T * (d + p) < d * p else "direct"


@register("linear_norm", "reference")
def linear_norm(a: torch.Tensor, g: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """[B] squared Frobenius norms of ``W_b = sum_t g_t a_t^T``."""
    B, T, d = a.shape
    p = g.shape[-1]
    dt = acc_dtype(a, g)
    out = torch.zeros(B, dtype=dt, device=a.device)
    if B == 0 or T == 0:
        return out
    if method == "auto":
        method = choose_method(T, d, p)
    a = a.to(dt)
    g = g.to(dt)
    if T == 1:
        return a[:, 0].pow(2).sum(-1) * g[:, 0].pow(2).sum(-1)
    if method == "ghost":
        for s in chunks(B, T * T):
            ga = torch.bmm(a[s], a[s].transpose(1, 2))  # [b, T, T]
            gg = torch.bmm(g[s], g[s].transpose(1, 2))  # [b, T, T]
            out[s] = (ga * gg).sum((1, 2))
    elif method == "direct":
        for s in chunks(B, p * d):
            w = torch.bmm(g[s].transpose(1, 2), a[s])  # [b, p, d]
            out[s] = w.pow(2).sum((1, 2))
    else:
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    return out


@register("linear_bias_norm", "reference")
def linear_bias_norm(g: torch.Tensor) -> torch.Tensor:
    """[B] ``||sum_t g_t||^2`` (not ``sum_t ||g_t||^2``)."""
    return g.to(acc_dtype(g)).sum(1).pow(2).sum(-1)


@register("linear_norms", "reference")
def linear_norms(a: torch.Tensor, g: torch.Tensor, method: str = "auto",
                 with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``linear_norm(a, g, method)``, ``linear_bias_norm(g)`` if ``with_bias`` else None):
    a Linear's weight and bias norms, which kernels compute in one pass over ``g``."""
    return linear_norm(a, g, method), (linear_bias_norm(g) if with_bias else None)


@register("linear_cross", "reference")
def linear_cross(a1, g1, a2, g2) -> torch.Tensor:
    """[B] ``<W1_b, W2_b>`` for two uses of one weight: ``sum_{t,s} (a1_t.a2_s)(g1_t.g2_s)``."""
    dt = acc_dtype(a1, g1, a2, g2)
    B = a1.shape[0]
    out = torch.zeros(B, dtype=dt, device=a1.device)
    T1, T2 = a1.shape[1], a2.shape[1]
    for s in chunks(B, T1 * T2):
        ga = torch.bmm(a1[s].to(dt), a2[s].to(dt).transpose(1, 2))
        gg = torch.bmm(g1[s].to(dt), g2[s].to(dt).transpose(1, 2))
        out[s] = (ga * gg).sum((1, 2))
    return out


@register("linear_clipped_sum", "reference")
def linear_clipped_sum(a, g, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """[p, d] ``(acc + sum_b c_b W_b + noise_std z) * scale``, accumulated in float32+."""
    dt = acc_dtype(a, g, acc)
    p, d = g.shape[-1], a.shape[-1]
    gs = g.to(dt) * c.to(dt)[:, None, None]
    update = gs.reshape(-1, p).t() @ a.to(dt).reshape(-1, d)
    return finish(acc, update, noise_std, seed, scale)


@register("linear_clipped_sum_many", "reference")
def linear_clipped_sum_many(items: list[tuple], c, accs: list) -> list[torch.Tensor]:
    """``linear_clipped_sum(a, g, c, acc)`` for every ``(a, g)`` of ``items`` and its ``accs``
    entry, no noise: the weight clipped sums of all Linear layers of a step."""
    if len(items) != len(accs):
        raise ValueError(f"linear_clipped_sum_many: {len(items)} inputs but {len(accs)} "
                         "accumulators")
    return [linear_clipped_sum(a, g, c, acc) for (a, g), acc in zip(items, accs)]


@register("linear_bias_clipped_sum", "reference")
def linear_bias_clipped_sum(g, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """[p] ``(acc + sum_b c_b sum_t g_bt + noise_std z) * scale``."""
    dt = acc_dtype(g, acc)
    update = c.to(dt) @ g.to(dt).sum(1)
    return finish(acc, update, noise_std, seed, scale)
