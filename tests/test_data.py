"""dpcompile.privacy.sampling: Poisson batch sampling and the Poisson DataLoader."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from dpcompile.privacy.sampling import PoissonBatchSampler, PoissonDataLoader, poisson_loader


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_inclusion_rate_matches_q():
    n, q, steps = 1000, 0.05, 400
    batches = list(PoissonBatchSampler(n, q, steps=steps, generator=seeded(0)))
    assert len(batches) == steps
    counts = torch.zeros(n)
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)
        counts[b] += 1
    # Total inclusions ~ Binomial(n * steps, q).
    z = (counts.sum().item() - n * steps * q) / math.sqrt(n * steps * q * (1 - q))
    assert abs(z) < 5, z
    # Each index on its own ~ Binomial(steps, q), independently: the sum of squared z-scores
    # is ~ chi2(n). Too large: some indices favoured; too small: a too-regular schedule.
    per_index_z = (counts.double() - steps * q) / math.sqrt(steps * q * (1 - q))
    chi2 = (per_index_z ** 2).sum().item()
    assert stats.chi2.sf(chi2, n) > 1e-6 and stats.chi2.cdf(chi2, n) > 1e-6, chi2
    # Batch sizes ~ Binomial(n, q): they vary, with the binomial mean and variance.
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 5
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert 0.65 < sizes.var().item() / (n * q * (1 - q)) < 1.35


def test_inclusions_are_independent_across_steps_and_indices():
    # Disjoint pairs (2i, 2i+1) of indices in one batch, and of batches (2t, 2t+1) for one
    # index: both included with probability q^2, independently across pairs.
    n, q, steps = 200, 0.3, 500
    masks = torch.zeros(steps, n, dtype=torch.bool)
    for t, b in enumerate(PoissonBatchSampler(n, q, steps=steps, generator=seeded(1))):
        masks[t, b] = True
    for both in (masks[:, 0::2] & masks[:, 1::2], masks[0::2] & masks[1::2]):
        trials = both.numel()
        z = (both.sum().item() - trials * q * q) / math.sqrt(trials * q * q * (1 - q * q))
        assert abs(z) < 5, z


def test_length_defaults_to_one_expected_epoch():
    assert len(PoissonBatchSampler(100, 0.1)) == 10
    assert len(PoissonBatchSampler(100, 0.3)) == 3
    assert len(PoissonBatchSampler(100, 1.0)) == 1
    assert len(PoissonBatchSampler(100, 0.001)) == 1000
    assert len(PoissonBatchSampler(100, 0.1, steps=7)) == 7
    assert list(PoissonBatchSampler(100, 0.1, steps=0)) == []


def test_full_rate_takes_everything():
    assert list(PoissonBatchSampler(5, 1.0, steps=3)) == [[0, 1, 2, 3, 4]] * 3


def test_empty_batches_are_yielded_as_empty_lists():
    batches = list(PoissonBatchSampler(10, 1e-9, steps=4, generator=seeded(0)))
    assert batches == [[], [], [], []]


def test_determinism_and_seeds():
    def draw(seed, steps=20):
        return list(PoissonBatchSampler(500, 0.02, steps=steps, generator=seeded(seed)))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    # A second pass continues the stream: a new epoch, equal to the next draws of a fresh sampler.
    sampler = PoissonBatchSampler(500, 0.02, steps=10, generator=seeded(0))
    first, second = list(sampler), list(sampler)
    assert first != second and first + second == draw(0, steps=20)
    # Without a generator, the global torch RNG is used (seedable as usual).
    torch.manual_seed(3)
    a = list(PoissonBatchSampler(500, 0.02, steps=5))
    torch.manual_seed(3)
    assert a == list(PoissonBatchSampler(500, 0.02, steps=5))


def test_rate_and_steps_may_change_between_passes():
    sampler = PoissonBatchSampler(50, 0.5, generator=seeded(0))
    sampler.sample_rate, sampler.steps = 1e-9, 3
    assert list(sampler) == [[], [], []]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0, sample_rate=0.1), "num_samples"),
    (dict(num_samples=2.5, sample_rate=0.1), "num_samples"),
    (dict(num_samples=10, sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
    (dict(num_samples=10, sample_rate=1.5), "sample_rate"),
    (dict(num_samples=10, sample_rate=float("nan")), "sample_rate"),
    (dict(num_samples=10, sample_rate=0.1, steps=-1), "steps"),
])
def test_sampler_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoissonBatchSampler(**kwargs)


# --- poisson_loader ------------------------------------------------------------------------
def tensor_loader(n: int = 100, batch_size: int = 10, **kwargs) -> DataLoader:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i is [i, i, i]
    y = torch.arange(n) % 7
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, **kwargs)


def test_loader_attributes_and_batches():
    loader = poisson_loader(tensor_loader(), generator=seeded(0))
    assert isinstance(loader, PoissonDataLoader)
    assert loader.sample_rate == pytest.approx(0.1)
    assert loader.expected_batch_size == pytest.approx(10.0)
    assert len(loader) == 10 and loader.skipped_empty_batches == 0
    sizes = []
    for x, y in loader:
        assert x.shape[1:] == (3,) and y.shape == x.shape[:1]
        rows = x[:, 0].long()
        assert torch.equal(x, rows.float().unsqueeze(1).repeat(1, 3))  # real dataset rows
        assert torch.equal(y, rows % 7)  # x and y stay aligned
        assert torch.all(rows[1:] > rows[:-1])  # distinct indices
        sizes.append(len(rows))
    assert len(sizes) + loader.skipped_empty_batches == len(loader)
    assert len(set(sizes)) > 1  # Poisson batch sizes vary


def test_loader_yields_the_samplers_batches():
    loader = poisson_loader(tensor_loader(), sample_rate=0.05, generator=seeded(5), steps=30)
    got = [x[:, 0].long().tolist() for x, _ in loader]
    expected = [b for b in PoissonBatchSampler(100, 0.05, steps=30, generator=seeded(5)) if b]
    assert got == expected


def test_default_rate_is_one_over_the_number_of_batches():
    loader = poisson_loader(tensor_loader(n=105, batch_size=10))  # 11 batches
    assert loader.sample_rate == pytest.approx(1 / 11) and len(loader) == 11
    assert loader.expected_batch_size == pytest.approx(105 / 11)


def test_empty_draws_are_skipped_and_counted():
    # 5 records at q = 0.05: a draw is empty with probability 0.95^5 ~ 0.77.
    loader = poisson_loader(tensor_loader(n=5, batch_size=1), sample_rate=0.05, generator=seeded(0))
    assert len(loader) == 20
    first = [x for x, _ in loader]
    assert all(len(x) > 0 for x in first)
    assert loader.skipped_empty_batches > 0
    assert len(first) + loader.skipped_empty_batches == 20
    second = [x for x, _ in loader]  # cumulative over passes
    assert len(first) + len(second) + loader.skipped_empty_batches == 40


def test_loader_keeps_collate_fn_workers_and_pinning():
    def collate(samples):
        return torch.stack([x for x, _ in samples]).sum(0)

    source = tensor_loader(collate_fn=collate, num_workers=1, pin_memory=False)
    loader = poisson_loader(source, sample_rate=0.3, generator=seeded(2), steps=8)
    assert loader.collate_fn is collate and loader.num_workers == 1 and loader.pin_memory is False
    out = list(loader)  # one worker process; the sampler (and the counter) stay in this one
    assert all(t.shape == (3,) for t in out)
    assert len(out) + loader.skipped_empty_batches == 8


def test_loader_from_an_unbatched_loader_still_collates():
    source = DataLoader(tensor_loader().dataset, batch_size=None)
    loader = poisson_loader(source, sample_rate=0.2, generator=seeded(0), steps=3)
    x, y = next(iter(loader))
    assert x.dim() == 2 and y.dim() == 1


def test_loader_rejects_what_it_cannot_sample():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(10)

    with pytest.raises(ValueError, match="map-style"):
        poisson_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_loader(tensor_loader(), sample_rate=0.0)
    with pytest.raises(ValueError, match="DataLoader"):
        poisson_loader([1, 2, 3])
