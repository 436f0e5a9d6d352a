"""nn.Embedding: per-sample norms from (ids, backprop), no dense weight gradient in backward.

The per-sample gradient ``E_b = sum_t e_{x_t} g_t^T`` is never materialised: norms and cross
terms (two uses of one table, or a table tied to a Linear head as in most language models)
come from the ids and backprops, and the clipped sum is an index_add of rescaled rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers.base import LinearUse, Op, Use
from dpkernels.reference import bounds as ref_bounds
from dpkernels.reference.bounds import dot_roundings


class EmbeddingUse(Use):
    """``E_b = sum_t e_{x_t} g_t^T`` with ``ids`` [B, T], ``g`` [B, T, p]; positions whose id
    is ``padding_idx`` contribute nothing (torch gives them no gradient)."""

    def __init__(self, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None,
                 num_embeddings: int, norm=None) -> None:
        super().__init__()
        self.ids, self.g = ids, g
        self.padding_idx, self.num_embeddings = padding_idx, num_embeddings
        self.norm = norm  # [B] ||E_b||^2 when already computed (or deferred by the engine)

    def raw_norm(self, op: Op) -> torch.Tensor:
        if self.norm is not None:
            return self.norm
        return op("embedding_norm", self.ids, self.g, self.padding_idx)

    def magnitude(self) -> torch.Tensor:
        return ref_bounds.magnitude(None, self.masked_g())

    def magnitude_operands(self):
        return None, self._bound_g()

    def underflow_operands(self):
        # E_b = sum_t e_{x_t} g_t^T: one-hot rows (T of them, padding or not) for x; what a
        # cross term with a tied head (a Linear: x = its g, y = its a) needs
        return self.g.shape[1], self._bound_g(), self.num_embeddings, self.g.shape[-1]

    def _bound_g(self) -> torch.Tensor:
        """``masked_g()``, one tensor for both bound operands (one row of the deferred
        magnitudes); taken before any ``drop_samples``, at clip time."""
        if getattr(self, "_masked", None) is None or self._masked[0] is not self.g:
            self._masked = (self.g, self.masked_g())
        return self._masked[1]

    def kappa(self) -> int:
        return dot_roundings(self.g.shape[-1], self.g) + 2 * self.g.shape[1] + 16

    def bound_constants(self):
        T = self.g.shape[1]
        if T <= 1 and self.g.device.type == "cpu":
            # ||g||^2: a sum of squares, within the margin; on a GPU the kernels sum it on
            # tensor cores (dot_roundings), beyond the margin
            return None
        return self.kappa(), dot_roundings(T, self.g)

    def error_terms(self):
        k = self.bound_constants()
        return None if k is None else (self.magnitude().unsqueeze(1), *k)

    def masked_g(self) -> torch.Tensor:
        """``g`` with the padding positions zeroed (for ops that take no padding_idx)."""
        if self.padding_idx is None:
            return self.g
        return self.g * (self.ids != self.padding_idx).unsqueeze(-1).to(self.g.dtype)

    def raw_dense(self, op: Op) -> torch.Tensor:
        B, T = self.ids.shape
        V, p = self.num_embeddings, self.g.shape[-1]
        dt = torch.promote_types(self.g.dtype, torch.float32)
        out = torch.zeros(B * V, p, dtype=dt, device=self.g.device)
        rows = (torch.arange(B, device=self.ids.device).unsqueeze(1) * V + self.ids.long())
        out.index_add_(0, rows.reshape(-1), self.masked_g().reshape(B * T, p).to(dt))
        return out.reshape(B, V, p)

    def raw_cross(self, other: Use, op: Op) -> torch.Tensor | None:
        if isinstance(other, EmbeddingUse):
            if other.padding_idx == self.padding_idx:
                return op("embedding_cross", self.ids, self.g, other.ids, other.g,
                          self.padding_idx)
            # two modules sharing one table with different padding ids
            return op("embedding_cross", self.ids, self.masked_g(), other.ids, other.masked_g(),
                      None)
        if isinstance(other, LinearUse):
            B, _, p = self.g.shape
            a, g = other.a, other.g
            if a.shape[0] == B and a.shape[-1] == p and g.shape[-1] == self.num_embeddings:
                return op("embedding_linear_cross", self.ids, self.g, self.padding_idx, a, g)
        return None

    def clipped_sum(self, op: Op, c, acc, noise_std, seed, scale) -> torch.Tensor:
        return op("embedding_clipped_sum", self.ids, self.g, c, self.num_embeddings,
                  self.padding_idx, acc, noise_std, seed, scale)


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, record):
        ctx.save_for_backward(ids)
        ctx.record = record
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        ctx.record(ids, g)
        return None, None, None, None


class EmbeddingHandler:
    types = (nn.Embedding,)

    def check(self, module: nn.Embedding, name: str) -> None:
        if module.max_norm is not None:
            raise ValueError(
                f"dpkernels: {name} (Embedding) has max_norm={module.max_norm}, which rewrites "
                "the embedding weights in place during the forward pass, outside the clipped "
                "update; construct it with max_norm=None (renormalise explicitly if needed)"
            )
        if module.sparse:
            raise ValueError(
                f"dpkernels: {name} (Embedding) has sparse=True; DP noise makes every row's "
                "gradient dense, so construct it with sparse=False"
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                f"dpkernels: {name} (Embedding) has scale_grad_by_freq=True, which scales "
                "each gradient by word frequencies counted over the whole batch and so mixes "
                "samples; construct it with scale_grad_by_freq=False"
            )

    def forward(self, engine, module: nn.Embedding, name: str, orig, ids, *rest, **kw):
        w = module.weight
        if rest or kw or not torch.is_grad_enabled() or not w.requires_grad:
            return orig(ids, *rest, **kw)
        self.check(module, name)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(
                f"dpkernels: {name} (Embedding) needs an integer tensor of ids, got "
                f"{getattr(ids, 'dtype', type(ids).__name__)}"
            )
        if ids.dim() < 1:
            raise ValueError(
                f"dpkernels: {name} (Embedding) got ids of shape {tuple(ids.shape)}; DP "
                "training needs a batch dimension first ([B] or [B, ...] ids)"
            )
        engine.check_device(ids.device)
        engine.on_forward(name)
        pad, V = module.padding_idx, module.num_embeddings
        batch = engine.note_batch(ids.shape[0])
        if ids.shape[0] == 1 and batch not in (None, 1):
            # Batch-1 ids in a B-batch forward (HF's position_ids of shape [1, T]): the output
            # is broadcast against the batch, and its backprop would arrive summed over the
            # samples.  Looking up B copies gives the same values wherever the output is
            # broadcast, and a per-sample backprop.
            ids = ids.expand(batch, *ids.shape[1:]).contiguous()

        def record(ids_saved, g):
            B, T = ids_saved.shape[0], math.prod(ids_saved.shape[1:])
            if B == 1 and engine.batch_size not in (None, 1):
                raise ValueError(
                    f"dpkernels: {name} (Embedding) got ids of batch 1 (shape "
                    f"{tuple(ids_saved.shape)}) broadcast against a batch of "
                    f"{engine.batch_size}, before any other layer of the forward showed the "
                    "batch size, so its per-sample gradients cannot be told apart; pass ids "
                    "with the batch first (e.g. position_ids.expand(B, -1))"
                )
            ids2, g2 = ids_saved.reshape(B, T), g.reshape(B, T, g.shape[-1])
            norm = None
            if engine.defers_norms():  # taken at clip time with the other deferred norms
                (norm,) = engine.defer_norm("linear_norms_many", (ids2, g2, "embedding", pad), 1)
            engine.record(name, B, [(w, EmbeddingUse(ids2, g2, pad, V, norm=norm))])

        return _EmbeddingFn.apply(ids, w, pad, record)


HANDLERS = [EmbeddingHandler()]
