import pytest
import torch
from noise_stats import check_noise, empty_batch_noise
from oracle import RTOL_F64, ce, check_engine, mse, rel_err
from torch import nn
from torch.func import grad, vmap

import dpkernels
from dpkernels.layers.embedding import EmbeddingUse
from dpkernels.reference import embedding as ref
from dpkernels.reference._common import gaussian


def make_ids(shape, V, pad, transposed=False):
    ids = torch.randint(0, V, shape[::-1] if transposed else shape)
    if transposed:
        ids = ids.transpose(0, -1)
        assert not ids.is_contiguous()
    if pad is not None:
        ids[torch.rand(shape) < 0.25] = pad
        ids[(0,) * ids.dim()] = pad
    return ids


# ---------------------------------------------------------------- engine against the oracle
IDS_CASES = [
    pytest.param((6, 7), False, id="BT"),
    pytest.param((6,), False, id="B"),
    pytest.param((6, 2, 3), False, id="B23"),
    pytest.param((6, 7), True, id="BT-transposed"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("shape,transposed", IDS_CASES)
def test_embedding_then_linear(reduction, pad, shape, transposed):
    V = 5  # few ids: every sample repeats some
    m = nn.Sequential(nn.Embedding(V, 6, padding_idx=pad), nn.Tanh(), nn.Linear(6, 3)).double()
    x = make_ids(shape, V, pad, transposed)
    y = torch.randint(0, 3, shape)
    check_engine(m, ce(reduction), x, y, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("pad", [None, 0])
def test_embedding_alone(reduction, pad):
    m = nn.Embedding(4, 5, padding_idx=pad).double()
    x = make_ids((7, 6), 4, pad)
    y = torch.randn(7, 6, 5, dtype=torch.float64)
    check_engine(m, mse(reduction), x, y, reduction=reduction)


class TwoUses(nn.Module):
    """One table read twice: the same module on two id streams, or two modules sharing it."""

    def __init__(self, shared_module, pad1, pad2):
        super().__init__()
        self.e1 = nn.Embedding(6, 4, padding_idx=pad1)
        if shared_module:
            self.e2 = self.e1
        else:
            self.e2 = nn.Embedding(6, 4, padding_idx=pad2)
            self.e2.weight = self.e1.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # x [B, 2, T]: x[:, 0] and x[:, 1] are non-contiguous views
        return self.out(torch.tanh(self.e1(x[:, 0]) * self.e2(x[:, 1])))


@pytest.mark.parametrize("shared_module,pad1,pad2", [
    pytest.param(True, 1, 1, id="same-module"),
    pytest.param(False, 1, 1, id="two-modules"),
    pytest.param(False, 1, 3, id="two-modules-two-pads"),
    pytest.param(False, None, 3, id="two-modules-one-pad"),
])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_uses_of_one_table(shared_module, pad1, pad2, reduction):
    m = TwoUses(shared_module, pad1, pad2).double()
    x = torch.randint(0, 6, (6, 2, 5))
    x[0, 0, 0], x[1, 1, 2] = 1, 3
    y = torch.randint(0, 3, (6, 5))
    check_engine(m, ce(reduction), x, y, reduction=reduction)


class TiedLM(nn.Module):
    def __init__(self, V=7, d=5, pad=0, head_bias=False):
        super().__init__()
        self.tok = nn.Embedding(V, d, padding_idx=pad)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=head_bias)
        self.head.weight = self.tok.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.tok(x))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_tied_head(reduction, head_bias, T):
    m = TiedLM(head_bias=head_bias).double()
    x = make_ids((5, T), 7, 0)
    y = torch.randint(0, 7, (5, T))
    check_engine(m, ce(reduction), x, y, reduction=reduction)


def test_frozen_embedding_untouched():
    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).double()
    m[0].weight.requires_grad_(False)
    x = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 3, (6, 3))
    check_engine(m, ce("mean"), x, y)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,words", [
    ({"max_norm": 1.0}, "max_norm=None"),
    ({"sparse": True}, "sparse=False"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq=False"),
])
def test_refused_configurations(kwargs, words):
    m = nn.Sequential(nn.Embedding(5, 4, **kwargs), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=words) as e:
        dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=4)
    assert "0 (Embedding)" in str(e.value)
    assert getattr(m, "_dpkernels_engine", None) is None


def test_bad_ids():
    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                                max_grad_norm=1.0, expected_batch_size=4)
    try:
        with pytest.raises(ValueError, match="batch dimension"):
            m(torch.tensor(3))
        with pytest.raises(TypeError, match="integer tensor"):
            m(torch.zeros(3, 2))
    finally:
        dp.zero_grad()
        dpkernels.detach(m)


# ---------------------------------------------------------------- the reference ops
def brute_table(ids, g, V, pad):
    """[B, V, p] per-sample gradients of a table, from torch.func on the module itself."""
    emb = nn.Embedding(V, g.shape[-1], padding_idx=pad).to(g.dtype)
    if ids.shape[0] == 0:  # vmap cannot run the backward on an empty batch
        return torch.zeros(0, V, g.shape[-1], dtype=g.dtype)

    def f(w, idb, gb):
        return (torch.func.functional_call(emb, {"weight": w}, (idb,)) * gb).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(emb.weight.detach(), ids, g)


def brute_linear(a, g):
    lin = nn.Linear(a.shape[-1], g.shape[-1], bias=False).to(a.dtype)
    if a.shape[0] == 0:
        return torch.zeros(0, g.shape[-1], a.shape[-1], dtype=a.dtype)

    def f(w, ab, gb):
        return (torch.func.functional_call(lin, {"weight": w}, (ab,)) * gb).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(lin.weight.detach(), a, g)


def close(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if b.numel():
        assert rel_err(a, b) <= RTOL_F64, (a, b)


SHAPES = [
    pytest.param(0, 4, 5, 3, 1, id="B0"),
    pytest.param(3, 1, 5, 3, 1, id="T1"),
    pytest.param(4, 9, 6, 7, None, id="B4-T9-nopad"),
    pytest.param(4, 9, 3, 7, 2, id="B4-T9-V3-pad"),
    pytest.param(2, 33, 40, 5, 0, id="B2-T33-V40"),
]


def rand_case(B, T, V, p, pad, dtype=torch.float64):
    ids = torch.randint(0, V, (B, T))
    if pad is not None and B:
        ids[0, 0] = pad
    return ids, torch.randn(B, T, p, dtype=dtype)


@pytest.mark.parametrize("B,T,V,p,pad", SHAPES)
def test_embedding_norm_kernel(B, T, V, p, pad):
    ids, g = rand_case(B, T, V, p, pad)
    close(ref.embedding_norm(ids, g, pad), brute_table(ids, g, V, pad).flatten(1).pow(2).sum(1))


@pytest.mark.parametrize("B,T,V,p,pad", SHAPES)
def test_embedding_cross_kernel(B, T, V, p, pad):
    ids1, g1 = rand_case(B, T, V, p, pad)
    ids2, g2 = rand_case(B, T + 2, V, p, pad)
    want = (brute_table(ids1, g1, V, pad) * brute_table(ids2, g2, V, pad)).flatten(1).sum(1)
    close(ref.embedding_cross(ids1, g1, ids2, g2, pad), want)


@pytest.mark.parametrize("B,T,V,p,pad", SHAPES)
def test_embedding_linear_cross_kernel(B, T, V, p, pad):
    ids, h = rand_case(B, T, V, p, pad)
    a = torch.randn(B, T + 1, p, dtype=torch.float64)
    g = torch.randn(B, T + 1, V, dtype=torch.float64)
    want = (brute_table(ids, h, V, pad) * brute_linear(a, g)).flatten(1).sum(1)
    close(ref.embedding_linear_cross(ids, h, pad, a, g), want)


@pytest.mark.parametrize("B,T,V,p,pad", SHAPES)
def test_embedding_clipped_sum_kernel(B, T, V, p, pad):
    ids, g = rand_case(B, T, V, p, pad)
    c = torch.rand(B, dtype=torch.float64)
    psg = brute_table(ids, g, V, pad)
    acc = torch.randn(V, p, dtype=torch.float64)
    close(ref.embedding_clipped_sum(ids, g, c, V, pad), torch.tensordot(c, psg, dims=1))
    want = (acc + torch.tensordot(c, psg, dims=1)
            + gaussian((V, p), 0.5, 11, "cpu", torch.float64)) * 0.25
    close(ref.embedding_clipped_sum(ids, g, c, V, pad, acc.clone(), 0.5, 11, 0.25), want)


@pytest.mark.parametrize("B,T,V,p,pad", SHAPES)
def test_embedding_use_dense(B, T, V, p, pad):
    ids, g = rand_case(B, T, V, p, pad)
    close(EmbeddingUse(ids, g, pad, V).raw_dense(None), brute_table(ids, g, V, pad))


def test_low_precision_accumulates_in_float32():
    ids, g = rand_case(3, 8, 4, 6, 1)
    g16 = g.to(torch.bfloat16)
    want = brute_table(ids, g16.double(), 4, 1).flatten(1).pow(2).sum(1)
    got = ref.embedding_norm(ids, g16, 1)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), want) < 1e-6
    c = torch.rand(3)
    s = ref.embedding_clipped_sum(ids.to(torch.int32), g16, c, 4, 1)
    assert s.dtype == torch.float32
    # the bf16 values are exact in float32; c_b * g and the sums over T = 8 rows round in
    # float32 (eps 6e-8 each): 1e-6 relative is ~16 eps
    want = torch.tensordot(c.double(), brute_table(ids, g16.double(), 4, 1), dims=1)
    assert rel_err(s.double(), want) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_step(backend):
    """An empty Poisson batch still steps: every gradient (the tied table too, once) is noise
    of std sigma C / B_exp, independent across parameters."""
    if backend == "triton":
        pytest.importorskip("triton")
    m = TiedLM(V=32, d=32, head_bias=True)  # float32: the Triton kernels
    noise, std = empty_batch_noise(m, torch.zeros(0, 5, dtype=torch.long), backend, steps=8)
    check_noise(noise, std)
