"""Tiny random-init Hugging Face models (config objects only, no downloads), called the way
their own docs call them, against the float64 oracle."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import RTOL_F64, check_engine, rel_err
from torch.overrides import TorchFunctionMode

import dpkernels

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


class KeepFloat64(TorchFunctionMode):
    """Keeps float64 tensors in float64 where a model computes in float32 on purpose: HF's
    RMSNorms (``x.to(torch.float32)``), rotary embeddings (``.float()``) and eager attention
    (``softmax(..., dtype=torch.float32)``) would otherwise bound the agreement of any two
    float64 computations at float32 rounding.  With the casts off the model is float64 end
    to end and the oracle's 1e-10 applies; the captured ops (``w * x.to(input_dtype)``) are
    unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            if func is torch.Tensor.float or (func is torch.Tensor.to
                                              and torch.float32 in args[1:]):
                return x
            if kwargs.get("dtype") == torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def exact(model, loss_fn, x, y, float64=False, **kw):
    """The oracle check with every dpkernels warning (e.g. the generic fallback's) an error;
    ``float64``: under ``KeepFloat64``."""
    with warnings.catch_warnings(), (KeepFloat64() if float64 else contextlib.nullcontext()):
        warnings.filterwarnings("error", message="dpkernels")
        return check_engine(model, loss_fn, x, y, **kw)


def gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager", **kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def test_gpt2_default_call_on_the_fast_path():
    """``model(input_ids)``: GPT-2 looks its position embeddings up with ids of shape [1, T]
    and adds them to the [B, T, d] token embeddings (the lookup is expanded to the batch, so
    wpe's backprop is per sample, not summed over it); its Conv1D layers are
    ``addmm(b, x.view(-1, d), W)``, captured by the addmm op rule; the head is tied."""
    m = gpt2()
    assert m.lm_head.weight is m.transformer.wte.weight
    x, y = tokens()
    exact(m, lm_loss, x, y)


def llama_like(kind, tied):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16,
                  tie_word_embeddings=tied, attn_implementation="eager")
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=4, **common)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
        m = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common)
        m = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # RMSNorm weights away from their init of ones
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m.double()


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("mistral", False),
                                       ("qwen2", True)])
def test_llama_family_rmsnorm_on_the_fast_path(kind, tied):
    """HF's *RMSNorm classes compute ``w * x.to(dtype)``: the mul op rule, exact."""
    m = llama_like(kind, tied)
    if tied:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    x, y = tokens()
    exact(m, lm_loss, x, y, float64=True)


def bert():
    """A tiny BertForSequenceClassification (3 labels), float64, key biases frozen."""
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).double()
    for layer in m.bert.encoder.layer:
        # q.(k + b) - q.(k' + b) does not depend on the key bias b, so its gradient is zero
        # up to rounding and no relative error of it means anything: frozen
        layer.attention.self.key.bias.requires_grad_(False)
    return m


def cls_loss(out, y):
    return F.cross_entropy(out.logits, y)


def test_bert_default_call_on_the_fast_path():
    """BertForSequenceClassification called as ``model(input_ids)``: [1, T] position ids,
    token type ids expanded from a buffer, LayerNorm, pooler."""
    m = bert()
    x, _ = tokens(B=4)
    y = torch.tensor([0, 1, 2, 1])
    exact(m, cls_loss, x, y, float64=True)


class GemmaNormLM(torch.nn.Module):
    """Embedding, HF's GemmaRMSNorm (``x * (1 + w.float())``), head."""

    def __init__(self):
        super().__init__()
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        self.emb = torch.nn.Embedding(V, 16)
        self.norm = GemmaRMSNorm(16)
        self.head = torch.nn.Linear(16, V)
        with torch.no_grad():
            self.norm.weight.normal_(0.0, 0.3)

    def forward(self, x):
        return transformers.modeling_outputs.CausalLMOutput(
            logits=self.head(self.norm(self.emb(x))))


def test_gemma_one_plus_w_rmsnorm():
    torch.manual_seed(0)
    m = GemmaNormLM().double()
    x, y = tokens()
    exact(m, lm_loss, x, y, float64=True)


def gpt2_lora():
    """GPT-2 with PEFT LoRA adapters (only they are trainable), lora_B away from zero."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                          lora_dropout=0.0, fan_in_fan_out=True)
    m = peft.get_peft_model(gpt2(), cfg)
    with torch.no_grad():  # lora_B starts at zero, which would zero lora_A's gradients
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return m


def test_gpt2_peft_lora_adapters_only():
    """PEFT LoRA on GPT-2's Conv1D (fan_in_fan_out): only the adapters are trainable, so only
    they get a (clipped) gradient; everything else stays None."""
    m = gpt2_lora()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, y = tokens()
    exact(m, lm_loss, x, y)


def checkpointing(model, reentrant):
    """Activation checkpointing on every layer, by the name this transformers version gives it
    (``gradient_checkpointing_enable`` before 5.x, ``activation_checkpointing_enable`` since,
    the old name deprecated)."""
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    assert is_checkpointing(model)


def is_checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def dp_step(model, x, y, loss_fn=lm_loss):
    """(per-sample norms, {name: grad}) of one noiseless DP step."""
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=1.0,
                                expected_batch_size=len(x), backend="reference")
    loss_fn(model(x), y).backward()
    dp.step()
    dpkernels.detach(model)
    return dp.per_sample_norms, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    """HF's activation (gradient) checkpointing: each layer's forward re-runs inside the backward;
    every use is recorded once.  GPT-2: exact against the oracle on the same model without
    checkpointing.  Llama (whose norms compute in float32 on purpose, see KeepFloat64, which
    does not reach the re-run inside the backward): the same as without checkpointing."""
    m = gpt2()
    ref = copy.deepcopy(m)
    checkpointing(m, reentrant)
    assert not is_checkpointing(ref)
    x, y = tokens(seed=2)
    exact(m, lm_loss, x, y, reference=ref)

    m = llama_like("llama", tied=True)
    plain = dp_step(copy.deepcopy(m), x, y)
    checkpointing(m, reentrant)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        ckpt = dp_step(m, x, y)
    assert rel_err(ckpt[0], plain[0]) < RTOL_F64
    for n, g in plain[1].items():
        assert rel_err(ckpt[1][n], g) < RTOL_F64, n


CHECKPOINTED = {
    "mistral-gqa": lambda: (llama_like("mistral", tied=False), lm_loss, tokens(seed=3)),
    "qwen2-gqa-tied": lambda: (llama_like("qwen2", tied=True), lm_loss, tokens(seed=3)),
    "bert": lambda: (bert(), cls_loss, (tokens(B=4, seed=3)[0], torch.tensor([2, 0, 1, 1]))),
    "gpt2-lora": lambda: (gpt2_lora(), lm_loss, tokens(seed=3)),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_gradient_checkpointing_other_models(name, reentrant):
    """The rest of the models above with HF's activation checkpointing on every layer: the same
    per-sample norms and clipped gradients as without it (whose exactness the tests above show
    against the float64 oracle), and no generic fallback."""
    m, loss_fn, (x, y) = CHECKPOINTED[name]()
    plain = dp_step(copy.deepcopy(m), x, y, loss_fn)
    checkpointing(m, reentrant)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        ckpt = dp_step(m, x, y, loss_fn)
    assert rel_err(ckpt[0], plain[0]) < RTOL_F64
    assert any(g is not None for g in plain[1].values())
    for n, g in plain[1].items():
        if g is None:
            assert ckpt[1][n] is None, n
        else:
            assert rel_err(ckpt[1][n], g) < RTOL_F64, n


def test_gpt2_float32_triton():
    """The op rules' Uses through the Triton kernels (the interpreter on CPU), float32 model:
    both sides compute in float32, so the rule of test_triton_engine.py applies (rtol 1e-4:
    ten times the ~1e-5 rounding of float32 sums of <= ~100 terms)."""
    m = gpt2().float()
    x, y = tokens()
    exact(m, lm_loss, x, y, backend="triton", rtol=1e-4)


def test_gpt2_bf16_autocast_stays_on_the_fast_path():
    """Under CPU bf16 autocast the op capture's batching check compares the module's bf16
    output with torch.func.vmap's per-sample re-run, which autocast does not reach (float32):
    GPT-2's Conv1D addmm fell back to the generic torch.func path (slow, per-sample
    gradients in bf16).  Now compared in float32 at bf16's tolerance: no fallback, and the
    per-sample norms are the float32 step's within bf16's budget (eps 2^-8: 5e-2 ~ 10 eps)."""
    x, y = tokens()
    norms = {}
    for autocast in (False, True):
        m = gpt2().float()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        dp = dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=1.0,
                                    loss_reduction="sum", seed=0)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="dpkernels")
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = lm_loss(m(x), y) * x.shape[0]
                loss.backward()
            norms[autocast] = dp.per_sample_norms.clone()
            dp.step()
        finally:
            dpkernels.detach(m)
    rel = (norms[True] - norms[False]).norm() / norms[False].norm()
    assert float(rel) < 5e-2, rel
