"""Misuse between make_private and step(): each case gives the exact result or a clear error.

Issue 7, items 1-4, 8-10, 14 and 16.  Every test here failed (or was silently wrong) on
30526b8.  Float64 models, so numbers are compared with the oracle at RTOL_F64.
"""

import copy
import gc
import io
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import RTOL_F64, oracle, rel_err
from torch import nn

import dpkernels


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def ce(out, y):
    return F.cross_entropy(out, y)


def private(model, opt=None, **kw):
    args = dict(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=9, seed=0)
    args.update(kw)
    opt = opt or torch.optim.SGD(model.parameters(), lr=1.0)
    return dpkernels.make_private(model, opt, **args)


def expected_grads(model, x, y, C, B_exp):
    _, grads, _ = oracle(copy.deepcopy(model), ce, x, y, C, B_exp, "mean")
    return grads


# ---------------------------------------------------------------- 1: provenance of gradients
def test_outside_parameter_unfrozen_later_is_refused():
    """(a) A temperature the optimizer holds but the model does not, frozen at make_private."""
    model = mlp()
    temp = nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)
    opt = torch.optim.SGD([*model.parameters(), temp], lr=1.0)
    dp = private(model, opt, max_grad_norm=1e-3)
    temp.requires_grad_(True)
    x, y = data()
    ce(model(x) / temp, y).backward()
    with pytest.raises(RuntimeError, match=r"not part of the model given to make_private"):
        dp.step()
    assert temp.item() == 1.0


def test_param_group_added_to_wrapped_optimizer_is_refused():
    """(b) optimizer.add_param_group on the *wrapped* optimizer after make_private."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = private(model, opt, max_grad_norm=1e-3)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    x, y = data()
    ce(model(x) + extra, y).backward()
    with pytest.raises(RuntimeError, match=r"param group 1, index 0"):
        dp.step()
    assert torch.all(extra == 0)


class TiedHead(nn.Module):
    """The head reads the embedding's weight in the parent's own code: not captured."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        return self.mix(self.emb(ids)).mean(1) @ self.emb.weight.t()


def test_tied_parameter_unfrozen_after_attach_cannot_leak():
    """(c) No leak hook was registered for a parameter frozen at attach: its raw gradient from
    the uncaptured use must not be silently dropped (or stepped)."""
    model = TiedHead().double()
    model.emb.weight.requires_grad_(False)
    dp = private(model)
    model.emb.weight.requires_grad_(True)
    ids = torch.randint(0, 11, (4, 3))
    F.cross_entropy(model(ids), torch.randint(0, 11, (4,))).backward()
    with pytest.raises(RuntimeError, match=r"'emb.weight' received a gradient outside"):
        dp.step()


def test_tied_parameter_unfrozen_after_attach_is_hooked_from_the_next_step():
    model = TiedHead().double()
    model.emb.weight.requires_grad_(False)
    dp = private(model)
    model.emb.weight.requires_grad_(True)
    ids = torch.randint(0, 11, (4, 3))
    y = torch.randint(0, 11, (4,))
    F.cross_entropy(model(ids), y).backward()
    with pytest.raises(RuntimeError):
        dp.step()
    dp.zero_grad()
    # the engine hooked the parameter when it wrote its gradient: the next backward raises
    with pytest.raises(RuntimeError, match="outside the per-sample capture"):
        F.cross_entropy(model(ids), y).backward()


def test_unfrozen_model_parameter_is_captured_exactly():
    model = mlp()
    model[0].weight.requires_grad_(False)
    dp = private(model, max_grad_norm=0.3)
    model[0].weight.requires_grad_(True)
    x, y = data()
    grads = expected_grads(model, x, y, 0.3, 9)
    ce(model(x), y).backward()
    dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


def test_frozen_after_a_step_is_not_stepped_again():
    model = mlp()
    dp = private(model)
    x, y = data()
    ce(model(x), y).backward()
    dp.step()  # no zero_grad: the engine's gradients stay on the parameters
    model[0].weight.requires_grad_(False)
    w = model[0].weight.detach().clone()
    ce(model(x), y).backward()
    dp.step()
    assert torch.equal(model[0].weight, w)


def test_replaced_parameter_is_refused():
    model = mlp()
    dp = private(model)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    x, y = data()
    with pytest.raises(RuntimeError, match=r"replaced or added afterwards"):
        ce(model(x), y).backward()
    del dp


def _property_case(seed):
    """Random freeze / unfreeze, add_param_group on either optimizer, parameter replacement,
    detach / re-attach; after every step() that does not raise, each parameter changed by
    exactly -lr * (the oracle's clipped gradient of the trainable model parameters)."""
    rnd = random.Random(seed)
    model = mlp(seed)
    outside = [nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2)]
    C, B_exp = 0.4, 9

    def attach():
        for q in outside:
            q.requires_grad_(rnd.random() < 0.5)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        return opt, private(model, opt, max_grad_norm=C, expected_batch_size=B_exp)

    opt, dp = attach()
    for it in range(12):
        action = rnd.choice(["freeze", "unfreeze", "wrapped_group", "dp_group", "replace",
                             "reattach", "none", "none"])
        params = list(model.parameters())
        if action == "freeze":
            rnd.choice(params).requires_grad_(False)
        elif action == "unfreeze":
            rnd.choice(params).requires_grad_(True)
        elif action == "wrapped_group":
            q = rnd.choice(outside)
            if all(q is not r for g in opt.param_groups for r in g["params"]):
                q.requires_grad_(True)
                opt.add_param_group({"params": [q]})
        elif action == "dp_group":
            q = rnd.choice(outside)
            q.requires_grad_(True)
            if all(q is not r for g in opt.param_groups for r in g["params"]):
                with pytest.raises(ValueError, match="not part of the model"):
                    dp.add_param_group({"params": [q]})
        elif action == "replace":
            lin = model[rnd.choice([0, 2])]
            lin.weight = nn.Parameter(lin.weight.detach().clone())
        elif action == "reattach":
            dpkernels.detach(model)
            opt, dp = attach()
        x, y = data(6, seed=100 + it)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        outside_before = [q.detach().clone() for q in outside]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = expected_grads(model, x, y, C, B_exp) if trainable else {}
        try:
            out = model(x) + sum(outside)
            ce(out, y).backward()
            dp.step()
        except RuntimeError as e:
            assert "dpkernels" in str(e)
            for n, p in model.named_parameters():  # nothing changed
                assert torch.equal(p, before[n]), (seed, it, action, n)
            for q, b in zip(outside, outside_before):
                assert torch.equal(q, b)
            dpkernels.detach(model)
            opt, dp = attach()
            continue
        finally:
            for q in outside:
                q.grad = None
        dp.zero_grad()
        for q, b in zip(outside, outside_before):
            assert torch.equal(q, b), (seed, it, action)
        for n, p in model.named_parameters():
            change = p.detach() - before[n]
            if n in grads:
                assert rel_err(-change, grads[n]) <= 1e-9, (seed, it, action, n)
            else:
                assert torch.equal(change, torch.zeros_like(change)), (seed, it, action, n)
    dpkernels.detach(model)


@pytest.mark.parametrize("seed", range(6))
def test_property_every_update_is_a_clipped_engine_gradient(seed):
    _property_case(seed)


# ---------------------------------------------------------------- 2: one source of truth for C
def test_changing_max_grad_norm_changes_the_clip_too():
    model = mlp()
    dp = private(model, max_grad_norm=10.0)
    dp.max_grad_norm = 0.05
    assert dp.engine.max_grad_norm == 0.05
    x, y = data()
    grads = expected_grads(model, x, y, 0.05, 9)
    ce(model(x), y).backward()
    dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


@pytest.mark.parametrize("attr", ["max_grad_norm", "noise_multiplier", "expected_batch_size"])
def test_setters_refuse_mid_logical_batch(attr):
    model = mlp()
    dp = private(model)
    x, y = data()
    ce(model(x), y).backward()
    dp.accumulate()
    with pytest.raises(RuntimeError, match=f"{attr} cannot change in the middle"):
        setattr(dp, attr, 2.0)
    dp.step()
    setattr(dp, attr, 2.0)  # right after a step it is fine
    assert getattr(dp, attr) == 2.0


def test_noise_follows_the_new_clip_norm():
    """Noise std is sigma * C / B_expected with the C the engine clips with."""
    model = nn.Linear(200, 100, bias=False).double()
    dp = private(model, noise_multiplier=2.0, max_grad_norm=1.0, expected_batch_size=4, seed=3)
    dp.max_grad_norm = 0.01
    x = torch.randn(4, 200, dtype=torch.float64)
    (model(x) * 0).sum().backward()
    dp.step()
    std = model.weight.grad.std().item()
    # 20,000 draws: the sample std is within 2% of the truth except with probability < 1e-9
    assert abs(std / (2.0 * 0.01 / 4) - 1) < 0.02


# ---------------------------------------------------------------- 3: non-finite arguments
@pytest.mark.parametrize("kw,match", [
    (dict(max_grad_norm=math.inf), "max_grad_norm"),
    (dict(max_grad_norm=math.nan), "max_grad_norm"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(noise_multiplier=math.nan), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(expected_batch_size=math.nan), "expected_batch_size"),
    (dict(expected_batch_size=math.inf), "expected_batch_size"),
    (dict(expected_batch_size=0), "expected_batch_size"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_non_finite_arguments_are_refused(kw, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        private(model, **kw)
    assert getattr(model, "_dpkernels_engine", None) is None  # nothing left attached
    dp = private(model)
    with pytest.raises(ValueError, match=match):
        setattr(dp, match, next(iter(kw.values())))


# ---------------------------------------------------------------- 4: stale optimizer after detach
def test_step_after_detach_raises():
    model = mlp()
    dp = private(model, noise_multiplier=1.0)
    dpkernels.detach(model)
    x, y = data()
    ce(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"after dpkernels.detach\(model\)"):
        dp.step()
    with pytest.raises(RuntimeError, match=r"after dpkernels.detach\(model\)"):
        dp.accumulate()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n])


# ---------------------------------------------------------------- 8: copies of an attached model
def test_deepcopy_of_attached_model_is_independent():
    model = mlp()
    dp = private(model)
    ema = copy.deepcopy(model)
    assert getattr(ema, "_dpkernels_engine", None) is None
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    x, y = data()
    with torch.no_grad():
        assert not torch.allclose(ema(x), model(x))  # the copy runs its own weights
    ce(ema(x), y).backward()  # plain training of the copy: records nothing into dp
    assert not dp.engine.uses
    assert all(p.grad is not None for p in ema.parameters())
    grads = expected_grads(model, x, y, 0.5, 9)
    ce(model(x), y).backward()
    dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


def test_torch_save_of_attached_model_loads_detached():
    model = mlp()
    private(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert getattr(loaded, "_dpkernels_engine", None) is None
    x, _ = data()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- 9: no graph kept by folding
def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_accumulate_keeps_no_graph_and_memory_is_flat():
    model = mlp()
    dp = private(model, expected_batch_size=4 * 50)
    counts = []
    for i in range(50):
        x, y = data(4, seed=i)
        x.requires_grad_(True)  # saved inputs that require grad
        ce(model(x), y).backward()
        dp.accumulate()
        if i in (9, 49):
            counts.append(_live_tensors())
    for acc in dp.engine.acc.values():
        assert not acc.requires_grad and acc.grad_fn is None
    assert counts[1] <= counts[0], counts
    dp.step()
    for p in model.parameters():
        assert p.grad.grad_fn is None and not p.grad.requires_grad


# ---------------------------------------------------------------- 10: a non-finite sample
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_sample_is_dropped_not_spread(bad):
    model = mlp()
    dp = private(model, max_grad_norm=0.3, noise_multiplier=0.0)
    x, y = data(6)
    x[3, 1] = float(bad)
    keep = torch.tensor([i != 3 for i in range(6)])
    grads = expected_grads(model, x[keep], y[keep], 0.3, 9)
    with pytest.warns(UserWarning, match=r"1 of 6 samples had a non-finite .*\[3\]"):
        ce(model(x), y).backward()
        dp.step()
    assert dp.nonfinite_samples == 1
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


def test_non_finite_sample_low_memory_mode():
    model = mlp()
    dp = private(model, max_grad_norm=0.3, mode="low-memory")
    x, y = data(6)
    x[2, 0] = float("nan")
    keep = torch.arange(6) != 2
    grads = expected_grads(model, x[keep], y[keep], 0.3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp.backward(ce(model(x), y))
        dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


# ---------------------------------------------------------------- 14: messages that say what
def test_two_batch_sizes_through_one_module_say_so():
    model = mlp()
    private(model, multiple_forwards=True)
    x1, y1 = data(4)
    x2, y2 = data(3, seed=2)
    loss = ce(model(x1), y1) + ce(model(x2), y2)
    with pytest.raises(ValueError, match=r"called 2 times.*one batch") as e:
        loss.backward()
    assert "batch_first" not in str(e.value)


def test_eval_forward_with_grad_between_backward_and_step_says_no_grad():
    model = mlp()
    private(model)
    x, y = data()
    ce(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"torch.no_grad\(\)"):
        model(x[:2])
    with torch.no_grad():  # the fix the message gives works
        model(x[:2])


# ---------------------------------------------------------------- 16: norms before step()
def test_per_sample_norms_available_between_backward_and_step():
    model = mlp()
    dp = private(model)
    x, y = data()
    true, _, _ = oracle(copy.deepcopy(model), ce, x, y, 1.0, 1, "mean")
    assert dp.per_sample_norms is None
    ce(model(x), y).backward()
    pending = dp.per_sample_norms
    assert pending is not None and rel_err(pending, true) <= RTOL_F64
    dp.step()
    assert torch.equal(dp.per_sample_norms, pending)


# ---------------------------------------------------------------- found by an adversarial review
def test_module_shared_by_two_attached_models_is_refused():
    shared = nn.Linear(5, 5).double()
    a = nn.Sequential(shared, nn.Linear(5, 3)).double()
    b = nn.Sequential(shared, nn.Linear(5, 2)).double()
    private(a)
    with pytest.raises(ValueError, match=r"0 \(Linear\) is already captured by another"):
        private(b)
    assert getattr(b, "_dpkernels_engine", None) is None
    assert not isinstance(b[1].__dict__.get("forward"), type(shared.forward))  # not half-patched


def test_trainable_parameters_outside_the_optimizer_warn():
    model = mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=1.0)
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\).*0.weight, 0.bias"):
        private(model, opt)


def test_step_hooks_of_the_dp_optimizer_run():
    model = mlp()
    dp = private(model)
    seen = []
    dp.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    dp.register_step_post_hook(lambda o, a, k: seen.append("post"))
    x, y = data()
    ce(model(x), y).backward()
    dp.step()
    assert seen == ["pre", "post"]


def test_zero_gradient_on_a_frozen_parameter_is_not_a_false_alarm():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = data()
    ce(model(x), y).backward()
    opt.zero_grad(set_to_none=False)  # zero gradients stay on every parameter
    model[0].weight.requires_grad_(False)
    dp = private(model, opt)
    ce(model(x), y).backward()
    dp.step()


def test_deepcopy_of_the_dp_optimizer_says_what_to_do():
    dp = private(mlp())
    with pytest.raises(TypeError, match=r"state_dict\(\)"):
        copy.deepcopy(dp)


def test_lbfgs_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="LBFGS"):
        private(model, torch.optim.LBFGS(model.parameters()))
    assert getattr(model, "_dpkernels_engine", None) is None


def test_accumulate_between_two_backwards_of_one_forward_is_refused():
    """Each sample would be clipped and summed twice (2 C per sample)."""
    model = mlp()
    dp = private(model)
    x, y = data()
    out = model(x)
    ce(out, y).backward(retain_graph=True)
    dp.accumulate()
    with pytest.raises(RuntimeError, match="already folded in"):
        out.square().mean().backward()


def test_input_gradient_before_backward_is_not_recorded():
    """torch.autograd.grad(loss, x) (saliency, FGSM) runs the layers' backward without
    parameter gradients: recording it made the engine apply the gradient of 2 * loss."""
    model = mlp()
    dp = private(model, max_grad_norm=0.3)
    x, y = data()
    grads = expected_grads(model, x, y, 0.3, 9)
    x.requires_grad_(True)
    loss = ce(model(x), y)
    torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


def test_two_forwards_before_one_backward_are_refused():
    """D(real) + D(fake) would pair real sample i with fake sample i as one sample."""
    model = mlp()
    private(model)
    x1, _ = data(4)
    x2, _ = data(4, seed=2)
    model(x1)
    with pytest.raises(RuntimeError, match="called twice .* multiple_forwards=True"):
        model(x2)
    with torch.no_grad():
        model(x2)  # evaluation forwards are fine


def test_multiple_forwards_of_the_same_samples_are_exact():
    """R-Drop / two views: row i of each call is sample i; its gradient is the sum."""
    model = mlp()
    ref = copy.deepcopy(model)
    dp = private(model, max_grad_norm=0.3, multiple_forwards=True)
    x, y = data()

    def loss2(m, xb, yb):
        return ce(m(xb), yb) + ce(m(0.5 * xb), yb)

    params = {k: v.detach() for k, v in ref.named_parameters()}

    def f(p, xb, yb):
        return loss2(lambda z: torch.func.functional_call(ref, p, (z,)), xb[None], yb[None])

    psg = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in psg.values()))
    c = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    loss2(model, x, y).backward()
    dp.step()
    for n, p in model.named_parameters():
        want = torch.tensordot(c, psg[n], dims=1) / 9
        assert rel_err(p.grad, want) <= RTOL_F64, n


def test_forward_replaced_on_the_instance_is_followed():
    """accelerate's add_hook_to_module and adapter tricks replace forward on the instance; the
    Linear rule would run F.linear and silently drop what the replacement does."""
    import types

    model = mlp()
    lin = model[2]
    lin.forward = types.MethodType(lambda self, x: F.linear(x, self.weight, self.bias) * 2.0,
                                   lin)
    x, y = data()
    with torch.no_grad():
        before = model(x)
    grads = expected_grads(model, x, y, 0.3, 9)
    dp = private(model, max_grad_norm=0.3)
    out = model(x)
    torch.testing.assert_close(out.detach(), before, rtol=0, atol=0)
    ce(out, y).backward()
    dp.step()
    for n, p in model.named_parameters():
        assert rel_err(-p.grad, -grads[n]) <= RTOL_F64, n


def test_unseeded_checkpoint_does_not_reveal_the_noise():
    """Noise is a pure function of (seed, step): a checkpoint holding an OS-drawn seed would
    let anyone with it and the starting weights subtract the noise, and resuming from an
    earlier checkpoint would reuse noise on other batches."""
    model = mlp()
    dp = private(model, seed=None, noise_multiplier=1.0)
    state = dp.state_dict()
    assert state["dp"]["seed"] is None
    twin = copy.deepcopy(model)
    dp2 = private(twin, seed=None, noise_multiplier=1.0)
    dp2.load_state_dict(state)
    x, y = data()
    for m, o in ((model, dp), (twin, dp2)):
        ce(m(x), y).backward()
        o.step()
    assert not torch.equal(model[0].weight.grad, twin[0].weight.grad)
    seeded = private(mlp(), seed=5)
    assert seeded.state_dict()["dp"]["seed"] == 5  # explicit seeds are kept (reproducibility)
