"""Poisson sampling: each logical batch includes every record independently with rate q."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields `steps` batches of indices (default: one epoch in expectation, round(1/q)).

    Empty batches are yielded as empty lists: skipping them silently would change the
    mechanism, so the caller decides (make_private releases a noise-only step).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        self.num_samples, self.sample_rate = num_samples, sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()
