"""Resuming with the clipping modes (issue 10): per-layer bounds, adaptive clipping and the
noise/clip schedules' positions are in ``dp_opt.state_dict()``.  Train, save, load into an
optimizer built with other settings, train on: bit for bit the uninterrupted run; or the load
refuses, naming the setting, and changes nothing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkernels
from dpkernels.adaptive import AdaptiveClipping
from dpkernels.schedules import ExponentialNoise, LambdaClip, StepClip

SAVED = dict(noise_multiplier=0.8, expected_batch_size=9, loss_reduction="mean", seed=11)
OTHER = dict(noise_multiplier=3.0, expected_batch_size=40, loss_reduction="sum", seed=999)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    B = 5 + step  # batch sizes vary, as under Poisson sampling
    return (torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


# how each run is set up: (make_private keywords, schedules), for the saved and the other run
def per_layer(saved):
    bounds = [0.1, 0.2, 0.3, 0.4] if saved else [1.0, 2.0, 3.0, 4.0]
    return dict(clipping="per_layer", max_grad_norm=bounds), []


def adaptive(saved):
    ad = (AdaptiveClipping(target_quantile=0.3, learning_rate=0.5, count_noise_std=2.0)
          if saved else AdaptiveClipping(target_quantile=0.8, learning_rate=0.05,
                                         count_noise_std=5.0))
    return dict(max_grad_norm=0.3 if saved else 5.0, adaptive_clipping=ad), []


def schedules(saved):
    if saved:
        return dict(max_grad_norm=0.3), [(ExponentialNoise, dict(gamma=0.9)),
                                         (StepClip, dict(step_size=2, gamma=0.5))]
    return dict(max_grad_norm=5.0), [(ExponentialNoise, dict(gamma=0.5)),
                                     (StepClip, dict(step_size=1, gamma=0.9))]


def per_layer_with_schedules(saved):
    kw, _ = per_layer(saved)
    return kw, schedules(saved)[1]


def adaptive_with_noise_schedule(saved):
    kw, _ = adaptive(saved)
    return kw, schedules(saved)[1][:1]


SETUPS = [per_layer, adaptive, schedules, per_layer_with_schedules,
          adaptive_with_noise_schedule]


def build(model, setup, saved):
    kw, scheds = setup(saved)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dp = dpkernels.make_private(model, opt, backend="reference", **(SAVED if saved else OTHER),
                                **kw)
    return dp, [cls(dp, **a) for cls, a in scheds]


def train(model, dp, scheds, first, last):
    for step in range(first, last):
        x, y = data(step)
        dp.backward(F.cross_entropy(model(x), y))  # mean over the batch, as SAVED says
        dp.step()
        dp.zero_grad()
        for s in scheds:
            s.step()


def runs(setup, steps, saved_at):
    """An uninterrupted run of ``steps`` steps (model, optimizer, schedules), a run stopped
    after ``saved_at`` steps (its optimizer and schedules, its state_dict), and a fresh model
    holding that run's weights with an optimizer built with the other arguments."""
    straight = mlp()
    dp, scheds = build(straight, setup, True)
    train(straight, dp, scheds, 0, steps)
    first = mlp()
    dp1, scheds1 = build(first, setup, True)
    train(first, dp1, scheds1, 0, saved_at)
    state, weights = copy.deepcopy(dp1.state_dict()), copy.deepcopy(first.state_dict())
    resumed = mlp()
    resumed.load_state_dict(weights)
    dp2, scheds2 = build(resumed, setup, False)
    return (straight, dp, scheds), (dp1, scheds1, state), (resumed, dp2, scheds2)


@pytest.mark.parametrize("setup", SETUPS, ids=[s.__name__ for s in SETUPS])
def test_resume_equals_uninterrupted_run(setup):
    (straight, dp, scheds), (dp1, scheds1, state), (resumed, dp2, scheds2) = runs(setup, 6, 3)
    dp2.load_state_dict(state)
    assert dp2.max_grad_norm == dp1.max_grad_norm
    if dp1.engine.clipping == "per_layer":
        assert dp2.engine.group_bounds == dp1.engine.group_bounds
    if dp1.adaptive is not None:
        assert dp2.adaptive.state_dict() == dp1.adaptive.state_dict()
    for a, b in zip(scheds1, scheds2):
        assert a.state_dict() == b.state_dict()
    train(resumed, dp2, scheds2, 3, 6)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert dp2.max_grad_norm == dp.max_grad_norm and dp2.noise_multiplier == dp.noise_multiplier
    assert dp2.history == dp.history and dp2.steps == dp.steps == 6
    # the schedules really moved sigma and C, and adaptive clipping C: the test has power
    if scheds:
        assert len({h[0] for h in dp.history}) == 6
    if dp.adaptive is not None or scheds[1:]:
        assert dp.max_grad_norm != build(mlp(), setup, True)[0].max_grad_norm


def test_lambda_schedule_resumes_with_the_new_function():
    """A LambdaClip's function is not saved (as torch's LambdaLR); its base and position are."""
    def setup(saved):
        return dict(max_grad_norm=0.3 if saved else 2.0), [(LambdaClip, dict(fn=lambda t:
                                                                             1.0 / (1 + t)))]
    (straight, dp, _), (dp1, _, state), (resumed, dp2, scheds2) = runs(setup, 4, 2)
    dp2.load_state_dict(state)
    train(resumed, dp2, scheds2, 2, 4)
    assert dp2.max_grad_norm == dp.max_grad_norm == 0.3 / 5
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _saved_state(setup):
    model = mlp()
    dp, scheds = build(model, setup, True)
    train(model, dp, scheds, 0, 2)
    return copy.deepcopy(dp.state_dict())


def flat(saved):
    return dict(max_grad_norm=0.3 if saved else 5.0), []


def no_schedules(saved):
    return dict(max_grad_norm=0.3 if saved else 5.0), []


def one_schedule(saved):
    return dict(max_grad_norm=0.3 if saved else 5.0), schedules(saved)[1][:1]


def swapped_schedules(saved):
    return dict(max_grad_norm=0.3 if saved else 5.0), schedules(saved)[1][::-1]


def other_groups(saved):
    return dict(clipping="per_layer", max_grad_norm={"0": 1.0, "2": 2.0}), []


def _set(path, value):
    def edit(state):
        state["dp"][path] = value
    return edit


def _set_adaptive(key, value):
    def edit(state):
        state["dp"]["adaptive"][key] = value
    return edit


def _set_schedule(key, value):
    def edit(state):
        state["dp"]["schedules"][0]["state"][key] = value
    return edit


MISMATCHES = [  # (saved with, loaded into, checkpoint edit, message)
    (per_layer, flat, None, r"saved with clipping='per_layer' but this optimizer uses "
                            r"clipping='flat'"),
    (flat, per_layer, None, r"saved with clipping='flat' but this optimizer uses "
                            r"clipping='per_layer'"),
    (per_layer, other_groups, None, r"per-layer clipping groups differ: the checkpoint has "
                                    r"\['0.weight', '0.bias', '2.weight', '2.bias'\]"),
    (per_layer, per_layer, _set("group_bounds", [0.1, 0.2, 0.3]), "4 per-layer groups but 3"),
    (per_layer, per_layer, _set("group_bounds", [0.1, 0.2, 0.3, -1.0]),
     r"max_grad_norm\['2.bias'\] must be a finite number > 0"),
    (per_layer, per_layer, _set("group_bounds", [0.1, 0.2, 0.3, 0.5]),
     r"total sqrt\(sum C_k\^2\)"),
    (adaptive, flat, None, "saved with adaptive clipping and this optimizer is without it"),
    (flat, adaptive, None, "saved without adaptive clipping and this optimizer is with it"),
    (adaptive, adaptive, _set_adaptive("target_quantile", 1.5), "target_quantile"),
    (adaptive, adaptive, _set_adaptive("count_noise_std", 0.1),
     r"2 \* count_noise_std > noise_multiplier"),
    (schedules, no_schedules, None, r"saved with the schedules \['ExponentialNoise', "
                                    r"'StepClip'\] and this optimizer has \[\]"),
    (no_schedules, one_schedule, None, r"saved with the schedules \[\] and this optimizer "
                                       r"has \['ExponentialNoise'\]"),
    (schedules, swapped_schedules, None, "in the same order"),
    (schedules, schedules, _set_schedule("last_step", -1), "last_step must be an integer"),
    (schedules, schedules, _set_schedule("gamma", 0.0), "gamma must be a finite number > 0"),
]


@pytest.mark.parametrize("saved_with, loaded_into, edit, match", MISMATCHES,
                         ids=[f"{a.__name__}-into-{b.__name__}" + (f"-{i}" if e else "")
                              for i, (a, b, e, _) in enumerate(MISMATCHES)])
def test_mismatched_checkpoint_is_refused_and_changes_nothing(saved_with, loaded_into, edit,
                                                              match):
    state = _saved_state(saved_with)
    if edit is not None:
        edit(state)
    model = mlp()
    dp, scheds = build(model, loaded_into, False)
    before = (dp.max_grad_norm, dp.noise_multiplier, dp.steps, dp.loss_reduction,
              getattr(dp.engine, "group_bounds", None),
              None if dp.adaptive is None else dp.adaptive.state_dict(),
              [s.state_dict() for s in scheds])
    with pytest.raises(ValueError, match=match):
        dp.load_state_dict(state)
    after = (dp.max_grad_norm, dp.noise_multiplier, dp.steps, dp.loss_reduction,
             getattr(dp.engine, "group_bounds", None),
             None if dp.adaptive is None else dp.adaptive.state_dict(),
             [s.state_dict() for s in scheds])
    assert after == before
    assert dp.original_optimizer.state_dict()["state"] == {}


# ---------------------------------------------------------------- mid logical batch
def flat_low_memory(saved):
    return dict(max_grad_norm=0.3 if saved else 5.0, mode="low-memory"), []


MID_BATCH_SETUPS = [flat, flat_low_memory, per_layer, adaptive]


def _half_batch(model, dp, accumulate):
    """The first micro-batch of step 2's logical batch: a backward, folded in or not."""
    x, y = data(2)
    dp.backward(F.cross_entropy(model(x[:3]), y[:3]) * 3 / 9)  # mean over the 9 expected
    if accumulate:
        dp.accumulate()


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulated", "backward-only"])
@pytest.mark.parametrize("setup", MID_BATCH_SETUPS, ids=[s.__name__ for s in MID_BATCH_SETUPS])
def test_state_dict_in_the_middle_of_a_logical_batch_is_refused(setup, accumulate):
    """The pending clipped sums (and the adaptive count) are not in the state: a checkpoint
    taken now would resume on fewer samples, silently.  state_dict() refuses, changes
    nothing (the step that follows is bit for bit the step of a run that never asked), and
    works again after step() or discard()."""
    runs = []
    for ask in (True, False):
        model = mlp()
        dp, scheds = build(model, setup, True)
        train(model, dp, scheds, 0, 2)
        _half_batch(model, dp, accumulate)
        if ask:
            with pytest.raises(RuntimeError, match=r"state_dict\(\) was called while a logical "
                                                   r"batch is in progress \(pending: the "):
                dp.state_dict()
        dp.step()
        runs.append((model, dp))
    (asked, dp), (never, _) = runs
    for (name, a), b in zip(asked.named_parameters(), never.parameters()):
        assert torch.equal(a, b), name
    assert dp.state_dict()["dp"]["steps"] == 3  # right after step(): fine
    _half_batch(asked, dp, accumulate)
    dp.discard()
    assert dp.state_dict()["dp"]["steps"] == 3  # after discard(): fine


@pytest.mark.parametrize("setup", MID_BATCH_SETUPS, ids=[s.__name__ for s in MID_BATCH_SETUPS])
def test_load_state_dict_into_an_optimizer_mid_logical_batch(setup):
    """Loading into an optimizer that has a logical batch in progress is refused (its pending
    sums were clipped with its own settings) and changes nothing; after discard() the load
    resumes the saved run exactly."""
    (straight, dp, _), (dp1, scheds1, state), (resumed, dp2, scheds2) = runs(setup, 5, 3)
    _half_batch(resumed, dp2, accumulate=True)
    before = (dp2.max_grad_norm, dp2.noise_multiplier, dp2.steps, dp2.loss_reduction,
              dp2.expected_batch_size, getattr(dp2.engine, "group_bounds", None),
              None if dp2.adaptive is None else dp2.adaptive.state_dict())
    pending = {p: a.clone() for p, a in dp2.engine.acc.items()}
    with pytest.raises(RuntimeError, match=r"load_state_dict\) cannot change in the middle of "
                                           r"a logical batch .*dp_opt.discard\(\) first"):
        dp2.load_state_dict(state)
    after = (dp2.max_grad_norm, dp2.noise_multiplier, dp2.steps, dp2.loss_reduction,
             dp2.expected_batch_size, getattr(dp2.engine, "group_bounds", None),
             None if dp2.adaptive is None else dp2.adaptive.state_dict())
    assert after == before
    assert dp2.original_optimizer.state_dict()["state"] == {}
    assert pending and dp2.engine.acc.keys() == pending.keys()
    assert all(torch.equal(dp2.engine.acc[p], a) for p, a in pending.items())
    dp2.discard()
    dp2.load_state_dict(state)
    train(resumed, dp2, scheds2, 3, 5)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
