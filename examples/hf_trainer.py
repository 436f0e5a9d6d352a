"""Fine-tune a tiny GPT-2 with ``transformers.Trainer`` and DP-SGD (``dpkernels.hf.DPTrainer``).

Offline: the model is built from a config object (random init) and the data is synthetic (each
sequence counts up by a random step from a random start, mod the vocabulary), so the model has
something to learn.  Poisson batches, per-sample clipping and noise by dpkernels, Trainer's own
clipping off, epsilon at the end::

    python examples/hf_trainer.py                 # ~1 min on 2 CPU cores
    python examples/hf_trainer.py --epsilon 3 --epochs 5 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

import dpkernels
from dpkernels.hf import DPTrainer


def synthetic(n: int, vocab: int, length: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(length)) % vocab
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (calibrates sigma)")
    ap.add_argument("--noise-multiplier", type=float, default=None,
                    help="use this sigma instead of calibrating one to --epsilon")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=2048, help="training sequences")
    ap.add_argument("--n-test", type=int, default=256, help="test sequences")
    ap.add_argument("--batch-size", type=int, default=128, help="expected (logical) batch size")
    ap.add_argument("--physical", type=int, default=64, help="max physical batch size")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    vocab, length = 64, 32
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(a.seed)
    model = transformers.GPT2LMHeadModel(cfg)  # model(input_ids): [1, T] position ids, tied head
    train = synthetic(a.n, vocab, length, a.seed)
    test = synthetic(a.n_test, vocab, length, a.seed + 1)
    q = a.batch_size / len(train)

    if a.noise_multiplier is None:
        budget = dict(target_epsilon=a.epsilon, target_delta=a.delta, sample_rate=q,
                      epochs=a.epochs)
    else:
        budget = dict(noise_multiplier=a.noise_multiplier)
    dp_opt = dpkernels.make_private(
        model, torch.optim.AdamW(model.parameters(), lr=a.lr), **budget,
        max_grad_norm=a.max_grad_norm, expected_batch_size=q * len(train))
    if dp_opt.calibration is not None:
        print(dp_opt.calibration)

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            max_grad_norm=0.0,               # Trainer's clipping off: dpkernels clips per sample
            per_device_train_batch_size=a.physical,   # physical batches; logical ones are Poisson
            per_device_eval_batch_size=128,
            num_train_epochs=a.epochs, learning_rate=a.lr, lr_scheduler_type="constant",
            use_cpu=a.device == "cpu", logging_strategy="epoch", save_strategy="no",
            report_to=[], disable_tqdm=True, seed=a.seed)
        trainer = DPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                            dp_optimizer=dp_opt, sample_rate=q, delta=a.delta,
                            poisson_seed=a.seed)
        before = trainer.evaluate()["eval_loss"]
        t0 = time.perf_counter()
        result = trainer.train()
        took = time.perf_counter() - t0
        after = trainer.evaluate()["eval_loss"]
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    print(f"train loss per epoch: {losses}")
    print(f"test loss (per-sequence mean): {before:.3f} before, {after:.3f} after "
          f"(uniform guess: {torch.log(torch.tensor(float(vocab))).item():.3f})")
    print(f"DP-SGD: noise multiplier {dp_opt.noise_multiplier:.4f}, sample rate {q:.4f} "
          f"(Poisson), max_grad_norm {a.max_grad_norm}")
    print(f"epsilon = {result.metrics['epsilon']:.3f} at delta = {a.delta}, "
          f"{dp_opt.steps} steps, training {took:.1f} s")
    return result.metrics["epsilon"], before, after


if __name__ == "__main__":
    main()
