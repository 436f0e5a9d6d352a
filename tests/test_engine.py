"""Engine behaviour and the privacy invariants of DESIGN.md section 6 (reference backend)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from noise_stats import check_noise, empty_batch_noise
from oracle import check_engine, oracle, rel_err
from torch import nn

import dpkernels


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def ce(out, y):
    return F.cross_entropy(out, y)


def data(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,),
                                                                                generator=g)


def private(model, **kw):
    args = dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=11, seed=0)
    args.update(kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return dpkernels.make_private(model, opt, **args)


# ---------------------------------------------------------------- clipping bound
@pytest.mark.parametrize("k", [-1, 0, 7, 14], ids=["all-clipped", "15-clipped", "8-clipped",
                                                    "1-clipped"])
def test_every_clipped_gradient_within_bound(k):
    """The clip factors the engine used: ||c_b g_b|| <= C for the true (float64 torch.func)
    per-sample gradients, clipped samples land on C (up to the 1e-6 guard in the factor),
    the others are left alone (c_b = 1, never scaled up), and param.grad is
    sum_b c_b g_b / B_expected with exactly these c_b.  C sits halfway between two sorted
    true norms (or below all), so no sample is within rounding of it."""
    model = mlp()
    x, y = data(16)
    _, _, psg = oracle(copy.deepcopy(model), ce, x, y, 1.0, 1, "mean")
    true = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
    s = true.sort().values
    C = (s[0] / 2 if k < 0 else (s[k] + s[k + 1]) / 2).item()
    clipped = true > C
    assert clipped.sum() == (16 if k < 0 else 15 - k)
    dp = private(model, max_grad_norm=C, expected_batch_size=19)
    ce(model(x), y).backward()
    dp.step()
    c = dp.engine.last_factors
    assert torch.all(c * true <= C * (1 + 1e-12))
    assert torch.all(c[clipped] * true[clipped] >= C * (1 - 2e-6 / true[clipped]))
    assert torch.all(c[~clipped] == 1.0)
    for name, p in model.named_parameters():
        want = torch.tensordot(c, psg[name], dims=1) / 19
        assert rel_err(p.grad, want) < 1e-10, name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_norm_margin(backend):
    """float32 norms are raised by the relative margin 2^-16 before the clip factor is taken
    (DESIGN.md section 6), so that their rounding error cannot let c_b ||g_b|| exceed C: for
    every clipped sample c_b * norm_b / C = 1 / (1 + 2^-16) (float32 rounding of the factor,
    ~1e-7, and the 1e-6 guard, ~1e-9 at norms ~1e3, are far below 2^-17).  float64 norms
    (the oracle's precision) get no margin: c_b * norm_b = C to ~1e-9."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))
    x = torch.randn(16, 6)
    y = torch.randint(0, 5, (16,))
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(base).to(dtype)
        dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    noise_multiplier=0.0, max_grad_norm=1.0,
                                    expected_batch_size=16, backend=backend)
        for _ in range(2):  # the first step measures the norms, the second clips at C
            (1e3 * F.cross_entropy(model(x.to(dtype)), y)).backward()
            dp.step()
            dp.zero_grad()
            norms = dp.per_sample_norms.double()
            dp.max_grad_norm = C = norms.median().item()
        clipped = norms > C
        assert clipped.sum() >= 7
        r = dp.engine.last_factors.double()[clipped] * norms[clipped] / C
        if dtype == torch.float32:
            assert (r <= 1 - 2**-17).all() and (r >= 1 - 2**-15).all(), r
        else:
            assert (r <= 1).all() and (r >= 1 - 1e-8).all(), r
        dpkernels.detach(model)


# ---------------------------------------------------------------- micro-batches
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulate_equals_one_batch(reduction):
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = data(12)
    loss_fn = (lambda o, t: F.cross_entropy(o, t, reduction=reduction))
    kw = dict(max_grad_norm=0.3, expected_batch_size=15, loss_reduction=reduction)
    dp1 = private(model, **kw)
    loss_fn(model(x), y).backward()
    dp1.step()
    dp2 = private(twin, **kw)
    for s in (slice(0, 5), slice(5, 6), slice(6, 12)):
        loss_fn(twin(x[s]), y[s]).backward()
        dp2.accumulate()
    dp2.step()
    for p1, p2 in zip(model.parameters(), twin.parameters()):
        assert rel_err(p2.grad, p1.grad) < 1e-12


def test_second_backward_without_accumulate_is_refused():
    model = mlp()
    x, y = data()
    dp = private(model)
    ce(model(x), y).backward()
    with pytest.raises(RuntimeError, match="accumulate"):
        model(x)
    dp.zero_grad()  # drops the pending backward
    ce(model(x), y).backward()
    dp.step()


# ---------------------------------------------------------------- noise
def _noisy_grads(seed, steps=1, sigma=2.0, C=0.5, B_exp=10, reduction="mean", batch=True):
    model = mlp()
    dp = private(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B_exp,
                 seed=seed, loss_reduction=reduction)
    out = []
    for _ in range(steps):
        if batch:
            x, y = data(4)
            F.cross_entropy(model(x), y, reduction=reduction).backward()
        dp.step()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        dp.zero_grad()
    return out


def test_noise_std_and_once_per_step():
    """With an empty step the gradient is pure noise: std sigma*C/B_expected.

    The sample std of n = 6*8+8+8*3+3 = 83 ... values per step, over 40 steps (3320 values),
    has relative standard error 1/sqrt(2n) ~ 1.2%; the 6-sigma band below fails by chance
    with probability < 1e-8.  Noise added twice would give sqrt(2) = +41%.
    """
    sigma, C, B_exp = 2.0, 0.5, 10
    grads = torch.cat(_noisy_grads(seed=1, steps=40, sigma=sigma, C=C, B_exp=B_exp,
                                   batch=False))
    n = grads.numel()
    expected = sigma * C / B_exp
    std = grads.std().item()
    assert abs(std / expected - 1) < 6 / math.sqrt(2 * n)
    assert abs(grads.mean().item()) < 6 * expected / math.sqrt(n)


def test_noise_sum_reduction_not_scaled():
    grads = torch.cat(_noisy_grads(seed=2, steps=20, sigma=1.5, C=2.0, reduction="sum",
                                   batch=False))
    n = grads.numel()
    assert abs(grads.std().item() / 3.0 - 1) < 6 / math.sqrt(2 * n)


def test_noise_fresh_each_step_and_reproducible():
    a = _noisy_grads(seed=3, steps=3, batch=False)
    b = _noisy_grads(seed=3, steps=3, batch=False)
    c = _noisy_grads(seed=4, steps=3, batch=False)
    for s in range(3):
        assert torch.equal(a[s], b[s])
        assert not torch.equal(a[s], c[s])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


def test_noise_added_once_with_microbatches():
    """Signal removed (noise 0 run subtracted): what is left has std sigma*C/B, not more."""
    x, y = data(12)
    sigma, C = 3.0, 0.2
    noisy, clean = [], []
    for seed in range(30):
        for std_on, store in ((sigma, noisy), (0.0, clean)):
            torch.manual_seed(0)
            model = mlp()
            dp = private(model, noise_multiplier=std_on, max_grad_norm=C, expected_batch_size=15,
                         seed=seed)
            for s in (slice(0, 4), slice(4, 8), slice(8, 12)):
                ce(model(x[s]), y[s]).backward()
                dp.accumulate()
            dp.step()
            store.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    diff = torch.cat(noisy) - torch.cat(clean)
    n = diff.numel()
    assert abs(diff.std().item() / (sigma * C / 15) - 1) < 6 / math.sqrt(2 * n)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_step_adds_noise(backend):
    """An empty Poisson batch still steps: every gradient is noise of std sigma C / B_exp."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 32))  # float32: Triton
    noise, std = empty_batch_noise(model, torch.zeros(0, 6), backend, steps=8)
    check_noise(noise, std)


# ---------------------------------------------------------------- nothing un-clipped leaks
def test_frozen_parameter_gets_no_grad_and_no_noise():
    model = mlp()
    model[0].weight.requires_grad_(False)
    dp = private(model, noise_multiplier=1.0)
    x, y = data()
    ce(model(x), y).backward()
    dp.step()
    assert model[0].weight.grad is None
    assert model[0].bias.grad is not None


def test_parameter_used_outside_its_module_is_refused():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) + x[:, :3] @ self.lin.weight[:, :3].t()

    model = Leaky().double()
    dp = private(model)
    x, y = data()
    with pytest.raises(RuntimeError, match="lin.weight"):
        ce(model(x), y).backward()
    dp.zero_grad()


def test_optimizer_with_foreign_parameter_refused():
    model = mlp()
    other = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), other], lr=0.1)
    with pytest.raises(ValueError, match="not part of the model"):
        dpkernels.make_private(model, opt, expected_batch_size=4)
    # the failed call left the model detached
    dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           expected_batch_size=4)


# ---------------------------------------------------------------- refusals and bad input
def test_batchnorm_refused_with_suggestion():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="GroupNorm"):
        dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               expected_batch_size=4)


def test_batch_mismatch_between_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.a(x)[:-1])  # drops a sample between layers

    model = Odd().double()
    dp = private(model)
    x, y = data()
    with pytest.raises(ValueError, match="batch of"):
        ce(model(x), y[:-1]).backward()
    dp.zero_grad()


def test_dtype_mismatch_names_module():
    model = mlp()
    private(model)
    with pytest.raises(TypeError, match=r"0 \(Linear\).*float32"):
        model(torch.randn(3, 6))


def test_unbatched_input_refused():
    model = nn.Linear(6, 3).double()
    private(model)
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.randn(6, dtype=torch.float64))


def test_bad_arguments():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_reduction"):
        dpkernels.make_private(model, opt, expected_batch_size=4, loss_reduction="avg")
    with pytest.raises(ValueError, match="expected_batch_size"):
        dpkernels.make_private(model, opt)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dpkernels.make_private(model, opt, noise_multiplier=-1, expected_batch_size=4)
    with pytest.raises(ValueError, match="backend"):
        dpkernels.make_private(model, opt, expected_batch_size=4, backend="fast")
    with pytest.raises(ValueError, match="max_grad_norm"):
        dpkernels.make_private(model, opt, expected_batch_size=4, max_grad_norm=0)


def test_attach_twice_refused_and_detach_restores():
    model = mlp()
    x, _ = data()
    before = model(x).detach()
    private(model)
    with pytest.raises(RuntimeError, match="already attached"):
        private(model)
    dpkernels.detach(model)
    assert "forward" not in model[0].__dict__
    assert torch.equal(model(x).detach(), before)
    private(model)  # can attach again


# ---------------------------------------------------------------- generic fallback
class Scale(nn.Module):
    """A module with no fused rule: elementwise scale and shift through ``addcmul``, an op
    with no op rule (``x * w + b`` is captured by the mul and add op rules)."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))
        self.b = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addcmul(self.b, x, self.w)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_generic_fallback_exact_and_warns(reduction):
    model = nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = data(7)
    check_engine_first = nn.Sequential(Scale(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.warns(UserWarning, match=r"0 \(Scale\).*addcmul.*generic"):  # input: no grad
        check_engine(check_engine_first, lambda o, t: F.cross_entropy(o, t, reduction=reduction),
                     x, y, reduction=reduction)
    with pytest.warns(UserWarning, match=r"1 \(Scale\).*generic"):
        check_engine(model, lambda o, t: F.cross_entropy(o, t, reduction=reduction), x, y,
                     reduction=reduction)


def test_generic_parent_with_own_parameter_and_children():
    class PosAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4, 6))
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(torch.addcmul(x, self.pos, self.pos))  # addcmul: no op rule

    model = nn.Sequential(PosAdd(), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    y = torch.randn(5, 4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="generic"):
        check_engine(model, lambda o, t: F.mse_loss(o, t), x, y)


def test_multihead_attention_whole_module_fallback():
    """MultiheadAttention reads out_proj.weight itself: handled as one generic module."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0])

    model = Attn().double()
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    y = torch.randn(4, 3, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        check_engine(model, lambda o, t: F.mse_loss(o, t), x, y)


# ---------------------------------------------------------------- optimizer surface
def test_state_dict_roundtrip_and_steps():
    model = mlp()
    dp = private(model, noise_multiplier=0.5)
    x, y = data()
    for _ in range(3):
        ce(model(x), y).backward()
        dp.step()
        dp.zero_grad()
    sd = dp.state_dict()
    model2 = mlp()
    dp2 = private(model2, noise_multiplier=9.0)
    dp2.load_state_dict(sd)
    assert dp2.steps == 3 and dp2.noise_multiplier == 0.5 and dp2.seed == dp.seed
    assert dp.param_groups is dp.original_optimizer.param_groups


SAVED = dict(noise_multiplier=0.8, max_grad_norm=0.3, expected_batch_size=9,
             loss_reduction="mean", seed=11)
OTHER = dict(noise_multiplier=3.0, max_grad_norm=5.0, expected_batch_size=40,
             loss_reduction="sum", seed=999)


def _train_steps(model, dp, first, last):
    for step in range(first, last):
        x, y = data(5 + step, seed=100 + step)  # batch sizes vary, as under Poisson sampling
        ce(model(x), y).backward()  # mean over the batch, as SAVED says
        dp.step()
        dp.zero_grad()


def _adam_private(model, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return dpkernels.make_private(model, opt, backend="reference", **kw)


def test_resume_from_state_dict_equals_uninterrupted_run():
    """Train, save, load into an optimizer built with other C, sigma, expected_batch_size,
    loss_reduction and seed, train on: bit for bit the uninterrupted run (noise included:
    the seed and step count key it; the engine must get C and loss_reduction back)."""
    torch.manual_seed(0)
    init = mlp()
    straight = copy.deepcopy(init)
    dp = _adam_private(straight, **SAVED)
    _train_steps(straight, dp, 0, 5)

    first = copy.deepcopy(init)
    dp1 = _adam_private(first, **SAVED)
    _train_steps(first, dp1, 0, 3)
    state, weights = copy.deepcopy(dp1.state_dict()), copy.deepcopy(first.state_dict())
    resumed = mlp()
    resumed.load_state_dict(weights)
    dp2 = _adam_private(resumed, **OTHER)
    dp2.load_state_dict(state)
    for key, value in SAVED.items():
        assert getattr(dp2, key) == value, key
    assert dp2.engine.max_grad_norm == SAVED["max_grad_norm"]
    assert dp2.engine.loss_reduction == SAVED["loss_reduction"]
    _train_steps(resumed, dp2, 3, 5)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert dp2.steps == dp.steps and dp2.history == dp.history


@pytest.mark.parametrize("field,value,match", [
    ("loss_reduction", "avg", "loss_reduction"),
    ("max_grad_norm", 0.0, "max_grad_norm"),
    ("noise_multiplier", float("nan"), "noise_multiplier"),
    ("expected_batch_size", None, "expected_batch_size"),
])
def test_load_state_dict_refuses_bad_checkpoint_and_changes_nothing(field, value, match):
    model = mlp()
    dp = _adam_private(model, **SAVED)
    _train_steps(model, dp, 0, 1)
    state = copy.deepcopy(dp.state_dict())
    state["dp"][field] = value
    other = mlp()
    dp2 = _adam_private(other, **OTHER)
    with pytest.raises(ValueError, match=match):
        dp2.load_state_dict(state)
    for key, v in OTHER.items():
        assert getattr(dp2, key) == v, key
    assert dp2.engine.loss_reduction == "sum" and dp2.steps == 0
    assert dp2.original_optimizer.state_dict()["state"] == {}


def test_wrapped_optimizer_adam_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    dp = dpkernels.make_private(model, torch.optim.Adam(model.parameters(), lr=0.05),
                                noise_multiplier=0.3, max_grad_norm=1.0, expected_batch_size=64,
                                seed=0)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        dp.step()
        dp.zero_grad()
    assert loss.item() < 0.8 * first


# ---------------------------------------------------------------- autocast
def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(model).double()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    dp.step()
    assert dp.per_sample_norms.dtype == torch.float32
    norms, grads, _ = oracle(ref, ce, x.double(), y, 0.5, 8, "mean")
    # bf16 has 8 mantissa bits (eps 2^-8 = 3.9e-3); a few roundings per value on the way
    # through two layers: 5% relative is about 10 eps, the usual bf16 parity budget.
    assert rel_err(dp.per_sample_norms.double(), norms) < 5e-2
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad.double(), grads[name]) < 5e-2


def test_instancenorm_running_stats_refused_even_without_parameters():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True))
    with pytest.raises(ValueError, match=r"1 \(InstanceNorm1d\).*track_running_stats=False"):
        dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               expected_batch_size=4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_clipping_bound_at_the_boundary(backend):
    """float32 norms carry rounding error; with C set exactly to each sample's true (float64)
    norm in turn, ``c_b * ||g_b||`` must still not exceed C: the norm margin covers it.  The
    loss is scaled so that norms are ~1e3 and the 1e-6 in the clip factor cannot hide it."""
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))
    x = torch.randn(16, 6)
    y = torch.randint(0, 5, (16,))

    def ce(out, t):
        return 1e3 * F.cross_entropy(out, t)

    _, _, psg = oracle(copy.deepcopy(model32).double(), ce, x.double(), y, 1.0, 16, "mean")
    true = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
    for b in range(16):
        C = true[b].item()
        model = copy.deepcopy(model32)
        dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=16,
                                    backend=backend)
        ce(model(x), y).backward()
        dp.step()
        factors = dp.engine.last_factors.double()  # the c_b this step clipped with
        assert (factors * true <= C).all(), (b, factors * true / C)
        assert factors[b] < 1  # the boundary sample is (just) clipped


def test_learning_rate_schedulers_and_param_groups():
    model = mlp()
    dp = private(model, noise_multiplier=0.0)
    for g in dp.param_groups:
        g["lr"] = 0.1
    assert isinstance(dp, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(dp, step_size=1, gamma=0.5)
    x, y = data()
    for _ in range(3):
        ce(model(x), y).backward()
        dp.step()
        dp.zero_grad()
        sched.step()
    assert dp.original_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    with pytest.raises(ValueError, match="not part of the model"):
        dp.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_generic_fallback_refuses_dropout_in_training():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Attn().double()
    with pytest.warns(UserWarning):
        dp = private(model)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mha \(MultiheadAttention\).*dropout"):
        model(x)
    model.eval()  # no dropout in eval mode: fine
    model(x)
    dp.zero_grad()
