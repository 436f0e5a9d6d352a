"""What one use of one parameter in one backward pass leaves behind, and how the engine
turns it into norms, cross terms and clipped sums.

A ``Use`` holds the tensors its per-sample gradient is made of (for a Linear: the inputs
``a`` and backprops ``g``).  Everything here is "raw": the per-sample gradient of the use is
``s * G_b`` with ``G_b`` computed from those tensors and ``s`` the engine's loss scale (the
realised batch size for ``loss_reduction="mean"``, 1 for ``"sum"``), the same for every use
of a micro-batch, so the engine applies it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dpkernels.reference import bounds as ref_bounds
from dpkernels.reference._common import exact_fp32_on
from dpkernels.reference.bounds import dot_roundings
from dpkernels.reference.linear import choose_method

Op = Callable[..., torch.Tensor]

# Unit roundoff of the dtype a norm accumulates in (16-bit inputs accumulate in float32).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def unit_roundoff(t: torch.Tensor) -> float:
    return UNIT_ROUNDOFF.get(t.dtype, 2.0**-24)


# Cancellation.  A per-sample norm is computed by another formula than the clipped sum that
# releases the gradient (ghost: sum over position pairs of Gram products; direct and bias: a
# sum over positions), and sums of signed terms lose accuracy *relative to the sum of the
# terms' magnitudes*, not to the result: a crafted sample with x_2 = -x_1 + e has a tiny norm
# and huge terms, and a relative margin on the norm does not bound its error.  The bounds below
# are in terms of S_b = sum_t |a_t| |g_t| (the magnitude of the per-sample gradient's terms):
#   ghost  |n^2 - n_hat^2| <= kappa u S^2, kappa = r(d) + r(p) + 2T + 16: a dot product of
#          length K costs r(K) roundings (reference/bounds.dot_roundings: K for FMA loops on the
#          CPU; on a GPU also what the tensor-core norm kernels may do, ops/_common.norm_mma),
#          and the T^2 pair products are summed in tiles (a tree inside a tile, sequential over
#          tiles) or by torch's cascade sum, both within 2T + 16 roundings for T >= 1;
#   direct/sum  |n - n_hat| <= gamma S with gamma = (r(T) + 16) u: the per-sample gradient
#          itself is a sum over T positions.
# The engine adds these to the squared norms before clipping (DESIGN.md section 6).


# Underflow.  The bounds above are relative: they assume that no product underflows.  A
# product below the smallest normal number is off by up to eta absolutely (2^-126 for float32,
# where GPUs may flush subnormals to zero; 2^-1022 for float64), and a Gram-form norm
# multiplies such products by products of the other factor: with |a| ~ 1e-23 and |g| ~ 1e17
# every a_t . a_s underflows to 0, and the norm of sum_t g_t a_t^T comes out 0 (ghost, and the
# T = 1 form ||a||^2 ||g||^2), while the clipped sum multiplies g_t a_t^T directly and releases
# the whole gradient unclipped.  For G_b = sum_t x_t y_t^T (x_t in R^m, y_t in R^n; a Linear:
# x = g, y = a) each Gram entry x_t . x_s is off by at most 1.01 m eta from underflow, and
# it multiplies |y_t . y_s| <= |y_t| |y_s|; symmetrically for y: |error| <= 2 eta (m Y^2 + n X^2)
# with X = sum_t |x_t|, Y = sum_t |y_t| (the factor 2 covers the relative errors on top), and
# 4 eta (max m Y Y' + max n X X') for a cross term 2 <G, G'>.  Errors from underflow that are
# not amplified that way (a product of the two Grams, a bias or embedding norm whose Gram has
# the gradient's own entries, the direct form's entries) are absolute and below 1e-30 for any
# sane shape: inside the 1e-6 that the clip factor C / (bound + 1e-6) adds to the bound.
# float32's eta is 2^-125, twice the smallest normal number: on a tensor core a block's partial
# sum may be flushed as well as a product (ops/_common.norm_mma; its float32 path scales rows
# so that nothing inside a chunk underflows, only the chunk's scaled-back sum may).
UNDERFLOW = {torch.float64: 2.0**-1022, torch.float32: 2.0**-125}


def underflow_eta(*dtypes: torch.dtype) -> float:
    """eta for a norm accumulated in the promotion of ``dtypes`` and float32."""
    dt = torch.float32
    for d in dtypes:
        dt = torch.promote_types(dt, d)
    return UNDERFLOW.get(dt, 2.0**-125)


def underflow_own(use: Use) -> torch.Tensor | None:
    """[B] bound on the underflow error of ``use``'s Gram-form squared norm, or None."""
    s = use.underflow_sums()
    if s is None:
        return None
    X, Y, m, n, eta = s
    return ((2.0 * eta * m) * Y * Y + (2.0 * eta * n) * X * X).sum(1)


def underflow_cross(u: Use, v: Use) -> torch.Tensor | None:
    """[B] bound on the underflow error of the cross term ``2 <G_b, G'_b>`` of two uses of one
    parameter (sums over groups: an upper bound of the per-group products), or None."""
    su, sv = u.underflow_sums(), v.underflow_sums()
    if su is None or sv is None:
        return None
    X, Y, m, n, eta = su
    X2, Y2, m2, n2, eta2 = sv
    k = 4.0 * max(eta, eta2)
    return ((k * max(m, m2)) * Y.sum(1) * Y2.sum(1) + (k * max(n, n2)) * X.sum(1) * X2.sum(1))


def cancellation_bounds(terms: list) -> torch.Tensor:
    """[B] summed error bounds of the squared norms for ``terms``: (S [B, G], kappa, T,
    norm_sq [B]) per use, G groups each bounded on its own (a conv's per-group Linears).  One
    stacked pass for all uses of a micro-batch; the larger of the ghost and sum forms (a use
    known to take the sum or direct form gives kappa 0: ``LinearUse.direct_form``)."""
    S = torch.cat([t[0] for t in terms], 1)  # [B, sum G]
    n = torch.cat([t[3].clamp_min(0).sqrt().unsqueeze(1).expand(-1, t[0].shape[1])
                   for t in terms], 1)
    # each use's own unit roundoff: cat promotes a float32 use's S to float64 next to a
    # float64 use, and float64's u would then bound a float32 norm 2^29 too tightly
    groups = [t for t in terms for _ in range(t[0].shape[1])]
    kappa = torch.tensor([t[1] * unit_roundoff(t[0]) for t in groups], dtype=S.dtype,
                         device=S.device)
    chain = torch.tensor([(t[2] + 16) * unit_roundoff(t[0]) for t in groups], dtype=S.dtype,
                         device=S.device)
    ghost = kappa * S * S
    e = chain * S
    direct = (2.0 * n + e) * e  # (n + e)^2 - n^2, each group's norm <= the use's norm
    return torch.maximum(ghost, direct).sum(1)


def stacked_bounds(M: torch.Tensor, own: list, cross_terms: list) -> torch.Tensor:
    """[B] summed error bounds, the same as ``cancellation_bounds`` and ``cross_error``, for
    uses whose magnitudes are rows of ``M`` [R, B] (all uses of a micro-batch, one grouped op):
    ``own`` (row, kappa u, (T + 16) u, norm_sq [B]) per use, ``cross_terms`` (row, row', k):
    ``k M[row] M[row']`` (2 max(kappa, kappa') u for a pair of uses of one parameter, and the
    underflow terms; a float instead of a row is a constant).  A few launches in all."""
    parts = []
    if own:
        rows = [r for r, _, _, _ in own]
        if rows == list(range(M.shape[0])):
            S = M
        else:
            S = M.index_select(0, torch.tensor(rows, dtype=torch.long).to(M.device,
                                                                          non_blocking=True))
        dt = M.dtype
        for _, _, _, n in own:
            dt = torch.promote_types(dt, n.dtype)
        S = S.to(dt)
        consts = torch.tensor([[k, c] for _, k, c, _ in own], dtype=dt).to(M.device,
                                                                          non_blocking=True)
        n = torch.stack([n.to(dt) for _, _, _, n in own]).clamp_min(0).sqrt()
        ghost = consts[:, :1] * S * S
        e = consts[:, 1:] * S
        direct = (2.0 * n + e) * e  # (n + e)^2 - n^2
        parts.append(torch.maximum(ghost, direct).sum(0))
    if cross_terms:
        # one gather for all products; a constant is the row of ones appended to M, with the
        # constant moved into k
        R = M.shape[0]
        idx, ks = [], []
        for r, r2, k in cross_terms:
            for x in (r, r2):
                if not isinstance(x, int):
                    k = k * float(x)
            idx.append([r if isinstance(r, int) else R, r2 if isinstance(r2, int) else R])
            ks.append(k)
        Mx = torch.cat([M, torch.ones(1, M.shape[1], dtype=M.dtype, device=M.device)])
        ix = torch.tensor(idx, dtype=torch.long).to(M.device, non_blocking=True)  # [E, 2]
        kt = torch.tensor(ks, dtype=M.dtype).to(M.device, non_blocking=True)
        # k first: k M M' never overflows where the bound itself does not
        parts.append(((kt.unsqueeze(1) * Mx[ix[:, 0]]) * Mx[ix[:, 1]]).sum(0))
    out = parts[0]
    for t in parts[1:]:
        out = out + t.to(out.dtype)
    return out


class Use:
    # Names of the attributes that hold per-sample tensors, batch first (a ``[B, ...]`` tensor
    # per sample row).  ``None``: every floating tensor attribute is one (the contract for a
    # Use: it keeps per-sample tensors only).
    per_sample: tuple[str, ...] | None = None

    def drop_samples(self, bad: torch.Tensor) -> None:
        """Zero the rows of the samples where ``bad`` [B] is True, so that a non-finite sample
        (given clip factor 0) contributes exactly nothing to the clipped sums."""
        names = self.per_sample
        if names is None:
            names = tuple(k for k, v in vars(self).items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point())
        for k in names:
            t = getattr(self, k)
            if t is None or not t.is_floating_point():
                continue
            if t.dim() == 0 or t.shape[0] != bad.shape[0]:
                raise RuntimeError(f"dpkernels: {type(self).__name__}.{k} is not batch-first")
            keep = ~bad.view(-1, *([1] * (t.dim() - 1)))
            setattr(self, k, torch.where(keep, t, torch.zeros((), dtype=t.dtype,
                                                               device=t.device)))

    def raw_norm(self, op: Op) -> torch.Tensor:
        """[B] ``||G_b||^2``."""
        return op("dense_norm", self.raw_dense(op))

    def magnitude(self) -> torch.Tensor | None:
        """[B] ``S_b``, the sum of the magnitudes of the terms ``G_b`` is a sum of, or None
        when the norm and the clipped sum come from the same materialised ``G_b``."""
        return None

    def kappa(self) -> int:
        """The ghost-form error constant (see ``cancellation_bounds``) for this use's shapes."""
        return 16

    def error_terms(self) -> tuple[torch.Tensor, int, int] | None:
        """``(S [B, G], kappa, T)`` for the cancellation bound of this use's norm
        (``cancellation_bounds``), or None when there is no cancellation to bound."""
        return None

    def magnitude_operands(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """``(a | None, g)`` ([B, T, d], [B, T, p]) with ``magnitude() = sum_t |a_t| |g_t|``
        (None: ``|a_t| = 1``), so that the engine takes the magnitudes of all uses of a
        micro-batch in one grouped op (``magnitude_many``); None when there is no such form
        (``magnitude`` and ``error_terms`` are then called per use)."""
        return None

    def bound_constants(self) -> tuple[int, int] | None:
        """``(kappa, T)`` of ``error_terms`` (one group) without computing ``S``; None when
        there is no cancellation to bound.  Only for uses with ``magnitude_operands``."""
        return None

    def underflow_operands(self) -> tuple | None:
        """``(x, y, m, n)`` for the underflow bound (``underflow_own``) of a norm of
        ``G_b = sum_t x_t y_t^T`` computed in Gram form: ``x``, ``y`` [B, T, m or n] (their row
        norms are summed over t), or an int for a sum known in advance (an embedding's one-hot
        rows: the number of positions); None when no Gram of one factor multiplies the other.
        The engine takes the sums with the deferred magnitudes (``magnitude_many``)."""
        return None

    def underflow_sums(self) -> tuple | None:
        """``(X [B, G], Y [B, G], m, n, eta)`` for ``underflow_own``: the summed row norms of
        ``underflow_operands`` per group (G = 1 unless a subclass has groups)."""
        ops = self.underflow_operands()
        if ops is None:
            return None
        x, y, m, n = ops
        ts = [t for t in (x, y) if isinstance(t, torch.Tensor)]
        B = ts[0].shape[0]

        def total(t):
            if isinstance(t, torch.Tensor):
                return ref_bounds.magnitude(None, t).unsqueeze(1)
            dt = torch.promote_types(ts[0].dtype, torch.float32)
            return torch.full((B, 1), float(t), dtype=dt, device=ts[0].device)

        return total(x), total(y), m, n, underflow_eta(*(t.dtype for t in ts))

    def raw_dense(self, op: Op) -> torch.Tensor:
        """[B, *param.shape] ``G_b`` materialised (used only where no ghost form exists)."""
        raise NotImplementedError

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        """[B] ``<G_b, G'_b>`` with a use of the same parameter, or None if no fast form."""
        return None

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        """``(acc + sum_b c_b G_b + noise) * scale`` (``c`` already includes the loss scale)."""
        return op("dense_clipped_sum", self.raw_dense(op), c, acc, noise_std, seed, scale)

    def group(self) -> tuple[str, tuple] | None:
        """(grouped op, operands) when this use's clipped sum can be folded together with the
        other uses of the step naming the same op: ``fold`` then calls ``op(name, [operands,
        ...], c, [acc, ...])`` once for all of them instead of ``clipped_sum`` per use."""
        return None

    def norm_rows(self) -> torch.Tensor | None:
        """[B, N] when ``raw_norm`` is the squared norm of these rows and costs a pass of its
        own: the engine then computes all such norms of a backward in one grouped op."""
        return None


def cross_error(u: Use, v: Use, norm_u: torch.Tensor, norm_v: torch.Tensor) -> torch.Tensor | None:
    """[B] bound on the error of ``2 <G_b, G'_b>`` for two uses of one parameter: the cross
    term is a ghost-form sum of signed pair products, ``|error| <= kappa u S S'`` (a use with
    no magnitude contributes its norm, computed from its materialised gradient)."""
    su, sv = u.magnitude(), v.magnitude()
    if su is None and sv is None:
        return None
    su = su if su is not None else norm_u.clamp_min(0).sqrt()
    sv = sv if sv is not None else norm_v.clamp_min(0).sqrt()
    return (2.0 * max(u.kappa(), v.kappa()) * unit_roundoff(su)) * su * sv


def cross(u: Use, v: Use, op: Op) -> torch.Tensor:
    """[B] ``<G_b, G'_b>`` for two uses of one parameter (raw: no loss scale)."""
    r = u.raw_cross(v, op)
    if r is None:
        r = v.raw_cross(u, op)
    if r is None:
        r = op("dense_cross", u.raw_dense(op), v.raw_dense(op))
    return r


class DenseUse(Use):
    """A use whose per-sample gradient is materialised: ``psg`` [B, *param.shape]."""

    def __init__(self, psg: torch.Tensor) -> None:
        self.psg = psg

    def raw_dense(self, op: Op) -> torch.Tensor:
        return self.psg

    def group(self) -> tuple[str, tuple]:
        return "rows_clipped_sum_many", (self.norm_rows().unsqueeze(1), self.psg.shape[1:])

    def norm_rows(self) -> torch.Tensor:
        B = self.psg.shape[0]
        return self.psg.reshape(B, math.prod(self.psg.shape[1:]))  # explicit: B may be 0


class SummedTerms:
    """Mixin for a use whose per-sample gradient was formed as a sum over ``terms`` positions
    of elementwise products (a norm layer's ``sum_pos g * x_hat`` and ``sum_pos g``, an
    elementwise op's ``sum_pos g * other``) and then materialised: the norm and the clipped sum
    both read the materialised sum, but its rounding error is relative to the terms'
    magnitudes, not to the sum (a crafted sample whose terms cancel has a tiny sum and a large
    error, DESIGN.md section 6).  ``mag`` [B, n]: ``sum_pos |term|`` per element (an upper
    bound of the magnitudes), so the error vector's norm is at most ``(terms + 16) u ||mag||``
    and the use is bounded like a bias over ``terms`` positions (``S_b = ||mag_b||``), in the
    sum form only.  Without ``mag`` the subclass's own rules apply."""

    mag: torch.Tensor | None = None
    terms: int = 1

    def _mag_rows(self) -> torch.Tensor:
        B = self.mag.shape[0]
        return self.mag.reshape(B, 1, math.prod(self.mag.shape[1:]))  # explicit: B may be 0

    def magnitude(self):
        if self.mag is None:
            return super().magnitude()
        return ref_bounds.magnitude(None, self._mag_rows())

    def magnitude_operands(self):
        if self.mag is None:
            return super().magnitude_operands()
        return None, self._mag_rows()

    def kappa(self) -> int:
        if self.mag is None:
            return super().kappa()
        return self._mag_rows().shape[-1] + 2 * self.terms + 16

    def bound_constants(self):
        if self.mag is None:
            return super().bound_constants()
        if self.terms <= 1:  # one product per element: relative rounding, in the margin
            return None
        # the norm is a sum of squares of the materialised sum (no Gram form): only the sum
        # form's bound, ghost constant 0 (kappa() is for cross terms, inner products of two
        # such sums)
        return 0, self.terms

    def error_terms(self):
        if self.mag is None:
            return super().error_terms()
        k = self.bound_constants()
        return None if k is None else (self.magnitude().unsqueeze(1), *k)


class SummedDenseUse(SummedTerms, DenseUse):
    """A ``DenseUse`` whose ``psg`` is a sum over ``terms`` positions with magnitudes
    ``mag`` [B, *param.shape] (``SummedTerms``)."""

    def __init__(self, psg: torch.Tensor, mag: torch.Tensor | None, terms: int) -> None:
        super().__init__(psg)
        self.mag, self.terms = mag, int(terms)


class LinearUse(Use):
    """``G_b = sum_t g_t a_t^T`` with ``a`` [B, T, d], ``g`` [B, T, p].  ``norm``: its [B]
    ``||G_b||^2`` when already computed (with the bias's, in one pass over ``g``)."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, method: str = "auto",
                 norm: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> None:
        self.a, self.g, self.method, self.norm = a, g, method, norm
        # [B, p, d] W_b, filled with the norm (linear_direct_many): the clipped sum reads it
        self.dense = dense

    def raw_norm(self, op: Op) -> torch.Tensor:
        if self.norm is not None:
            return self.norm
        return op("linear_norm", self.a, self.g, self.method)

    def magnitude(self) -> torch.Tensor:
        return ref_bounds.magnitude(self.a, self.g)

    def magnitude_operands(self):
        return self.a, self.g

    def underflow_operands(self):
        return self.g, self.a, self.g.shape[-1], self.a.shape[-1]

    def kappa(self) -> int:
        return (dot_roundings(self.a.shape[-1], self.a) + dot_roundings(self.g.shape[-1], self.g)
                + 2 * self.a.shape[1] + 16)

    def direct_form(self) -> bool:
        """Whether the norm is the sum of squares of ``W_b`` itself (the direct form, also
        when ``W_b`` is kept): its error is then the sum form's alone, not the ghost form's
        (which grows with S^2 ~ T n^2 and would inflate long sequences' norms by tens of
        percent)."""
        if self.dense is not None:
            return True
        T, d, p = self.a.shape[1], self.a.shape[2], self.g.shape[2]
        return (choose_method(T, d, p) if self.method == "auto" else self.method) == "direct"

    def bound_constants(self):
        T = self.a.shape[1]
        if T <= 1:  # ||a||^2 ||g||^2: products of sums of squares, no cancellation
            return None
        # the ghost constant (kappa) only where the norm took the ghost form; kappa() itself
        # stays for cross terms, which are Gram-form sums whatever the norms' form
        return (0 if self.direct_form() else self.kappa()), dot_roundings(T, self.g)

    def error_terms(self):
        k = self.bound_constants()
        return None if k is None else (self.magnitude().unsqueeze(1), *k)

    def raw_dense(self, op: Op) -> torch.Tensor:
        if self.dense is not None and isinstance(self.norm, torch.Tensor):
            # filled: the deferred op that writes W_b also gave the norm (a cross term with
            # a later use of the same parameter may come before that: from a and g then)
            return self.dense
        dt = torch.promote_types(self.a.dtype, torch.float32)
        with exact_fp32_on(self.a):
            return torch.einsum("btp,btd->bpd", self.g.to(dt), self.a.to(dt))

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        if isinstance(other, LinearUse):
            return op("linear_cross", self.a, self.g, other.a, other.g)
        return None

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        if self.dense is not None:
            return op("dense_clipped_sum", self.dense, c, acc, noise_std, seed, scale)
        return op("linear_clipped_sum", self.a, self.g, c, acc, noise_std, seed, scale)

    def group(self) -> tuple[str, tuple]:
        if self.dense is not None:
            B = self.dense.shape[0]
            return "rows_clipped_sum_many", (self.dense.reshape(B, 1, -1) if B else
                                             self.dense.reshape(0, 1, math.prod(
                                                 self.dense.shape[1:])),
                                             self.dense.shape[1:])
        return "linear_clipped_sum_many", (self.a, self.g)


class BiasUse(Use):
    """``G_b = sum_t g_t`` with ``g`` [B, T, p] (Linear and Conv biases).  ``norm``: its [B]
    ``||G_b||^2`` when already computed."""

    def __init__(self, g: torch.Tensor, norm: torch.Tensor | None = None,
                 gram: bool = True) -> None:
        # gram: the norm may be the Gram form's sum_{t,s} g_t . g_s (a ghost-form Linear's
        # kernel); False: it is ||sum_t g_t||^2 formed from the sum (the sum form's bound)
        self.g, self.norm, self.gram = g, norm, gram

    def raw_norm(self, op: Op) -> torch.Tensor:
        if self.norm is not None:
            return self.norm
        return op("linear_bias_norm", self.g)

    def magnitude(self) -> torch.Tensor:
        return ref_bounds.magnitude(None, self.g)

    def magnitude_operands(self):
        return None, self.g

    def kappa(self) -> int:
        return dot_roundings(self.g.shape[-1], self.g) + 2 * self.g.shape[1] + 16

    def bound_constants(self):
        if self.g.shape[1] <= 1:
            return None
        return (self.kappa() if self.gram else 0), dot_roundings(self.g.shape[1], self.g)

    def error_terms(self):
        k = self.bound_constants()
        return None if k is None else (self.magnitude().unsqueeze(1), *k)

    def raw_dense(self, op: Op) -> torch.Tensor:
        return self.g.to(torch.promote_types(self.g.dtype, torch.float32)).sum(1)

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        return op("linear_bias_clipped_sum", self.g, c, acc, noise_std, seed, scale)

    def group(self) -> tuple[str, tuple]:
        return "rows_clipped_sum_many", (self.g, self.g.shape[-1:])


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype in force for ``device_type``, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
