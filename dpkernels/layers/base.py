"""What one use of one parameter in one backward pass leaves behind, and how the engine
turns it into norms, cross terms and clipped sums.

A ``Use`` holds the tensors its per-sample gradient is made of (for a Linear: the inputs
``a`` and backprops ``g``).  Everything here is "raw": the per-sample gradient of the use is
``s * G_b`` with ``G_b`` computed from those tensors and ``s`` the engine's loss scale (the
realised batch size for ``loss_reduction="mean"``, 1 for ``"sum"``), the same for every use
of a micro-batch, so the engine applies it once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Op = Callable[..., torch.Tensor]


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

    def raw_dense(self, op: Op) -> torch.Tensor:
        """[B, *param.shape] ``G_b`` materialised (used only where no ghost form exists)."""
        raise NotImplementedError

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        """[B] ``<G_b, G'_b>`` with a use of the same parameter, or None if no fast form."""
        return None

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        """``(acc + sum_b c_b G_b + noise) * scale`` (``c`` already includes the loss scale)."""
        return op("dense_clipped_sum", self.raw_dense(op), c, acc, noise_std, seed, scale)


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


class LinearUse(Use):
    """``G_b = sum_t g_t a_t^T`` with ``a`` [B, T, d], ``g`` [B, T, p].  ``norm``: its [B]
    ``||G_b||^2`` when already computed (with the bias's, in one pass over ``g``)."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, method: str = "auto",
                 norm: torch.Tensor | None = None) -> None:
        self.a, self.g, self.method, self.norm = a, g, method, norm

    def raw_norm(self, op: Op) -> torch.Tensor:
        if self.norm is not None:
            return self.norm
        return op("linear_norm", self.a, self.g, self.method)

    def raw_dense(self, op: Op) -> torch.Tensor:
        dt = torch.promote_types(self.a.dtype, torch.float32)
        return torch.einsum("btp,btd->bpd", self.g.to(dt), self.a.to(dt))

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        if isinstance(other, LinearUse):
            return op("linear_cross", self.a, self.g, other.a, other.g)
        return None

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        return op("linear_clipped_sum", self.a, self.g, c, acc, noise_std, seed, scale)


class BiasUse(Use):
    """``G_b = sum_t g_t`` with ``g`` [B, T, p] (Linear and Conv biases).  ``norm``: its [B]
    ``||G_b||^2`` when already computed."""

    def __init__(self, g: torch.Tensor, norm: torch.Tensor | None = None) -> None:
        self.g, self.norm = g, norm

    def raw_norm(self, op: Op) -> torch.Tensor:
        if self.norm is not None:
            return self.norm
        return op("linear_bias_norm", self.g)

    def raw_dense(self, op: Op) -> torch.Tensor:
        return self.g.to(torch.promote_types(self.g.dtype, torch.float32)).sum(1)

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        return op("linear_bias_clipped_sum", self.g, c, acc, noise_std, seed, scale)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype in force for ``device_type``, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
