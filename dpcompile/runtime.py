"""What runs each backward step around the compiled, rewritten backward graph."""
from __future__ import annotations

from typing import Any

import torch



class PrivateBackward:
    """Feeds the noise and scalar inputs, checks the per-sample norms, strips extra outputs."""

    def __init__(self, compiled: Any, state: Any, ctx: Any) -> None:
        self._boxed_call = True  # AOTAutograd passes one list; an instance attribute survives its wrappers
        self.compiled = compiled
        self.state = state
        self.ctx = ctx
        self.n_extra = len(ctx.extra_outputs)

    def __call__(self, args: list[Any]) -> Any:
        state, ctx = self.state, self.ctx
        state.enter_backward(ctx)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        inputs = list(args) + self._runtime_inputs(device)
        args.clear()  # let the compiled graph free saved activations as it goes
        outputs = self.compiled(inputs)
        n_grads = len(outputs) - self.n_extra
        if ctx.deferred:
            state.defer(ctx, outputs[n_grads], list(outputs[n_grads + 1:]))
        else:
            state.check_norms(outputs[n_grads])
        return list(outputs[:n_grads])

    def _runtime_inputs(self, device: torch.device) -> list[torch.Tensor]:
        if not self.ctx.runtime_inputs:
            return []
        state = self.state
        noise = state.noise(self.ctx.noise_key, self.ctx.runtime_inputs["dp_noise"][0], device)
        scalars = torch.tensor([state.noise_std, state.options.expected_batch_size or 0.0],
                               dtype=torch.float32).to(device, non_blocking=True)
        return [noise, scalars]
