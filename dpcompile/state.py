"""Privacy state of one compiled model: noise stream, step count and accountant.

It is attached to the model's parameters so that ``dpcompile.privacy_spent(model)``
finds it, and saves/restores with ``state_dict``/``load_state_dict`` so a resumed run
draws bit-identical noise and reports the same ε.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .accounting import PrivacyAccountant
from .errors import DPCompileError
from .options import DPOptions

STATE_ATTR = "_dpcompile_state"


class PrivacyState:
    def __init__(self, options: DPOptions) -> None:
        self.options = options
        self.seed = options.seed
        self.steps = 0  # noisy releases so far
        self.skipped_steps = 0  # Poisson draws with no sample: nothing released, still accounted
        self.accountant = PrivacyAccountant(options.accountant)
        self.release_next = True  # False on gradient-accumulation micro-steps
        self.last_sample_norms: torch.Tensor | None = None
        self.compiled: list[Any] = []  # CompileContext of every compiled region, for inspection
        self._task: int | None = None
        self._graphs_in_task: set[int] = set()
        self._zeros: dict[tuple, torch.Tensor] = {}

    # -- noise -------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        return self.options.noise_multiplier * self.options.max_grad_norm if self.release_next else 0.0

    def noise(self, graph_id: int, numel: int, device: torch.device) -> torch.Tensor:
        """N(0, 1) draws for one graph at the current step: a pure function of (seed, step, graph)."""
        if self.noise_std == 0.0:
            key = (numel, str(device))
            if key not in self._zeros:
                self._zeros[key] = torch.zeros(numel, device=device)
            return self._zeros[key]
        gen = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, self.steps, graph_id))
        return torch.randn(numel, generator=gen, device=device)

    # -- one release per backward pass, however many graphs it runs ------------------
    def enter_backward(self, graph_id: int) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task, self._graphs_in_task = task, set()
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        self._graphs_in_task.add(graph_id)

    def _finish_backward(self) -> None:
        self._task = None
        if self.release_next:
            self.record_release()

    def record_release(self, count: int = 1) -> None:
        self.steps += count
        if self.options.sample_rate is not None and self.options.noise_multiplier > 0:
            self.accountant.step(self.options.noise_multiplier, self.options.sample_rate, count)

    def record_skipped(self, count: int = 1) -> None:
        """A Poisson draw with no sample: the release of pure noise is skipped, not its accounting."""
        self.skipped_steps += count
        self.record_release(count)

    # -- accounting ----------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        if self.options.noise_multiplier == 0:
            return float("inf")
        if self.options.sample_rate is None:
            raise DPCompileError(
                "dpcompile: cannot account privacy without the sampling rate; pass "
                "options={'sample_rate': q, ...} to torch.compile or use dpcompile.make_private")
        return self.accountant.get_epsilon(delta)

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "skipped_steps": self.skipped_steps,
                "release_next": self.release_next, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.release_next = bool(state.get("release_next", True))
        self.accountant.load_state_dict(state["accountant"])


def stream_seed(seed: int, step: int, graph_id: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{graph_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def state_of(model: torch.nn.Module) -> PrivacyState:
    for p in model.parameters():
        state = getattr(p, STATE_ATTR, None)
        if state is not None:
            return state
    raise DPCompileError(
        "dpcompile: this model has no privacy state yet; compile it with torch.compile(model, backend='dp', "
        "options={...}) and run at least one forward pass first")
