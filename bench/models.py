"""The benchmark models of shared/ANCHORS.md, with their batch makers and losses.

Every size is a parameter so the CPU smoke preset can run the same architectures small.
``spec(name, **sizes)`` bundles a model builder, a batch maker and a loss for bench/e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- gpt


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, T, d]
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, T, d/h]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.seq:
            raise ValueError(f"sequence of {T} tokens, but the model was built for {self.seq}")
        # A contiguous [B, T] tensor, not a broadcast [1, T] or an expanded view: per-sample
        # embedding rules need the batch dimension, and Opacus' ghost embedding norm crashes
        # on non-contiguous ids (ANCHORS.md).
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T).contiguous()
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, V]


def gpt(vocab: int = 16384, d: int = 768, layers: int = 6, heads: int = 12,
        seq: int = 256) -> GPT:
    return GPT(vocab, d, layers, heads, seq)


def gpt_batch(batch: int, seq: int, vocab: int = 16384, device="cpu", generator=None):
    """(ids [B, T], next-token targets [B, T])."""
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy, mean over every token of the batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


# ---------------------------------------------------------------------------- cnn


def cnn(widths: tuple[int, ...] = (64, 64, 128, 128, 256), groups: int = 32,
        classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """5 x (Conv2d 3x3 pad 1, GroupNorm, ReLU), AvgPool2d(2) after blocks 2 and 4, global
    average pool, Linear to ``classes``."""
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(min(groups, w), w), nn.ReLU()]
        if i in (1, 3):
            layers.append(nn.AvgPool2d(2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def image_batch(batch: int, size: int = 32, classes: int = 10, channels: int = 3,
                device="cpu", generator=None):
    x = torch.randn(batch, channels, size, size, device=device, generator=generator)
    y = torch.randint(0, classes, (batch,), device=device, generator=generator)
    return x, y


# ---------------------------------------------------------------------------- mlp


def mlp(widths: tuple[int, ...] = (784, 1024, 1024, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_batch(batch: int, features: int = 784, classes: int = 10, device="cpu",
              generator=None):
    x = torch.randn(batch, features, device=device, generator=generator)
    y = torch.randint(0, classes, (batch,), device=device, generator=generator)
    return x, y


def cls_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


# ---------------------------------------------------------------------------- Hugging Face
# Real architectures from transformers (imported only when one of these is built), random
# init from a config object (no download), called the way their docs call them:
# ``model(input_ids)`` (so [1, T] position ids, HF's Conv1D / RMSNorm modules, tied heads).
# Dropout is off, as in the gpt above.

HF_GPT2 = dict(vocab=50257, d=768, layers=12, heads=12)  # GPT-2 small: 124.4 M parameters
# TinyLlama-1.1B's shape (Llama 2 architecture: RMSNorm, SwiGLU, rotary, GQA 32/4 heads,
# untied head): 1.10 B parameters
HF_LLAMA = dict(vocab=32000, d=2048, layers=22, heads=32, kv_heads=4, ffn=5632)


class HFCausalLM(nn.Module):
    """A transformers causal LM returning its logits, called as ``model(input_ids)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx).logits


def hf_gpt2(vocab: int, d: int, layers: int, heads: int, seq: int) -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=max(seq, 1024), n_embd=d,
                                  n_layer=layers, n_head=heads, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return HFCausalLM(transformers.GPT2LMHeadModel(cfg))


def hf_llama(vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int,
             seq: int) -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads,
                                   max_position_embeddings=max(seq, 2048),
                                   tie_word_embeddings=False)
    return HFCausalLM(transformers.LlamaForCausalLM(cfg))


# ---------------------------------------------------------------------------- registry


@dataclass
class Spec:
    """What bench/e2e.py needs to time one model."""

    model: Callable[[], nn.Module]
    batch: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (batch, seq, device, generator)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # (out, y) -> (criterion args, criterion kwargs) for a per-sample criterion such as
    # Opacus' ghost-clipping wrapper around nn.CrossEntropyLoss
    criterion_args: Callable[[torch.Tensor, torch.Tensor], tuple[tuple, dict]]


def spec(name: str, **sizes) -> Spec:
    """``name`` is gpt, cnn, mlp, hf-gpt2 or hf-llama; ``sizes`` override the ANCHORS.md sizes
    (for gpt: vocab, d, layers, heads, seq; for cnn: widths, groups, size; for mlp: widths)
    or HF_GPT2 / HF_LLAMA (and kv_heads, ffn for hf-llama)."""
    if name in ("hf-gpt2", "hf-llama"):
        base = HF_GPT2 if name == "hf-gpt2" else HF_LLAMA
        kw = {**base, **{k: v for k, v in sizes.items() if k in base or k == "seq"}}
        build = hf_gpt2 if name == "hf-gpt2" else hf_llama

        def lm_args(out, y):
            return (out.flatten(0, 1).float(), y.flatten()), {"shape": out.shape}

        return Spec(
            model=lambda: build(**kw),
            batch=lambda b, seq, device="cpu", generator=None: gpt_batch(
                b, seq, kw["vocab"], device, generator),
            loss=lm_loss,
            criterion_args=lm_args,
        )
    if name == "gpt":
        vocab = sizes.get("vocab", 16384)
        kw = {k: sizes[k] for k in ("vocab", "d", "layers", "heads", "seq") if k in sizes}

        def lm_args(out, y):
            return (out.flatten(0, 1).float(), y.flatten()), {"shape": out.shape}

        return Spec(
            model=lambda: gpt(**kw),
            batch=lambda b, seq, device="cpu", generator=None: gpt_batch(
                b, seq, vocab, device, generator),
            loss=lm_loss,
            criterion_args=lm_args,
        )
    if name == "cnn":
        size = sizes.get("size", 32)
        kw = {k: tuple(sizes[k]) if k == "widths" else sizes[k]
              for k in ("widths", "groups") if k in sizes}
        return Spec(
            model=lambda: cnn(**kw),
            batch=lambda b, seq=None, device="cpu", generator=None: image_batch(
                b, size, device=device, generator=generator),
            loss=cls_loss,
            criterion_args=lambda out, y: ((out.float(), y), {}),
        )
    if name == "mlp":
        widths = tuple(sizes.get("widths", (784, 1024, 1024, 10)))
        return Spec(
            model=lambda: mlp(widths),
            batch=lambda b, seq=None, device="cpu", generator=None: mlp_batch(
                b, widths[0], widths[-1], device, generator),
            loss=cls_loss,
            criterion_args=lambda out, y: ((out.float(), y), {}),
        )
    raise ValueError(f"unknown model {name!r}; expected gpt, cnn, mlp, hf-gpt2 or hf-llama")
