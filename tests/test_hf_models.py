"""Tiny random-init Hugging Face models (config objects only, no downloads), called the way
their own docs call them, against the float64 oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import check_engine

transformers = pytest.importorskip("transformers")

# the float64 oracle runs attention under vmap, which has no batching rule for it on CPU
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

V, T = 40, 8


def lm_loss(out, y):
    """Token cross-entropy, mean over a sample's tokens and over the batch."""
    per_token = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1), reduction="none")
    return per_token.reshape(y.shape).mean(1).mean()


def tokens(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def exact(model, loss_fn, x, y, **kw):
    """The oracle check with every dpkernels warning (e.g. the generic fallback's) an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        return check_engine(model, loss_fn, x, y, **kw)


def gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def test_gpt2_default_call_position_ids_broadcast():
    """model(input_ids): GPT-2 looks its position embeddings up with ids of shape [1, T] and
    adds them to the [B, T, d] token embeddings; wpe's per-sample gradients must come out
    exact (the lookup is expanded to the batch, so its backprop is not summed over it)."""
    m = gpt2()
    x, y = tokens()
    check_engine(m, lm_loss, x, y)
