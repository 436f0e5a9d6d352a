"""``dpkernels demo``: DP-SGD end to end on scikit-learn's bundled digits (offline).

An MLP on the 8x8 digits, Poisson sampling, sigma calibrated to a target epsilon (PLD), a
progress bar, then the test accuracy, the epsilon spent, and the time of one DP step
against one non-private step of the same model and batch, measured in this process.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import dispatch

DEFAULTS = dict(epsilon=3.0, delta=1e-5, epochs=40, batch_size=256, max_grad_norm=1.0,
                lr=1.0, hidden=128, max_physical_batch_size=128, seed=0, accountant="pld")


def _number(kind, low: float, inclusive: bool = True):
    """An argparse type: a finite ``kind`` >= ``low`` (> ``low`` unless ``inclusive``), so that
    a bad value is a usage error, not a traceback from deep inside training."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v >= low if inclusive else v > low)
        if not ok:
            finite = "" if kind is int else " and finite"
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low:g}{finite}, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _probability(text: str) -> float:
    v = _number(float, 0.0, inclusive=False)(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    count = _number(int, 1)
    positive = _number(float, 0.0, inclusive=False)
    p.add_argument("--epsilon", type=positive, default=d["epsilon"],
                   help="target epsilon; calibrates the noise multiplier (default %(default)s)")
    p.add_argument("--noise-multiplier", type=_number(float, 0.0), default=None,
                   help="use this noise multiplier instead of calibrating it to --epsilon")
    p.add_argument("--delta", type=_probability, default=d["delta"], help="default %(default)s")
    p.add_argument("--epochs", type=count, default=d["epochs"], help="default %(default)s")
    p.add_argument("--batch-size", type=count, default=d["batch_size"],
                   help="expected (logical) Poisson batch size (default %(default)s)")
    p.add_argument("--max-physical-batch-size", type=count,
                   default=d["max_physical_batch_size"],
                   help="micro-batch size limit; memory depends on it only "
                        "(default %(default)s)")
    p.add_argument("--max-grad-norm", type=positive, default=d["max_grad_norm"],
                   help="per-sample clipping norm C (default %(default)s)")
    p.add_argument("--lr", type=_number(float, 0.0), default=d["lr"], help="SGD learning rate "
                   "(default %(default)s)")
    p.add_argument("--hidden", type=count, default=d["hidden"], help="hidden width "
                   "(default %(default)s)")
    p.add_argument("--backend", default="auto", choices=list(dispatch.BACKENDS),
                   help="op backend (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--accountant", default=d["accountant"], choices=["pld", "rdp"],
                   help="default %(default)s")
    p.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    p.add_argument("--secure-mode", action="store_true",
                   help="noise from the ChaCha20 CSPRNG (secure_mode=True; needs the C++ "
                   "extension); --seed then seeds only the data order and the model")
    p.add_argument("--timing-steps", type=count, default=30,
                   help="steps timed for the DP / non-private comparison (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors for what the types alone cannot check: device and backend."""
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but no CUDA GPU is visible to torch")
    if args.backend == "triton" and device.type == "cpu" and "triton" not in sys.modules:
        # Triton runs on CPU tensors only in its interpreter, which must be switched on
        # before triton is first imported (creating a torch optimizer imports it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        dispatch.check_backend(args.backend, device.type)
    except RuntimeError as e:
        parser.error(f"argument --backend: {e}")


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test) as tensors: 80/20 split, pixels scaled by 1/16.

    The scaling is the data's known range, not a statistic of the private data."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "dpkernels demo needs scikit-learn for its bundled digits dataset:\n"
            "    pip install 'dpkernels[demo]'    (or: pip install scikit-learn)"
        ) from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple:
    """Median seconds of one training step (forward, backward, step), DP and non-private,
    on fresh copies of the same model and the same batch, interleaved."""
    import dpkernels

    torch.manual_seed(args.seed)
    plain = make_model(args.hidden).to(device)
    private = make_model(args.hidden).to(device)
    private.load_state_dict(plain.state_dict())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=args.lr)
    dp_opt = dpkernels.make_private(
        private, torch.optim.SGD(private.parameters(), lr=args.lr), noise_multiplier=1.0,
        max_grad_norm=args.max_grad_norm, expected_batch_size=len(x), backend=args.backend,
        **noise_args(args))

    def plain_step():
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    def dp_step():
        dp_opt.zero_grad()
        F.cross_entropy(private(x), y).backward()
        dp_opt.step()

    times = {plain_step: [], dp_step: []}
    for i in range(args.timing_steps + 5):
        for fn in (plain_step, dp_step):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i >= 5:  # warm-up
                times[fn].append(time.perf_counter() - t)
    dpkernels.detach(private)
    return statistics.median(times[dp_step]), statistics.median(times[plain_step])


def run(args) -> dict:
    from tqdm.auto import tqdm

    import dpkernels

    t_start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    n = len(x_tr)
    if not 0 < args.batch_size <= n:
        raise SystemExit(f"--batch-size must lie in [1, {n}]")
    q = args.batch_size / n
    steps_per_epoch = max(1, round(1 / q))
    total_steps = args.epochs * steps_per_epoch
    print(f"dpkernels {dpkernels.__version__} demo: digits, {n} train / {len(x_te)} test, "
          f"MLP 64-{args.hidden}-10, device {device}, backend {args.backend} "
          f"(runs {dispatch.pick(args.backend, device.type)})")

    if args.noise_multiplier is not None:
        sigma = args.noise_multiplier
    else:
        t = time.perf_counter()
        sigma = dpkernels.noise_multiplier_for(args.epsilon, args.delta, q, total_steps,
                                               accountant=args.accountant)
        print(f"noise multiplier {sigma:.4f} for epsilon {args.epsilon} at delta "
              f"{args.delta:g} ({args.accountant}, q={q:.4f}, {total_steps} steps; "
              f"calibrated in {time.perf_counter() - t:.1f} s)")

    model = make_model(args.hidden).to(device)
    dp_opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0),
        noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
        expected_batch_size=args.batch_size, backend=args.backend, **noise_args(args))
    dataset = torch.utils.data.TensorDataset(x_tr.to(device), y_tr.to(device))
    loader = dpkernels.poisson_loader(dataset, q, steps=steps_per_epoch, seed=args.seed,
                                      optimizer=dp_opt)

    bar = tqdm(total=total_steps, desc="DP-SGD", unit="step", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in dpkernels.micro_batches(loader, dp_opt, args.max_physical_batch_size,
                                              on_step=bar.update):
            F.cross_entropy(model(xb), yb).backward()
        bar.set_postfix(epoch=epoch + 1, acc=f"{accuracy(model, x_te, y_te, device):.3f}")
    bar.close()
    train_s = time.perf_counter() - t_train

    acc = accuracy(model, x_te, y_te, device)
    eps = dp_opt.epsilon(args.delta, accountant=args.accountant)
    dpkernels.detach(model)
    dp_s, plain_s = time_steps(args, x_tr[: args.batch_size].to(device),
                               y_tr[: args.batch_size].to(device), device)
    total_s = time.perf_counter() - t_start
    print(f"test accuracy: {acc:.4f} ({round(acc * len(x_te))}/{len(x_te)})")
    print(f"privacy: epsilon = {eps:.3f} at delta = {args.delta:g} ({args.accountant} "
          f"accountant), noise multiplier {sigma:.4f}, sample rate {q:.4f}, "
          f"{dp_opt.steps} steps, max grad norm {args.max_grad_norm:g}")
    print(f"step time ({device.type}, batch {args.batch_size}, median of {args.timing_steps}): "
          f"DP {dp_s * 1e3:.3f} ms, non-private {plain_s * 1e3:.3f} ms, "
          f"ratio {dp_s / plain_s:.2f}x")
    print(f"training {train_s:.1f} s, total {total_s:.1f} s")
    return dict(accuracy=acc, epsilon=eps, noise_multiplier=sigma, steps=dp_opt.steps,
                dp_step_s=dp_s, plain_step_s=plain_s, train_s=train_s, total_s=total_s)


def noise_args(args) -> dict:
    """secure_mode=True refuses a noise seed: the noise key comes from os.urandom."""
    if getattr(args, "secure_mode", False):
        return dict(secure_mode=True)
    return dict(seed=args.seed)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    model.eval()
    pred = model(x.to(device)).argmax(-1)
    model.train()
    return (pred == y.to(device)).float().mean().item()
