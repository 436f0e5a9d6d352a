"""The float64 oracle: per-sample gradients from torch.func, clipped and summed by hand.

``check_engine`` runs one DP step (noise 0) on ``model`` and compares ``per_sample_norms``
and every ``param.grad`` with ``sum_b c_b g_b / B_expected`` built from ``vmap(grad(...))`` of
each sample's own loss, on an untouched copy of the model.  ``B_expected`` defaults to the
realised batch size + 3, so a step that divides by the realised batch instead fails.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import dpkernels
from dpkernels.reference._common import cudnn_exact_fp32

# float64 end to end: both sides make ~1e-16 relative rounding errors per operation; 1e-10
# leaves five orders of magnitude for sums over a few thousand terms.
RTOL_F64 = 1e-10


def per_sample_grads(model, loss_fn, x, y):
    """{name: [B, *shape]} gradients of each sample's own loss (batch of one)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v for k, v in model.named_buffers()}

    def f(p, xb, yb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return loss_fn(out, yb.unsqueeze(0))

    try:
        return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    except RuntimeError:
        # vmap has no batching rule for some modules (a float64 LSTM): the same gradients,
        # one sample at a time
        rows = [grad(f)(params, x[b], y[b]) for b in range(x.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in params}


@contextlib.contextmanager
def no_tf32():
    """Float32 matmuls and convolutions in IEEE float32 inside the block (on CUDA both may
    default to TF32, whose 10-bit mantissas put a float32 oracle ~1e-3 off); restored after."""
    matmul = torch.backends.cuda.matmul
    new_api = getattr(matmul, "fp32_precision", None) is not None
    old = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
    try:
        with cudnn_exact_fp32():
            yield
    finally:
        if new_api:
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old


def oracle(model, loss_fn, x, y, max_grad_norm, expected_batch_size, reduction):
    with no_tf32():
        psg = per_sample_grads(model, loss_fn, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    scale = 1.0 / expected_batch_size if reduction == "mean" else 1.0
    grads = {k: torch.tensordot(c, v, dims=1) * scale for k, v in psg.items()}
    return norms, grads, psg


def ce(reduction):
    """Cross-entropy over all leading positions ([B, C] or [B, T, C] outputs)."""

    def f(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)

    return f


def mse(reduction):
    def f(out, y):
        return F.mse_loss(out, y, reduction=reduction)

    return f


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_engine(model, loss_fn, x, y, *, reduction="mean", max_grad_norm=None,
                 expected_batch_size=None, backend="reference", rtol=RTOL_F64,
                 norm_method="auto", require_mixed_clipping=True, mode="fast", reference=None):
    """One DP step against the oracle; returns the engine's (norms, grads): ``per_sample_norms``
    and ``{name: param.grad}``, both already checked against the oracle.

    ``loss_fn(out, y)`` must take the reduction into account (mean or sum over the batch);
    the oracle calls it on batches of one.  By default ``max_grad_norm`` is the median true
    norm, so that some samples are clipped and some are not, and ``expected_batch_size`` is
    ``B + 3`` (never the realised ``B``: dividing by the wrong one must show).  ``reference``:
    the model the oracle differentiates, if not a copy of ``model`` (e.g. the same model
    without activation checkpointing, which torch.func cannot run).
    """
    ref = copy.deepcopy(model if reference is None else reference)
    B = x.shape[0]
    if expected_batch_size is None:
        expected_batch_size = B + 3
    true_norms, _, _ = oracle(ref, loss_fn, x, y, 1.0, 1, reduction)
    if max_grad_norm is None:
        max_grad_norm = true_norms.median().item() * 1.0001
    if require_mixed_clipping and B > 1:
        assert (true_norms > max_grad_norm).any() and (true_norms < max_grad_norm).any()
    norms, grads, _ = oracle(ref, loss_fn, x, y, max_grad_norm, expected_batch_size, reduction)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                expected_batch_size=expected_batch_size, loss_reduction=reduction,
                                backend=backend, norm_method=norm_method, seed=0, mode=mode)
    got_grads = {}
    try:
        loss = loss_fn(model(x), y)
        dp.backward(loss)
        dp.step()
        got_norms = dp.per_sample_norms.clone()
        assert rel_err(got_norms.to(norms.dtype), norms) <= rtol, (got_norms, norms)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
                continue
            if name not in grads:
                continue
            assert p.grad is not None, name
            err = rel_err(p.grad.to(grads[name].dtype), grads[name])
            assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.3g}"
            got_grads[name] = p.grad.clone()
    finally:
        dpkernels.detach(model)
    return got_norms, got_grads
