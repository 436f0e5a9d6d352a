"""Poisson sampling, empty batches, micro-batches."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkernels
from dpkernels.data import PoissonBatchSampler, split_batch


def test_batch_sizes_are_binomial():
    n, q, steps = 500, 0.04, 4000
    sizes = np.array([len(b) for b in PoissonBatchSampler(n, q, steps=steps, seed=1)])
    mean, var = n * q, n * q * (1 - q)
    # sample mean: standard error sqrt(var/steps); 5 of them is a 1-in-3e6 false alarm
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    # sample variance: standard error ~ var * sqrt(2/(steps-1)) (near-normal counts)
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (steps - 1))


def test_every_example_appears_and_inclusion_is_uniform():
    n, q, steps = 50, 0.1, 3000
    counts = np.zeros(n)
    for b in PoissonBatchSampler(n, q, steps=steps, seed=2):
        assert len(set(b)) == len(b)
        counts[b] += 1
    assert (counts > 0).all()
    # each count ~ Binomial(steps, q)
    sd = math.sqrt(steps * q * (1 - q))
    assert np.abs(counts - steps * q).max() < 5 * sd


def test_seeded_epochs_and_distributed_split():
    s1 = PoissonBatchSampler(100, 0.2, steps=7, seed=3)
    s2 = PoissonBatchSampler(100, 0.2, steps=7, seed=3)
    e0 = list(s1)
    assert e0 == list(s2)
    assert list(s1) != e0  # the next epoch draws new batches
    s1.set_epoch(0)
    assert list(s1) == e0
    assert len(s1) == 7
    assert len(PoissonBatchSampler(100, 0.2)) == 5  # one epoch in expectation
    ranks = [list(PoissonBatchSampler(100, 0.2, steps=7, seed=3, rank=r, world_size=3))
             for r in range(3)]
    for step, logical in enumerate(e0):
        parts = [ranks[r][step] for r in range(3)]
        assert sorted(sum(parts, [])) == logical
        assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    with pytest.raises(ValueError, match="seed"):
        PoissonBatchSampler(100, 0.2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(100, 0.0)
    with pytest.raises(ValueError, match="rank"):
        PoissonBatchSampler(100, 0.1, seed=0, rank=2, world_size=2)


def _model_and_opt(reduction="mean"):
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = dpkernels.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                 noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=2, loss_reduction=reduction, seed=0)
    return m, opt


def test_empty_batch_collates_and_steps():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 5), torch.randint(0, 3, (20,)))
    # q tiny: nearly every batch is empty
    loader = dpkernels.poisson_loader(ds, 1e-4, steps=5, seed=0)
    batches = list(loader)
    assert all(x.shape == (0, 5) and y.shape == (0,) and y.dtype == torch.long
               for x, y in batches)
    for reduction in ("sum", "mean"):
        m, opt = _model_and_opt(reduction)
        before = [p.detach().clone() for p in m.parameters()]
        x, y = batches[0]
        # a full training step on the empty batch: forward, backward, noise-only update
        loss = F.cross_entropy(m(x), y, reduction=reduction)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert opt.steps == 1
        for p, b in zip(m.parameters(), before, strict=True):
            assert torch.isfinite(p).all() and not torch.equal(p, b)  # noise moved it


def test_micro_batches_match_one_big_batch():
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    loader = dpkernels.poisson_loader(ds, 0.5, steps=3, seed=4)
    m1, opt1 = _model_and_opt()
    m2, opt2 = _model_and_opt()
    m2.load_state_dict(m1.state_dict())
    for x, y in loader:  # whole logical batches
        F.cross_entropy(m1(x), y).backward()
        opt1.step()
        opt1.zero_grad()
    seen = []
    loader.batch_sampler.set_epoch(0)  # the same logical batches again
    for x, y in dpkernels.micro_batches(loader, opt2, max_physical_batch_size=5):
        assert len(x) <= 5
        seen.append(len(x))
        F.cross_entropy(m2(x), y).backward()
    assert opt2.steps == opt1.steps == 3 and sum(seen) > 0
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    # the sampler told the optimizer: epsilon needs no sample rate and does not warn
    assert opt2.sample_rate == 0.5 and opt2.poisson is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.epsilon(1e-5, accountant="rdp")


def test_micro_batches_step_on_empty_logical_batches():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 5), torch.randint(0, 3, (20,)))
    loader = dpkernels.poisson_loader(ds, 1e-4, steps=4, seed=0)
    m, opt = _model_and_opt()
    calls = []
    for _batch in dpkernels.micro_batches(loader, opt, 8, on_step=lambda: calls.append(1)):
        raise AssertionError("empty batches yield no micro-batch")
    assert opt.steps == 4 and len(calls) == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_shuffled_loader_is_reported():
    ds = torch.utils.data.TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    m, opt = _model_and_opt()
    for x, y in dpkernels.micro_batches(loader, opt, 4):
        F.cross_entropy(m(x), y).backward()
    assert opt.poisson is False and opt.sample_rate == 8 / 40
    assert "Poisson assumption" in opt.privacy_report(1e-5, accountant="rdp")
    with pytest.warns(UserWarning, match="Poisson"):
        opt.epsilon(1e-5, accountant="rdp")


def test_split_batch_structures():
    batch = {"x": torch.arange(10).reshape(5, 2), "y": (torch.arange(5), np.arange(5))}
    parts = split_batch(batch, 2)
    assert [len(p["x"]) for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["y"][0] for p in parts]), torch.arange(5))
    assert split_batch((torch.zeros(0, 3), torch.zeros(0)), 4) == []
    with pytest.raises(ValueError, match="max_physical_batch_size must be a positive integer"):
        split_batch(torch.zeros(3), 0)


def test_poisson_loader_rejects_batch_size():
    ds = torch.utils.data.TensorDataset(torch.randn(4, 2))
    with pytest.raises(TypeError, match="batch_size"):
        dpkernels.poisson_loader(ds, 0.5, batch_size=2)


def test_leaving_micro_batches_early_discards_the_partial_batch():
    from torch import nn

    import dpkernels as dk

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    dp = dk.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0,
                         max_grad_norm=1.0, expected_batch_size=8, seed=0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, dtype=torch.float64))
    loader = dk.poisson_loader(data, sample_rate=0.5, seed=1, optimizer=dp)
    for (x,) in dk.micro_batches(loader, dp, max_physical_batch_size=2):
        model(x).sum().backward()
        break  # mid logical batch: one micro-batch folded, one backward pending
    assert not dp.engine.acc and not dp.engine.uses
    dp.step()  # nothing stale: zero gradient (noise 0)
    assert all(p.grad.abs().max() == 0 for p in model.parameters())


def _epochs_of(loader, n):
    """The first ``n`` epochs a loader draws, as lists of batches of dataset indices."""
    return [list(loader.batch_sampler._batches(e)) for e in range(n)]


def _draw(loader):
    """One pass over the loader: the index batches it drew (and the epoch it took)."""
    seen = [list(b) for b in loader.batch_sampler]
    return loader.batch_sampler.epoch, seen


def test_seeded_loader_never_replays_an_epoch_for_the_same_optimizer():
    """Two Poisson loaders with the same explicit seed feeding one optimizer (a restarted
    training loop, a second train()) drew the very same batches: steps the accountant
    counts as independent Poisson samples then share their samples, and epsilon is too
    small.  The second loader must continue with the seed's next epoch; set_epoch() to an
    epoch already drawn must raise; a resumed optimizer keeps the record."""
    ds = torch.utils.data.TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    _, opt = _model_and_opt()
    first = dpkernels.poisson_loader(ds, 0.25, steps=3, seed=11, optimizer=opt)
    want = _epochs_of(first, 4)
    assert _draw(first) == (0, want[0])
    second = dpkernels.poisson_loader(ds, 0.25, steps=3, seed=11, optimizer=opt)
    assert _draw(second) == (1, want[1])  # not epoch 0 again
    assert _draw(first) == (2, want[2])
    assert opt.poisson_epochs == {11: {0, 1, 2}}
    first.batch_sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match=r"seed=11\): epoch 1 was already drawn .* next is 3"):
        iter(first.batch_sampler)
    # micro_batches attaches the loader too
    third = dpkernels.poisson_loader(ds, 0.25, steps=3, seed=11)
    third.batch_sampler.set_epoch(0)
    with pytest.raises(RuntimeError, match="epoch 0 was already drawn"):
        next(iter(dpkernels.micro_batches(third, opt, max_physical_batch_size=4)))
    # resumed from a checkpoint: the record comes along, the new loader continues after it
    _, resumed = _model_and_opt()
    resumed.load_state_dict(opt.state_dict())
    assert resumed.poisson_epochs == {11: {0, 1, 2}}
    again = dpkernels.poisson_loader(ds, 0.25, steps=3, seed=11, optimizer=resumed)
    assert _draw(again) == (3, want[3])
    # another seed, or another optimizer, starts at its own epoch 0
    other = dpkernels.poisson_loader(ds, 0.25, steps=3, seed=12, optimizer=opt)
    assert _draw(other)[0] == 0
    _, fresh = _model_and_opt()
    assert _draw(dpkernels.poisson_loader(ds, 0.25, steps=3, seed=11, optimizer=fresh)) == (
        0, want[0])


def test_os_seeded_loader_keeps_no_record():
    """seed=None draws fresh OS entropy per sampler (nothing to replay): the optimizer keeps
    no record, so no OS-drawn seed reaches a checkpoint (it would reveal the batches)."""
    ds = torch.utils.data.TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    _, opt = _model_and_opt()
    loader = dpkernels.poisson_loader(ds, 0.25, steps=2, optimizer=opt)
    list(loader.batch_sampler)
    assert opt.poisson_epochs == {} and opt.state_dict()["dp"]["poisson_epochs"] == {}
