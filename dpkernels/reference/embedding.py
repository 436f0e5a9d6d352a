"""Embeddings: per-sample norms, cross terms (two uses of one table, or a table tied to a
Linear head) and clipped sums, without a dense ``[V, p]`` gradient per sample.

Shapes: ``ids`` [B, T] integer ids, ``g`` [B, T, p] backprops of the embedding output,
``padding_idx`` a non-negative id (as ``nn.Embedding`` stores it) or None, ``c`` [B]
per-sample factors.  The per-sample gradient is ``E_b = sum_t e_{x_t} g_t^T`` (V x p) over
the positions whose id is not ``padding_idx``; its rows are segment sums of ``g`` grouped by
id, so the norms and cross terms are computed on those segment sums: one sort of the
(sample, id) keys and one ``index_add`` of the rows, O(T log T + T p) per sample.
"""

from __future__ import annotations

import torch

from dpkernels.dispatch import register
from dpkernels.reference._common import acc_dtype, chunks, finish


def _rows(ids: torch.Tensor, g: torch.Tensor, padding_idx, dt: torch.dtype):
    """(flat ids [N], flat sample index [N], rows [N, p]) with padding positions dropped."""
    B, T = ids.shape
    flat = ids.reshape(-1).long()
    sample = torch.arange(B, device=ids.device).repeat_interleave(T)
    rows = g.reshape(B * T, g.shape[-1]).to(dt)
    if padding_idx is not None:
        keep = flat != padding_idx
        flat, sample, rows = flat[keep], sample[keep], rows[keep]
    return flat, sample, rows


def _segments(uses, padding_idx, dt):
    """Segment sums of the rows of every use in ``uses`` (pairs ``(ids, g)`` over the same
    samples), on the union of their (sample, id) keys: (sample of each segment [U],
    [sums [U, p] per use])."""
    parts = [_rows(ids, g, padding_idx, dt) for ids, g in uses]
    width = 1 + max((int(f.max()) for f, _, _ in parts if f.numel()), default=0)
    keys = [s * width + f for f, s, _ in parts]
    uniq, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    sums, start = [], 0
    for k, (_, _, rows) in zip(keys, parts):
        seg = torch.zeros(uniq.numel(), rows.shape[-1], dtype=dt, device=rows.device)
        sums.append(seg.index_add_(0, inverse[start:start + k.numel()], rows))
        start += k.numel()
    return uniq // width, sums


@register("embedding_norm", "reference")
def embedding_norm(ids: torch.Tensor, g: torch.Tensor, padding_idx=None) -> torch.Tensor:
    """[B] ``||E_b||^2 = sum_{t,s} [x_t = x_s] (g_t.g_s)`` over non-padding positions."""
    B, T = ids.shape
    dt = acc_dtype(g)
    out = torch.zeros(B, dtype=dt, device=g.device)
    if B == 0 or T == 0:
        return out
    for s in chunks(B, T * g.shape[-1]):
        sample, (seg,) = _segments([(ids[s], g[s])], padding_idx, dt)
        out[s].index_add_(0, sample, seg.pow(2).sum(1))
    return out


@register("embedding_cross", "reference")
def embedding_cross(ids1, g1, ids2, g2, padding_idx=None) -> torch.Tensor:
    """[B] ``<E1_b, E2_b> = sum_{t,s} [x1_t = x2_s] (g1_t.g2_s)`` for two uses of one table."""
    B = ids1.shape[0]
    dt = acc_dtype(g1, g2)
    out = torch.zeros(B, dtype=dt, device=g1.device)
    T = ids1.shape[1] + ids2.shape[1]
    if B == 0 or ids1.shape[1] == 0 or ids2.shape[1] == 0:
        return out
    for s in chunks(B, T * g1.shape[-1]):
        sample, (s1, s2) = _segments([(ids1[s], g1[s]), (ids2[s], g2[s])], padding_idx, dt)
        out[s].index_add_(0, sample, (s1 * s2).sum(1))
    return out


@register("embedding_linear_cross", "reference")
def embedding_linear_cross(ids, h, padding_idx, a, g) -> torch.Tensor:
    """[B] ``<E_b, W_b>`` for an embedding use (``ids`` [B, S], backprops ``h`` [B, S, d]) and
    a Linear use (inputs ``a`` [B, T, d], backprops ``g`` [B, T, V]) of one [V, d] weight:
    ``sum_{t,s} g_t[x_s] (a_t.h_s)``."""
    B, S = ids.shape
    T = a.shape[1]
    dt = acc_dtype(h, a, g)
    out = torch.zeros(B, dtype=dt, device=h.device)
    if B == 0 or S == 0 or T == 0:
        return out
    h = h.to(dt)
    if padding_idx is not None:
        h = h * (ids != padding_idx).unsqueeze(-1).to(dt)
    idx = ids.long()
    for s in chunks(B, T * S):
        n = idx[s].shape[0]
        gx = g[s].gather(2, idx[s].unsqueeze(1).expand(n, T, S)).to(dt)  # [b, T, S] g_t[x_s]
        ah = torch.bmm(a[s].to(dt), h[s].transpose(1, 2))  # [b, T, S] a_t.h_s
        out[s] = (gx * ah).sum((1, 2))
    return out


@register("embedding_clipped_sum", "reference")
def embedding_clipped_sum(ids, g, c, num_embeddings, padding_idx=None, acc=None, noise_std=0.0,
                          seed=0, scale=1.0) -> torch.Tensor:
    """[V, p] ``(acc + sum_b c_b E_b + noise_std z) * scale``: an index_add of ``c_b g_bt``."""
    dt = acc_dtype(g, acc)
    flat, sample, rows = _rows(ids, g, padding_idx, dt)
    rows = rows * c.to(dt)[sample].unsqueeze(1)
    update = torch.zeros(num_embeddings, g.shape[-1], dtype=dt, device=g.device)
    update.index_add_(0, flat, rows)
    return finish(acc, update, noise_std, seed, scale)
