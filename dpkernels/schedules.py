"""Noise and clipping schedules: sigma and C that change between steps.

In the style of ``torch.optim.lr_scheduler``: a schedule takes the ``DPOptimizer``, remembers
the current value as its base, and each ``.step()`` (called after ``dp_opt.step()``) sets
the value for the next step::

    noise = dpkernels.schedules.ExponentialNoise(dp_opt, gamma=0.99)
    clip = dpkernels.schedules.StepClip(dp_opt, step_size=100, gamma=0.5)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        dp_opt.step(); dp_opt.zero_grad()
        noise.step(); clip.step()

Values go through ``DPOptimizer.noise_multiplier`` / ``max_grad_norm``, the one source of
truth: they are validated there, and refused in the middle of a logical batch (after
``accumulate()`` and before ``step()``), so every micro-batch of a step is clipped with the
same C and noised once with the same sigma.  The accountant composes the noise multiplier of
each step (``dp_opt.history``); C alone changes no privacy cost (the noise is ``sigma * C``
for sensitivity ``C``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "ExponentialNoise", "StepNoise", "LambdaNoise",
    "ExponentialClip", "StepClip", "LambdaClip",
]


class _Schedule:
    attr = ""  # the DPOptimizer property this schedule drives

    def __init__(self, optimizer) -> None:
        from dpkernels.optim import DPOptimizer

        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"{type(self).__name__} needs the DPOptimizer returned by "
                            f"dpkernels.make_private, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base = float(getattr(optimizer, self.attr))
        self.last_step = 0
        # dp_opt.state_dict() saves this schedule's position; load_state_dict restores it
        optimizer.schedules.append(self)

    def factor(self, step: int) -> float:
        """The value after ``step`` schedule steps, as a multiple of the base value."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and set the optimizer's value for its next step."""
        value = self.base * self.factor(self.last_step + 1)
        setattr(self.optimizer, self.attr, value)  # validated, refused mid logical batch
        self.last_step += 1

    def get_last_value(self) -> float:
        return float(getattr(self.optimizer, self.attr))

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("optimizer", "fn")}

    def check_state(self, state: dict) -> None:
        """Raise a ValueError unless ``state`` is a state_dict() of this kind of schedule."""
        name = type(self).__name__
        if not isinstance(state, dict) or set(state) != set(self.state_dict()):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"dpkernels: {name}.load_state_dict: expected the keys "
                             f"{sorted(self.state_dict())}, got {keys}")
        _positive(f"{name} base", state["base"])
        step = state["last_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"dpkernels: {name}.load_state_dict: last_step must be an "
                             f"integer >= 0, got {step!r}")
        if "gamma" in state:
            _positive(f"{name} gamma", state["gamma"])
        if "step_size" in state and (isinstance(state["step_size"], bool) or not
                                     isinstance(state["step_size"], int)
                                     or state["step_size"] < 1):
            raise ValueError(f"dpkernels: {name}.load_state_dict: step_size must be an "
                             f"integer >= 1, got {state['step_size']!r}")

    def load_state_dict(self, state: dict) -> None:
        """Restore the base value, the settings (gamma, step_size) and the position.  The
        DPOptimizer's own load_state_dict does this for every schedule made on it."""
        self.check_state(state)
        vars(self).update(state)


def _positive(name: str, value) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class _Exponential(_Schedule):
    def __init__(self, optimizer, gamma: float) -> None:
        self.gamma = _positive("gamma", gamma)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return self.gamma ** step


class _Step(_Schedule):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be an integer >= 1, got {step_size!r}")
        self.step_size = step_size
        self.gamma = _positive("gamma", gamma)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class _Lambda(_Schedule):
    def __init__(self, optimizer, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise TypeError(f"{type(self).__name__} needs a function of the step count, got "
                            f"{fn!r}")
        self.fn = fn
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return float(self.fn(step))


class ExponentialNoise(_Exponential):
    """``sigma_t = sigma_0 * gamma**t``."""

    attr = "noise_multiplier"


class StepNoise(_Step):
    """``sigma_t = sigma_0 * gamma**(t // step_size)``."""

    attr = "noise_multiplier"


class LambdaNoise(_Lambda):
    """``sigma_t = sigma_0 * fn(t)``."""

    attr = "noise_multiplier"


class ExponentialClip(_Exponential):
    """``C_t = C_0 * gamma**t``."""

    attr = "max_grad_norm"


class StepClip(_Step):
    """``C_t = C_0 * gamma**(t // step_size)``."""

    attr = "max_grad_norm"


class LambdaClip(_Lambda):
    """``C_t = C_0 * fn(t)``."""

    attr = "max_grad_norm"
