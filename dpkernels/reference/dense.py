"""Materialised per-sample gradients ``[B, *shape]``: norm-layer affine terms, the generic
fallback, and cross terms between uses that have no ghost form.  Also the noise-only op."""

from __future__ import annotations

import torch

from dpkernels.dispatch import register
from dpkernels.reference._common import acc_dtype, finish


@register("dense_norm", "reference")
def dense_norm(psg: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of per-sample gradients ``psg`` [B, ...]."""
    return psg.to(acc_dtype(psg)).flatten(1).pow(2).sum(1)


@register("dense_cross", "reference")
def dense_cross(psg1: torch.Tensor, psg2: torch.Tensor) -> torch.Tensor:
    """[B] ``<psg1_b, psg2_b>``."""
    dt = acc_dtype(psg1, psg2)
    return (psg1.to(dt).flatten(1) * psg2.to(dt).flatten(1)).sum(1)


@register("dense_clipped_sum", "reference")
def dense_clipped_sum(psg, c, acc=None, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """``(acc + sum_b c_b psg_b + noise_std z) * scale``."""
    dt = acc_dtype(psg, acc)
    update = torch.tensordot(c.to(dt), psg.to(dt), dims=1)
    return finish(acc, update, noise_std, seed, scale)


@register("add_noise", "reference")
def add_noise(acc: torch.Tensor, noise_std=0.0, seed=0, scale=1.0) -> torch.Tensor:
    """``(acc + noise_std z) * scale`` for a parameter whose clipped sum is already folded."""
    return finish(None, acc, noise_std, seed, scale)


@register("add_noise_many", "reference")
def add_noise_many(accs: list[torch.Tensor], noise_std=0.0, seeds=(), scale=1.0
                   ) -> list[torch.Tensor]:
    """``add_noise`` for every ``accs[i]`` with ``seeds[i]`` (a list, in place where
    ``add_noise`` is): the engine's one noise-and-scale pass over all parameters of a step."""
    if len(seeds) != len(accs):
        raise ValueError(f"add_noise_many: {len(accs)} tensors but {len(seeds)} seeds")
    return [add_noise(a, noise_std, s, scale) for a, s in zip(accs, seeds)]


@register("rows_clipped_sum_many", "reference")
def rows_clipped_sum_many(items: list[tuple], c: torch.Tensor, accs: list) -> list[torch.Tensor]:
    """For every ``(x, shape)`` of ``items`` (``x`` [B, T, N]): ``acc + sum_{b,t} c_b x[b, t, :]``
    shaped ``shape`` (in place into the matching ``accs`` entry when given), no noise: the
    clipped sums of all biases and norm-layer affine terms of a step, folded together."""
    if len(items) != len(accs):
        raise ValueError(f"rows_clipped_sum_many: {len(items)} inputs but {len(accs)} "
                         "accumulators")
    out = []
    for (x, shape), acc in zip(items, accs):
        dt = acc_dtype(x, acc)
        update = (c.to(dt) @ x.to(dt).sum(1)).reshape(shape)
        out.append(finish(acc, update if acc is None else update.reshape(acc.shape), 0.0, 0, 1.0))
    return out


@register("dense_norm_many", "reference")
def dense_norm_many(rows: list[torch.Tensor]) -> torch.Tensor:
    """[len(rows), B] squared norms of every ``rows[i]`` [B, N] (per sample)."""
    return torch.stack([dense_norm(r) for r in rows])
