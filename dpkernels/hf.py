"""Hugging Face ``transformers.Trainer`` with DP-SGD: :class:`DPTrainer`.

``Trainer`` does several things that are harmless for ordinary training and silently change
DP-SGD (a different algorithm, or a privacy claim that no longer holds).  ``DPTrainer`` takes
them over or refuses them, each with an error saying what to set:

- **sampling**: Trainer shuffles into fixed-size batches (``drop_last`` and all); the
  accountant assumes Poisson sampling.  ``DPTrainer`` builds its own training loader from
  :class:`dpkernels.PoissonBatchSampler` (``sample_rate``; one Poisson batch = one DP step;
  empty batches step with noise only) and tells the optimizer, so ``epsilon`` is right.
  With a fixed ``poisson_seed``, a second ``train()`` (or another ``DPTrainer`` on the same
  optimizer, or a restart by ``auto_find_batch_size``) continues with the seed's next epochs:
  drawing the same batches again would make steps the accountant counts as independent
  share their samples.  ``train_dataset`` must be map-style (a length and indexing), and the
  optimizer's ``expected_batch_size`` must be ``sample_rate * len(train_dataset)`` (within
  rounding to a whole sample) for ``loss_reduction="mean"``, or the update is scaled wrong:
  refused otherwise;
- **its own gradient clipping** (``TrainingArguments.max_grad_norm``, default 1.0) would clip
  the noisy gradient a second time: refused unless 0 (or None);
- **gradient accumulation** divides the loss by ``gradient_accumulation_steps`` and steps the
  optimizer every N batches without folding the micro-batches: refused unless 1.  Large
  logical batches are split by ``DPTrainer`` itself into physical batches of at most
  ``per_device_train_batch_size`` rows (``dp_opt.accumulate()`` between them, one step);
- **the loss**: HF models normalise their loss by the number of label tokens of the whole
  batch, and Trainer passes ``num_items_in_batch`` (the token count across micro-batches) to
  the model: both couple samples (one sample's presence rescales the others' gradients, so
  the sensitivity is no longer C).  ``DPTrainer`` never lets the model compute the loss: it
  computes each sample's own loss (causal LM: mean over the sample's label tokens after the
  shift; token classification, masked LM, seq2seq: the same without the shift; sequence
  classification: cross-entropy of its logits; or your ``per_sample_loss``), then the
  mean over the batch for ``loss_reduction="mean"`` (the sum for ``"sum"``).  The kind of model
  is read from its class and the classes it derives from; token logits of a model of no known
  kind (which could go either way) and single-logit "classification" are refused.
  ``compute_loss_func`` and ``label_smoothing_factor`` are refused (pass ``per_sample_loss``);
- **step timing**: with the above, Trainer calls ``optimizer.step()`` exactly once per Poisson
  batch, after its backward; ``DPTrainer`` calls ``dp_opt.discard()`` and
  ``dp_opt.zero_grad()`` before each batch (Trainer only calls ``model.zero_grad()``), so a
  batch interrupted by an error leaves nothing behind for the next step.  Its learning-rate
  scheduler only changes the learning rate, which is post-processing and costs no privacy;
- **fp16** (a ``GradScaler`` scales the loss, hence the norms), ``torch_compile``, several
  GPUs in one process (``DataParallel``) and distributed runs: refused.  bf16 autocast
  (``bf16=True``) works.

Resuming from a Trainer checkpoint is not supported yet (the Poisson loader's position and
the accountant's history are not restored together).

What ``epsilon`` covers: the model's parameters.  Trainer's logs are computed from the private
batches without noise and are not covered: the training ``loss`` (each Poisson batch's mean
sample loss), ``num_input_tokens_seen`` (``include_num_input_tokens_seen``: token counts of
the batches drawn) and evaluation metrics on training data.  Keep them private, or turn them
off (``logging_strategy="no"``, ``include_num_input_tokens_seen="no"``).

Example (``examples/hf_trainer.py`` runs it on a tiny random-init GPT-2)::

    dp_opt = dpkernels.make_private(model, torch.optim.AdamW(model.parameters(), lr=5e-4),
                                    noise_multiplier=1.0, max_grad_norm=1.0,
                                    expected_batch_size=q * len(train_set))
    args = TrainingArguments(output_dir=..., max_grad_norm=0.0, per_device_train_batch_size=16,
                             num_train_epochs=3, report_to=[])
    trainer = DPTrainer(model=model, args=args, train_dataset=train_set, dp_optimizer=dp_opt,
                        sample_rate=q, delta=1e-5)
    out = trainer.train()
    out.metrics["epsilon"]          # also dp_opt.epsilon(1e-5)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - the extra is documented
    raise ImportError(
        "dpkernels.hf needs the transformers package (pip install transformers)") from e

from dpkernels.data import PoissonBatchSampler, _EmptySafeCollate, split_batch, use_loader
from dpkernels.optim import DPOptimizer

__all__ = ["DPTrainer", "causal_lm_per_sample_loss"]

def _upcast(t: torch.Tensor) -> torch.Tensor:
    """16-bit logits to float32 for the loss; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor,
                              shift: bool = True) -> torch.Tensor:
    """[B] each sequence's mean token cross-entropy over its labels that are not -100 (after
    the causal shift: position t predicts label t+1); 0 for a sequence with no label."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(_upcast(logits.transpose(1, 2)), labels, ignore_index=-100,
                          reduction="none")  # [B, T]
    mask = labels.ne(-100)
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1)


class DPTrainer(Trainer):
    """``transformers.Trainer`` training with a :class:`dpkernels.DPOptimizer` on Poisson
    batches.  See the module docstring for everything it takes over or refuses.

    ``dp_optimizer``: from ``dpkernels.make_private(model, ...)`` on this ``model``.
    ``sample_rate``: Poisson sampling rate q (``expected_batch_size / len(train_dataset)``);
    ``steps_per_epoch`` (default ``round(1 / q)``: one epoch in expectation) and
    ``poisson_seed`` (default: from the OS) go to the sampler.  ``per_sample_loss(outputs,
    labels) -> [B]``: the loss of each sample (default: causal LM or classification, from the
    logits' shape).  ``delta``: if given, ``train()`` adds ``epsilon`` (PLD) at that delta
    to its metrics and logs, and every training log the running ``epsilon_rdp`` (see
    ``log``).  ``log_clipping``: also log the clipped fraction and the median per-sample
    norm (not private: see ``log``).  Every other argument is ``Trainer``'s, except
    ``optimizers``."""

    def __init__(self, *args, dp_optimizer: DPOptimizer, sample_rate: float,
                 steps_per_epoch: int | None = None, poisson_seed: int | None = None,
                 per_sample_loss: Callable | None = None, delta: float | None = None,
                 log_clipping: bool = False, **kwargs) -> None:
        if not isinstance(dp_optimizer, DPOptimizer):
            raise TypeError("dpkernels: DPTrainer needs dp_optimizer=dpkernels.make_private("
                            f"model, ...), got {type(dp_optimizer).__name__}")
        if "optimizers" in kwargs:
            opt, sched = kwargs.pop("optimizers")
            if opt is not None and opt is not dp_optimizer:
                raise ValueError("dpkernels: pass the DP optimizer as dp_optimizer=, not in "
                                 "optimizers=")
        else:
            sched = None
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "dpkernels: DPTrainer computes each sample's own loss; compute_loss_func gets "
                "num_items_in_batch (a token count across the batch), which couples samples. "
                "Pass per_sample_loss=fn(outputs, labels) -> [B] instead")
        super().__init__(*args, optimizers=(dp_optimizer, sched), **kwargs)
        self.dp_optimizer = dp_optimizer
        self.sample_rate = float(sample_rate)
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"dpkernels: sample_rate must lie in (0, 1], got {sample_rate}")
        self.steps_per_epoch = steps_per_epoch
        self.poisson_seed = poisson_seed
        self.per_sample_loss = per_sample_loss
        if delta is not None and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
            raise ValueError(f"dpkernels: delta must lie in (0, 1), got {delta!r}")
        self.delta = delta
        self.log_clipping = bool(log_clipping)
        self._logged_norms = None  # the per-sample norms the last log reported
        self._epsilon_failed = False
        self._check_args()
        mine = {id(p) for p in dp_optimizer.engine.params}
        if not any(id(p) in mine for p in self.model.parameters()):
            raise ValueError("dpkernels: dp_optimizer was made for another model than "
                             "DPTrainer's model")

    def _check_args(self) -> None:
        a = self.args
        if a.max_grad_norm not in (None, 0, 0.0):
            raise ValueError(
                f"dpkernels: TrainingArguments.max_grad_norm={a.max_grad_norm} would clip the "
                "noisy DP gradient a second time (post-processing, so still private, but no "
                "longer the DP-SGD update: it silently rescales signal and noise together). "
                "Set TrainingArguments(max_grad_norm=0.0); the per-sample clipping bound is "
                "make_private's max_grad_norm")
        if a.gradient_accumulation_steps != 1:
            raise ValueError(
                f"dpkernels: gradient_accumulation_steps={a.gradient_accumulation_steps}: "
                "Trainer would divide the loss by it and step every N batches without folding "
                "the micro-batches. Set it to 1: each Poisson batch is one DP step, and "
                "DPTrainer splits it into physical batches of at most "
                "per_device_train_batch_size rows itself")
        if a.fp16:
            raise ValueError("dpkernels: fp16 uses a GradScaler, whose loss scale would scale "
                             "the per-sample norms; use bf16=True")
        if a.label_smoothing_factor:
            raise ValueError("dpkernels: label_smoothing_factor is not supported by DPTrainer; "
                             "pass a per_sample_loss that smooths")
        if getattr(a, "torch_compile", False):
            raise ValueError("dpkernels: torch_compile is not supported with an attached model")
        if a.n_gpu > 1 or a.world_size > 1:
            raise ValueError(
                "dpkernels: DPTrainer runs on one device in one process (it would be wrapped in "
                "DataParallel or DDP, whose gradient all-reduce bypasses the clipping); use "
                "make_private(..., distributed=True) with your own loop for several GPUs")

    # --- data: Poisson batches ------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        collate = self.data_collator
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset,
                                                                                  "__len__"):
            raise ValueError(
                f"dpkernels: DPTrainer needs a train_dataset with a length and indexing (a "
                f"map-style dataset), got {type(dataset).__name__}: Poisson sampling draws each "
                "index with probability sample_rate, which a stream cannot do")
        if hasattr(dataset, "column_names") and hasattr(self, "_remove_unused_columns"):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        n = len(dataset)
        ebs = self.dp_optimizer.expected_batch_size
        # mean reduction divides the clipped, noised sum by expected_batch_size, which must be
        # the sampler's q * N (up to rounding it to a whole number of samples)
        if self.dp_optimizer.loss_reduction == "mean" and abs(ebs - self.sample_rate * n) >= 1:
            raise ValueError(
                f"dpkernels: the DP optimizer's expected_batch_size={ebs:g} is not the Poisson "
                f"batch DPTrainer samples: sample_rate={self.sample_rate:g} x "
                f"len(train_dataset)={n} = {self.sample_rate * n:g}. Every update would be "
                "scaled by the wrong batch size; make_private(..., expected_batch_size="
                "sample_rate * len(train_dataset)) or fix sample_rate")
        # use_loader below ties a seeded sampler to the optimizer's record of the epochs drawn:
        # a second train(), a restart by auto_find_batch_size or another DPTrainer on the same
        # optimizer continues with the seed's next epoch instead of replaying the batches
        sampler = PoissonBatchSampler(n, self.sample_rate, steps=self.steps_per_epoch,
                                      seed=self.poisson_seed)
        # not through accelerator.prepare: its loader wrappers may re-batch or shard
        loader = DataLoader(dataset, batch_sampler=sampler,
                            collate_fn=_EmptySafeCollate(dataset, collate),
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        use_loader(self.dp_optimizer, loader)
        self._warn_past_calibration(len(sampler))
        return loader

    def _warn_past_calibration(self, steps_per_epoch: int) -> None:
        """Say before training, not at the step that crosses it, when this run will take more
        DP steps than make_private(target_epsilon=...) calibrated the noise for (e.g.
        ``epochs`` there is ``ceil(epochs / q)`` steps, here ``epochs * round(1 / q)``)."""
        cal = self.dp_optimizer.calibration
        if cal is None:
            return
        args = self.args
        run = args.max_steps if args.max_steps > 0 else math.ceil(
            args.num_train_epochs * steps_per_epoch)
        total = self.dp_optimizer.steps + run
        if total > cal.steps:
            warnings.warn(
                f"dpkernels: this train() runs {run} DP steps ({self.dp_optimizer.steps} taken "
                f"before), {total} in all, but the noise multiplier was calibrated for "
                f"{cal.steps} (target_epsilon={cal.target_epsilon:g}): the privacy spent will "
                f"exceed the target. Calibrate with make_private(..., steps={total}) or set "
                "max_steps / steps_per_epoch to fit.", stacklevel=3)

    # --- one Poisson batch = one DP step -----------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one Poisson batch, split into physical batches of at most
        ``per_device_train_batch_size`` rows folded with ``accumulate()``; the last one is
        left pending for the ``optimizer.step()`` Trainer calls next.  ``num_items_in_batch``
        is ignored (each sample's loss is its own).  Returns the batch's mean sample loss."""
        model.train()
        dp = self.dp_optimizer
        # a logical batch interrupted by an exception (an out-of-memory error that
        # auto_find_batch_size retries, or a caught error and train() again) left its first
        # physical batches' clipped sums in the accumulator: they must not join this step
        dp.discard()
        dp.zero_grad()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("dpkernels: DPTrainer needs 'labels' in every batch (each "
                             "sample's loss is computed from them)")
        batch = {**inputs, "labels": labels}
        B = labels.shape[0]
        if B == 0:  # an empty Poisson batch: the step adds noise only
            return torch.zeros((), device=self.args.device)
        total = torch.zeros((), device=labels.device, dtype=torch.float32)
        # _train_batch_size: per_device_train_batch_size, or what auto_find_batch_size lowered
        # it to after an out-of-memory error
        pieces = split_batch(batch, max(1, int(self._train_batch_size)))
        for i, piece in enumerate(pieces):
            if i:
                dp.accumulate()
            y = piece.pop("labels")
            with self.compute_loss_context_manager():
                per = self._per_sample(model(**piece), y)
            if per.shape != (y.shape[0],):
                raise ValueError(f"dpkernels: per_sample_loss must return one loss per sample "
                                 f"([{y.shape[0]}]), got shape {tuple(per.shape)}")
            loss = per.sum() if dp.loss_reduction == "sum" else per.mean()
            dp.backward(loss)
            total += per.detach().float().sum()
        return total / B

    def _per_sample(self, outputs, labels) -> torch.Tensor:
        if self.per_sample_loss is not None:
            return self.per_sample_loss(outputs, labels)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits.dim() == 3 and labels.dim() == 2:
            return causal_lm_per_sample_loss(logits, labels, shift=self._shifts_labels())
        if (logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point()
                and logits.shape[1] > 1):
            return F.cross_entropy(_upcast(logits), labels, reduction="none")
        raise ValueError(
            f"dpkernels: no default per-sample loss for logits {tuple(logits.shape)} and "
            f"labels {tuple(labels.shape)}; pass DPTrainer(per_sample_loss=fn(outputs, labels) "
            "-> [B])")

    def _shifts_labels(self) -> bool:
        """Whether token logits predict the *next* label (causal LM: shift) or their own
        position's (token classification, masked LM, seq2seq decoders), from the model's class
        or any class it derives from; a model of neither kind is refused, since guessing
        wrong trains on the wrong targets without any error."""
        from transformers.models.auto import modeling_auto as auto

        m = self.accelerator.unwrap_model(self.model)
        base = getattr(getattr(m, "base_model", None), "model", None)  # PEFT
        classes = {c.__name__ for obj in (m, base) if obj is not None
                   for c in type(obj).__mro__}

        def kind(mapping: str) -> bool:
            return bool(classes & set(getattr(auto, mapping, {}).values()))

        if kind("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
            return True
        if any(kind(k) for k in ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                                 "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                                 "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                                 "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")):
            return False
        raise ValueError(
            f"dpkernels: DPTrainer cannot tell whether {type(m).__name__}'s token logits "
            "predict the next label (a causal LM: shift by one) or their own position's; pass "
            "per_sample_loss=lambda out, y: dpkernels.hf.causal_lm_per_sample_loss(out.logits, "
            "y, shift=True) (or shift=False)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation loss: the mean of the per-sample losses (the model's own loss would be
        normalised over the batch's tokens)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("dpkernels: DPTrainer computes losses from 'labels', which this "
                             "batch does not have")
        outputs = model(**inputs)
        loss = self._per_sample(outputs, labels).mean()
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        if kwargs.get("resume_from_checkpoint") or (args and args[0]):
            raise ValueError("dpkernels: resuming DPTrainer from a checkpoint is not supported "
                             "yet (the Poisson loader and the accountant's history are not "
                             "restored together)")
        out = super().train(*args, **kwargs)
        if self.delta is not None:
            eps = self.dp_optimizer.epsilon(self.delta)
            out.metrics["epsilon"] = eps
            out.metrics["delta"] = self.delta
            self.log({"epsilon": eps, "delta": self.delta, "dp_steps": self.dp_optimizer.steps})
        return out

    def create_optimizer(self, model=None):
        return self.optimizer  # the DP optimizer given

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer's pre-step grad_norm reads .grad before DPOptimizer.step() writes the clipped,
        # noised sum: it would log 0 (and touch every gradient); nothing is logged instead
        return None

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs get the DP view: with ``delta`` the running ``epsilon_rdp`` (the RDP
        accountant, fast and an upper bound; ``train()`` ends with the tighter PLD
        ``epsilon``), and with ``log_clipping=True`` ``dp_clipped_fraction`` and
        ``dp_median_sample_norm`` (the per-sample gradient norms before clipping, of the last
        micro-batch: statistics of private data without noise, NOT covered by epsilon, like
        the training loss; the fraction is of samples whose clip factor was below 1, and is
        not logged under per-layer clipping).  Trainer's ``grad_norm`` is dropped: it read
        ``.grad`` before the DP step wrote it."""
        if "loss" in logs:
            logs = dict(logs)
            logs.pop("grad_norm", None)
            if self.log_clipping:
                logs.update(self._clipping_stats())
            if self.delta is not None and self.dp_optimizer.steps and not self._epsilon_failed:
                try:
                    logs["epsilon_rdp"] = self.dp_optimizer.epsilon(self.delta, accountant="rdp")
                except ValueError as e:  # e.g. steps taken before DPTrainer at an unknown rate
                    self._epsilon_failed = True
                    warnings.warn(f"dpkernels: epsilon_rdp is not logged: {e}", stacklevel=2)
        super().log(logs, *args, **kwargs)

    def _clipping_stats(self) -> dict:
        """The clipped fraction (factor below 1, a dropped non-finite sample included: the
        factors the last micro-batch was clipped with, whatever C is now) and the median
        finite per-sample norm; nothing when no micro-batch was clipped since the last log
        (empty Poisson batches)."""
        engine = self.dp_optimizer.engine
        norms, factors = engine.last_norms, engine.last_factors
        if norms is None or norms is self._logged_norms or not norms.numel():
            return {}
        self._logged_norms = norms
        out = {"dp_median_sample_norm": float(norms.detach().float().nanmedian())}
        if factors is not None:  # per-layer clipping scales each group on its own
            out["dp_clipped_fraction"] = float((factors.detach() < 1.0).float().mean())
        return out

