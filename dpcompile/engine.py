"""`make_private`: Opacus-style set-up on top of the `dp` backend.

    model, optimizer, loader = dpcompile.make_private(
        module, optimizer, data_loader, target_epsilon=3.0, target_delta=1e-5, epochs=5,
        max_grad_norm=1.0, max_physical_batch_size=64)

- calibrates σ for (ε, δ) over the planned number of steps (dp-accounting, PLD);
- replaces the loader by Poisson sampling with rate q = batch_size / N (one logical
  batch per step, variable size, the batch dim marked dynamic: no recompile per size);
- splits logical batches larger than ``max_physical_batch_size`` into micro-batches whose
  clipped gradients accumulate, noise being added once, on the last micro-batch;
- releases a pure-noise step when a Poisson draw is empty (skipping it would reveal
  that the batch was empty, which the accounting does not cover).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .accounting import calibrate_noise_multiplier
from .backends.dp import register_state
from .data import PoissonBatchSampler
from .errors import DPCompileError


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                 max_grad_norm: float = 1.0, target_epsilon: float | None = None, target_delta: float = 1e-5,
                 epochs: float | None = None, noise_multiplier: float | None = None,
                 max_physical_batch_size: int | None = None, seed: int | None = None,
                 accountant: str = "pld", **options: Any):
    """Returns (compiled model, DPOptimizer, DPDataLoader). Extra keyword arguments are dp backend options."""
    n = len(data_loader.dataset)
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    if not batch_size:
        raise DPCompileError("dpcompile.make_private: the data loader needs a batch_size (the expected logical batch)")
    sample_rate = batch_size / n
    steps_per_epoch = max(1, round(1 / sample_rate))
    if (target_epsilon is None) == (noise_multiplier is None):
        raise DPCompileError("dpcompile.make_private: pass exactly one of target_epsilon or noise_multiplier")
    if target_epsilon is not None:
        if epochs is None:
            raise DPCompileError("dpcompile.make_private: target_epsilon needs epochs (to know the number of steps)")
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, sample_rate,
                                                      int(round(epochs * steps_per_epoch)), mechanism=accountant)
    backend_options = dict(options, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                           sample_rate=sample_rate, expected_batch_size=sample_rate * n, seed=seed,
                           accountant=accountant)
    state = register_state(backend_options, module)
    model = torch.compile(module, backend="dp", options=backend_options)
    dp_optimizer = DPOptimizer(optimizer, state, module)
    generator = torch.Generator()
    generator.manual_seed(state.seed)
    loader = DPDataLoader(data_loader, sample_rate, steps_per_epoch, max_physical_batch_size, state,
                          dp_optimizer, generator)
    return model, dp_optimizer, loader


class DPOptimizer:
    """Steps only at the end of a logical batch; zero_grad likewise (micro-batches accumulate)."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: Any, module: torch.nn.Module) -> None:
        self.optimizer, self.state, self.module = optimizer, state, module

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        if not self.state.last_backward_released:
            return None
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.state.last_backward_released:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def noise_only_step(self) -> None:
        """An empty Poisson draw: release σR·z / E[B] as the gradient, as the analysis assumes."""
        opts = self.state.options
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        gen = self.state.generator("empty-batch", params[0].device)
        std = opts.noise_multiplier * opts.max_grad_norm
        for p in params:
            p.grad = (std * torch.randn(p.shape, generator=gen, device=p.device) / opts.expected_batch_size).to(p.dtype)
        self.state.record_skipped()
        self.state.last_backward_released = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "privacy": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.state.load_state_dict(state["privacy"])


class DPDataLoader:
    """Poisson-sampled logical batches, split into physical micro-batches."""

    def __init__(self, loader: DataLoader, sample_rate: float, steps: int, max_physical: int | None,
                 state: Any, optimizer: DPOptimizer, generator: torch.Generator) -> None:
        self.dataset, self.collate_fn = loader.dataset, loader.collate_fn
        self.sample_rate, self.max_physical = sample_rate, max_physical
        self.expected_batch_size = sample_rate * len(loader.dataset)
        self.state, self.optimizer = state, optimizer
        self.sampler = PoissonBatchSampler(len(loader.dataset), sample_rate, steps=steps, generator=generator)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        for indices in self.sampler:
            if not indices:
                self.optimizer.noise_only_step()
                continue
            chunk = self.max_physical or len(indices)
            parts = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
            for k, part in enumerate(parts):
                self.state.release_next = k == len(parts) - 1
                batch = self.collate_fn([self.dataset[i] for i in part])
                yield _mark_batch_dynamic(batch)
        self.state.release_next = True


def _mark_batch_dynamic(batch: Any) -> Any:
    """Poisson batch sizes vary: compile the batch dim symbolically from the first step."""
    tensors = batch if isinstance(batch, (list, tuple)) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1:
            torch._dynamo.mark_dynamic(t, 0)
    return batch
