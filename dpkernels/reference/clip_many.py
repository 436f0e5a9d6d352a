"""A micro-batch's clip factors from the parts its squared norms and their error bounds are
made of, in one op: the sum of the norm contributions, the deferred cancellation bounds
(``stacked_bounds``), the other bounds, and ``clip_factors``, which the engine otherwise runs
as a dozen small steps (DESIGN.md section 6)."""

from __future__ import annotations

import math

import torch

from dpkernels.dispatch import register
from dpkernels.reference.bounds import clip_factors


def check_parts(name: str, parts, err_parts, M, own, own_consts, cross) -> int:
    """The batch size, checked: ``parts`` [U, B]; every ``err_parts`` [B]; ``M`` [R, B] when
    there are bounds; ``own`` [len(own_consts), B]; rows within ``M``."""
    if parts.dim() != 2 or parts.shape[0] == 0:
        raise ValueError(f"dpkernels.ops.{name}: parts must be [U >= 1, B], got "
                         f"{tuple(parts.shape)}")
    B = parts.shape[1]
    for e in err_parts:
        if e.shape != (B,):
            raise ValueError(f"dpkernels.ops.{name}: an error bound has shape "
                             f"{tuple(e.shape)}, expected [{B}]")
    if own_consts or cross:
        if M is None or M.dim() != 2 or M.shape[1] != B:
            raise ValueError(f"dpkernels.ops.{name}: magnitudes must be [R, {B}], got "
                             f"{None if M is None else tuple(M.shape)}")
        # a cross term's factor that is not an int is a constant (stacked_bounds)
        rows = [r for r, _, _ in own_consts] + [r for c in cross for r in c[:2]
                                                 if isinstance(r, int)]
        if any(not 0 <= int(r) < M.shape[0] for r in rows):
            raise ValueError(f"dpkernels.ops.{name}: a bound names a magnitude row outside "
                             f"0..{M.shape[0] - 1}")
        if any(not isinstance(r, int) and not (math.isfinite(float(r)) and float(r) >= 0)
               for c in cross for r in c[:2]):
            raise ValueError(f"dpkernels.ops.{name}: a constant factor of a cross bound must "
                             "be finite and >= 0")
    if own_consts and (own is None or own.shape != (len(own_consts), B)):
        raise ValueError(f"dpkernels.ops.{name}: own norms must be [{len(own_consts)}, {B}], "
                         f"got {None if own is None else tuple(own.shape)}")
    return B


def cross_row(r, r2, k) -> list[float]:
    """A cross bound ``(row, row', k)`` of ``stacked_bounds`` as the Triton kernel's table row:
    a constant factor (not an int) moved into k and its row -1 (read as 1), as
    ``stacked_bounds`` does with its row of ones."""
    out = []
    for x in (r, r2):
        if isinstance(x, int):
            out.append(float(x))
        else:
            k = k * float(x)
            out.append(-1.0)
    return [*out, float(k)]


def bounds_table(own_consts: list, cross: list) -> list[list[float]]:
    """The Triton kernel's bounds table: ``(row, ku, cu)`` per own bound, then ``cross_row``
    per cross bound (the engine stages it to ride along the deferred norms' table copy)."""
    return ([[float(r), float(k), float(c)] for r, k, c in own_consts]
            + [cross_row(*c) for c in cross])


@register("clip_from_parts", "reference")
def clip_from_parts(parts: torch.Tensor, err_parts: list, M: torch.Tensor | None,
                    own: torch.Tensor | None, own_consts: list, cross: list, loss_scale: float,
                    margin: float, max_grad_norm: float) -> tuple[torch.Tensor, ...]:
    """(norm_sq, norms, factors, factors * loss_scale, every norm and bound finite) where
    ``norm_sq = parts.sum(0)`` ([U, B] contributions), the error bound is the sum of
    ``err_parts`` and ``stacked_bounds(M, own, cross)`` (``own``: (magnitude row, kappa u,
    (T + 16) u) of ``own_consts`` with the use's own norm, row i of ``own``; ``cross``: (row,
    row', k), a float instead of a row being a constant factor: the underflow terms), and
    norms and factors are ``clip_factors(norm_sq, err_sq, loss_scale, margin,
    max_grad_norm)``: main's functions composed, so this op's bounds and factor rules are
    theirs (underflow terms, per-use unit roundoff, 0 for a non-finite norm or bound and for
    a subnormal factor)."""
    from dpkernels.layers.base import stacked_bounds  # layers import the reference

    check_parts("clip_from_parts", parts, err_parts, M, own, own_consts, cross)
    norm_sq = parts.sum(0)
    errs = list(err_parts)
    if own_consts or cross:
        rows = [] if own is None else own.unbind(0)
        errs.append(stacked_bounds(M, [(r, k, c, n) for (r, k, c), n in zip(own_consts, rows)],
                                   cross))
    err_sq = None
    if len(errs) == 1:
        err_sq = errs[0]
    elif errs:
        err_sq = torch.stack([t.to(errs[-1].dtype) for t in errs]).sum(0)
    norms, factors, ok = clip_factors(norm_sq, err_sq, loss_scale, margin, max_grad_norm)
    return norm_sq, norms, factors, factors * loss_scale, ok
