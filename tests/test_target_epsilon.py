"""make_private(target_epsilon=...): the noise multiplier calibrated with the PLD accountant.

Issue 10, item 3.  The epsilon reached after the planned steps must lie within
``EPS_RTOL = 1e-3`` of the target, from below; bad argument combinations are refused.
"""

import logging
import warnings

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.calibration import EPS_RTOL, planned_steps

# q = 0.2 for 2 epochs (10 steps) at epsilon 2: sigma ~1.7, where each PLD evaluation is cheap
Q, DELTA = 0.2, 1e-5


def model():
    torch.manual_seed(0)
    return nn.Linear(4, 2).double()


def private(**kw):
    m = model()
    args = dict(max_grad_norm=1.0, expected_batch_size=8, seed=0)
    args.update(kw)
    return m, dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), **args)


def test_target_epsilon_is_met_from_below_and_reported(caplog):
    with caplog.at_level(logging.INFO, logger="dpkernels"):
        m, dp = private(target_epsilon=2.0, target_delta=DELTA, epochs=2, sample_rate=Q)
    cal = dp.calibration
    assert cal.steps == 10 and cal.sample_rate == Q and cal.accountant == "pld"
    assert dp.noise_multiplier == cal.noise_multiplier > 0
    eps = dpkernels.epsilon(dp.noise_multiplier, Q, 10, DELTA)
    assert (1 - EPS_RTOL) * 2.0 <= eps <= 2.0
    assert eps == cal.epsilon
    assert "noise multiplier" in caplog.text and "epsilon 2" in caplog.text
    # the optimizer's own report after the planned steps spends exactly that budget
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(10):
        m(x).sum().backward()
        dp.step()
        dp.zero_grad()
    with pytest.warns(UserWarning, match="Poisson"):  # no Poisson loader was attached
        assert dp.epsilon(DELTA) == pytest.approx(eps, rel=1e-12)
    # one step more than planned spends more than the target: said at that step, once
    m(x).sum().backward()
    with pytest.warns(UserWarning, match=r"step 11 goes past the 10 steps .*target_epsilon=2,"):
        dp.step()
    dp.zero_grad()
    m(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp.step()


def test_planned_steps_rounds_up():
    assert planned_steps(0.01, epochs=0.5) == 50
    assert planned_steps(0.03, epochs=1) == 34  # 33.3 steps: rounded up, never down
    assert planned_steps(0.5, steps=7.0) == 7


@pytest.mark.parametrize("kw, match", [
    (dict(noise_multiplier=1.0, target_epsilon=1.0, target_delta=DELTA, epochs=1,
          sample_rate=Q), "either noise_multiplier= or target_epsilon="),
    (dict(target_epsilon=1.0, epochs=1, sample_rate=Q), "needs target_delta="),
    (dict(target_epsilon=1.0, target_delta=DELTA, epochs=1), "needs sample_rate="),
    (dict(target_epsilon=1.0, target_delta=DELTA, sample_rate=Q), "exactly one of epochs="),
    (dict(target_epsilon=1.0, target_delta=DELTA, sample_rate=Q, epochs=1, steps=20),
     "exactly one of epochs="),
    (dict(target_epsilon=1.0, target_delta=DELTA, sample_rate=1.5, epochs=1),
     r"sample_rate must lie in \(0, 1\]"),
    (dict(target_epsilon=-1.0, target_delta=DELTA, sample_rate=Q, epochs=1),
     "target_epsilon must be"),
    (dict(target_epsilon=1.0, target_delta=DELTA, sample_rate=Q, steps=0), "steps must be"),
    (dict(noise_multiplier=1.0, epochs=3), "only apply with target_epsilon="),
    (dict(target_delta=DELTA), "only apply with target_epsilon="),
], ids=["both", "no-delta", "no-rate", "no-length", "epochs-and-steps", "bad-rate",
        "bad-target", "zero-steps", "epochs-alone", "delta-alone"])
def test_bad_arguments_are_refused_before_attaching(kw, match):
    m = model()
    with pytest.raises(ValueError, match=match):
        dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                               expected_batch_size=8, **kw)
    assert getattr(m, "_dpkernels_engine", None) is None  # nothing attached


def test_noise_multiplier_default_and_sample_rate_for_the_report():
    _, dp = private()
    assert dp.noise_multiplier == 1.0 and dp.calibration is None
    _, dp = private(noise_multiplier=0.7, sample_rate=Q)
    assert dp.sample_rate == Q
