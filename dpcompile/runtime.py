"""What runs each backward step around the compiled, rewritten backward graph."""
from __future__ import annotations

from typing import Any

import torch

from .errors import DPCompileError


class PrivateBackward:
    """Feeds the noise and scalar inputs, checks the per-sample norms, strips extra outputs."""

    def __init__(self, compiled: Any, state: Any, ctx: Any) -> None:
        self._boxed_call = True  # AOTAutograd passes one list; an instance attribute survives its wrappers
        self.compiled = compiled
        self.state = state
        self.ctx = ctx
        self.noise_numel = ctx.plan["noise_numel"]
        self.n_extra = len(ctx.extra_outputs)

    def __call__(self, args: list[Any]) -> Any:
        state, options = self.state, self.state.options
        state.enter_backward(self.ctx.graph_id)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        noise = state.noise(self.ctx.graph_id, self.noise_numel, device)
        scalars = torch.tensor([state.noise_std, options.expected_batch_size or 0.0],
                               dtype=torch.float32).to(device, non_blocking=True)
        inputs = list(args) + [noise, scalars]
        args.clear()  # let the compiled graph free saved activations as it goes
        outputs = self.compiled(inputs)
        norms = outputs[-1]
        state.last_sample_norms = norms.detach()
        if options.check_finite and not bool(torch.isfinite(norms).all()):
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise DPCompileError(
                f"dpcompile: per-sample gradient norm is NaN/inf for sample(s) {bad[:10]} of this batch; "
                "no gradient was released. Check the inputs and loss of those samples (or lower the learning "
                "rate / use gradient-safe ops); set options={'check_finite': False} to skip this check.")
        return list(outputs[: len(outputs) - self.n_extra])
