"""Secure noise (csrc/secure_noise.*, dpkernels/secure.py, secure_mode=True).

The C++ extension must be built for these tests (CI builds it: README's install); they are
skipped only where the build is switched off on purpose (DPKERNELS_SKIP_EXT=1).  Every
statistical check states its false-failure probability; the keys are fresh os.urandom keys,
so those probabilities are real.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import dpkernels
from dpkernels import secure

pytestmark = pytest.mark.skipif(os.environ.get("DPKERNELS_SKIP_EXT") == "1",
                                reason="C++ extension switched off (DPKERNELS_SKIP_EXT=1)")

RFC_KEY = bytes(range(32))
# z beyond 5.33 standard errors: two-sided probability 1e-7 per check
Z = 5.33


def normals(n, std=1.0, dtype=torch.float64, key=None, stream=0):
    out = torch.empty(n, dtype=dtype)
    return secure.secure_normal_(out, key or os.urandom(32), stream, std)


# ---------------------------------------------------------------- ChaCha20, RFC 8439
def test_block_function_rfc8439_2_3_2():
    got = secure.chacha20_keystream(RFC_KEY, bytes.fromhex("000000090000004a00000000"), 1, 1)
    assert got.hex() == (
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")


@pytest.mark.parametrize("counter,want", [
    (0, "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"),
    (1, "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
        "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"),
], ids=["A.1-1", "A.1-2"])
def test_block_function_rfc8439_appendix_a1(counter, want):
    assert secure.chacha20_keystream(bytes(32), bytes(12), counter, 1).hex() == want


def test_keystream_rfc8439_2_4_2():
    """The 'sunscreen' encryption: ciphertext = plaintext XOR the keystream from counter 1."""
    plain = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
    cipher = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d")
    ks = secure.chacha20_keystream(RFC_KEY, bytes.fromhex("000000000000004a00000000"), 1, 2)
    assert bytes(p ^ k for p, k in zip(plain, ks)) == cipher


# ---------------------------------------------------------------- the normal mapping
def test_normals_follow_the_documented_mapping():
    """The op equals the formula of docs/DESIGN.md evaluated with numpy's libm from the same
    keystream: element e uses block e//2, words 8*(e%2)..+8 as four 64-bit draws.  Both
    sides round ~20 times in float64 (2^-52 each) on values below 10: 1e-13 is ~50x that."""
    key, n = os.urandom(32), 1001
    got = normals(n, key=key, stream=5).numpy()
    nonce = (5).to_bytes(8, "little") + bytes(4)
    d = np.frombuffer(secure.chacha20_keystream(key, nonce, 0, (n + 1) // 2),
                      dtype="<u8").reshape(-1, 4)[:n]
    sh = np.uint64(11)
    u1 = ((d[:, 0] >> sh).astype(np.float64) + 1) * 2.0**-53
    t1 = (d[:, 1] >> sh).astype(np.float64) * 2.0**-53
    u2 = ((d[:, 2] >> sh).astype(np.float64) + 1) * 2.0**-53
    t2 = (d[:, 3] >> sh).astype(np.float64) * 2.0**-53
    want = (np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * t1)
            + np.sqrt(-2 * np.log(u2)) * np.cos(2 * np.pi * t2)) / np.sqrt(2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_float32_noise_is_the_float64_draw_rounded_once():
    key = os.urandom(32)
    z64 = normals(777, key=key, stream=3)
    for std in (1.0, 0.37):
        z32 = normals(777, std=std, dtype=torch.float32, key=key, stream=3)
        assert torch.equal(z32, (std * z64).float())


def test_normal_statistics():
    """2^20 draws: mean, variance, both tails and a Kolmogorov-Smirnov test.  Mean, variance
    and tail counts use 5.33-sigma bands (1e-7 each), KS p > 1e-7: all six together fail a
    correct generator with probability < 1e-6."""
    n = 1 << 20
    z = normals(n).numpy()
    assert abs(z.mean()) < Z / math.sqrt(n)
    assert abs(z.var() - 1) < Z * math.sqrt(2 / n)
    for t in (3.0, 4.0):
        p = 2 * stats.norm.sf(t)
        count = int((np.abs(z) > t).sum())
        assert abs(count - n * p) < Z * math.sqrt(n * p * (1 - p)), (t, count, n * p)
    assert stats.kstest(z, "norm").pvalue > 1e-7
    # neighbours (the two elements of one block) are uncorrelated: |r| < 5.33 / sqrt(n)
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < Z / math.sqrt(n // 2)


def test_streams_are_distinct_and_prefix_stable():
    key = os.urandom(32)
    a, b = normals(64, key=key, stream=0), normals(64, key=key, stream=1)
    assert not torch.isin(a, b).any()
    assert torch.equal(normals(10, key=key, stream=1), b[:10])  # same stream, same counters
    assert not torch.isin(a, normals(64, key=os.urandom(32), stream=0)).any()
    big = (1 << 40) + 3  # the high nonce word is used too
    assert not torch.isin(normals(64, key=key, stream=big), a).any()


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _key_words(key):
    return [int.from_bytes(key[i:i + 4], "little") for i in range(0, 32, 4)]


# Chunk boundaries that cut the stream everywhere the kernels could get it wrong: odd offsets
# (mid-block: two normals per ChaCha20 block), single elements, empty chunks, the CPU
# kernel's batch of 32 blocks (64 elements) and parallel_for grain (2048 blocks, 4096
# elements) and one past them, and an odd total.
N_CHUNKED = 10007
CUTS = [0, 1, 2, 3, 3, 6, 63, 64, 65, 127, 129, 1000, 4095, 4096, 4097, 4098, 8191, 9999,
        N_CHUNKED - 1, N_CHUNKED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["secure_normal_", "secure_normal_per_block_"])
def test_chunked_draw_equals_the_whole_draw_bit_for_bit(dtype, op):
    """Elements [a, b) drawn at offset a are elements a..b-1 of the whole draw, bit for bit,
    for the CPU kernel and for the CUDA kernel's per-block code run on the CPU."""
    key, std, stream = os.urandom(32), 0.73, 9
    whole = secure.secure_normal_(torch.empty(N_CHUNKED, dtype=dtype), key, stream, std)
    draw = getattr(torch.ops.dpkernels, op)
    rng = np.random.default_rng(0)
    random_cuts = [0, *sorted(rng.integers(0, N_CHUNKED, 25).tolist()), N_CHUNKED]
    for cuts in (CUTS, random_cuts, [0, N_CHUNKED]):
        out = torch.full((N_CHUNKED,), float("nan"), dtype=dtype)
        for a, b in zip(cuts[:-1], cuts[1:]):
            draw(out[a:b], _key_words(key), stream, std, a)
        assert torch.equal(_bits(out), _bits(whole)), (op, cuts)


def test_draw_at_the_end_of_the_stream():
    """The last elements of a stream (block counter 2^32 - 1): the offset reaches them, the
    two kernels agree, and a draw one element past the end is refused."""
    key, end = os.urandom(32), 1 << 33
    tail = secure.secure_normal_(torch.empty(5, dtype=torch.float64), key, 2, 1.0,
                                 offset=end - 5)
    per_block = torch.empty(5, dtype=torch.float64)
    torch.ops.dpkernels.secure_normal_per_block_(per_block, _key_words(key), 2, 1.0, end - 5)
    assert torch.equal(_bits(tail), _bits(per_block))
    last = secure.secure_normal_(torch.empty(2, dtype=torch.float64), key, 2, 1.0,
                                 offset=end - 2)
    assert torch.equal(_bits(last), _bits(tail[3:]))
    with pytest.raises(ValueError, match=r"offset \+ out.numel\(\) <= 2\^33"):
        secure.secure_normal_(torch.empty(2), key, 2, 1.0, offset=end - 1)


@pytest.mark.parametrize("shape,dtype,chunk", [
    ((1001,), torch.float32, 1), ((1001,), torch.float32, 37), ((1001,), torch.float32, 64),
    ((25, 41), torch.float64, 37), ((25, 41), torch.float64, 1 << 18),
    ((3 * (1 << 18) + 11,), torch.float32, 1 << 18)],
    ids=["odd-f32-1", "odd-f32-37", "odd-f32-64", "2d-f64-37", "2d-f64-whole",
         "default-chunks-f32"])
def test_step_noise_in_chunks_equals_one_whole_draw(monkeypatch, shape, dtype, chunk):
    """StepNoise adds its noise NOISE_CHUNK_ELEMS elements at a time (each chunk at its
    offset in the parameter's stream): acc + the whole draw, bit for bit."""
    monkeypatch.setattr(secure, "NOISE_CHUNK_ELEMS", chunk)
    acc = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    noise = secure.StepNoise(0.61)
    whole = secure.secure_normal_(torch.empty(shape, dtype=dtype), noise._key, 4, 0.61)
    want = acc + whole
    got = noise(4, acc)
    assert got is acc
    assert torch.equal(_bits(got), _bits(want))


def test_step_noise_fresh_key_each_step_and_one_draw_per_stream():
    a, b = secure.StepNoise(1.0), secure.StepNoise(1.0)
    za, zb = a(0, torch.zeros(50)), b(0, torch.zeros(50))
    assert not torch.isin(za, zb).any()
    with pytest.raises(RuntimeError, match="stream 0 was drawn twice"):
        a(0, torch.zeros(50))


@pytest.mark.parametrize("call,match", [
    (lambda: secure.secure_normal_(torch.empty(4), b"short", 0, 1.0), "key must be 32 bytes"),
    (lambda: secure.secure_normal_(torch.empty(4, dtype=torch.int32), bytes(32), 0, 1.0),
     "float32 or float64"),
    (lambda: secure.secure_normal_(torch.empty(4, 4).t(), bytes(32), 0, 1.0), "contiguous"),
    (lambda: secure.secure_normal_(torch.empty(4), bytes(32), -1, 1.0), "stream"),
    (lambda: secure.secure_normal_(torch.empty(4), bytes(32), 0, -1.0), "std"),
    (lambda: secure.secure_normal_(torch.empty(4), bytes(32), 0, float("nan")), "std"),
    (lambda: secure.secure_normal_(torch.empty(4, device="meta"), bytes(32), 0, 1.0),
     "CPU or a CUDA device"),
    # the C++ checks, reached without the Python wrapper
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4), [0] * 7, 0, 1.0),
     "key must be 8 32-bit words"),
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4), [1 << 32] * 8, 0, 1.0),
     r"key\[0\] must be in \[0, 2\^32\)"),
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4, dtype=torch.half), [0] * 8, 0,
                                                1.0), "float32 or float64"),
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4), [0] * 8, 0, -2.0),
     "std must be finite and >= 0"),
    (lambda: torch.ops.dpkernels.chacha20_keystream([0] * 8, [0] * 3, (1 << 32) - 1, 2),
     "32-bit block counter"),
    (lambda: secure.secure_normal_(torch.empty(4), bytes(32), 0, 1.0, offset=-1),
     r"offset must be >= 0"),
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4), [0] * 8, 0, 1.0, -1),
     r"offset \(the position in the stream of out's first element\) must be >= 0"),
    (lambda: torch.ops.dpkernels.secure_normal_(torch.empty(4), [0] * 8, 0, 1.0,
                                                (1 << 33) - 3),
     r"offset=8589934589 and numel=4 do not fit in one stream"),
    (lambda: torch.ops.dpkernels.secure_normal_per_block_(torch.empty(4), [0] * 8, 0, 1.0,
                                                          (1 << 33) - 3),
     r"do not fit in one stream"),
], ids=["key-len", "dtype", "strided", "stream", "std", "std-nan", "device", "op-key-len",
        "op-key-word", "op-dtype", "op-std", "op-counter", "offset", "op-offset",
        "op-offset-end", "op-per-block-offset-end"])
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


# ---------------------------------------------------------------- secure_mode in the engine
def mlp(dtype=torch.float64):
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(B, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 6, generator=g, dtype=dtype), torch.randint(0, 3, (B,), generator=g)


def grads_minus_clean(B_exp, sigma, C, steps, micro, mode="fast", dtype=torch.float64,
                      empty=False):
    """Secure-mode gradients minus the same run without noise: the noise alone."""
    x, y = data(B_exp, dtype)
    out = []
    for _ in range(steps):
        pair = []
        for secure_mode in (True, False):
            torch.manual_seed(0)
            model = mlp(dtype)
            dp = dpkernels.make_private(
                model, torch.optim.SGD(model.parameters(), lr=0.0),
                noise_multiplier=sigma if secure_mode else 0.0, max_grad_norm=C,
                expected_batch_size=B_exp, secure_mode=secure_mode, mode=mode)
            for s in ([] if empty else np.array_split(np.arange(B_exp), micro)):
                dp.backward(F.cross_entropy(model(x[s]), y[s]))
                dp.accumulate()
            dp.step()
            pair.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        out.append(pair[0] - pair[1])
    return torch.cat(out).double()


@pytest.mark.parametrize("micro,mode,dtype,empty", [
    (1, "fast", torch.float64, False), (3, "fast", torch.float64, False),
    (2, "low-memory", torch.float64, False), (1, "fast", torch.float32, False),
    (1, "fast", torch.float64, True)],
    ids=["flat", "micro-batches", "low-memory", "float32", "empty-batch"])
def test_secure_noise_added_once_per_step(micro, mode, dtype, empty):
    """std of the noise in param.grad is sigma*C/B_expected: 83 values x 25 steps, relative
    standard error 1/sqrt(2n) = 1.6%, a 5.33-sigma band (false failure 1e-7); noise added
    twice would be +41%, missing -100%."""
    sigma, C, B = 2.0, 0.5, 10
    noise = grads_minus_clean(B, sigma, C, steps=25, micro=micro, mode=mode, dtype=dtype,
                              empty=empty)
    n = noise.numel()
    assert abs(noise.std().item() / (sigma * C / B) - 1) < Z / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < Z * (sigma * C / B) / math.sqrt(n)


def test_secure_noise_differs_between_steps_and_parameters():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                expected_batch_size=1, secure_mode=True)
    seen = []
    for _ in range(2):
        dp.step()  # an empty step: the gradients are the noise
        seen += [p.grad.clone() for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in seen])
    assert flat.unique().numel() == flat.numel()


def test_seed_is_refused_in_secure_mode():
    model = mlp()
    with pytest.raises(ValueError, match="seed is refused with secure_mode=True"):
        dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               expected_batch_size=4, secure_mode=True, seed=0)
    # the failed call left the model detached: it can be made private again
    dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           expected_batch_size=4, secure_mode=True)


def test_missing_build_raises_with_the_reason():
    """A process where dpkernels._C cannot be imported (as after an install without a
    compiler): secure_mode=True raises saying why and what to do; the rest still works and
    `dpkernels info` says the extension is not built."""
    code = (
        "import sys; sys.modules['dpkernels._C'] = None\n"
        "import torch, dpkernels\n"
        "m = torch.nn.Linear(2, 2)\n"
        "dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), "
        "expected_batch_size=2)\n"
        "try:\n"
        "    m2 = torch.nn.Linear(2, 2)\n"
        "    dpkernels.make_private(m2, torch.optim.SGD(m2.parameters(), lr=0.1), "
        "expected_batch_size=2, secure_mode=True)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
        "from dpkernels import info; print(info.report())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "RAISED dpkernels: secure_mode=True needs the C++ extension" in out
    assert "dpkernels._C cannot be imported" in out and "--no-build-isolation" in out
    assert "C++ extension  not built, secure_mode=True unavailable" in out


def test_stale_build_raises_saying_to_rebuild():
    """An extension built from an older csrc/ (secure_normal_ without the offset, as left by
    an editable install that was not rebuilt) is reported as unavailable, with the fix, not
    called with an argument it does not take."""
    code = (
        "import sys, types; sys.modules['dpkernels._C'] = types.ModuleType('dpkernels._C')\n"
        "import torch\n"
        "lib = torch.library.Library('dpkernels', 'DEF')\n"
        "lib.define('secure_normal_(Tensor(a!) out, int[] key, int stream, float std) -> ()')\n"
        "from dpkernels import secure\n"
        "print(secure.available())\n"
        "try:\n"
        "    secure.StepNoise(1.0)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "(False, 'dpkernels._C is out of date" in out
    assert "RAISED dpkernels: secure_mode=True needs the C++ extension" in out
    assert "python setup.py build_ext --inplace" in out


def test_cuda_build_does_not_claim_the_cuda_backend(monkeypatch):
    """An extension built with CUDA (secure noise only) must not make backend='auto' pick
    'cuda' on the GPU: no DP-SGD op has a CUDA kernel, so every op would run on the
    reference instead of Triton."""
    from dpkernels import dispatch

    monkeypatch.setattr(secure, "with_cuda", lambda: True)
    dispatch.cuda_available.cache_clear()
    try:
        ok, why = dispatch.cuda_available()
        assert not ok and "no DP-SGD op has a CUDA C++ kernel" in why
        assert dispatch.pick("auto", "cuda") != "cuda"
    finally:
        dispatch.cuda_available.cache_clear()


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_accumulator_gets_noise_without_the_cuda_kernel(monkeypatch):
    """An extension built without CUDA still serves CUDA accumulators (CPU noise, copied)."""
    monkeypatch.setattr(secure, "with_cuda", lambda: False)
    acc = torch.zeros(1000, device="cuda")
    secure.StepNoise(2.0)(3, acc)
    assert acc.is_cuda and 1.6 < acc.std().item() < 2.4  # 1000 draws: s.e. of std 2.2%
    with pytest.raises(RuntimeError, match="built without its CUDA kernel"):
        secure.secure_normal_(torch.empty(4, device="cuda"), bytes(32), 0, 1.0)



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_noise_equals_cpu_bit_for_bit(dtype):
    if not secure.with_cuda():
        pytest.fail("the C++ extension was built without its CUDA kernels "
                    "(build on the GPU machine with DPKERNELS_BUILD_CUDA=1)")
    key = os.urandom(32)
    for n, stream, offset in ((1, 0, 0), (4099, 7, 0), (1 << 20, (1 << 40) + 1, 0),
                              (1, 3, 1), (4099, 7, 3), (1000, 2, 4097),
                              (5, 2, (1 << 33) - 5)):
        cpu = torch.empty(n, dtype=dtype)
        gpu = torch.empty(n, dtype=dtype, device="cuda")
        secure.secure_normal_(cpu, key, stream, 0.81, offset=offset)
        secure.secure_normal_(gpu, key, stream, 0.81, offset=offset)
        assert torch.equal(gpu.cpu().view(torch.int8), cpu.view(torch.int8)), (n, stream,
                                                                               offset)
    # chunks at odd offsets on the GPU equal the whole CPU draw
    whole = secure.secure_normal_(torch.empty(N_CHUNKED, dtype=dtype), key, 5, 0.81)
    out = torch.full((N_CHUNKED,), float("nan"), dtype=dtype, device="cuda")
    for a, b in zip(CUTS[:-1], CUTS[1:]):
        secure.secure_normal_(out[a:b], key, 5, 0.81, offset=a)
    assert torch.equal(_bits(out.cpu()), _bits(whole))
