"""Privacy state of one compiled model: noise stream, step count and accountant.

It is attached to the model's parameters so that ``dpcompile.privacy_spent(model)``
finds it, and saves/restores with ``state_dict``/``load_state_dict`` so a resumed run
draws bit-identical noise and reports the same ε.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import weakref
from typing import Any

import torch

from .accounting import PrivacyAccountant
from .errors import DPCompileError
from .lsg import LSGProjector
from .options import DPOptions

STATE_ATTR = "_dpcompile_state"
GUARD_ATTR = "_dpcompile_guarded"
IN_GRAPH_ATTR = "_dpcompile_in_graph"  # an input of some dp-compiled graph: its gradient is clipped there
NAME_ATTR = "_dpcompile_name"
# compiled module -> its state, for privacy_state(model) under FSDP2 (whose registered parameters are
# shards without STATE_ATTR). Weak and outside the module: copy.deepcopy(model) must not copy the state.
_STATE_OF_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, PrivacyState]" = weakref.WeakKeyDictionary()


class PrivacyState:
    def __init__(self, options: DPOptions) -> None:
        self.options = options
        self.seed = options.seed
        self.steps = 0  # noisy releases so far
        self.skipped_steps = 0  # Poisson draws with no sample: nothing released, still accounted
        self.accountant = PrivacyAccountant(options.accountant)
        self.release_next = True  # False on gradient-accumulation micro-steps
        self.last_backward_released = True
        self.last_sample_norms: torch.Tensor | None = None
        self.compiled: list[Any] = []  # CompileContext of every compiled region, for inspection
        self.multi_graph = False  # set when dynamo splits the model (graph breaks)
        self.compiled_module: Any = lambda: None  # weakref to torch.compile's wrapper (FSDP2 may shard it)
        self._task: int | None = None
        self._runs_in_task: list[Any] = []  # CompileContext of each compiled backward run this pass
        self._pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self.graph_gradients: dict[int, list[tuple[torch.Tensor, int]]] = {}  # id(param) -> (grad, version)
        self._zeros: dict[tuple, torch.Tensor] = {}
        self.bsr = self._make_correlated_noise(options)  # None unless noise_mechanism == "bsr"
        self.lsg = LSGProjector(options.lsg, options.seed) if options.lsg is not None else None

    # -- noise -------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        return self.options.noise_multiplier * self.options.max_grad_norm if self.release_next else 0.0

    def noise(self, stream: str, numel: int, device: torch.device) -> torch.Tensor:
        """N(0, 1) draws for one graph at the current step: a pure function of (seed, step, stream).

        With noise_mechanism="bsr" it is the correlated w_t = (C⁻¹Z)_t of that stream instead."""
        if self.noise_std == 0.0:
            key = (numel, str(device))
            if key not in self._zeros:
                self._zeros[key] = torch.zeros(numel, device=device)
            return self._zeros[key]
        if self.bsr is not None:
            return self._bsr_noise(stream, numel, device)
        return torch.randn(numel, generator=self.generator(stream, device), device=device)

    def generator(self, stream: str, device: torch.device) -> torch.Generator:
        """The noise generator of one named stream at the current step."""
        gen = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, self.steps, stream))
        return gen

    def _deferred_noise(self, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
        """Noise for the graph-break path, one vector per parameter in a fixed order."""
        if not self.noise_std:
            return [torch.zeros(n, device=device) for n in sizes]
        if self.bsr is not None:  # one correlated stream over all of them, split
            return list(self._bsr_noise("deferred", sum(sizes), device).split(sizes))
        gen = self.generator("deferred", device)
        return [torch.randn(n, generator=gen, device=device) for n in sizes]

    # -- BSR correlated noise (dpcompile.bsr) -------------------------------------------
    @staticmethod
    def _make_correlated_noise(options: DPOptions):
        if options.noise_mechanism != "bsr":
            return None
        from .bsr import CorrelatedNoise, bsr_coefficients

        coefficients = options.bsr_coefficients or bsr_coefficients(
            options.bsr_bands, options.bsr_momentum, options.bsr_weight_decay)
        return CorrelatedNoise(coefficients)

    def _bsr_noise(self, stream: str, numel: int, device: torch.device) -> torch.Tensor:
        """w_t = (C⁻¹Z)_t of one stream at the current step; advances its buffers at most once a step."""
        def gaussian(name: str, step: int, size: int, dev: torch.device) -> torch.Tensor:
            gen = torch.Generator(device=dev)
            gen.manual_seed(stream_seed(self.seed, step, name))
            return torch.randn(size, generator=gen, device=dev)

        return self.bsr.draw(stream, numel, device, self.steps, gaussian)

    def _bsr_epsilon(self, delta: float) -> float:
        """ε of the C X + σR Z release after self.steps steps (b-min-separation, zero-out adjacency)."""
        from .bsr import epsilon

        opts = self.options
        return epsilon(opts.noise_multiplier, self.bsr.coefficients, self.steps, delta,
                       opts.bsr_min_separation or 1, opts.bsr_max_participations, opts.accountant)

    def _load_bsr_state(self, state: dict[str, Any]) -> None:
        saved = state.get("options", {})
        for key in ("noise_mechanism", "bsr_min_separation", "bsr_max_participations"):
            if saved.get(key, "gaussian" if key == "noise_mechanism" else None) != getattr(self.options, key):
                raise DPCompileError(
                    f"dpcompile: checkpoint was made with {key}={saved.get(key)!r} but this model uses "
                    f"{getattr(self.options, key)!r}; resume with the same privacy options")
        if self.bsr is not None:
            if state.get("bsr") is None:
                raise DPCompileError("dpcompile: this checkpoint has no BSR noise buffers; it cannot resume a "
                                     "noise_mechanism='bsr' run")
            self.bsr.load_state_dict(state["bsr"])

    # -- one release per backward pass, however many graphs it runs ------------------
    def enter_backward(self, ctx: Any) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task, self._runs_in_task, self._pending, self.graph_gradients = task, [], [], {}
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        self._runs_in_task.append(ctx)

    def record_gradients(self, ctx: Any, grads: list[Any]) -> None:
        """What a graph's backward hands autograd for each parameter, checked as it reaches the
        parameter (guard_parameters)."""
        for position, param in ctx.params.items():
            grad = grads[position]
            if isinstance(grad, torch.Tensor):
                self.graph_gradients.setdefault(id(param), []).append((grad, grad._version))

    def defer(self, ctx: Any, sq_norms: torch.Tensor, per_sample_grads: list[torch.Tensor]) -> None:
        """A graph-break graph's share of the step; clipped once the whole backward has run."""
        self._pending.append((ctx, sq_norms, per_sample_grads))

    def _finish_backward(self) -> None:
        runs, pending = self._runs_in_task, self._pending
        self._task, self._runs_in_task, self._pending, self.graph_gradients = None, [], [], {}
        if len(runs) > 1 and not all(c.deferred for c in runs):
            for c in runs:
                for p in c.params.values():
                    p.grad = None
            raise DPCompileError(
                "dpcompile: one backward pass ran several compiled graphs of this model that were each clipped on "
                "their own (a graph break appeared after compilation, or the model was called twice before "
                "backward). The gradients were discarded. Call the model once per backward, or re-create the "
                "compiled model so that dpcompile sees the graph break when compiling.")
        if pending:
            self._release_deferred(pending)
        self.last_backward_released = self.release_next
        if self.release_next:
            self.record_release()

    def _release_deferred(self, pending) -> None:
        from .distributed import graph_scalars
        from .per_sample import clip_weights, noise_scales, privatize, weighted_sum

        opts = self.options
        total = sum(sq for _, sq, _ in pending)
        weights, norms = clip_weights(total, opts.max_grad_norm, opts.loss_reduction, opts.clipping,
                                      opts.automatic_gamma)
        self.check_norms(norms)
        device = total.device
        scalars = torch.tensor(graph_scalars(self), device=device)  # data-parallel: noise on one rank only
        weights, std = noise_scales(weights, scalars)
        ordered = sorted(pending, key=lambda item: item[0].noise_key)
        noises = iter(self._deferred_noise([ps[0].numel() for _, _, grads in ordered for ps in grads], device))
        for ctx, _, per_sample_grads in ordered:
            for position, ps in zip(ctx.plan["deferred_positions"], per_sample_grads):
                param = ctx.params[position]
                clipped = weighted_sum(weights, ps)
                noise = next(noises)
                grad = privatize(clipped, noise, 0, std).to(param.dtype)
                param.grad = grad if param.grad is None else param.grad + grad

    def check_norms(self, norms: torch.Tensor) -> None:
        self.last_sample_norms = norms.detach()
        if self.options.check_finite and not bool(torch.isfinite(norms).all()):
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise DPCompileError(
                f"dpcompile: per-sample gradient norm is NaN/inf for sample(s) {bad[:10]} of this batch; "
                "no gradient was released. Check the inputs and loss of those samples (or lower the learning "
                "rate / use gradient-safe ops); set options={'check_finite': False} to skip this check.")

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
        if self.bsr is not None:
            return self._bsr_epsilon(delta)
        if self.options.sample_rate is None:
            raise DPCompileError(
                "dpcompile: cannot account privacy without the sampling rate; pass "
                "options={'sample_rate': q, ...} to torch.compile or use dpcompile.make_private")
        return self.accountant.get_epsilon(delta)

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "skipped_steps": self.skipped_steps,
                "release_next": self.release_next, "options": dataclasses.asdict(self.options),
                "accountant": self.accountant.state_dict(),
                "lsg": self.lsg.state_dict() if self.lsg is not None else None,
                "bsr": self.bsr.state_dict() if self.bsr is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("options", {})
        for key in ("max_grad_norm", "noise_multiplier", "sample_rate"):
            if key in saved and saved[key] != getattr(self.options, key):
                raise DPCompileError(
                    f"dpcompile: checkpoint was made with {key}={saved[key]} but this model uses "
                    f"{getattr(self.options, key)}; resume with the same privacy options")
        self._load_bsr_state(state)  # checks its options first, like the loop above
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.release_next = bool(state.get("release_next", True))
        self.accountant.load_state_dict(state["accountant"])
        if self.lsg is not None and state.get("lsg") is not None:
            self.lsg.seed = self.seed
            self.lsg.load_state_dict(state["lsg"])


def guard_parameters(params) -> None:
    """Fail closed when a parameter gets a gradient that is not exactly its dp graph's.

    Checked as the gradient reaches the parameter (a tensor hook: after all of a backward's
    contributions are summed, before they are accumulated into ``p.grad`` or returned by
    ``torch.autograd.grad``). Refused: calling the uncompiled module, torch.compile falling back
    to eager (recompile limit, suppressed errors), and code run eagerly outside the dp graphs
    that uses the parameter, alone or on top of its clipped gradient (graph breaks,
    ``torch._dynamo.disable``, a loss term that reads the parameter).
    """
    for p in params:
        if p.requires_grad and not getattr(p, GUARD_ATTR, False):
            p.register_hook(functools.partial(_check_incoming_gradient, weakref.ref(p)))
            setattr(p, GUARD_ATTR, True)


def attach_to_module(module: torch.nn.Module, state: PrivacyState) -> None:
    _STATE_OF_MODULE[module] = state


def guard_module(module: torch.nn.Module) -> None:
    """Guard every trainable parameter of a module compiled with the dp backend, not only the
    ones its graphs take: Dynamo runs what it cannot trace (a forward under
    ``torch._dynamo.disable``, an untraceable call) eagerly between the graphs, and a parameter
    used there would get a gradient that no clip factor covers and whose norm no clip factor saw."""
    for name, p in module.named_parameters():
        if p.requires_grad and not hasattr(p, NAME_ATTR):
            setattr(p, NAME_ATTR, f"{type(module).__name__}.{name}")
    guard_parameters(module.parameters())


def _check_incoming_gradient(param_ref: weakref.ref, grad: torch.Tensor) -> None:
    """The summed gradient reaching a parameter must be the very tensor its dp graph returned this
    backward, unmodified: anything added to it came from outside the clipped graphs."""
    if grad is None:  # a graph that writes the gradient itself (graph breaks: PrivacyState._release_deferred)
        return
    param = param_ref()
    state = getattr(param, STATE_ATTR, None)
    if not getattr(param, IN_GRAPH_ATTR, False):
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received a gradient from code that torch.compile ran eagerly, "
            "outside the dp-compiled graphs (a forward under torch._dynamo.disable, a call Dynamo cannot trace, an "
            "FSDP hook), so no clip factor covers it; the gradient was discarded. Make that code traceable "
            "(TORCH_LOGS=graph_breaks lists the breaks) or freeze the parameter (requires_grad=False).")
    if state is None or torch._C._current_graph_task_id() != state._task:
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received a gradient from a backward pass that did not run through "
            "its dp-compiled graph, so the gradient is neither clipped nor noised; it was discarded. Call the "
            "compiled model (not the original module), and check that torch.compile did not fall back to eager "
            "(torch._dynamo recompile limit, suppressed errors: see the log).")
    released = state.graph_gradients.pop(id(param), [])
    if len(released) > 1:
        return  # several clipped graphs in one backward: refused as a whole when it ends (_finish_backward)
    if not released or grad is not released[0][0] or grad._version != released[0][1]:
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received, besides its clipped gradient, a gradient from code run "
            "outside the dp-compiled graphs (eagerly between graph breaks, under torch._dynamo.disable, or a loss "
            "term that reads the parameter outside the compiled model); that part is neither clipped nor noised, "
            "so the gradient was discarded. Keep every use of the parameter inside the compiled model (for L2 "
            "regularisation use the optimizer's weight_decay).")


def _name(param: torch.Tensor) -> str:
    return getattr(param, NAME_ATTR, None) or f"of shape {tuple(param.shape)}"


def stream_seed(seed: int, step: int, stream: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def state_of(model: torch.nn.Module) -> PrivacyState:
    for module in (model, getattr(model, "_orig_mod", None)):  # torch.compile's wrapper or the module
        if module in _STATE_OF_MODULE:
            return _STATE_OF_MODULE[module]
    for p in model.parameters():
        state = getattr(p, STATE_ATTR, None)
        if state is not None:
            return state
    raise DPCompileError(
        "dpcompile: this model has no privacy state yet; compile it with torch.compile(model, backend='dp', "
        "options={...}) and run at least one forward pass first. If the compiled model has already trained, "
        "torch.compile never called the dp backend for it and its gradients were neither clipped nor noised: "
        "this happens for torch.compile(DDP(model)) and for FSDP2 (fully_shard) modules, which Dynamo runs "
        "eagerly")
