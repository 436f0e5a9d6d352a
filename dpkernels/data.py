"""Poisson sampling, and large logical batches fed as small physical ones.

The accountant assumes every step's batch is a Poisson sample: each example joins it
independently with probability ``sample_rate``, so batch sizes vary (Binomial(N, q)) and a
batch can be empty.  :class:`PoissonBatchSampler` draws such batches, :func:`poisson_loader`
wraps it in a ``DataLoader`` whose collate also handles empty batches, and
:func:`micro_batches` splits each logical batch into pieces of at most
``max_physical_batch_size`` and drives ``DPOptimizer.accumulate()`` / ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of indices into ``range(num_samples)``; each index is in each
    batch independently with probability ``sample_rate``.

    ``steps`` defaults to ``round(1 / sample_rate)`` (one epoch in expectation).  Batches are
    a function of ``(seed, epoch, step)`` only: every iteration starts the next epoch (or the
    one given to :meth:`set_epoch`), and all ranks of a distributed run draw the same logical
    batch, of which rank ``r`` of ``world_size`` keeps every ``world_size``-th index from
    ``r`` (its share may be empty).

    With an explicit ``seed``, a sampler that feeds a ``DPOptimizer`` (:func:`use_loader`,
    ``poisson_loader(..., optimizer=)``, :func:`micro_batches`) never draws an epoch that
    optimizer has already drawn with that seed: a second loader, a second ``train()`` or a
    run resumed from ``state_dict()`` (which keeps the record) continues with the next epoch
    not drawn yet, and :meth:`set_epoch` to an epoch already drawn raises.  The same batches
    again would make steps the accountant counts as independent Poisson samples share their
    samples, and the reported epsilon would be too small.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        q = float(sample_rate)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if steps is None:
            steps = max(1, round(1.0 / q))
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.seed_given = seed is not None
        if seed is None:
            if world_size > 1:
                raise ValueError("a distributed PoissonBatchSampler needs the same explicit "
                                 "seed on every rank, so that the ranks share one batch")
            seed = int(np.random.SeedSequence().entropy) & (2**63 - 1)
        self.num_samples = num_samples
        self.sample_rate = q
        self.steps = steps
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._next_epoch = 0
        self._epoch_set = False  # set_epoch() named the next epoch
        # {seed: epochs drawn} of the DPOptimizer these batches feed (use_loader)
        self._drawn: dict[int, set[int]] | None = None

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * num_samples``: the logical batch size in expectation (all ranks)."""
        return self.sample_rate * self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)
        self._epoch_set = True

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        # the epoch is taken here, when iteration starts, not at the first batch
        epoch = self._next_epoch
        if self._drawn is not None:
            epoch = _claim_epoch(self._drawn, self.seed, epoch, self._epoch_set)
        self.epoch, self._next_epoch, self._epoch_set = epoch, epoch + 1, False
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        n = self.num_samples
        for _ in range(self.steps):
            # Independent inclusion of each index == a Binomial(n, q) size, then a uniform
            # subset of that size; this costs O(batch) per step instead of O(n).
            size = int(rng.binomial(n, self.sample_rate))
            batch = np.sort(rng.choice(n, size=size, replace=False))
            yield batch[self.rank::self.world_size].tolist()


def _claim_epoch(drawn: dict[int, set[int]], seed: int, epoch: int, named: bool) -> int:
    """The epoch to draw for ``seed`` given the optimizer's record ``drawn`` (updated): ``epoch``
    if not drawn yet, else the one after the last drawn (an error when ``set_epoch`` named
    it)."""
    used = drawn.setdefault(seed, set())
    if epoch in used:
        if named:
            raise RuntimeError(
                f"dpkernels: PoissonBatchSampler(seed={seed}): epoch {epoch} was already drawn "
                "for this DPOptimizer. Drawing the same Poisson batches again makes steps the "
                "accountant counts as independent share their samples, so the reported "
                f"epsilon would be too small. set_epoch() to an epoch not drawn yet (the next "
                f"is {max(used) + 1}), use another seed, or pass seed=None (fresh OS entropy).")
        epoch = max(used) + 1
    used.add(epoch)
    return epoch


def _empty_like(batch: Any) -> Any:
    """``batch`` with every tensor cut to zero rows along the first dimension."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, np.ndarray):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)((k, _empty_like(v)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


class _EmptySafeCollate:
    """Collates an empty batch as zero-row tensors shaped like one collated example."""

    def __init__(self, dataset: Dataset, collate_fn: Callable) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> Any:
        if samples:
            return self.collate_fn(samples)
        return _empty_like(self.collate_fn([self.dataset[0]]))


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    optimizer=None,
    collate_fn: Callable | None = None,
    **loader_kwargs,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` whose batches are Poisson samples (see
    :class:`PoissonBatchSampler`); empty batches come out as zero-row tensors.

    Pass the ``DPOptimizer`` as ``optimizer`` (or call :func:`use_loader` later) so that
    ``optimizer.epsilon(delta)`` knows the sample rate.  ``loader_kwargs`` go to
    ``DataLoader`` (``num_workers``, ``pin_memory``, ...); ``batch_size``, ``shuffle``,
    ``sampler`` and ``drop_last`` are not allowed: the sampler decides the batches.
    """
    bad = {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(loader_kwargs)
    if bad:
        raise TypeError(f"poisson_loader does not take {sorted(bad)}: the Poisson sampler "
                        "decides every batch (use sample_rate = expected batch / len(dataset))")
    sampler = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, seed=seed,
                                  rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler,
                        collate_fn=_EmptySafeCollate(dataset, collate_fn or default_collate),
                        **loader_kwargs)
    if optimizer is not None:
        use_loader(optimizer, loader)
    return loader


def use_loader(optimizer, loader: DataLoader) -> None:
    """Tell ``optimizer`` (a ``DPOptimizer``) how ``loader`` samples, for the accountant.

    A Poisson loader sets ``optimizer.sample_rate`` and ``optimizer.poisson = True``; any
    other loader sets ``poisson = False`` (its steps get a warning in the epsilon report) and
    the conventional ``batch_size / len(dataset)`` as the sample rate when it is known.
    """
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, PoissonBatchSampler):
        optimizer.sample_rate = sampler.sample_rate
        optimizer.poisson = True
        if sampler.seed_given:  # no epoch of this seed drawn twice for this optimizer
            sampler._drawn = optimizer.poisson_epochs
        return
    optimizer.poisson = False
    batch_size = getattr(loader, "batch_size", None)
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        n = None
    if batch_size and n:
        optimizer.sample_rate = min(1.0, batch_size / n)


def batch_size_of(batch: Any) -> int:
    """Number of examples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        values = list(batch.values())
    else:
        values = batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        n = batch_size_of(v)
        if n >= 0:
            return n
    return -1


def split_batch(batch: Any, max_size: int) -> list:
    """Cut a collated batch (tensors, or tuples / lists / dicts of them) along its first
    dimension into pieces of at most ``max_size`` examples; ``[]`` for an empty batch."""
    if not (isinstance(max_size, int) and max_size > 0):
        raise ValueError(f"max_physical_batch_size must be a positive integer, got {max_size!r}")
    n = batch_size_of(batch)
    if n < 0:
        raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")
    return [_slice(batch, i, min(i + max_size, n)) for i in range(0, n, max_size)]


def _slice(batch: Any, i: int, j: int) -> Any:
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[i:j]
    if isinstance(batch, dict):
        return type(batch)((k, _slice(v, i, j)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, i, j) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, i, j) for v in batch)
    return batch


def micro_batches(
    loader,
    optimizer,
    max_physical_batch_size: int,
    *,
    on_step: Callable[[], None] | None = None,
) -> Iterator:
    """Iterate over ``loader``'s logical batches as micro-batches of at most
    ``max_physical_batch_size`` examples, stepping ``optimizer`` for you::

        for x, y in micro_batches(loader, dp_opt, max_physical_batch_size=64):
            loss_fn(model(x), y).backward()     # no accumulate / step / zero_grad here

    After each micro-batch's backward the helper calls ``accumulate()``, and after the last
    one of a logical batch ``step()`` then ``zero_grad()`` (then ``on_step()`` if given).  An
    empty logical batch yields nothing and still gets its ``step()``: noise only, as the
    accountant assumes.  Memory depends on the micro-batch only.  Leaving the loop early
    drops the unfinished logical batch.  The optimizer learns the loader's sampling
    (:func:`use_loader`).
    """
    use_loader(optimizer, loader)
    for batch in loader:
        pieces = split_batch(batch, max_physical_batch_size)
        for i, piece in enumerate(pieces):
            try:
                yield piece
            except GeneratorExit:
                # the loop was left inside a logical batch: its partial sums must not leak
                # into the next step
                optimizer.discard()
                raise
            if i < len(pieces) - 1:
                optimizer.accumulate()
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step()
