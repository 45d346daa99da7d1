"""Poisson sampling for DP-SGD.

The privacy analysis in `dpcompile.accounting` assumes that every step draws its batch by
*Poisson sampling*: each of the N records is included independently with probability q,
so batch sizes are random (Binomial(N, q), mean q * N) and may be zero. Fixed-size
shuffled batches do not give that guarantee.

* `PoissonBatchSampler` yields one logical batch of indices per step, empty ones included.
* `poisson_loader` turns an ordinary `DataLoader` into one that samples this way; as an
  empty batch cannot be collated, it skips empty draws and counts them in
  ``loader.skipped_empty_batches``.

Accounting: one pass over either object is ``len(...)`` steps of rate q, whatever number
of batches actually came out. Skipped empty draws are still steps for the accountant.

`CyclicBatchSampler` is the other schema: fixed-order cyclic batches, for the BSR
correlated-noise mechanism (`dpcompile.bsr`), whose accounting needs each example to take
part at most once every b steps rather than Poisson sampling.

Randomness comes from a `torch.Generator` (the global torch RNG if none is given), which is
a statistical, not a cryptographic, generator -- as in most DP-SGD implementations.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate, default_convert

__all__ = ["PoissonBatchSampler", "PoissonDataLoader", "poisson_loader", "CyclicBatchSampler"]


def _check_sample_rate(sample_rate: Any) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (Poisson inclusion probability q), got {sample_rate!r}")
    return float(sample_rate)


class PoissonBatchSampler(Sampler[list[int]]):
    """Each iteration yields one batch: every i in range(num_samples), independently with prob. q.

    Args:
        num_samples: dataset size N.
        sample_rate: inclusion probability q in (0, 1].
        steps: batches per pass (``len(self)``); default ``round(1 / q)``, one epoch in
            expectation.
        generator: source of randomness (the global torch RNG if None). Two samplers with
            equally seeded generators yield the same batches; iterating again continues
            the generator's stream (a new epoch, new batches).

    Empty batches are yielded as empty lists, not skipped: whether to release a
    noise-only step, skip it, or fail is the caller's decision (the accountant counts the
    step either way). Indices within a batch are sorted ascending.

    ``sample_rate`` and ``steps`` are read at the start of each pass, so they may be
    changed between passes.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer (the dataset size), got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.sample_rate = _check_sample_rate(sample_rate)
        if steps is None:
            steps = max(1, round(1 / self.sample_rate))
        elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0 or None, got {steps!r}")
        self.steps = int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        steps, q, n = self.steps, self.sample_rate, self.num_samples
        device = self.generator.device if self.generator is not None else "cpu"
        for _ in range(steps):
            included = torch.rand(n, generator=self.generator, device=device) < q
            yield included.nonzero().flatten().tolist()


class _SkipEmptyBatches(Sampler[list[int]]):
    """Passes the batches of a PoissonBatchSampler on, dropping (and counting) empty ones."""

    def __init__(self, sampler: PoissonBatchSampler) -> None:
        super().__init__()
        self.sampler = sampler
        self.skipped_empty_batches = 0

    def __len__(self) -> int:
        return len(self.sampler)  # Poisson draws (= accountant steps), an upper bound on batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            if batch:
                yield batch
            else:
                self.skipped_empty_batches += 1


class PoissonDataLoader(DataLoader):
    """A DataLoader over Poisson-sampled batches; build it with `poisson_loader`.

    Attributes:
        sample_rate: q.
        expected_batch_size: q * N.
        skipped_empty_batches: empty draws skipped so far (cumulative over passes). The
            batch sampler runs in the main process even with workers, but ahead of the
            consumer by the prefetch depth: the count is exact once a pass has finished.

    ``len(loader)`` is the number of Poisson draws per pass: the number of steps to give
    the accountant, even when some draws were empty and skipped.
    """

    sample_rate: float
    expected_batch_size: float

    @property
    def poisson_sampler(self) -> PoissonBatchSampler:
        return self.batch_sampler.sampler

    @property
    def skipped_empty_batches(self) -> int:
        return self.batch_sampler.skipped_empty_batches


def poisson_loader(data_loader: DataLoader, sample_rate: float | None = None,
                   generator: torch.Generator | None = None, *, steps: int | None = None) -> PoissonDataLoader:
    """A Poisson-sampling copy of `data_loader` (same dataset, collate_fn, workers, pinning).

    Args:
        data_loader: a loader over a map-style dataset (with ``__len__``).
        sample_rate: q; default ``1 / len(data_loader)`` (= batch_size / N when the batch
            size divides N), so the expected batch size and the number of steps per pass
            match the original loader.
        generator: randomness of the sampling (global torch RNG if None).
        steps: draws per pass, default ``round(1 / q)``.

    Empty draws are skipped, not yielded (an empty batch cannot be collated), and counted in
    ``skipped_empty_batches``. Note that skipping is itself observable (no update happens
    that step), which the accountant does not model; for a strict guarantee the training
    loop should release a noise-only update for each skipped draw, as
    `dpcompile.make_private` does. With q * N >= 10 an empty draw has probability
    (1 - q)^N < e^-10 per step anyway.
    """
    if not isinstance(data_loader, DataLoader):
        raise ValueError(f"poisson_loader needs a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("poisson_loader needs a map-style dataset with __len__ and __getitem__: Poisson "
                         "sampling draws each record independently by index")
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("poisson_loader: the dataset is empty")
    if sample_rate is None:
        batches = len(data_loader)
        if batches == 0:
            raise ValueError("poisson_loader: len(data_loader) is 0; pass sample_rate explicitly")
        sample_rate = 1.0 / batches
    sample_rate = _check_sample_rate(sample_rate)
    batch_sampler = _SkipEmptyBatches(PoissonBatchSampler(num_samples, sample_rate, steps, generator))
    collate_fn = data_loader.collate_fn
    if collate_fn is default_convert:  # the source loader did not batch (batch_size=None)
        collate_fn = default_collate
    num_workers = data_loader.num_workers
    loader = PoissonDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        generator=data_loader.generator,  # seeds the workers; the sampling uses `generator`
        prefetch_factor=data_loader.prefetch_factor if num_workers > 0 else None,
        persistent_workers=data_loader.persistent_workers,
        pin_memory_device=getattr(data_loader, "pin_memory_device", ""),
        in_order=getattr(data_loader, "in_order", True),
    )
    loader.sample_rate = sample_rate
    loader.expected_batch_size = sample_rate * num_samples
    return loader


class CyclicBatchSampler(Sampler[list[int]]):
    """Fixed-order cyclic batches: the participation schema of BSR's accounting.

    The N indices are split once, by a data-independent random permutation, into
    ``num_batches`` = b batches of sizes ⌊N/b⌋ or ⌈N/b⌉; global step t always uses batch
    t mod b. So every example takes part at most once every b steps (b-min-separation)
    and in at most ⌈T/b⌉ of the first T steps, which is what `dpcompile.bsr.sensitivity`
    assumes. Unlike Poisson sampling there is no amplification: the guarantee comes from
    the noise and the bounded number of participations only.

    ``batch(step)`` gives the batch of a global step (so a run resumed at step t goes on
    with the right batch); iterating yields one epoch, batches 0..b−1. Indices within a
    batch are sorted ascending.
    """

    def __init__(self, num_samples: int, num_batches: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        for name, value in (("num_samples", num_samples), ("num_batches", num_batches)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_batches > num_samples:
            raise ValueError(f"num_batches={num_batches} exceeds num_samples={num_samples}: some batch would be "
                             "empty; use at most one batch per sample")
        self.num_samples, self.num_batches = int(num_samples), int(num_batches)
        order = torch.randperm(self.num_samples, generator=generator)
        self.batches = [sorted(part.tolist()) for part in order.tensor_split(self.num_batches)]

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, step: int) -> list[int]:
        return self.batches[step % self.num_batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])
