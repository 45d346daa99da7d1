"""What runs each backward step around the compiled, rewritten backward graph."""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch

from ..distributed import check_forward, graph_scalars
from ..errors import DPCompileError
from ..privacy.lsg import lsg_inputs


class OwnParametersOnly:
    """Runs a compiled forward only on the parameters it was compiled for.

    Dynamo may reuse a graph for another instance of the same module class when the dp
    options compare equal; the graph's privacy state (noise stream, accountant) belongs
    to the first model, so the second model's steps would be accounted to the first.
    """

    def __init__(self, compiled: Any, ctx: Any, state: Any = None) -> None:
        self._boxed_call = True
        self.compiled = compiled
        self.ctx = ctx
        self.state = state

    def __call__(self, args: list[Any]) -> Any:
        if self.state is not None:  # under DDP: attach to its group, or refuse (dpcompile.distributed)
            check_forward(self.state, self.ctx)
        for position, param in self.ctx.params.items():
            if args[position] is not param:
                raise DPCompileError(
                    "dpcompile: torch.compile reused a graph compiled for another model instance (same class, "
                    "equal dp options); its privacy state (noise stream, steps, accountant) belongs to that model. "
                    "Give each private model its own options (dpcompile.make_private does), e.g. a different "
                    "seed, or call torch._dynamo.reset() before compiling the second model.")
        outputs = self.compiled(args)
        if self.state is not None:  # a training forward (AOT runs it under no_grad)
            _mark_forward(outputs, args, self.ctx)
            _note_forward_state(self.state)
        return outputs


# The privacy states whose training forwards ran during a call of a compiled function (whose
# state is found from the parameters its graphs take, not given at torch.compile time).
_RECORDING = threading.local()


@contextlib.contextmanager
def states_used() -> Iterator[list[Any]]:
    """The privacy states of the training forwards run inside the block, in order."""
    outer = getattr(_RECORDING, "states", None)
    _RECORDING.states = used = []
    try:
        yield used
    finally:
        _RECORDING.states = outer
        if outer is not None:
            outer.extend(used)


def states_of_this_call() -> list[Any]:
    """The states whose training forwards already ran in the current compiled call (empty outside one)."""
    return list(getattr(_RECORDING, "states", None) or ())


def _note_forward_state(state: Any) -> None:
    used = getattr(_RECORDING, "states", None)
    if used is not None and not any(s is state for s in used):
        used.append(state)


# A fresh tensor of each training forward carries a one-shot token: its dp backward consumes it,
# so a second backward through the same forward (loss.backward(retain_graph=True) twice), which
# would release and count the same batch twice, is refused. The tensors the backward saves come
# back to it as the same Python objects, and the token dies with them.
FORWARD_TOKEN = "_dpcompile_forward"


def _mark_forward(outputs: list[Any], inputs: list[Any], ctx: Any) -> None:
    token = [False, weakref.ref(ctx)]  # consumed?, which compiled region (a graph break's next graph saves it too)
    inputs_ids = {id(a) for a in inputs}
    for out in outputs:
        if isinstance(out, torch.Tensor) and id(out) not in inputs_ids:
            setattr(out, FORWARD_TOKEN, token)


def _consume_forward(args: list[Any], ctx: Any) -> None:
    tokens = {id(t): t for t in (getattr(a, FORWARD_TOKEN, None) for a in args if isinstance(a, torch.Tensor))
              if t is not None and t[1]() is ctx}
    if any(t[0] for t in tokens.values()):
        raise DPCompileError(
            "dpcompile: a second backward pass through the same forward (loss.backward(retain_graph=True), then "
            "backward again): it would release and count the same batch twice. Nothing was released; run a new "
            "forward for each backward.")
    for t in tokens.values():
        t[0] = True


class PrivateBackward:
    """Feeds the noise and scalar inputs, checks the per-sample norms, strips extra outputs."""

    def __init__(self, compiled: Any, state: Any, ctx: Any) -> None:
        self._boxed_call = True  # AOTAutograd passes one list; an instance attribute survives its wrappers
        self.compiled = compiled
        self.state = state
        self.ctx = ctx
        self.n_extra = len(ctx.extra_outputs)
        self.noise_cut = _noise_cut(ctx)

    def __call__(self, args: list[Any]) -> Any:
        state, ctx = self.state, self.ctx
        state.enter_backward(ctx)
        _consume_forward(args, ctx)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        inputs = list(args) + self._graph_inputs(self._runtime_inputs(device))
        args.clear()  # let the compiled graph free saved activations as it goes
        outputs = self.compiled(inputs)
        n_grads = len(outputs) - self.n_extra
        if self.n_extra:  # the per-sample norms (or squared norms, (K, B) group-wise) come first
            ctx.last_batch = outputs[n_grads].shape[-1]
            state.note_samples(ctx.last_batch)
        if not self.n_extra:
            pass  # a graph-break piece without parameters: only input gradients flow on
        elif ctx.deferred:
            state.defer(ctx, outputs[n_grads], list(outputs[n_grads + 1:]))
        else:
            state.check_norms(outputs[n_grads])
        return state.route_gradients(ctx, list(outputs[:n_grads]))

    def _graph_inputs(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The flat noise cut into the per-gradient views the compiled graph takes
        (`compiler.backend.split_noise_input`)."""
        if self.noise_cut is None:
            return values
        index, sizes, pieces = self.noise_cut
        noise = values[index]
        if sizes is not None:  # the pieces tile the vector: one call
            views = list(noise.split(sizes))
        else:
            views = [noise.narrow(0, start, numel) for start, numel in pieces]
        return values[:index] + views + values[index + 1:]

    def _runtime_inputs(self, device: torch.device) -> list[torch.Tensor]:
        """The extra graph inputs, in the order the passes added them."""
        state, ctx = self.state, self.ctx
        values: dict[str, torch.Tensor] = {}
        if ctx.plan.get("lsg"):
            values.update(lsg_inputs(state.lsg, ctx, state.steps))
        if "dp_noise" in ctx.runtime_inputs:
            values["dp_noise"] = state.noise(ctx.noise_key, ctx.runtime_inputs["dp_noise"][0], device)
            # [σR or 0, divisor]; data-parallel: noise on one rank, divisor per reduction (dpcompile.distributed)
            values["dp_scalars"] = torch.tensor(graph_scalars(state), dtype=torch.float32).to(device, non_blocking=True)
        return [values[name] for name in ctx.runtime_inputs]


def _noise_cut(ctx: Any) -> tuple | None:
    """(index of dp_noise among the runtime inputs, piece sizes if they tile it else None, pieces)."""
    pieces = ctx.plan.get("noise_pieces")
    if not pieces:
        return None
    ends = [start + numel for start, numel in pieces]
    tiles = [start for start, _ in pieces] == [0] + ends[:-1] and ends[-1] == ctx.plan["noise_numel"]
    sizes = [numel for _, numel in pieces] if tiles else None
    return list(ctx.runtime_inputs).index("dp_noise"), sizes, pieces
