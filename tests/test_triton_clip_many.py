"""The fused clip op (``clip_from_parts``: the sum of a micro-batch's norm contributions, its
deferred cancellation bounds, the other bounds and the clip factors in one launch) against its
reference (the engine's former steps: ``parts.sum(0)``, ``stacked_bounds``, ``clip_factors``),
through Triton's interpreter.

Tolerance rule: the kernel adds the same terms as torch in another order.  The sums here are
of nonnegative terms plus one negative row of a tenth their size, so each differs from torch's
by at most (terms + 4) unit roundoffs times 1.25 relatively; a square root halves that, the
products and the correctly rounded division add at most 4 more.  Allowed: 2 (terms + 8) u.
NaN, infinities, zeros and the all-finite flag must agree exactly."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernel_check import DEVICE, on_device, poison  # noqa: E402, F401

from dpkernels import dispatch  # noqa: E402
from dpkernels.ops import clip_many  # noqa: E402
from dpkernels.reference import clip_many as ref  # noqa: E402

U32 = 2.0**-24


def _case(B, U, E, V, X, special, dtype=torch.float32):
    g = torch.Generator().manual_seed(B * 1000 + U * 100 + E * 10 + V + X)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    scale = 10.0 ** torch.randint(-6, 6, (B,), generator=g).to(dtype).to(DEVICE)
    parts = rand(U, B) * scale
    parts[-1] = -0.1 * rand(B) * scale  # a cross term: a negative contribution
    err_parts = [rand(B) * 1e-4 * scale for _ in range(E)]
    R = max(V, 2)
    M = rand(R, B) * scale.sqrt() * 3.0
    own = rand(V, B) * scale if V else None
    if V:
        own[0] *= 1e6  # a large norm: the direct-form term of the bound is the larger one
    own_consts = [(int(torch.randint(0, R, (1,), generator=g)), 1e-4 * (i + 1), 3e-6 * (i + 1))
                  for i in range(V)]
    cross = [(0, R - 1, 2e-4), (1, 0, 1e-4)][:X]
    if special and B >= 5:
        parts[0, 0] = float("nan")
        parts[0, 1] = float("inf")
        parts[:, 2] = 0.0
        parts[0, 2] = -1e-9  # a negative total: clamped to 0
        parts[:, 3] = 0.0
        parts[0, 4] = 1e30
        if E:
            err_parts[0][3] = float("nan")  # a NaN bound with a finite norm: factor 0
        if V:
            M[:, 4] = float("nan")
    return parts, err_parts, M if (V or X) else None, own, own_consts, cross


@pytest.mark.parametrize("B", [0, 5, 1500])  # 1500: more than one block of the loop
@pytest.mark.parametrize("U,E,V,X", [(1, 0, 0, 0), (4, 0, 3, 0), (3, 1, 2, 2), (6, 2, 0, 1),
                                     (2, 2, 4, 0)],
                         ids=["norms-only", "own-bounds", "all", "cross-only", "two-errs"])
def test_clip_from_parts_matches_the_reference(B, U, E, V, X):
    for special in (False, True):
        args = _case(B, U, E, V, X, special)
        for loss_scale in (1.0, 37.0):
            got = clip_many.clip_from_parts(*args, loss_scale, 2.0**-16, 0.7)
            want = ref.clip_from_parts(*args, loss_scale, 2.0**-16, 0.7)
            rtol = 2 * (U + E + V + X + 8) * U32
            for i, (out, w) in enumerate(zip(got[:4], want[:4])):
                assert out.dtype == torch.float32 and out.shape == (B,), i
                assert torch.equal(out.isnan(), w.isnan()), i
                assert torch.equal(out.isinf(), w.isinf()) and torch.equal(out == 0, w == 0), i
                torch.testing.assert_close(out, w, rtol=rtol, atol=0, equal_nan=True)
            ok, rok = got[4], want[4]
            assert ok.dtype == rok.dtype == torch.bool and ok.dim() == 0
            assert bool(ok) == bool(rok) == (not special or B < 5)


def test_clip_from_parts_scaled_factors_are_factors_times_the_loss_scale():
    args = _case(7, 3, 1, 2, 1, False)
    _, _, fac, cfac, _ = clip_many.clip_from_parts(*args, 13.0, 2.0**-16, 0.5)
    assert torch.equal(cfac, fac * 13.0)


def test_clip_from_parts_refuses_bad_inputs():
    parts = torch.rand(2, 4)
    with pytest.raises(ValueError, match="parts must be"):
        clip_many.clip_from_parts(torch.rand(0, 4), [], None, None, [], [], 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="an error bound has shape"):
        clip_many.clip_from_parts(parts, [torch.rand(3)], None, None, [], [], 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="magnitudes must be"):
        clip_many.clip_from_parts(parts, [], None, None, [], [(0, 0, 1.0)], 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="outside"):
        clip_many.clip_from_parts(parts, [], torch.rand(2, 4), torch.rand(1, 4),
                                  [(2, 1e-4, 1e-5)], [], 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="own norms must be"):
        clip_many.clip_from_parts(parts, [], torch.rand(2, 4), None, [(1, 1e-4, 1e-5)], [],
                                  1.0, 0.0, 1.0)


@pytest.mark.parametrize("B", [5, 1500])
def test_clip_from_parts_constant_cross_factors(B):
    """A cross bound's factor that is a float is a constant (the underflow terms: an
    embedding's number of positions), never a row of M: 9.0 with 12 rows must not read row 9.
    The bound is what ``stacked_bounds`` gives with the constants multiplied out by hand; k is
    large here so that the terms decide the factors."""
    from dpkernels.layers.base import stacked_bounds

    g = torch.Generator().manual_seed(B)
    M = torch.rand(12, B, generator=g).to(DEVICE)
    parts = torch.rand(2, B, generator=g).to(DEVICE) * 0.1
    cross = [(9.0, 9.0, 0.02), (3, 3, 0.5), (9.0, 4, 0.25), (2, 7, 0.1)]
    by_hand = [(11, 11, 0.02 * 81.0), (3, 3, 0.5), (11, 4, 0.25 * 9.0), (2, 7, 0.1)]
    Mh = M.clone()
    Mh[11] = 1.0
    want_err = stacked_bounds(Mh, [], by_hand)
    for fn in (clip_many.clip_from_parts, ref.clip_from_parts):
        got = fn(parts, [], M, None, [], cross, 2.0, 2.0**-16, 0.5)
        want = ref.clip_from_parts(parts, [want_err], None, None, [], [], 2.0, 2.0**-16, 0.5)
        rtol = 2 * (2 + 4 + 8) * U32
        for out, w in zip(got[:4], want[:4]):
            torch.testing.assert_close(out, w, rtol=rtol, atol=0)
        assert (got[2] < 1).all()  # the constant terms clip every sample
    with pytest.raises(ValueError, match="constant factor"):
        ref.clip_from_parts(parts, [], M, None, [], [(float("nan"), 3, 1.0)], 1.0, 0.0, 1.0)


# clip_from_parts on the adversarial inputs of tests/test_clip_adversarial.py: exactly at C,
# subnormals, near float32 max, inf, NaN, in the norms and in the bounds (an error part, a NaN
# magnitude): every factor keeps c * sqrt(norm_sq + err) * loss_scale <= C (inputs exact, in
# float64), is 0 where the norm or the bound is not finite or the factor would be subnormal,
# and the kernel agrees with the reference on which factors are 0 and on the flag.
F32MAX = torch.finfo(torch.float32).max
VALS = [0.0, -0.0, -1.0, 1e-45, 2.0**-126, 1e-7, 1.0, (1.0 / (1 + 2**-16) - 1e-6) ** 2,
        0.99999, 1.00001, 4.0, 1e30, 1e38, F32MAX, float("inf"), float("nan"), -float("inf")]


@pytest.mark.parametrize("C", [1.0, 7.0, 1e-30])
@pytest.mark.parametrize("loss_scale", [1.0, 256.0, 1e30])
def test_clip_from_parts_adversarial(C, loss_scale):
    from dpkernels.layers.base import stacked_bounds

    nsq = torch.tensor(VALS, dtype=torch.float32).to(DEVICE)
    n = nsq.numel()
    nan_first = torch.tensor([float("nan")] + [1.0] * (n - 1)).to(DEVICE)
    cases = [([], None, []), ([torch.full_like(nsq, 1e-3)], None, []),
             ([torch.full_like(nsq, F32MAX)], None, []), ([nan_first], None, []),
             # a NaN magnitude (inf * 0) in a cross bound, with finite norms: factor 0
             ([], torch.stack([nan_first, torch.ones_like(nsq)]), [(0, 1, 1e-3)]),
             # a constant factor: an underflow term
             ([], torch.stack([nsq.abs().nan_to_num(0.0, 0.0, 0.0)]), [(0, 0, 1e-3), (4.0, 4.0,
                                                                        2.0**-125)])]
    for errs, M, cross in cases:
        args = (nsq[None], errs, M, None, [], cross, loss_scale, 2.0**-16, C)
        got = clip_many.clip_from_parts(*args)
        want = ref.clip_from_parts(*args)
        assert bool(got[4]) == bool(want[4])
        e64 = 0.0
        for e in errs:
            e64 = e64 + e.double()
        if M is not None:
            e64 = e64 + stacked_bounds(M.double(), [], cross)
        exact = (nsq.double().clamp_min(0) + e64).sqrt() * loss_scale
        for f in (got[2], want[2]):
            assert not torch.isnan(f).any(), f
            out = f.double() * exact
            ok = ~(f > 0) | ~torch.isfinite(out) | (out <= C * (1 + 1e-12))
            assert ok.all(), (nsq[~ok], f[~ok], out[~ok] / C)
            assert (f[~torch.isfinite(exact)] == 0).all()
            assert ((f == 0) | (f >= torch.finfo(torch.float32).tiny)).all()  # no subnormal
        m = want[2] > 0
        assert (got[2][m].double() <= want[2][m].double() * (1 + 2.0**-22)).all()
        assert torch.equal(got[2] == 0, want[2] == 0)
        if M is not None and cross[0][2] == 1e-3 and len(cross) == 1:
            # the NaN bound of sample 0 with its finite norm: 0, counted as not finite
            assert got[2][0] == 0 and not bool(got[4])


def test_clip_from_parts_float64_is_the_reference():
    args = _case(6, 3, 1, 2, 1, True, dtype=torch.float64)
    got = clip_many.clip_from_parts(*args, 3.0, 0.0, 0.9)
    want = ref.clip_from_parts(*args, 3.0, 0.0, 0.9)
    for out, w in zip(got, want):
        assert out.dtype == w.dtype
        torch.testing.assert_close(out, w, rtol=0, atol=0, equal_nan=True)


def test_clip_from_parts_resolves_to_triton():
    fn, backend = dispatch.resolve("clip_from_parts", "triton", DEVICE)
    assert backend == "triton" and fn.__module__.startswith("dpkernels.ops")


@pytest.mark.parametrize("net", ["tied", "plain"])
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64),
                                           ("triton", torch.float32)])
def test_engine_clip_factors_are_the_composed_steps(backend, dtype, net):
    """The engine's clip op gets the micro-batch's norm contributions and bound terms and must
    give what summing them, ``err_sq`` and ``clip_factors`` give (float64: identically; float32:
    the rule above, for the terms of this model).  "tied": cross terms, so the uses' own norms
    are not their contributions; "plain": they are, and the op gets them as one block."""
    from test_bounds_deferred import Tied
    from torch import nn

    import dpkernels
    from dpkernels.engine import NORM_MARGIN
    from dpkernels.reference import bounds as ref_bounds

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)

        def forward(self, ids):
            return self.head(torch.tanh(self.fc(self.emb(ids))))

    torch.manual_seed(0)
    model = (Tied() if net == "tied" else Plain()).to(dtype)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=0.05, backend=backend,
                                expected_batch_size=4, seed=0)
    try:
        ids = torch.randint(0, 11, (4, 9))
        ids[:, -2:] = 0
        model(ids).square().mean().backward()
        engine = model._dpkernels_engine
        err_want = engine.err_sq()
        calls, op = [], engine.op

        def spy(name, *args, **kwargs):
            out = op(name, *args, **kwargs)
            if name == "clip_from_parts":
                calls.append((args, out))
            return out

        engine.op = spy
        dp.step()
    finally:
        dpkernels.detach(model)
    (args, got), = calls
    block, L = args[0], engine.loss_scale
    assert block.shape[0] > 1 and args[3] is not None  # sums, own bounds
    # cross bounds: each Gram-form use's own underflow terms (row, row), and for "tied" the
    # pairs of uses of one parameter (row, row')
    assert all(len(c) == 3 for c in args[5]) and len(args[5]) >= 6
    assert any(r != r2 for r, r2, _ in args[5]) == (net == "tied")
    assert (args[3] is block) == (net == "plain")
    nsq = block.sum(0)
    norms, fac, _ = ref_bounds.clip_factors(nsq, err_want, L, NORM_MARGIN[dtype], 0.05)
    assert (fac < 1).any()  # some samples clipped
    terms = block.shape[0] + len(args[4]) + len(args[5]) + len(args[1])
    rtol = 0.0 if dtype == torch.float64 else 2 * (terms + 8) * U32
    for out, want in zip(got[:4], (nsq, norms, fac, fac * L)):
        torch.testing.assert_close(out, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reading_norms_before_step_changes_nothing(backend):
    """``per_sample_norms`` between backward and step takes the deferred norms and sums them
    early; the step then clips from that sum: the same norms and gradients as without it
    (reference: identical; Triton: the clip kernel adds the 7 contributions in another order
    than torch's sum, the rule above with 7 terms)."""
    from torch import nn

    import dpkernels

    def run(peek):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3))
        dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                    noise_multiplier=0.0, max_grad_norm=0.05,
                                    expected_batch_size=3, backend=backend)
        try:
            m(torch.randint(0, 11, (3, 40))).square().mean().backward()
            early = dp.per_sample_norms.clone() if peek else None
            dp.step()
            return early, dp.per_sample_norms, [p.grad.clone() for p in m.parameters()]
        finally:
            dpkernels.detach(m)

    early, norms, grads = run(True)
    _, norms2, grads2 = run(False)
    assert torch.equal(early, norms)
    rtol = 0.0 if backend == "reference" else 2 * (7 + 8) * U32
    torch.testing.assert_close(norms, norms2, rtol=rtol, atol=0)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
