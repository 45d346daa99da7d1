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

With ``noise_mechanism="bsr", bands=p`` it sets up BSR correlated noise instead: fixed-order
cyclic batches (b = ⌈N / batch_size⌉ per epoch), σ calibrated by the matrix-factorization
accounting of `dpcompile.privacy.bsr` (no amplification by sampling). ``noise_mechanism="amplified_bsr"``
(bands=p, groups=b ≥ p) sets up the amplified banded mechanism: b fixed groups, step t
Poisson-samples group t mod b, σ from the amplified accounting (`dpcompile.privacy.bsr.amplified_epsilon`).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .privacy.accounting import calibrate_noise_multiplier
from .compiler.backend import register_state
from .privacy.sampling import CyclicBatchSampler, CyclicPoissonBatchSampler, PoissonBatchSampler, PoissonDataLoader
from .distributed import (check_cyclic_batches, check_in_sync, local_share, make_private_group,
                          setup_make_private, synchronize_gradients)
from .errors import DPCompileError
from .privacy.rng import stream_seed
from .options import validate_make_private_args


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                 max_grad_norm: float = 1.0, target_epsilon: float | None = None, target_delta: float = 1e-5,
                 epochs: float | None = None, noise_multiplier: float | None = None,
                 max_physical_batch_size: int | None = None, insecure_seed: int | None = None,
                 accountant: str = "pld", noise_mechanism: str = "gaussian", bands: int | None = None,
                 groups: int | None = None, data_parallel: bool | None = None, **options: Any):
    """Returns (compiled model, DPOptimizer, DPDataLoader). Extra keyword arguments are dp backend options.

    noise_mechanism="bsr" (with bands=p) switches to BSR correlated noise over fixed-order
    cyclic batches instead of Poisson-sampled DP-SGD; noise_mechanism="amplified_bsr" (bands=p,
    groups=b, default b = p) the amplified banded mechanism over cyclic Poisson batches; see
    `_make_private_bsr`.

    data_parallel: None (default) trains data-parallel when a torch.distributed process group of
    several ranks is initialized (every rank calls make_private alike; see `dpcompile.distributed`):
    each rank clips its share of the global batch, rank 0 adds the noise, DPOptimizer.step sums
    the gradients. False: this rank trains on its own.
    """
    validate_make_private_args(max_physical_batch_size=max_physical_batch_size, target_epsilon=target_epsilon,
                               target_delta=target_delta, epochs=epochs, noise_multiplier=noise_multiplier,
                               insecure_seed=insecure_seed)
    group = make_private_group(module, data_parallel)
    if noise_mechanism != "gaussian" or bands is not None or groups is not None:
        return _make_private_bsr(module, optimizer, data_loader, noise_mechanism, bands, groups, max_grad_norm=max_grad_norm,
                                 target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
                                 noise_multiplier=noise_multiplier, max_physical_batch_size=max_physical_batch_size,
                                 insecure_seed=insecure_seed, accountant=accountant, options=options, group=group)
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
                           sample_rate=sample_rate, expected_batch_size=sample_rate * n, insecure_seed=insecure_seed,
                           accountant=accountant)
    state = register_state(backend_options, module)
    state.sampling_audit = None  # make_private draws the Poisson batches itself
    if group is not None:  # same seed (hence the same Poisson batches) and parameters on every rank
        setup_make_private(state, module, group)
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
        synchronize_gradients(self.state, self._params())  # data-parallel: sum over ranks (else no-op)
        return self.optimizer.step(closure)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.state.last_backward_released:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def noise_only_step(self) -> None:
        """An empty Poisson draw: release σR·z / E[B] as the gradient, as the analysis assumes."""
        release_pure_noise(self.state, self._params())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def empty_share_step(self) -> None:
        """Data-parallel: this rank drew no sample of a non-empty logical batch. It releases nothing of
        its own (rank 0, which holds the batch's first sample, adds the noise) but joins the step's
        gradient all-reduce with zeros and counts the step like every other rank."""
        for p in self._params():
            p.grad = torch.zeros_like(p)
        self.state.record_release()
        self.state.last_backward_released = True
        self.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "privacy": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.state.load_state_dict(state["privacy"])
        check_in_sync(self.state)  # data-parallel: every rank must have loaded the same state


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
        # Each pass draws from the secret seed and the step it starts at: a resumed run goes on with
        # fresh batches instead of replaying the ones it already used.
        self.sampler.generator.manual_seed(stream_seed(self.state.seed, self.state.steps, "poisson-batches"))
        for indices in self.sampler:
            self.state.discard_accumulation()  # a logical batch abandoned half-way is never released
            if not indices:
                self.optimizer.noise_only_step()  # identical on every rank: no communication
                continue
            indices = local_share(self.state, indices)  # data-parallel: every W-th sample (else all)
            if not indices:
                self.optimizer.empty_share_step()
                continue
            chunk = self.max_physical or len(indices)
            parts = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
            for k, part in enumerate(parts):
                self.state.release_next = k == len(parts) - 1
                batch = self.collate_fn([self.dataset[i] for i in part])
                yield _mark_batch_dynamic(batch)
        self.state.release_next = True


def release_pure_noise(state: Any, params: list[torch.Tensor]) -> None:
    """The release of an empty Poisson draw: each gradient is σR·z / E[B] (no sample, noise only), and
    the step is counted, as the accounting assumes (skipping it would reveal that the batch was empty)."""
    opts = state.options
    gen = state.generator("empty-batch", params[0].device)
    std = opts.noise_multiplier * opts.max_grad_norm
    for p in params:
        p.grad = (std * torch.randn(p.shape, generator=gen, device=p.device) / opts.expected_batch_size).to(p.dtype)
    state.record_skipped()
    state.last_backward_released = True


def _mark_batch_dynamic(batch: Any) -> Any:
    """Poisson batch sizes vary: compile the batch dim symbolically from the first step.

    maybe_mark_dynamic, not mark_dynamic: a model whose code specializes the batch size
    (shape checks in Hugging Face layers) then gets a static graph instead of an error.
    """
    tensors = batch if isinstance(batch, (list, tuple)) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    return batch


# ----------------------------------------------------------------------------- BSR front end

def _make_private_bsr(module: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                      noise_mechanism: str, bands: int | None, groups: int | None, *, max_grad_norm: float,
                      target_epsilon: float | None, target_delta: float, epochs: float | None,
                      noise_multiplier: float | None, max_physical_batch_size: int | None, insecure_seed: int | None,
                      accountant: str, options: dict[str, Any], group: Any = None):
    """BSR over b = ⌈N / batch_size⌉ fixed cyclic batches; σ = μ(ε, δ)·sens(C) over epochs·b steps.

    The workload's momentum β and decay λ default to those of a torch.optim.SGD optimizer
    (β = momentum, λ = lr·weight_decay): they only shape the factorization, never the privacy.

    "amplified_bsr": b = `groups` (default: the number of bands) fixed groups, step t samples group
    t mod b with Poisson rate q = batch_size·b/N (expected batch: batch_size), σ calibrated by the
    amplified accounting over epochs·N/batch_size steps.
    """
    from .privacy import bsr

    validate_make_private_args(max_physical_batch_size=max_physical_batch_size, target_epsilon=target_epsilon,
                               target_delta=target_delta, epochs=epochs, noise_multiplier=noise_multiplier,
                               insecure_seed=insecure_seed)

    def refuse(message: str) -> None:
        raise DPCompileError(f"dpcompile.make_private(noise_mechanism={noise_mechanism!r}): {message}")

    if noise_mechanism == "gaussian":
        raise DPCompileError("dpcompile.make_private: bands and groups only apply with noise_mechanism='bsr' or "
                             "'amplified_bsr'")
    if noise_mechanism not in ("bsr", "amplified_bsr"):
        raise DPCompileError(f"dpcompile.make_private: noise_mechanism must be 'gaussian', 'bsr' or "
                             f"'amplified_bsr', got {noise_mechanism!r}")
    amplified = noise_mechanism == "amplified_bsr"
    if groups is not None and not amplified:
        refuse("groups only applies with noise_mechanism='amplified_bsr' (BSR's cyclic batches are set by "
               "batch_size)")
    if isinstance(data_loader, PoissonDataLoader):
        refuse("the data loader samples Poisson batches itself; BSR's accounting needs dpcompile's own batches "
               "(fixed-order cyclic, or cyclic Poisson groups for 'amplified_bsr'). Pass an ordinary DataLoader "
               "with batch_size.")
    fixed = sorted({"sample_rate", "expected_batch_size", "bsr_min_separation", "bsr_max_participations",
                    "bsr_bands", "bsr_sample_rate"} & set(options))
    if fixed:
        refuse(f"{fixed} are set from the data loader and `bands`; do not pass them")
    if (bands is None) == (options.get("bsr_coefficients") is None):
        refuse("pass exactly one of bands=p (closed-form banded square root; p ≈ batches per epoch is a good "
               "start) or bsr_coefficients=[c_0, ..., c_(p-1)]")
    n = len(data_loader.dataset)
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    if not batch_size:
        refuse("the data loader needs a batch_size (the logical batch of the cyclic schema)")
    momentum, weight_decay = _sgd_workload(optimizer)
    momentum = options.pop("bsr_momentum", momentum)
    weight_decay = options.pop("bsr_weight_decay", weight_decay)
    coefficients = options.get("bsr_coefficients") or bsr.bsr_coefficients(bands, momentum, weight_decay)
    if amplified:
        if group is not None:
            refuse("data-parallel training is not supported for the amplified banded mechanism yet (an empty "
                   "share of a rank is not handled); train on one rank or use noise_mechanism='bsr'")
        num_batches, sample_rate, steps_per_epoch = _cyclic_poisson_schema(n, batch_size, groups, coefficients,
                                                                           refuse)
        expected_batch_size = float(batch_size)  # q·N/b
    else:
        num_batches = steps_per_epoch = min(n, -(-n // batch_size))
        sample_rate, expected_batch_size = None, n / num_batches
    if (target_epsilon is None) == (noise_multiplier is None):
        refuse("pass exactly one of target_epsilon or noise_multiplier")
    if target_epsilon is not None:
        if epochs is None:
            refuse("target_epsilon needs epochs (to know the number of steps and participations)")
        steps = max(1, int(round(epochs * steps_per_epoch)))
        if amplified:
            noise_multiplier = bsr.calibrate_amplified_noise_multiplier(
                target_epsilon, target_delta, coefficients, steps, num_batches, sample_rate, mechanism=accountant)
        else:
            noise_multiplier = bsr.calibrate_noise_multiplier(target_epsilon, target_delta, coefficients, steps,
                                                              num_batches, mechanism=accountant)
    backend_options = dict(options, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                           noise_mechanism="bsr", bsr_bands=bands, bsr_momentum=momentum,
                           bsr_weight_decay=weight_decay, bsr_min_separation=num_batches,
                           bsr_sample_rate=sample_rate, expected_batch_size=expected_batch_size,
                           insecure_seed=insecure_seed, accountant=accountant)
    state = register_state(backend_options, module)
    state.cyclic_batches_verified = True  # make_private draws the cyclic (Poisson) batches itself
    if group is not None:  # same seed (hence the same cyclic partition) and parameters on every rank
        setup_make_private(state, module, group)
        check_cyclic_batches(state, n, num_batches)
    model = torch.compile(module, backend="dp", options=backend_options)
    dp_optimizer = DPOptimizer(optimizer, state, module)
    if amplified:
        loader = CyclicPoissonDPDataLoader(data_loader, num_batches, sample_rate, steps_per_epoch,
                                           max_physical_batch_size, state)
    else:
        loader = CyclicDPDataLoader(data_loader, num_batches, max_physical_batch_size, state)
    return model, dp_optimizer, loader


def _cyclic_poisson_schema(n: int, batch_size: int, groups: int | None, coefficients: tuple[float, ...],
                           refuse: Any) -> tuple[int, float, int]:
    """(b groups, rate q = batch_size·b/N, steps per epoch N/batch_size) of the amplified schema."""
    from .privacy import bsr

    b = len(coefficients) if groups is None else groups
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
        refuse(f"groups must be an int in [1, N = {n}], got {b!r}")
    sample_rate = batch_size * b / n
    if sample_rate > 1:
        refuse(f"batch_size × groups = {batch_size} × {b} exceeds the N = {n} examples: a group of N/b examples "
               f"cannot give an expected batch of {batch_size}. Use at most N / batch_size = {n // batch_size} "
               "groups (and as many bands or fewer)")
    bsr.check_amplified(coefficients, b, sample_rate)
    return b, sample_rate, max(1, round(n / batch_size))


def _sgd_workload(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(β, λ) of the BSR workload from a torch SGD optimizer's first param group, else (0, 0)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 0.0, 0.0
    group = optimizer.param_groups[0]
    return float(group.get("momentum", 0.0)), float(group["lr"]) * float(group.get("weight_decay", 0.0))


class CyclicDPDataLoader:
    """Fixed-order cyclic logical batches for BSR, split into physical micro-batches.

    Step t uses batch t mod b of a fixed partition derived from the privacy state's seed, so
    a run resumed from a checkpoint (state and seed restored) goes on with the same cycle at
    the right place. One pass runs to the end of the current epoch. Every logical batch must
    end in one private release before the next is drawn: a skipped release would shift later
    batches onto other step indices and break the min-separation the accounting assumes.
    """

    def __init__(self, loader: DataLoader, num_batches: int, max_physical: int | None, state: Any) -> None:
        self.dataset, self.collate_fn = loader.dataset, loader.collate_fn
        self.num_batches, self.max_physical, self.state = num_batches, max_physical, state
        self.expected_batch_size = len(loader.dataset) / num_batches
        self.steps_per_epoch = num_batches
        self._sampler: tuple[int, Any] | None = None

    @property
    def sampler(self) -> CyclicBatchSampler:
        if self._sampler is None or self._sampler[0] != self.state.seed:
            self._sampler = (self.state.seed, self._make_sampler())
        return self._sampler[1]

    def _make_sampler(self) -> Any:
        return CyclicBatchSampler(len(self.dataset), self.num_batches, torch.Generator().manual_seed(self.state.seed))

    def _check_schema(self) -> None:
        """The privacy state must account exactly the schema this loader draws."""
        opts = self.state.options
        if opts.bsr_sample_rate is not None or opts.bsr_min_separation != self.num_batches:
            raise DPCompileError(
                f"dpcompile: this cyclic BSR loader draws {self.num_batches} fixed batches, but the model's privacy "
                f"state accounts bsr_min_separation={opts.bsr_min_separation}, bsr_sample_rate={opts.bsr_sample_rate}: "
                "use the loader make_private returned together with its model")

    def _indices(self, step: int) -> list[int]:
        return self.sampler.batch(step)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.state.steps % self.steps_per_epoch

    def __iter__(self) -> Iterator[Any]:
        self._check_schema()
        start = self.state.steps
        for step in range(start, start + len(self)):
            if self.state.steps != step:
                raise DPCompileError(
                    f"dpcompile: the cyclic BSR loader expected step {step} but the privacy state is at step "
                    f"{self.state.steps}: each logical batch must end with one private backward before the next "
                    "batch is drawn (batch t mod b belongs to step t; the accounting relies on it)")
            indices = local_share(self.state, self._indices(step))  # data-parallel: every W-th sample
            chunk = self.max_physical or len(indices)
            parts = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
            self.state.discard_accumulation()  # a logical batch abandoned half-way is never released
            for k, part in enumerate(parts):
                self.state.release_next = k == len(parts) - 1
                yield _mark_batch_dynamic(self.collate_fn([self.dataset[i] for i in part]))
        self.state.release_next = True


class CyclicPoissonDPDataLoader(CyclicDPDataLoader):
    """Cyclic Poisson batches for the amplified banded mechanism (`dpcompile.privacy.sampling.CyclicPoissonBatchSampler`).

    Step t draws group t mod b of a fixed partition with Poisson rate q, both from the privacy
    state's secret seed (a resumed run draws what an uninterrupted one would). One pass is one
    epoch in expectation (N / batch_size steps). An empty draw is refused: the pure-noise release it
    needs is not implemented for correlated noise (probability (1 − q)^{N/b} a step).
    """

    def __init__(self, loader: DataLoader, num_groups: int, sample_rate: float, steps_per_epoch: int,
                 max_physical: int | None, state: Any) -> None:
        super().__init__(loader, num_groups, max_physical, state)
        self.sample_rate, self.steps_per_epoch = sample_rate, steps_per_epoch
        self.expected_batch_size = sample_rate * len(loader.dataset) / num_groups

    def _make_sampler(self) -> CyclicPoissonBatchSampler:
        return CyclicPoissonBatchSampler(len(self.dataset), self.num_batches, self.sample_rate, self.state.seed)

    def _check_schema(self) -> None:
        opts = self.state.options
        if opts.bsr_sample_rate != self.sample_rate or opts.bsr_min_separation != self.num_batches:
            raise DPCompileError(
                f"dpcompile: this cyclic Poisson loader draws {self.num_batches} groups at rate {self.sample_rate:g}, "
                f"but the model's privacy state accounts bsr_min_separation={opts.bsr_min_separation}, "
                f"bsr_sample_rate={opts.bsr_sample_rate}: use the loader make_private returned with its model")

    def _indices(self, step: int) -> list[int]:
        indices = self.sampler.batch(step)
        if not indices:
            raise DPCompileError(
                f"dpcompile: the cyclic Poisson draw of step {step} is empty; the amplified banded accounting needs "
                "that step released as pure correlated noise, which dpcompile does not implement yet. Nothing was "
                "released for it. Use a larger batch_size (an empty draw has probability (1 − q)^(N/b) a step)")
        return indices
