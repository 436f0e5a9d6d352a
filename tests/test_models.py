import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import check_engine, per_sample_grads, rel_err
from torch import nn

# the float64 oracle runs attention under vmap, which has no batching rule for it on CPU
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

V, D, HEADS, PAD = 50, 16, 2, 0


class Block(nn.Module):
    """Pre-LN transformer block: LayerNorm before attention, RMSNorm before the MLP."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.RMSNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.fc2 = nn.Linear(4 * D, D)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, schedule=(0, 1), tied=True, max_len=8):
        super().__init__()
        self.schedule = schedule  # which block runs at each depth: (0, 1, 0) reuses block 0
        self.tok = nn.Embedding(V, D, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lnf = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, x):
        B, T = x.shape
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device).expand(B, T))
        for i in self.schedule:
            h = self.blocks[i](h)
        return self.head(self.lnf(h))


def token_ce(reduction):
    def f(out, y):  # mean over the tokens of a sample, then the batch reduction
        per_token = F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="none")
        per_sample = per_token.reshape(y.shape).mean(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    return f


def batch(B=4, T=6):
    x = torch.randint(0, V, (B, T))
    x[:, -2:][torch.rand(B, 2) < 0.5] = PAD  # some padded positions
    x[0, -1] = PAD
    y = torch.randint(1, V, (B, T))
    return x, y


def perturbed(m):
    with torch.no_grad():  # norms away from their identity init, so their affine terms matter
        for name, p in m.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("schedule", [(0, 1), (0, 1, 0)], ids=["2-blocks", "block0-twice"])
def test_tied_transformer(schedule, reduction):
    m = perturbed(TinyLM(schedule).double())
    assert m.head.weight is m.tok.weight
    x, y = batch()
    check_engine(m, token_ce(reduction), x, y, reduction=reduction)


def test_tied_norms_are_not_sums_of_per_use_norms():
    m = perturbed(TinyLM().double())
    x, y = batch()
    loss = token_ce("sum")
    norms, _ = check_engine(copy.deepcopy(m), loss, x, y, reduction="sum")

    untied = copy.deepcopy(m)
    untied.head.weight = nn.Parameter(untied.tok.weight.detach().clone())
    psg = per_sample_grads(untied, loss, x, y)
    as_if_untied = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
    cross = 2 * (psg["tok.weight"] * psg["head.weight"]).flatten(1).sum(1)
    # the true norms carry the cross term 2<E_b, W_b> between the two uses of the table ...
    assert rel_err(as_if_untied.pow(2) + cross, norms.pow(2)) < 1e-10
    # ... which is far above rounding (the oracle's tolerance is 1e-10) in every sample:
    # summing per-use norms would mis-clip
    assert ((as_if_untied - norms).abs() > 1e-5 * norms).all()
