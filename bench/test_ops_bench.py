"""pytest-benchmark micro-benchmarks of every dpkernels op (the names of ``dispatch.op_names()``).

    pytest bench/ --benchmark-only --benchmark-json=bench/results/<date>-<cpu|gpu>-ops.json

Not part of the test suite (``testpaths = ["tests"]``); tests/test_bench.py runs one tiny
case and checks that every registered op has a case here.

- **provider** ``reference``: the pure-torch op, on every machine (CPU tensors without a GPU,
  CUDA tensors with one).  ``triton``: the Triton kernel, only with a CUDA GPU (skipped, and
  reported as skipped, without one: the CPU interpreter's times mean nothing); an op with no
  Triton kernel is skipped for ``triton`` with that reason.
- **shapes**: without a GPU, small ones (``CPU``) so that the whole run takes about a minute;
  with a GPU, the layers of the ANCHORS.md bench models (``GPU``: gpt B16 T256, cnn B256,
  mlp B1024).  fp32 everywhere, bf16 too on a GPU.
- **timing**: each call is followed by ``torch.cuda.synchronize()`` on a GPU, so a round is
  launch + kernel + sync (host overhead included, as the engine sees it).  One untimed call
  first compiles and autotunes the Triton kernels.  Clipped sums run without an accumulator
  (a fresh output each call); in-place ops (noise) update the same tensor every round.
- **output**: pytest-benchmark's table, and ``--benchmark-json`` for machine-readable numbers;
  every benchmark's ``extra_info`` holds op, provider, case, dtype, device, and the machine
  info holds torch, triton and the git commit (bench/conftest.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dpkernels import dispatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.bench


def _r(*shape, dt):
    return torch.randn(*shape, device=DEVICE).to(dt)


def _c(B):
    return torch.rand(B, device=DEVICE)


def _ids(B, T, V):
    return torch.randint(0, V, (B, T), device=DEVICE)


# op -> {case id: builder(dtype) -> (args, kwargs)}.  CPU: small shapes; GPU: bench models.
def _linear(B, T, d, p):
    return lambda dt: ((_r(B, T, d, dt=dt), _r(B, T, p, dt=dt)), {})


def _conv(B, Cin, Cout, H):
    def build(dt):
        x = _r(B, Cin, H, H, dt=dt)
        g = _r(B, Cout, H, H, dt=dt)
        return (x, g, (Cout, Cin, 3, 3), (1, 1), (1, 1), (1, 1), 1), {}
    return build


def _conv_sum(B, Cin, Cout, H):
    def build(dt):
        (x, g, *geo), _ = _conv(B, Cin, Cout, H)(dt)
        return (x, g, _c(B), *geo), {"noise_std": 0.5, "seed": 3}
    return build


def _linear_sum(B, T, d, p):
    def build(dt):
        (a, g), _ = _linear(B, T, d, p)(dt)
        return (a, g, _c(B)), {"noise_std": 0.5, "seed": 3}
    return build


def _linear_many(B, T, shapes):
    def build(dt):
        items = [(_r(B, T, d, dt=dt), _r(B, T, p, dt=dt)) for d, p in shapes]
        return (items, _c(B), [None] * len(items)), {}
    return build


def _rows_many(B, T, widths):
    def build(dt):
        items = [(_r(B, T, n, dt=dt), (n,)) for n in widths]
        return (items, _c(B), [None] * len(items)), {}
    return build


def _emb(B, T, p, V):
    return lambda dt: ((_ids(B, T, V), _r(B, T, p, dt=dt)), {"padding_idx": 0})


def _emb_cross(B, T, p, V):
    def build(dt):
        return (_ids(B, T, V), _r(B, T, p, dt=dt), _ids(B, T, V), _r(B, T, p, dt=dt)), {}
    return build


def _emb_linear(B, T, d, V):
    def build(dt):
        return (_ids(B, T, V), _r(B, T, d, dt=dt), 0, _r(B, T, d, dt=dt), _r(B, T, V, dt=dt)), {}
    return build


def _emb_sum(B, T, p, V):
    def build(dt):
        return ((_ids(B, T, V), _r(B, T, p, dt=dt), _c(B), V),
                {"padding_idx": 0, "noise_std": 0.5, "seed": 3})
    return build


def _noise(*sizes):
    def build(dt):
        accs = [torch.zeros(n, device=DEVICE) for n in sizes]
        if len(sizes) == 1:
            return (accs[0],), {"noise_std": 0.5, "seed": 3, "scale": 0.1}
        return (accs,), {"noise_std": 0.5, "seeds": list(range(len(sizes))), "scale": 0.1}
    return build


def _layer_norm(B, T, d, rms=False):
    def build(dt):
        x, g = _r(B, T, d, dt=dt), _r(B, T, d, dt=dt)
        return ((x, g, (d,)), {}) if rms else ((x, g, (d,), 1e-5), {})
    return build


def _group_norm(B, C, H, G):
    return lambda dt: ((_r(B, C, H, H, dt=dt), _r(B, C, H, H, dt=dt), G, 1e-5), {})


def _magnitudes(B, T, shapes):
    """``magnitude_many`` items: a Linear use per (d, p), a bias use (a None) per p alone."""
    def build(dt):
        items = [(None if d is None else _r(B, T, d, dt=dt), _r(B, T, p, dt=dt))
                 for d, p in shapes]
        return (items,), {}
    return build


def _clip(B):
    return lambda dt: ((torch.rand(B, device=DEVICE) * 4, torch.rand(B, device=DEVICE) * 1e-3,
                        1.0, 2.0 ** -16, 1.0), {})


def _norms_many(B, T, shapes, V=None, p_emb=None):
    """``linear_norms_many`` items: a Linear use with its bias per (d, p), a bias alone (a norm
    layer's partial sums) per (None, p), and a token embedding (V, p_emb) when given."""
    def build(dt):
        items = [(None if d is None else _r(B, T, d, dt=dt), _r(B, T, p, dt=dt),
                  "auto", True) for d, p in shapes]
        if V is not None:
            items.append((_ids(B, T, V), _r(B, T, p_emb, dt=dt), "embedding", 0))
        return (items,), {}
    return build


def _direct_many(B, T, shapes):
    """``linear_direct_many`` items: a Linear use with its bias and its W_b buffer per (d, p)
    (long sequences: the direct form, W_b materialised)."""
    def build(dt):
        items = [(_r(B, T, d, dt=dt), _r(B, T, p, dt=dt), True,
                  torch.empty(B, p, d, device=DEVICE)) for d, p in shapes]
        return (items,), {}
    return build


def _clip_parts(B, U, R):
    """``clip_from_parts`` as the engine calls it for U uses (own bounds on R magnitude rows,
    each use's two underflow terms and one cross pair)."""
    def build(dt):
        parts = torch.rand(U, B, device=DEVICE)
        M = torch.rand(R, B, device=DEVICE)
        own_consts = [(u % R, 1e-4, 2e-5) for u in range(U)]
        cross = [(u % R, u % R, 2.0**-120) for u in range(2 * U)] + [(0, 1, 1e-4)]
        return (parts, [torch.rand(B, device=DEVICE) * 1e-4], M, parts, own_consts, cross,
                1.0, 2.0**-16, 1.0), {}
    return build


def _norm_parts(B, T, d, rms=False):
    def build(dt):
        x, g = _r(B, T, d, dt=dt), _r(B, T, d, dt=dt)
        return ((x, g, (d,)), {}) if rms else ((x, g, (d,), 1e-5, True, True), {})
    return build


CPU = {
    "linear_norm": {"ghost-B4-T64-d128-p128": _linear(4, 64, 128, 128),
                    "T1-B64-d256-p256": _linear(64, 1, 256, 256)},
    "linear_norms": {"B4-T64-d128-p384": _linear(4, 64, 128, 384)},
    "linear_bias_norm": {"B4-T64-p384": lambda dt: ((_r(4, 64, 384, dt=dt),), {})},
    "linear_cross": {"B4-T64-d128-p128": lambda dt: (_linear(4, 64, 128, 128)(dt)[0]
                                                     + _linear(4, 64, 128, 128)(dt)[0], {})},
    "linear_clipped_sum": {"B4-T64-d128-p384": _linear_sum(4, 64, 128, 384)},
    "linear_clipped_sum_many": {"B4-T64-4layers": _linear_many(4, 64, [(128, 384), (128, 128),
                                                                       (128, 512), (512, 128)])},
    "linear_bias_clipped_sum": {"B4-T64-p384": lambda dt: ((_r(4, 64, 384, dt=dt), _c(4)),
                                                           {"noise_std": 0.5, "seed": 3})},
    "dense_norm": {"B64-N10k": lambda dt: ((_r(64, 10250, dt=dt),), {})},
    "dense_norm_many": {"B64-8x256": lambda dt: (([_r(64, 256, dt=dt) for _ in range(8)],), {})},
    "dense_cross": {"B64-N10k": lambda dt: ((_r(64, 10250, dt=dt), _r(64, 10250, dt=dt)), {})},
    "dense_clipped_sum": {"B64-10x1024": lambda dt: ((_r(64, 10, 1024, dt=dt), _c(64)),
                                                     {"noise_std": 0.5, "seed": 3})},
    "rows_clipped_sum_many": {"B4-T64-4biases": _rows_many(4, 64, [384, 128, 512, 128])},
    "add_noise": {"N256k": _noise(1 << 18)},
    "add_noise_many": {"4-tensors": _noise(128 * 384, 128 * 128, 128 * 512, 512 * 128)},
    "embedding_norm": {"B4-T64-p128-V1024": _emb(4, 64, 128, 1024)},
    "embedding_cross": {"B4-T64-p128-V1024": _emb_cross(4, 64, 128, 1024)},
    "embedding_linear_cross": {"B4-T64-d128-V1024": _emb_linear(4, 64, 128, 1024)},
    "embedding_clipped_sum": {"B4-T64-p128-V1024": _emb_sum(4, 64, 128, 1024)},
    "layer_norm_psg": {"B4-T64-d128": _layer_norm(4, 64, 128)},
    "rms_norm_psg": {"B4-T64-d128": _layer_norm(4, 64, 128, rms=True)},
    "group_norm_psg": {"B8-C32-H16-G8": _group_norm(8, 32, 16, 8)},
    "conv_unfold": {"B8-C16-H16": lambda dt: ((_r(8, 16, 16, 16, dt=dt), (32, 16, 3, 3), (1, 1),
                                               (1, 1), (1, 1), 1), {})},
    "conv_norm": {"B8-C16-32-H16": _conv(8, 16, 32, 16)},
    "conv_clipped_sum": {"B8-C16-32-H16": _conv_sum(8, 16, 32, 16)},
    "magnitude_many": {"B4-T64-3uses": _magnitudes(4, 64, [(128, 384), (None, 384),
                                                           (512, 128)])},
    "clip_factors": {"B64": _clip(64)},
    "linear_norms_many": {"B4-T64-3uses-emb": _norms_many(4, 64, [(128, 384), (None, 384),
                                                                  (512, 128)], 1024, 128)},
    "clip_from_parts": {"B64-8uses": _clip_parts(64, 8, 12)},
    "linear_direct_many": {"B2-T256-2uses": _direct_many(2, 256, [(64, 96), (96, 64)])},
    "layer_norm_psg_parts": {"B4-T64-d128": _norm_parts(4, 64, 128)},
    "rms_norm_psg_parts": {"B4-T64-d128": _norm_parts(4, 64, 128, rms=True)},
}

# gpt: B16 T256 d768 (qkv 768->2304, proj 768->768, fc1 768->3072, fc2 3072->768, head
# 768->16384, V 16384); cnn: B256 32x32, widths 64-64-128-128-256, GroupNorm(32); mlp: B1024,
# 784-1024-1024-10 (shared/ANCHORS.md, bench/models.py).
GPT_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GPU = {
    "linear_norm": {"gpt-fc1": _linear(16, 256, 768, 3072),
                    "gpt-head": _linear(16, 256, 768, 16384),
                    "mlp-fc2": _linear(1024, 1, 1024, 1024)},
    "linear_norms": {"gpt-qkv": _linear(16, 256, 768, 2304)},
    "linear_bias_norm": {"gpt-fc1": lambda dt: ((_r(16, 256, 3072, dt=dt),), {})},
    "linear_cross": {"gpt-proj": lambda dt: (_linear(16, 256, 768, 768)(dt)[0]
                                             + _linear(16, 256, 768, 768)(dt)[0], {})},
    "linear_clipped_sum": {"gpt-fc1": _linear_sum(16, 256, 768, 3072),
                           "gpt-head": _linear_sum(16, 256, 768, 16384),
                           "mlp-fc2": _linear_sum(1024, 1, 1024, 1024)},
    "linear_clipped_sum_many": {"gpt-block": _linear_many(16, 256, GPT_LINEARS)},
    "linear_bias_clipped_sum": {"gpt-fc1": lambda dt: ((_r(16, 256, 3072, dt=dt), _c(16)),
                                                       {"noise_std": 0.5, "seed": 3})},
    "dense_norm": {"mlp-fc3-psg": lambda dt: ((_r(1024, 10250, dt=dt),), {})},
    "dense_norm_many": {"gpt-ln-terms": lambda dt: (([_r(16, 768, dt=dt) for _ in range(26)],),
                                                    {})},
    "dense_cross": {"mlp-fc3-psg": lambda dt: ((_r(1024, 10250, dt=dt),
                                                _r(1024, 10250, dt=dt)), {})},
    "dense_clipped_sum": {"mlp-fc3-psg": lambda dt: ((_r(1024, 10, 1025, dt=dt), _c(1024)),
                                                     {"noise_std": 0.5, "seed": 3})},
    "rows_clipped_sum_many": {"gpt-block-biases": _rows_many(16, 256, [2304, 768, 3072, 768,
                                                                       768, 768, 768, 768])},
    "add_noise": {"gpt-head": _noise(16384 * 768)},
    "add_noise_many": {"gpt-block": _noise(*[d * p for d, p in GPT_LINEARS])},
    "embedding_norm": {"gpt-tok": _emb(16, 256, 768, 16384)},
    "embedding_cross": {"gpt-tok": _emb_cross(16, 256, 768, 16384)},
    "embedding_linear_cross": {"gpt-tied-head": _emb_linear(16, 256, 768, 16384)},
    "embedding_clipped_sum": {"gpt-tok": _emb_sum(16, 256, 768, 16384)},
    "layer_norm_psg": {"gpt-ln": _layer_norm(16, 256, 768)},
    "rms_norm_psg": {"gpt-ln": _layer_norm(16, 256, 768, rms=True)},
    "group_norm_psg": {"cnn-gn1": _group_norm(256, 64, 32, 32),
                       "cnn-gn5": _group_norm(256, 256, 8, 32)},
    "conv_unfold": {"cnn-conv3": lambda dt: ((_r(256, 64, 16, 16, dt=dt), (128, 64, 3, 3),
                                              (1, 1), (1, 1), (1, 1), 1), {})},
    "conv_norm": {"cnn-conv2": _conv(256, 64, 64, 32), "cnn-conv5": _conv(256, 128, 256, 8)},
    "conv_clipped_sum": {"cnn-conv2": _conv_sum(256, 64, 64, 32),
                         "cnn-conv5": _conv_sum(256, 128, 256, 8)},
    "magnitude_many": {"gpt-block": _magnitudes(16, 256, GPT_LINEARS
                                                + [(None, p) for _, p in GPT_LINEARS])},
    "clip_factors": {"gpt-B16": _clip(16), "mlp-B1024": _clip(1024)},
    "linear_norms_many": {"gpt-block-tok": _norms_many(16, 256, GPT_LINEARS
                                                       + [(None, 768)] * 4, 16384, 768),
                          "mlp": _norms_many(1024, 1, [(784, 1024), (1024, 1024), (1024, 10)])},
    "linear_direct_many": {"gpt-T2048-block": _direct_many(2, 2048, GPT_LINEARS)},
    # gpt-tiny's 2 blocks' uses ~ 26 contributions, 40 magnitude rows
    "clip_from_parts": {"gpt-B16": _clip_parts(16, 26, 40), "mlp-B1024": _clip_parts(1024, 6, 9)},
    "layer_norm_psg_parts": {"gpt-ln": _norm_parts(16, 256, 768)},
    "rms_norm_psg_parts": {"gpt-ln": _norm_parts(16, 256, 768, rms=True)},
}

CASES = GPU if CUDA else CPU
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16} if CUDA else {"fp32": torch.float32}
# Ops whose inputs are not floating-point activations: one dtype is enough.
FLOAT32_ONLY = {"add_noise", "add_noise_many", "clip_factors", "clip_from_parts"}


def _params():
    for op in sorted(CASES):
        for case in CASES[op]:
            for dname in DTYPES:
                if dname != "fp32" and op in FLOAT32_ONLY:
                    continue
                for provider in ("reference", "triton"):
                    yield pytest.param(op, case, dname, provider,
                                       id=f"{op}-{case}-{dname}-{provider}")


@functools.cache
def _impl(op: str, provider: str):
    """The implementation the engine would call for ``op`` on ``provider`` (None: the
    provider has no kernel for it)."""
    fn, got = dispatch.resolve(op, provider, DEVICE)
    return fn if got == provider else None


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("op,case,dname,provider", list(_params()))
def test_op(benchmark, op, case, dname, provider):
    if provider == "triton" and not CUDA:
        pytest.skip("Triton kernels are timed on a CUDA GPU only")
    fn = _impl(op, provider)
    if fn is None:
        pytest.skip(f"no {provider} kernel for {op} (the engine runs the reference)")
    torch.manual_seed(0)
    args, kwargs = CASES[op][case](DTYPES[dname])
    benchmark.extra_info.update(op=op, case=case, dtype=dname, provider=provider,
                                device=torch.cuda.get_device_name() if CUDA else "cpu")

    def run():
        out = fn(*args, **kwargs)
        _sync()
        return out

    with torch.no_grad():
        out = run()  # compile and autotune outside the timed rounds
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                assert torch.isfinite(t).all(), f"{op}: non-finite output"
        benchmark(run)

