"""A micro-batch's clip factors from the parts of its squared norms and of their error bounds,
in one launch: the sum of the norm contributions, the deferred cancellation bounds
(``stacked_bounds``: a dozen small torch ops), the other bounds, ``clip_factors`` (the same
rules, ops/bounds.py's ``clip_factor``) and the factors times the loss scale
that the clipped sums take."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.dispatch import register
from dpkernels.ops._common import device_table
from dpkernels.ops.bounds import clip_factor
from dpkernels.reference import clip_many as ref
from dpkernels.reference.clip_many import bounds_table


@triton.jit
def _clip_from_parts_kernel(parts_ptr, U, err_ptr, E, m_ptr, own_ptr, V, tab_ptr, X,
                            nsq_ptr, norms_ptr, fac_ptr, cfac_ptr, ok_ptr, B, loss_scale,
                            one_plus_margin, max_grad_norm, HAS_ERR: tl.constexpr,
                            BLOCK: tl.constexpr):
    """One program.  Per sample b: ``n = sum_u parts[u, b]``; the bound ``e = sum_i err[i, b]
    + sum_v max(ku_v S^2, (2 sqrt(own_v) + cu_v S) cu_v S) + sum_x k_x S_r S_r'`` with
    ``S = M[row, b]`` (table rows: (row, ku, cu) for v < V, then (row, row', k), a row of
    -1 standing for 1: a constant factor, already in k); then the reference ``clip_factors``
    in float32 with correctly rounded sqrt and division: 0 for a non-finite norm or bound and
    for a factor below the smallest normal number; ``ok``: whether every norm and bound is
    finite."""
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        nsq = tl.zeros([BLOCK], dtype=tl.float32)
        for u in range(0, U):
            nsq += tl.load(parts_ptr + u * B + b, mask=m, other=0.0)
        n = tl.where(nsq < 0.0, 0.0, nsq)  # clamp_min(0), NaN stays NaN
        norms = tl.sqrt_rn(n) * loss_scale
        if HAS_ERR:
            err = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(0, E):
                err += tl.load(err_ptr + i * B + b, mask=m, other=0.0)
            own = tl.zeros([BLOCK], dtype=tl.float32)
            for v in range(0, V):
                r = tl.load(tab_ptr + 3 * v).to(tl.int64)
                ku = tl.load(tab_ptr + 3 * v + 1)
                cu = tl.load(tab_ptr + 3 * v + 2)
                S = tl.load(m_ptr + r * B + b, mask=m, other=0.0)
                q = tl.load(own_ptr + v * B + b, mask=m, other=0.0)
                q = tl.sqrt_rn(tl.where(q < 0.0, 0.0, q))
                e = cu * S
                own += tl.maximum(ku * S * S, (2.0 * q + e) * e,
                                  propagate_nan=tl.PropagateNan.ALL)
            for x in range(0, X):
                # row -1: a constant, moved into k (the reference's row of ones)
                t = tab_ptr + 3 * (V + x)
                r1 = tl.load(t).to(tl.int64)
                r2 = tl.load(t + 1).to(tl.int64)
                S1 = tl.load(m_ptr + tl.maximum(r1, 0) * B + b, mask=m, other=0.0)
                S2 = tl.load(m_ptr + tl.maximum(r2, 0) * B + b, mask=m, other=0.0)
                S1 = tl.where(r1 >= 0, S1, 1.0)
                S2 = tl.where(r2 >= 0, S2, 1.0)
                own = own + tl.load(t + 2) * S1 * S2  # k first, as the reference
            n = n + (err + own)
        fac, finite = clip_factor(n, norms, loss_scale, one_plus_margin, max_grad_norm)
        cnt += tl.where(m & (finite == 0), 1, 0)
        tl.store(nsq_ptr + b, nsq, mask=m)
        tl.store(norms_ptr + b, norms, mask=m)
        tl.store(fac_ptr + b, fac, mask=m)
        tl.store(cfac_ptr + b, fac * loss_scale, mask=m)
    tl.store(ok_ptr, tl.sum(cnt, axis=0) == 0)


@register("clip_from_parts", "triton")
def clip_from_parts(parts: torch.Tensor, err_parts: list, M: torch.Tensor | None,
                    own: torch.Tensor | None, own_consts: list, cross: list, loss_scale: float,
                    margin: float, max_grad_norm: float) -> tuple[torch.Tensor, ...]:
    """The reference ``clip_from_parts`` in one launch (float32 inputs; others: the
    reference), plus one small host-to-device copy of the bounds' table when there are
    bounds."""
    B = ref.check_parts("clip_from_parts", parts, err_parts, M, own, own_consts, cross)
    given = [parts, *err_parts] + [t for t in (M, own) if t is not None]
    if any(t.dtype != torch.float32 for t in given):
        return ref.clip_from_parts(parts, err_parts, M, own, own_consts, cross, loss_scale,
                                   margin, max_grad_norm)
    device = parts.device
    parts = parts.detach().contiguous()
    E, V, X = len(err_parts), len(own_consts), len(cross)
    err = parts
    if E:
        err = torch.stack([e.detach() for e in err_parts]) if E > 1 else err_parts[0].detach()
        err = err.contiguous()
    M = parts if M is None else M.detach().contiguous()
    own = parts if own is None else own.detach().contiguous()
    tab = parts
    if V + X:
        tab = device_table(bounds_table(own_consts, cross), torch.float32, device)
    out = torch.empty(4, B, dtype=torch.float32, device=device)
    ok = torch.empty((), dtype=torch.bool, device=device)
    _clip_from_parts_kernel[(1,)](
        parts_ptr=parts, U=parts.shape[0], err_ptr=err, E=E, m_ptr=M, own_ptr=own, V=V,
        tab_ptr=tab, X=X, nsq_ptr=out[0], norms_ptr=out[1], fac_ptr=out[2], cfac_ptr=out[3],
        ok_ptr=ok, B=B, loss_scale=float(loss_scale), one_plus_margin=1.0 + float(margin),
        max_grad_norm=float(max_grad_norm), HAS_ERR=bool(E + V + X), BLOCK=1024)
    return out[0], out[1], out[2], out[3], ok
