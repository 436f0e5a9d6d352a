"""``dpkernels.hf.DPTrainer``: transformers.Trainer with DP-SGD on Poisson batches.

Tiny random-init GPT-2 (config object, no downloads).  The one-step test checks the update
Trainer applies against the float64 oracle on the Poisson batch the sampler drew (so the
sampling, the per-sample loss, the physical split, the step timing and the absence of a
second clipping are all checked at once); the others check each refusal."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from oracle import RTOL_F64, oracle, rel_err

import dpkernels

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("dpkernels.hf")

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

V, T, N = 40, 8, 24


def gpt2(dtype=torch.float64):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def dataset(n=N, seed=0):
    """Token sequences; every third one is padded (labels -100 on its last 3 positions), so a
    loss normalised by the batch's token count would differ from the per-sample one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, V, (T,), generator=g)
        labels = ids.clone()
        mask = torch.ones(T, dtype=torch.long)
        if i % 3 == 0:
            labels[-3:] = -100
            mask[-3:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_grad_norm=0.0, per_device_train_batch_size=4,
                num_train_epochs=1, learning_rate=1.0, lr_scheduler_type="constant",
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def per_sample_lm_loss(out, y):
    """The oracle's loss: batch mean of each sequence's mean over its label tokens."""
    return hf.causal_lm_per_sample_loss(out.logits, y).mean()


class _Forward(torch.nn.Module):
    """The oracle differentiates ``model(input_ids, attention_mask)`` per sample."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1])


def test_one_step_matches_the_oracle(tmp_path):
    """One DPTrainer step (SGD lr 1, no noise) moves every parameter by exactly minus the
    clipped sum / expected batch size of the per-sample gradients of each sequence's own loss,
    on the Poisson batch drawn by the sampler, split into physical batches of 4."""
    q, seed = 0.5, 3
    rows = dataset()
    batch = next(iter(dpkernels.PoissonBatchSampler(N, q, steps=1, seed=seed)))
    assert len(batch) > 4 and any(i % 3 == 0 for i in batch)  # split, and padded sequences
    model = gpt2()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.stack([torch.stack([rows[i]["input_ids"], rows[i]["attention_mask"]])
                     for i in batch])
    y = torch.stack([rows[i]["labels"] for i in batch])
    C, ebs = 0.5, q * N
    _, want, _ = oracle(_Forward(model), per_sample_lm_loss, x, y, C, ebs, "mean")

    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=ebs,
                                backend="reference", seed=0)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows,
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=1, poisson_seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        trainer.train()
    assert dp.steps == 1 and dp.poisson and dp.sample_rate == q
    for n, p in model.named_parameters():
        got = start[n] - p.detach()
        assert rel_err(got, want["model." + n]) < RTOL_F64, n


def test_training_reports_epsilon_and_learns(tmp_path):
    """A few epochs with noise: epsilon at the end is the accountant's for the steps taken
    (Poisson, q), empty Poisson batches step with noise only, and the loss goes down."""
    q, sigma, delta = 0.25, 0.8, 1e-5
    model = gpt2(torch.float32)
    rows = [r for r in dataset(n=32, seed=1)]
    for r in rows:  # a learnable task: every sequence is the same
        r["input_ids"] = torch.arange(1, T + 1)
        r["labels"] = torch.arange(1, T + 1)
        r["attention_mask"] = torch.ones(T, dtype=torch.long)
    dp = dpkernels.make_private(model, torch.optim.AdamW(model.parameters(), lr=3e-2),
                                noise_multiplier=sigma, max_grad_norm=1.0,
                                expected_batch_size=q * len(rows), seed=1)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, num_train_epochs=4,
                                                  learning_rate=3e-2, logging_strategy="epoch"),
                           train_dataset=rows, dp_optimizer=dp, sample_rate=q, delta=delta,
                           poisson_seed=0)
    out = trainer.train()
    steps = 4 * round(1 / q)
    assert dp.steps == steps == out.global_step
    assert out.metrics["epsilon"] == pytest.approx(dpkernels.epsilon(sigma, q, steps, delta))
    assert math.isfinite(out.metrics["epsilon"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_empty_poisson_batch_steps_with_noise_only(tmp_path):
    """q small enough that a batch is empty: the step still happens (noise only)."""
    q, seed = 0.05, 0
    sampler = dpkernels.PoissonBatchSampler(N, q, steps=6, seed=seed)
    assert any(len(b) == 0 for b in sampler)
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=q * N)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=6, poisson_seed=seed)
    trainer.train()
    assert dp.steps == 6


def test_training_logs_show_the_dp_view(tmp_path):
    """Every training log has the running RDP epsilon (non-decreasing, above the final PLD
    epsilon) and, asked for (they are not private), the clipped fraction and the median
    per-sample norm; no Trainer grad_norm (it read .grad before the DP step wrote it: 0)."""
    q, seed = 0.25, 1
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=0.05,
                                expected_batch_size=q * N)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, logging_strategy="steps",
                                                  logging_steps=1),
                           train_dataset=dataset(), dp_optimizer=dp, sample_rate=q,
                           steps_per_epoch=4, poisson_seed=seed, delta=1e-5,
                           log_clipping=True)
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert all("grad_norm" not in h for h in logs)
    eps = [h["epsilon_rdp"] for h in logs]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] >= out.metrics["epsilon"]
    # C = 0.05 clips nearly every sample of a random-init model
    assert all(0.0 <= h["dp_clipped_fraction"] <= 1.0 for h in logs)
    assert max(h["dp_clipped_fraction"] for h in logs) == 1.0
    assert all(h["dp_median_sample_norm"] > 0.05 for h in logs
               if h["dp_clipped_fraction"] == 1.0)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, float("nan"), True])
def test_bad_delta_refused_before_training(tmp_path, delta):
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="delta must lie in"):
        hf.DPTrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                     dp_optimizer=dp, sample_rate=4 / N, delta=delta)


def test_clipping_statistics_follow_the_factors_used(tmp_path):
    """Adaptive clipping changes C after each step: the logged fraction is of the factors the
    step used (below 1), not of the norms against the next step's C; an empty Poisson batch
    repeats nothing."""
    q, seed = 0.25, 1
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=q * N,
                                adaptive_clipping=dpkernels.AdaptiveClipping(
                                    target_quantile=0.5, learning_rate=0.5, count_noise_std=2.0))
    seen = []
    dp.engine.factor_hooks.append(lambda n, f: seen.append(float((f < 1).float().mean())))
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, logging_strategy="steps",
                                                  logging_steps=1,
                                                  per_device_train_batch_size=N),
                           train_dataset=dataset(), dp_optimizer=dp, sample_rate=q,
                           steps_per_epoch=4, poisson_seed=seed, log_clipping=True)
    trainer.train()  # one micro-batch per step: one factor vector each
    logged = [h["dp_clipped_fraction"] for h in trainer.state.log_history
              if "dp_clipped_fraction" in h]
    assert logged == seen


def test_clipping_statistics_are_not_logged_unless_asked(tmp_path):
    trainer = _make(tmp_path, logging_strategy="steps", logging_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(not any(k.startswith("dp_") or k == "grad_norm" for k in h)
                        for h in logs)


def _make(tmp_path, model=None, **kw):
    model = model or gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    extra = {k: kw.pop(k) for k in ("compute_loss_func", "optimizers") if k in kw}
    return hf.DPTrainer(model=model, args=args(tmp_path, **kw), train_dataset=dataset(),
                        dp_optimizer=dp, sample_rate=0.2, **extra)


@pytest.mark.parametrize("kw,match", [
    (dict(max_grad_norm=1.0), "max_grad_norm=0.0"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
    (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    (dict(compute_loss_func=lambda out, y, num_items_in_batch=None: out.logits.sum()),
     "num_items_in_batch"),
    (dict(optimizers=(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), None)),
     "dp_optimizer="),
], ids=["clip", "grad-accum", "label-smoothing", "compute-loss-func", "optimizers"])
def test_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _make(tmp_path, **kw)


def test_default_trainer_arguments_refused(tmp_path):
    """TrainingArguments' default max_grad_norm is 1.0: the user must turn it off."""
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="clip the noisy DP gradient a second time"):
        hf.DPTrainer(model=model, args=transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to=[]), train_dataset=dataset(),
            dp_optimizer=dp, sample_rate=0.2)


def test_resume_refused(tmp_path):
    with pytest.raises(ValueError, match="resuming"):
        _make(tmp_path).train(resume_from_checkpoint=True)


def test_example_script_runs(capsys):
    """examples/hf_trainer.py at toy size (fixed sigma: no calibration), in this process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    eps, before, after = example.main(["--n", "128", "--batch-size", "32", "--physical", "16",
                                       "--epochs", "1", "--noise-multiplier", "1.0",
                                       "--n-test", "16"])
    assert math.isfinite(eps) and eps > 0  # its value: test_training_reports_epsilon_...
    out = capsys.readouterr().out
    assert "epsilon =" in out and "4 steps" in out


def _spy_batches(trainer):
    """Record the dataset indices of every Poisson batch trainer.training_step gets (rows are
    told apart by their input ids)."""
    seen, orig = [], trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        rows = trainer.train_dataset
        seen.append([next(i for i, r in enumerate(rows) if torch.equal(r["input_ids"], x))
                     for x in ids])
        return orig(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    return seen


def test_interrupted_batch_leaves_nothing_for_the_next_step(tmp_path):
    """An error on the second physical batch of a Poisson batch (an out-of-memory error, which
    auto_find_batch_size retries the same way) leaves the first one's clipped sum in the
    accumulator.  The next train()'s step must be exactly the oracle's for its own batch: the
    aborted batch's samples would otherwise join a step the accountant counts as a fresh
    Poisson sample (and count twice where the batches overlap)."""
    q, C, rows = 0.5, 0.5, dataset()
    model = gpt2()
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=q * N,
                                backend="reference", seed=0)
    calls = []

    def fail_second_physical_batch(module, inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")

    hook = model.transformer.h[0].register_forward_pre_hook(fail_second_physical_batch)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows,
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=1, poisson_seed=3)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert dp.steps == 0 and dp.engine.acc  # the first physical batch was folded
    hook.remove()
    ref = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = _spy_batches(trainer)
    trainer.train()
    (batch,) = seen
    assert len(batch) > 4  # split into physical batches again
    x = torch.stack([torch.stack([rows[i]["input_ids"], rows[i]["attention_mask"]])
                     for i in batch])
    y = torch.stack([rows[i]["labels"] for i in batch])
    _, want, _ = oracle(_Forward(ref), per_sample_lm_loss, x, y, C, q * N, "mean")
    assert dp.steps == 1
    for n, p in model.named_parameters():
        assert rel_err(start[n] - p.detach(), want["model." + n]) < RTOL_F64, n


def test_fixed_poisson_seed_never_draws_the_same_batches_twice(tmp_path):
    """With poisson_seed fixed, a second train() and a second DPTrainer on the same optimizer
    continue with the seed's next epochs.  Drawing the first epoch again would replay the same
    Poisson samples: steps the accountant counts as independent would share their samples
    (at sigma 1, q 0.01, 2 x 100 such steps report epsilon 0.91 where the replayed pairs
    spend 2.29)."""
    q, rows = 0.3, dataset()
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=q * N)
    runs = []
    for _ in range(2):
        trainer = hf.DPTrainer(model=model, args=args(tmp_path), train_dataset=rows,
                               dp_optimizer=dp, sample_rate=q, steps_per_epoch=3,
                               poisson_seed=5)
        seen = _spy_batches(trainer)
        trainer.train()
        trainer.train()
        runs += [seen[:3], seen[3:]]
    assert dp.steps == 12
    expect = [list(dpkernels.PoissonBatchSampler(N, q, steps=3, seed=5)._batches(e))
              for e in range(4)]
    assert runs == expect  # epochs 0, 1, 2, 3 of the seed: four different draws


def test_expected_batch_size_must_match_the_sampler(tmp_path):
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=256)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                           dp_optimizer=dp, sample_rate=0.3)
    with pytest.raises(ValueError, match=r"expected_batch_size=256 .* = 7\.2"):
        trainer.train()
    assert dp.steps == 0


def test_iterable_dataset_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(dataset())

    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=2),
                           train_dataset=Stream(), dp_optimizer=dp, sample_rate=0.2)
    with pytest.raises(ValueError, match="map-style dataset"):
        trainer.train()


class MyGPT2(transformers.GPT2LMHeadModel):
    """A user's subclass of a causal LM: its logits still predict the next token."""


class Wrapper(torch.nn.Module):
    """A model of no known kind returning token logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


def test_default_loss_kind_from_the_class_hierarchy(tmp_path):
    """The default per-sample loss shifts the labels for a subclass of a causal LM (it did
    not: the model trained to copy the current token), and refuses token logits of a model
    it cannot classify instead of guessing."""
    model = gpt2()
    model.__class__ = MyGPT2
    ids = torch.randint(1, V, (3, T))
    trainer = _make(tmp_path, model=model)
    out = model(input_ids=ids)
    got = trainer._per_sample(out, ids)
    assert torch.equal(got, hf.causal_lm_per_sample_loss(out.logits, ids, shift=True))
    wrapped = _make(tmp_path, model=Wrapper(gpt2(torch.float32)))
    with pytest.raises(ValueError, match="cannot tell whether Wrapper's token logits"):
        wrapped._per_sample(wrapped.model(ids), ids)
    with pytest.raises(ValueError, match="no default per-sample loss"):  # one logit: MSE?
        wrapped._per_sample({"logits": torch.randn(3, 1)}, torch.zeros(3, dtype=torch.long))


def test_sequence_classification_step_matches_the_oracle(tmp_path):
    """BERT sequence classification (token type and position ids from buffers, pooler): one
    step is the float64 oracle's clipped sum of each sample's own cross-entropy (in float64:
    the default loss upcasts 16-bit logits only)."""
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double()
    rows = dataset()
    for i, r in enumerate(rows):
        r["labels"] = torch.tensor(i % 3)
    q, seed, C = 0.5, 3, 0.5
    batch = next(iter(dpkernels.PoissonBatchSampler(N, q, steps=1, seed=seed)))
    x = torch.stack([torch.stack([rows[i]["input_ids"], rows[i]["attention_mask"]])
                     for i in batch])
    y = torch.stack([rows[i]["labels"] for i in batch])
    _, want, _ = oracle(_Forward(copy.deepcopy(model)),
                        lambda out, t: torch.nn.functional.cross_entropy(out.logits, t),
                        x, y, C, q * N, "mean")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=q * N,
                                backend="reference", seed=0)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows,
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=1, poisson_seed=seed)
    trainer.train()
    for n, p in model.named_parameters():
        w = want["model." + n]
        if n.endswith("attention.self.key.bias"):
            # softmax is invariant to it: its true gradient is 0 up to rounding (norm ~1e-22),
            # where a relative error means nothing
            assert (start[n] - p.detach()).norm() < 1e-15
            continue
        assert rel_err(start[n] - p.detach(), w) < RTOL_F64, n


def test_warns_before_training_past_the_calibrated_steps(tmp_path):
    """make_private(target_epsilon=..., steps=4) then a Trainer run of 6 DP steps: the budget
    would be overspent; said before the first step (and again by the optimizer at step 5)."""
    q = 0.25
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                target_epsilon=8.0, target_delta=1e-5, sample_rate=q, steps=4,
                                max_grad_norm=1.0, expected_batch_size=q * N)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=dataset(),
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=3)
    with pytest.warns(UserWarning, match=r"runs 6 DP steps .* calibrated for 4") as rec:
        trainer.train()
    assert dp.steps == 6
    assert any("step 5 goes past the 4 steps" in str(w.message) for w in rec)
    # within the plan: silent
    model = gpt2(torch.float32)
    dp = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                target_epsilon=8.0, target_delta=1e-5, sample_rate=q, steps=6,
                                max_grad_norm=1.0, expected_batch_size=q * N)
    trainer = hf.DPTrainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=dataset(),
                           dp_optimizer=dp, sample_rate=q, steps_per_epoch=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dpkernels")
        trainer.train()
