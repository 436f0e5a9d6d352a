"""The weight (and bias) norms of every Linear use of a micro-batch in one call.

The engine takes these norms at clip time, when every use's inputs ``a`` [B, T, d] and
backprops ``g`` [B, T, p] are in hand (the fast mode keeps them until the clipped sums anyway),
so that a kernel can compute all of them in one launch instead of one launch and one
partial-sum pass per layer during the backward.
"""

from __future__ import annotations

import torch

from dpkernels.dispatch import register
from dpkernels.reference._common import chunks
from dpkernels.reference.bounds import magnitude
from dpkernels.reference.embedding import embedding_norm
from dpkernels.reference.linear import linear_bias_norm, linear_norms


def check_items(name: str, items: list) -> tuple[int, int]:
    """(batch size, number of output rows) of ``items`` [(a, g, method, with_bias), ...],
    checked."""
    if not items:
        raise ValueError(f"dpkernels.ops.{name}: no inputs")
    first = items[0][1]
    B = first.shape[0] if isinstance(first, torch.Tensor) else None
    rows = 0
    for i, item in enumerate(items):
        if len(item) != 4:
            raise ValueError(f"dpkernels.ops.{name}: input {i} is not (a, g, method, "
                             "with_bias)")
        a, g, method, with_bias = item
        if method == "embedding":  # (ids [B, T], g [B, T, p], "embedding", padding_idx)
            if (not isinstance(a, torch.Tensor) or not isinstance(g, torch.Tensor)
                    or a.dim() != 2 or g.dim() != 3 or a.shape != g.shape[:2]
                    or a.shape[0] != B):
                raise ValueError(
                    f"dpkernels.ops.{name}: input {i} (embedding) has shapes "
                    f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(g, 'shape', ()))}, "
                    f"expected ids [{B}, T] and g [{B}, T, p]")
            if a.is_floating_point() or a.is_complex():
                raise TypeError(f"dpkernels.ops.{name}: input {i}: ids must be integers, got "
                                f"{a.dtype}")
            rows += 1
            continue
        if a is None and not with_bias:
            raise ValueError(f"dpkernels.ops.{name}: input {i} has neither a weight (a is "
                             "None) nor a bias (with_bias is false)")
        if a is None:  # a bias alone: a stands in for its shape
            a = g
        if (not isinstance(a, torch.Tensor) or not isinstance(g, torch.Tensor) or a.dim() != 3
                or g.dim() != 3 or a.shape[:2] != g.shape[:2] or a.shape[0] != B):
            raise ValueError(
                f"dpkernels.ops.{name}: input {i} has shapes "
                f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(g, 'shape', ()))}, "
                f"expected a [{B}, T, d] and g [{B}, T, p]")
        if method not in ("auto", "ghost", "direct"):
            raise ValueError(f"dpkernels.ops.{name}: input {i}: method must be 'auto', "
                             f"'ghost' or 'direct', got {method!r}")
        rows += (item[0] is not None) + bool(with_bias)
    return B, rows


MAG_KINDS = ("a", "g", "ag")


def check_mags(name: str, items: list, mags: list | None) -> list[tuple[int, str]]:
    """``mags`` [(item index, "a" | "g" | "ag"), ...] checked against ``items`` (a Linear use
    with a weight, or "g" of a bias alone); [] for None."""
    if mags is None:
        return []
    out = []
    for j, m in enumerate(mags):
        ok = isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], int) and m[1] in MAG_KINDS
        if ok:
            i, kind = m
            ok = 0 <= i < len(items) and items[i][2] != "embedding" and (
                kind == "g" or items[i][0] is not None)
        if not ok:
            raise ValueError(
                f"dpkernels.ops.{name}: mags[{j}] = {m!r} is not (index of a Linear input, "
                "'a' | 'g' | 'ag'); 'a' and 'ag' need the input's a, embeddings have none")
        out.append((m[0], m[1]))
    return out


def mag_operands(item: tuple, kind: str) -> tuple:
    """The ``magnitude`` operands ``(a | None, x)`` of magnitude row ``kind`` of ``item``."""
    a, g = item[0], item[1]
    return {"a": (None, a), "g": (None, g), "ag": (a, g)}[kind]


def out_rows(items: list) -> list[tuple[int, int]]:
    """(weight row or -1, bias row or -1) of every item in the [rows, B] output (an
    embedding's norm is a weight row)."""
    out, r = [], 0
    for a, _, method, with_bias in items:
        if method == "embedding":
            out.append((r, -1))
            r += 1
            continue
        w = -1 if a is None else r
        r += a is not None
        out.append((w, r if with_bias else -1))
        r += bool(with_bias)
    return out


@register("linear_norms_many", "reference")
def linear_norms_many(items: list, mags: list | None = None) -> torch.Tensor:
    """[rows, B] ``linear_norms(a, g, method, with_bias)`` of every ``(a, g, method,
    with_bias)`` of ``items``: the weight norm ``||sum_t g_t a_t^T||^2``, then, with_bias, the
    bias norm ``||sum_t g_t||^2`` on the next row; ``a`` None: the bias norm alone (a Linear
    with a frozen weight, or rows of partial sums such as a norm layer's); ``(ids, g,
    "embedding", padding_idx)``: an Embedding's ``embedding_norm(ids, g, padding_idx)``.
    Then one row per ``mags`` entry ``(i, kind)``: the magnitude (reference/bounds.py) of input
    i's ``a`` (``sum_t |a_t|``), ``g`` (``sum_t |g_t|``) or both (``sum_t |a_t| |g_t|``), for
    the deferred cancellation and underflow bounds (the engine asks for them when they are
    all of T == 1 Linear uses, whose kernel has the row norms in hand).
    float32 (float64 when an input is)."""
    check_items("linear_norms_many", items)
    mags = check_mags("linear_norms_many", items, mags)
    parts = []
    for a, g, method, with_bias in items:
        if method == "embedding":
            parts.append(embedding_norm(a, g, with_bias))
            continue
        if a is None:
            parts.append(linear_bias_norm(g))
            continue
        w, b = linear_norms(a, g, method, bool(with_bias))
        parts.append(w)
        if with_bias:
            parts.append(b)
    parts += [magnitude(*mag_operands(items[i], kind)) for i, kind in mags]
    dt = parts[0].dtype
    for t in parts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.stack([t.to(dt) for t in parts])


def check_direct_items(name: str, items: list) -> int:
    """The batch size of ``items`` [(a, g, with_bias, W), ...] (``linear_direct_many``),
    checked: a [B, T, d], g [B, T, p], W a contiguous [B, p, d] tensor of the accumulation
    dtype (float32, float64 for float64 inputs)."""
    if not items:
        raise ValueError(f"dpkernels.ops.{name}: no inputs")
    B = items[0][1].shape[0]
    for i, item in enumerate(items):
        if len(item) != 4:
            raise ValueError(f"dpkernels.ops.{name}: input {i} is not (a, g, with_bias, W)")
        a, g, _, w = item
        want = torch.promote_types(torch.promote_types(a.dtype, g.dtype), torch.float32)
        if (a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2] or a.shape[0] != B
                or not isinstance(w, torch.Tensor)
                or tuple(w.shape) != (B, g.shape[2], a.shape[2]) or w.dtype != want
                or not w.is_contiguous()):
            raise ValueError(
                f"dpkernels.ops.{name}: input {i} has shapes {tuple(a.shape)}, "
                f"{tuple(g.shape)} and W {tuple(getattr(w, 'shape', ()))} "
                f"({getattr(w, 'dtype', None)}), expected a [{B}, T, d], g [{B}, T, p] and a "
                f"contiguous {want} W [{B}, p, d]")
    return B


@register("linear_direct_many", "reference")
def linear_direct_many(items: list) -> torch.Tensor:
    """[rows, B] norms of every ``(a, g, with_bias, W)`` of ``items`` (the weight row, then
    the bias row when with_bias), each weight norm the sum of squares of ``W``, filled here
    with ``W_b = sum_t g_t a_t^T``; float32 (float64 for float64 inputs)."""
    B = check_direct_items("linear_direct_many", items)
    rows = []
    for a, g, with_bias, w in items:
        dt = w.dtype
        a, g = a.detach(), g.detach()  # a may be a saved input that requires grad
        for s in chunks(B, max(1, a.shape[1]) * (a.shape[2] + g.shape[2])):
            torch.bmm(g[s].to(dt).transpose(1, 2), a[s].to(dt), out=w[s])
        rows.append(w.pow(2).sum((1, 2)))
        if with_bias:
            rows.append(linear_bias_norm(g).to(dt))
    dt = torch.float32
    for r in rows:
        dt = torch.promote_types(dt, r.dtype)
    return torch.stack([r.to(dt) for r in rows]) if rows else torch.zeros(0, B)
