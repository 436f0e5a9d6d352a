"""Noise and clipping schedules (issue 10, item 4): the noise drawn, the clipping and the
accountant's history follow the schedule step by step; a change of C alone costs nothing."""

import math

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.schedules import (
    ExponentialClip,
    ExponentialNoise,
    LambdaClip,
    LambdaNoise,
    StepClip,
    StepNoise,
)

Q, DELTA = 0.01, 1e-5
# noise-only steps on a 100 x 200 weight: the sample std of n = 20000 normal draws has
# relative standard error 1 / sqrt(2n) = 0.5%; 6 of them (3%) bound a false failure at ~1e-9
N_NOISE, STD_RTOL = 20000, 6 / math.sqrt(2 * 20000)


def private(sigma=1.0, C=1.0, **kw):
    torch.manual_seed(0)
    m = nn.Linear(200, 100, bias=False).double()
    dp = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                noise_multiplier=sigma, max_grad_norm=C,
                                loss_reduction="sum", seed=0, sample_rate=Q, **kw)
    return m, dp


def noise_step(m, dp):
    """One step on an all-zero input: every gradient is zero, ``p.grad`` is the noise."""
    m(torch.zeros(4, 200, dtype=torch.float64)).sum().backward()
    dp.step()
    std = m.weight.grad.std().item()
    dp.zero_grad()
    return std


@pytest.mark.parametrize("make, expect", [
    (lambda dp: ExponentialNoise(dp, gamma=0.8), lambda t: 2.0 * 0.8 ** t),
    (lambda dp: StepNoise(dp, step_size=2, gamma=0.5), lambda t: 2.0 * 0.5 ** (t // 2)),
    (lambda dp: LambdaNoise(dp, lambda t: 1.0 + t), lambda t: 2.0 * (1.0 + t)),
], ids=["exponential", "step", "lambda"])
def test_noise_schedule_draws_and_accounts_each_step(make, expect):
    m, dp = private(sigma=2.0, C=0.5)
    sched = make(dp)
    for t in range(5):
        assert dp.noise_multiplier == pytest.approx(expect(t), rel=1e-15)
        std = noise_step(m, dp)
        assert abs(std / (expect(t) * 0.5) - 1) < STD_RTOL
        sched.step()
    assert sched.last_step == 5
    sigmas = [h[0] for h in dp.history for _ in range(h[2])]
    assert sigmas == pytest.approx([expect(t) for t in range(5)], rel=1e-15)
    ref = dpkernels.epsilon_from_history([(expect(t), Q, 1) for t in range(5)], DELTA, "rdp")
    with pytest.warns(UserWarning, match="Poisson"):
        assert dp.epsilon(DELTA, accountant="rdp") == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("make, expect", [
    (lambda dp: ExponentialClip(dp, gamma=0.5), lambda t: 0.5 ** t),
    (lambda dp: StepClip(dp, step_size=2, gamma=0.1), lambda t: 0.1 ** (t // 2)),
    (lambda dp: LambdaClip(dp, lambda t: 1.0 / (1 + t)), lambda t: 1.0 / (1 + t)),
], ids=["exponential", "step", "lambda"])
def test_clip_schedule_clips_and_noises_at_the_new_bound_and_costs_nothing(make, expect):
    m, dp = private(sigma=0.0, C=1.0)
    sched = make(dp)
    x = torch.zeros(1, 200, dtype=torch.float64)
    x[0, 0] = 100.0  # one sample, gradient norm 100 * sqrt(100): always clipped
    for t in range(4):
        m(x).sum().backward()
        dp.step()
        # the clipped gradient has norm C_t (up to the 1e-6 in the clip factor's denominator)
        assert m.weight.grad.norm().item() == pytest.approx(expect(t), rel=1e-6)
        dp.zero_grad()
        sched.step()
    assert dp.history == [[0.0, Q, 4]]  # C is not in the accounting

    m, dp = private(sigma=1.5, C=1.0)
    sched = make(dp)
    for t in range(4):
        assert abs(noise_step(m, dp) / (1.5 * expect(t)) - 1) < STD_RTOL  # noise is sigma*C_t
        sched.step()
    assert dp.history == [[1.5, Q, 4]]


def test_schedule_refused_in_the_middle_of_a_logical_batch():
    m, dp = private()
    sched = ExponentialNoise(dp, gamma=0.5)
    m(torch.ones(2, 200, dtype=torch.float64)).sum().backward()
    dp.accumulate()
    with pytest.raises(RuntimeError, match="noise_multiplier cannot change in the middle"):
        sched.step()
    assert sched.last_step == 0 and dp.noise_multiplier == 1.0
    dp.step()
    sched.step()
    assert dp.noise_multiplier == 0.5


def test_bad_schedules_are_refused():
    _, dp = private()
    with pytest.raises(TypeError, match="needs the DPOptimizer"):
        ExponentialNoise(torch.optim.SGD([nn.Parameter(torch.ones(1))]), gamma=0.5)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ExponentialClip(dp, gamma=0.0)
    with pytest.raises(ValueError, match="step_size must be an integer >= 1"):
        StepNoise(dp, step_size=0)
    with pytest.raises(TypeError, match="function of the step count"):
        LambdaClip(dp, 3.0)
    sched = LambdaNoise(dp, lambda t: -1.0)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        sched.step()
    sched = LambdaClip(dp, lambda t: 0.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        sched.step()


def test_schedule_state_round_trip():
    _, dp = private(sigma=2.0)
    a = ExponentialNoise(dp, gamma=0.5)
    a.step()
    a.step()
    b = ExponentialNoise(dp, gamma=0.9)
    b.load_state_dict(a.state_dict())
    assert (b.base, b.gamma, b.last_step) == (2.0, 0.5, 2)
    b.step()
    assert dp.noise_multiplier == 2.0 * 0.5 ** 3
    lam = LambdaNoise(dp, lambda t: 1.0)
    assert "fn" not in lam.state_dict()
