"""The demo end to end with tiny settings, and the command line around it."""

import re
import sys

import pytest

pytest.importorskip("sklearn")

from dpkernels.__main__ import main  # noqa: E402


def test_demo_tiny(capsys):
    rc = main(["demo", "--epochs", "2", "--epsilon", "8", "--accountant", "rdp",
               "--timing-steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    acc = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    eps = float(re.search(r"epsilon = ([0-9.]+) at delta = 1e-05 \(rdp", out).group(1))
    ratio = float(re.search(r"ratio ([0-9.]+)x", out).group(1))
    assert 0.3 < acc <= 1.0  # 10 classes: chance is 0.1
    assert 7.9 < eps <= 8.0  # calibrated to the target
    assert ratio > 0
    assert "noise multiplier" in out and "Poisson" not in out


def test_demo_fixed_noise(capsys):
    main(["demo", "--epochs", "1", "--noise-multiplier", "0", "--timing-steps", "1",
          "--no-progress", "--max-physical-batch-size", "50"])
    assert "epsilon = inf" in capsys.readouterr().out


def test_demo_secure_mode(capsys, monkeypatch):
    """--secure-mode draws every step's noise from the CSPRNG (counted here) and trains."""
    pytest.importorskip("dpkernels._C", reason="C++ extension not built")
    from dpkernels import secure

    keys = []
    real = secure.StepNoise.__init__

    def counting(self, std):
        real(self, std)
        keys.append(self._key)

    monkeypatch.setattr(secure.StepNoise, "__init__", counting)
    main(["demo", "--epochs", "2", "--noise-multiplier", "1", "--timing-steps", "1",
          "--no-progress", "--secure-mode"])
    out = capsys.readouterr().out
    steps = int(re.search(r"([0-9]+) steps, max grad norm", out).group(1))
    assert len(keys) >= steps and len(set(keys)) == len(keys)  # + the timing steps
    assert 0.3 < float(re.search(r"test accuracy: ([0-9.]+)", out).group(1)) <= 1.0


def test_demo_without_sklearn(monkeypatch):
    from dpkernels import demo

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match="pip install"):
        demo.load_digits_split()


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
