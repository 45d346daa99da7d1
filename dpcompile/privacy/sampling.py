"""Poisson sampling for DP-SGD.

The privacy analysis in `dpcompile.privacy.accounting` assumes that every step draws its batch by
*Poisson sampling*: each of the N records is included independently with probability q,
so batch sizes are random (Binomial(N, q), mean q * N) and may be zero. Fixed-size
shuffled batches do not give that guarantee.

* `PoissonBatchSampler` yields one logical batch of indices per step, empty ones included.
* `poisson_loader` turns an ordinary `DataLoader` into one that samples this way; as an
  empty batch cannot be collated, it skips empty draws and counts them in
  ``loader.skipped_empty_batches``.

Accounting: one pass over either object is ``len(...)`` steps of rate q, whatever number
of batches actually came out. Skipped empty draws are still steps for the accountant.

`PoissonAudit` checks the other way round that a stream of logical batch sizes is plausible
under Poisson sampling (for the plain ``torch.compile(..., backend="dp")`` API, where
dpcompile does not build the loader): a loader with a fixed batch size is refused.

`CyclicBatchSampler` is the other schema: fixed-order cyclic batches, for the BSR
correlated-noise mechanism (`dpcompile.privacy.bsr`), whose accounting needs each example to take
part at most once every b steps rather than Poisson sampling. `CyclicPoissonBatchSampler`
combines both for the amplified banded mechanism: b fixed groups, group t mod b Poisson-sampled.

Randomness comes from a `torch.Generator` (the global torch RNG if none is given), which is
a statistical, not a cryptographic, generator -- as in most DP-SGD implementations.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate, default_convert

from ..errors import DPCompileError

__all__ = ["PoissonBatchSampler", "PoissonDataLoader", "poisson_loader", "PoissonAudit", "CyclicBatchSampler",
           "CyclicPoissonBatchSampler"]


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


class PoissonAudit:
    """Refuses a stream of logical batch sizes that is implausible under Poisson sampling.

    With ``options={'sample_rate': q, 'expected_batch_size': E}`` the accountant assumes each
    step's batch is a Poisson sample of the N = E / q records, so its size is Binomial(N, q).
    A loader with a fixed batch size (shuffled or not) repeats one size (plus, without
    drop_last, one remainder size per epoch) and gives no amplification by sampling: its true
    ε can be ten times the reported one. Call ``observe(size)`` with the size of every
    logical batch (all micro-batches and ranks of a step together) before it is released;
    it raises DPCompileError once the sizes are implausible. Refusals are sticky.

    The test, and its false-refusal bound (under true Poisson sampling, over a whole run,
    however long: probability < ``alpha`` = 1e-6):

    * p* bounds the probability of any one size: the largest Binomial(N, q) probability,
      or of Binomial(N, q) conditioned on a non-empty batch (a loader that skips empty draws,
      like `poisson_loader`), whichever is larger (N = ⌊E/q⌋ and ⌈E/q⌉ when E/q is not an
      integer; a relative slack of 1e-4 covers the rounding of lgamma).
    * The sizes are cut into blocks of 8, 8, 16, 32, ... (block j ≥ 1 has 8·2^(j−1) sizes).
      For n independent sizes, each value of probability <= p*, the probability that some
      value occurs at least m times is at most C(n, m)·p*^(m−1) (union over the C(n, m)
      sets of m positions; for a set, Σ_v Π_i P(b_i = v) <= Σ_v P(b_1 = v)·p*^(m−1) = p*^(m−1)).
      Block j refuses when a size occurs m_j times in it, m_j the smallest m with
      C(n_j, m)·p*^(m−1) <= alpha·2^−(j+1); over all blocks that is < Σ_j alpha·2^−(j+1) = alpha.
      Counts are kept by a Misra-Gries summary of 8 counters, which never over-counts
      (so the bound still holds) and is exact for streams of at most 8 distinct sizes.
    * A size above ⌈E/q⌉ (more samples than records) is impossible and refused at once.

    So a fixed-size loader is refused within the first block of 8 when p* <= 0.127 (about
    E·(1−q) >= 10), and within a few blocks for smaller E. When constant sizes are plausible
    (q = 1: every record in every batch, which *is* Poisson sampling at q = 1; or E·(1−q) so
    small that p* is close to 1) m_j never exists for the early blocks and nothing is refused
    until the evidence is overwhelming. Blocks grow, so a loader switched late in a run of T
    steps is caught within about T more steps. The bound assumes E = q·N: with a wrong
    expected_batch_size the model of the sizes is wrong too.

    Only the sizes are seen, so the audit cannot tell a Poisson sampler from another random
    one with the same size distribution: it catches fixed batches, not every mistake.
    """

    FIRST_BLOCK = 8
    COUNTERS = 8
    _P_SLACK = 1e-4  # relative, on p*: lgamma rounding at large N

    def __init__(self, sample_rate: float, expected_batch_size: float, *, alpha: float = 1e-6) -> None:
        q = _check_sample_rate(sample_rate)
        E = expected_batch_size
        if isinstance(E, bool) or not isinstance(E, numbers.Real) or not 0 < E < math.inf:
            raise ValueError(f"expected_batch_size must be a positive finite number, got {E!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
            raise ValueError(f"alpha (the false-refusal probability) must be in (0, 1), got {alpha!r}")
        records = float(E) / q
        if records < 1 - 1e-9:
            raise ValueError(f"expected_batch_size={E} is below sample_rate={q}: E = q·N needs N >= 1 records")
        self.sample_rate, self.expected_batch_size, self.alpha = q, float(E), float(alpha)
        self.max_batch_size = math.ceil(records * (1 - 1e-9))  # N (⌈E/q⌉ if E/q is not an integer)
        self.max_probability = _largest_size_probability(q, records, self._P_SLACK)  # p*
        self.seen = 0  # sizes observed
        self.block = 0  # current block j
        self.block_seen = 0  # sizes observed in block j
        self.counts: dict[int, int] = {}  # Misra-Gries counters of block j
        self.failure: str | None = None  # the refusal, once made
        self._threshold: tuple[int, int | None] | None = None  # (j, m_j) cache

    # -- the test ------------------------------------------------------------------------
    def block_length(self, j: int) -> int:
        return self.FIRST_BLOCK if j == 0 else self.FIRST_BLOCK << (j - 1)

    def level(self, j: int) -> float:
        """alpha_j: the false-refusal probability spent on block j (Σ_j alpha_j = alpha)."""
        return self.alpha * 2.0 ** -(j + 1)

    def threshold(self, j: int) -> int | None:
        """m_j: the count of one size in block j that is refused (None: no count is implausible enough)."""
        if self._threshold is None or self._threshold[0] != j:
            self._threshold = (j, _repeat_threshold(self.block_length(j), self.max_probability, self.level(j)))
        return self._threshold[1]

    def observe(self, batch_size: int) -> None:
        """Record one logical batch size; raises DPCompileError if the sizes are not plausibly Poisson."""
        if self.failure is not None:
            raise DPCompileError(self.failure)
        b = operator.index(batch_size)
        if b < 0:
            raise ValueError(f"batch_size must be >= 0, got {b}")
        if b > self.max_batch_size:
            self._refuse(
                f"a logical batch of {b} samples is larger than the dataset, N = expected_batch_size / "
                f"sample_rate = {self.expected_batch_size:g} / {self.sample_rate:g} = {self.max_batch_size}: it "
                "cannot come from Poisson sampling of N records (check that expected_batch_size = sample_rate · N)")
        self.seen += 1
        self.block_seen += 1
        if b in self.counts:
            self.counts[b] += 1
        elif len(self.counts) < self.COUNTERS:
            self.counts[b] = 1
        else:  # Misra-Gries: b and one occurrence of each counted size cancel
            self.counts = {v: c - 1 for v, c in self.counts.items() if c > 1}
        m = self.threshold(self.block)
        count = self.counts.get(b, 0)
        if m is not None and count >= m:
            n = self.block_length(self.block)
            self._refuse(
                f"{count} of the last {self.block_seen} logical batches had exactly {b} samples, which under "
                f"Poisson sampling at sample_rate={self.sample_rate:g} (sizes Binomial(N={self.max_batch_size}, q), "
                f"expected {self.expected_batch_size:g}) has probability below "
                f"{math.exp(min(0.0, _log_repeat_bound(n, count, self.max_probability))):.1e}")
        if self.block_seen == self.block_length(self.block):
            self.block, self.block_seen, self.counts = self.block + 1, 0, {}

    def _refuse(self, why: str) -> None:
        self.failure = (
            f"dpcompile: the data loader does not look Poisson-sampled: {why}. The accountant's ε for "
            f"sample_rate={self.sample_rate:g} assumes each record joins each batch independently with probability "
            "q; a DataLoader with a fixed batch_size (shuffled or not) gives no amplification by sampling, so its "
            "true ε can be many times the reported one. This batch is refused. Fix: sample with "
            "dpcompile.privacy.sampling.poisson_loader(loader, sample_rate=q) (a PoissonDataLoader), or "
            "DataLoader(dataset, batch_sampler=dpcompile.privacy.sampling.PoissonBatchSampler(N, q)), or use "
            "dpcompile.make_private, which sets up Poisson sampling itself. (This check refuses a truly "
            f"Poisson-sampled run with probability below {self.alpha:g}.)")
        raise DPCompileError(self.failure)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "expected_batch_size": self.expected_batch_size,
                "alpha": self.alpha, "seen": self.seen, "block": self.block, "block_seen": self.block_seen,
                "counts": [[v, c] for v, c in sorted(self.counts.items())], "failure": self.failure}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("sample_rate", "expected_batch_size", "alpha", "seen", "block", "block_seen", "counts", "failure")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"PoissonAudit state must be a dict with keys {keys}, got {state!r}")
        saved = (state["sample_rate"], state["expected_batch_size"], state["alpha"])
        if saved != (self.sample_rate, self.expected_batch_size, self.alpha):
            raise DPCompileError(
                f"dpcompile: the Poisson audit state was saved for (sample_rate, expected_batch_size, alpha) = "
                f"{saved} but this run uses {(self.sample_rate, self.expected_batch_size, self.alpha)}; resume with "
                "the same options")
        counts = {int(v): int(c) for v, c in state["counts"]}
        block, block_seen = int(state["block"]), int(state["block_seen"])
        if (block < 0 or not 0 <= block_seen < self.block_length(block) or len(counts) > self.COUNTERS
                or any(c < 1 for c in counts.values()) or sum(counts.values()) > block_seen):
            raise ValueError(f"PoissonAudit state is inconsistent: {state!r}")
        self.seen, self.block, self.block_seen, self.counts = int(state["seen"]), block, block_seen, counts
        self.failure = None if state["failure"] is None else str(state["failure"])

    def __repr__(self) -> str:
        return (f"PoissonAudit(sample_rate={self.sample_rate!r}, expected_batch_size={self.expected_batch_size!r}, "
                f"seen={self.seen}, max_probability={self.max_probability:.3g})")


def _log_binomial_pmf(n: int, q: float, b: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(b + 1) - math.lgamma(n - b + 1)
            + b * math.log(q) + (n - b) * math.log1p(-q))


def _largest_size_probability(q: float, records: float, slack: float = 0.0) -> float:
    """p*: the largest probability of one batch size under Binomial(N, q), or under Binomial(N, q)
    conditioned on >= 1 (empty draws skipped), for N = ⌊records⌋ and ⌈records⌉; times (1 + slack)."""
    if q >= 1:
        return 1.0  # every record every step: one size, with probability 1
    tol = 1e-9 * records
    best = 0.0
    for n in {max(1, math.floor(records + tol)), max(1, math.ceil(records - tol))}:
        mode = min(n, math.floor((n + 1) * q))
        near = [b for b in (1, mode - 1, mode, mode + 1) if 0 <= b <= n]
        pmf = {b: math.exp(_log_binomial_pmf(n, q, b)) for b in near + [0]}
        nonempty = -math.expm1(n * math.log1p(-q))  # P(B >= 1)
        conditional = max(p for b, p in pmf.items() if b >= 1) / nonempty if nonempty > 0 else 1.0
        best = max(best, max(pmf.values()), conditional)
    return min(1.0, best * (1 + slack))


def _log_repeat_bound(n: int, m: int, p: float) -> float:
    """log of C(n, m)·p^(m−1): bounds P(some value occurs >= m times among n independent draws,
    each value having probability <= p)."""
    if p >= 1:
        return 0.0
    return math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1) + (m - 1) * math.log(p)


def _repeat_threshold(n: int, p: float, level: float) -> int | None:
    """The smallest m <= n with C(n, m)·p^(m−1) <= level, None if there is none.

    m -> log C(n, m) + (m−1) log p has decreasing increments (concave), and at m = 1 it is
    log n > log level, so the m that satisfy the inequality form a suffix of 1..n: bisect."""
    target = math.log(level)
    if p >= 1 or _log_repeat_bound(n, n, p) > target:
        return None
    lo, hi = 1, n  # bound(lo) > target >= bound(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _log_repeat_bound(n, mid, p) <= target:
            hi = mid
        else:
            lo = mid
    return hi


class CyclicBatchSampler(Sampler[list[int]]):
    """Fixed-order cyclic batches: the participation schema of BSR's accounting.

    The N indices are split once, by a data-independent random permutation, into
    ``num_batches`` = b batches of sizes ⌊N/b⌋ or ⌈N/b⌉; global step t always uses batch
    t mod b. So every example takes part at most once every b steps (b-min-separation)
    and in at most ⌈T/b⌉ of the first T steps, which is what `dpcompile.privacy.bsr.sensitivity`
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


class CyclicPoissonBatchSampler:
    """Cyclic Poisson participation: the schema of the amplified banded mechanism.

    The N indices are split once, by a random permutation drawn from ``seed``, into
    ``num_groups`` = b disjoint groups (sizes ⌊N/b⌋ or ⌈N/b⌉, the partition of
    `CyclicBatchSampler`); step t draws each index of group t mod b independently with
    probability ``sample_rate`` = q. The draw of step t is a pure function of (seed, t), so a
    run resumed at step t draws what an uninterrupted one would. The seed must stay secret
    (it is the privacy state's). An example takes part at most once every b steps, in at most
    ⌈T/b⌉ of the first T, each time with probability q: what `dpcompile.privacy.bsr.amplified_epsilon`
    assumes. Batches may be empty (probability (1 − q)^{N/b} a step).
    """

    def __init__(self, num_samples: int, num_groups: int, sample_rate: float, seed: int) -> None:
        self.sample_rate = _check_sample_rate(sample_rate)
        self.seed = int(seed)
        self.groups = CyclicBatchSampler(num_samples, num_groups, torch.Generator().manual_seed(self.seed)).batches
        self.num_groups = len(self.groups)

    def batch(self, step: int) -> list[int]:
        """The Poisson draw of step `step` from group step mod b (sorted indices)."""
        from .rng import stream_seed

        group = self.groups[step % self.num_groups]
        generator = torch.Generator().manual_seed(stream_seed(self.seed, step, "cyclic-poisson"))
        included = torch.rand(len(group), generator=generator) < self.sample_rate
        return [index for index, keep in zip(group, included.tolist()) if keep]
