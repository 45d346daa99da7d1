"""What ``torch.compile(module, backend="dp", options=...)`` does before Dynamo sees a frame.

The dp backend is only called for the graphs Dynamo builds, so on its own it cannot protect what
Dynamo never graphs: a module Dynamo skips or runs eagerly (stock RNNs, full backward hooks, a
forward under ``torch._dynamo.disable``), ``TORCHDYNAMO_DISABLE=1``, errors suppressed into an
eager fallback. So dpcompile takes part in ``torch.compile`` itself: importing the backend (which
``torch.compile(..., backend="dp")`` does through its entry point, before it calls
``torch._dynamo.optimize``) wraps ``torch._dynamo.optimize`` so that, for the dp backend only,

    torch.compile(module, backend="dp", options=o)
        1. validates ``o`` and creates the module's PrivacyState (`own_state`), owned by the
           module (no table keyed by the options dict, no look-up through the call stack);
        2. guards every trainable parameter (`state.guard_parameters`): a gradient that autograd
           brings to it and that is not its dp graph's release is refused before it is
           accumulated into ``p.grad``;
        3. hands the state to the backend inside the options it receives (``STATE_KEY``);
        4. returns the OptimizedModule as a `PrivateModule`: its call surfaces a DPCompileError
           as itself (not wrapped in BackendCompilerFailed), re-raises a refusal that
           ``suppress_errors`` swallowed, and hands the outputs to the loss tracker.

Other backends are untouched. ``torch.compile`` of a plain function (no module) is guarded per
graph by the backend (`dpcompile.compiler.backend._state_for`).
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch

from ..errors import DPCompileError
from ..options import DPOptions
from ..privacy.state import (SECRET_OPTIONS, STATE_ATTR, PrivacyState, own_module, refuse_sharded_blocks,
                             state_of_module)

STATE_KEY = "__dpcompile_state__"  # weakref to the module's PrivacyState, in the options the backend receives
_ORIGINAL_OPTIMIZE = None
_DP_BACKEND: Any = None  # the backend function, handed over by `compiler.backend` (which imports this module)


def install(dp_backend: Any) -> None:
    """Wrap ``torch._dynamo.optimize`` once (idempotent) to protect modules compiled with `dp_backend`."""
    global _ORIGINAL_OPTIMIZE, _DP_BACKEND
    import torch._dynamo

    _DP_BACKEND = dp_backend
    if _ORIGINAL_OPTIMIZE is not None:
        return
    _ORIGINAL_OPTIMIZE = torch._dynamo.optimize
    torch._dynamo.optimize = functools.wraps(_ORIGINAL_OPTIMIZE)(_optimize)
    from ..privacy import checkpoint

    checkpoint.install()  # the accounting rides in optimizer checkpoints


def _optimize(*args: Any, **kwargs: Any):
    decorator = _ORIGINAL_OPTIMIZE(*args, **kwargs)
    backend = kwargs.get("backend", args[0] if args else None)
    return _PrivateDecorator(decorator, backend) if _is_dp(backend) else decorator


def _is_dp(backend: Any) -> bool:
    return backend == "dp" or backend is _DP_BACKEND or getattr(backend, "compiler_fn", None) is _DP_BACKEND


class _PrivateDecorator:
    """torch._dynamo.optimize's decorator for the dp backend: protects the module first."""

    def __init__(self, inner: Any, backend: Any) -> None:
        self.inner, self.backend = inner, backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self):
        return self.inner.__enter__()

    def __exit__(self, *exc: Any):
        return self.inner.__exit__(*exc)

    def __call__(self, fn: Any) -> Any:
        module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if not isinstance(module, torch.nn.Module):  # a function: its state comes from its parameters
            return self._function(fn)
        kwargs = getattr(self.backend, "kwargs", None)
        options = (kwargs or {}).get("options")
        state = own_state(module, options)
        if kwargs is not None:
            kwargs["options"] = {**(options or {}), STATE_KEY: weakref.ref(state)}  # weak: copies share no state
        compiled = self.inner(fn)
        if compiled is fn:  # torch._dynamo.optimize returned its null decorator
            state.no_graph_reason = ("Dynamo is disabled (TORCHDYNAMO_DISABLE=1, torch.compile(disable=True) or "
                                     "torch._dynamo.config.disable), so torch.compile returned the module as it is")
            return fn
        if isinstance(compiled, torch.nn.Module):
            compiled.__class__ = _private_class(type(compiled))
            state.compiled_module = weakref.ref(compiled)
            return compiled
        # nn.Module.compile(): the compiled _call_impl
        return _private_function(compiled, state, owner=weakref.ref(module))

    def _function(self, fn: Any) -> Any:
        """A compiled function: at each call the modules it takes or names are guarded with the
        state its graphs found; a call that ran no dp graph in grad mode (Dynamo disabled, or it
        ran the function eagerly) guards them with a state that refuses every gradient."""
        kwargs = getattr(self.backend, "kwargs", None) or {}
        options = {k: v for k, v in (kwargs.get("options") or {}).items() if k != STATE_KEY}
        DPOptions.from_dict(options)  # invalid options are refused at torch.compile time
        return _private_function(self.inner(fn), None, fn, options)


def own_state(module: torch.nn.Module, options: dict | None) -> PrivacyState:
    """The privacy state `module` trains under from now on, attached to it and its parameters.

    A state already handed over (make_private's) is used as it is. Re-compiling a module that has
    already released gradients continues its state when the privacy options are the same (the ε
    spent so far stays counted) and is refused when they differ."""
    given = (options or {}).get(STATE_KEY)
    given = given() if given is not None else None
    if given is not None:
        own_module(module, given)
        return given
    fresh = DPOptions.from_dict({k: v for k, v in (options or {}).items() if k != STATE_KEY})
    previous = state_of_module(module)
    if previous is not None and previous.steps + previous.skipped_steps > 0:
        if _settings(previous.options) != _settings(fresh):
            raise DPCompileError(
                f"dpcompile: this {type(module).__name__} has already released {previous.steps} private steps under "
                "other privacy options; compiling it again with new options would restart its privacy accounting. "
                "Keep the options (compile again with the same ones), or start from a fresh copy of the model")
        own_module(module, previous)
        return previous
    state = PrivacyState(fresh)
    own_module(module, state)
    return state


def _settings(options: DPOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in SECRET_OPTIONS}


def unwrap_refusal(error: BaseException) -> BaseException:
    """The DPCompileError a torch.compile error stands for, else the error itself."""
    inner = getattr(error, "inner_exception", None)
    return inner if isinstance(inner, DPCompileError) else error


def _call_privately(call: Any, state: PrivacyState | None, args: tuple, kwargs: dict,
                    found: list | None = None) -> Any:
    """Run the compiled call; surface a refusal as itself; track the outputs for the loss.

    `state` None: a compiled function, whose state is that of the parameters its graphs took."""
    from .recurrent import packed_sequences
    from .runtime import states_used

    try:
        # allow_rnn: Dynamo traces nn.RNN/GRU/LSTM (dpcompile.compiler.recurrent rewrites them) instead of
        # running them eagerly, where their gradients would be refused; only for dp compiles.
        with states_used() as used, torch._dynamo.config.patch(allow_rnn=True), packed_sequences():
            out = call(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = unwrap_refusal(e)
        if inner is e:
            raise
        raise inner.with_traceback(None) from None
    if state is None:
        if found is not None:
            found.extend(used)
        if len(used) != 1:
            return out  # no private forward ran (or several models': each loss is refused at backward)
        state = used[0]
    if state.refusal is not None and torch.is_grad_enabled():  # suppress_errors ran the model eagerly
        raise state.refusal.with_traceback(None)
    return state.track_outputs(out, (args, kwargs))


@functools.lru_cache(None)
def _private_class(cls: type) -> type:
    return type(f"Private{cls.__name__}", (PrivateModule, cls), {"__module__": cls.__module__})


class PrivateModule:
    """Mixed into the OptimizedModule that ``torch.compile(module, backend="dp")`` returns."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = state_of_module(self._orig_mod)
        if state is None and torch.is_grad_enabled():
            raise DPCompileError(
                "dpcompile: this compiled model has no privacy state of its own: it is a copy (copy.deepcopy) of a "
                "compiled private model, whose state stays with the original. Compile the copy itself: "
                "torch.compile(copy._orig_mod, backend='dp', options=...), or evaluate it under torch.no_grad()")
        if torch.is_grad_enabled():  # fully_shard applied to blocks after torch.compile
            refuse_sharded_blocks(self._orig_mod)
        return _call_privately(super().__call__, state, args, kwargs)


def _private_function(compiled: Any, state: PrivacyState | None, fn: Any = None, options: dict | None = None,
                      owner: "weakref.ref[torch.nn.Module] | None" = None) -> Any:
    """`owner`: the module whose nn.Module.compile() made `compiled` (weak: it holds `compiled`)."""
    eager_state: list[PrivacyState] = []  # made at the first call that runs no dp graph

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        if owner is not None and owner() is not None and torch.is_grad_enabled():
            refuse_sharded_blocks(owner())  # fully_shard applied to blocks after module.compile()
        used: list[PrivacyState] = []
        out = _call_privately(compiled, state, args, kwargs, used)
        if fn is None or state is not None:
            return out
        if len(used) == 1:
            _guard_reachable_modules(fn, args, kwargs, used[0])
        elif not used and torch.is_grad_enabled():
            if not eager_state:
                eager_state.append(PrivacyState(DPOptions.from_dict(options)))
                eager_state[0].no_graph_reason = (
                    f"no dp graph ran for the compiled function {getattr(fn, '__qualname__', fn)} (Dynamo is disabled: "
                    "TORCHDYNAMO_DISABLE=1, torch.compile(disable=True), torch._dynamo.config.disable; or it ran "
                    "the function eagerly)")
            _guard_reachable_modules(fn, args, kwargs, eager_state[0])
        return out

    return call


def _guard_reachable_modules(fn: Any, args: tuple, kwargs: dict, state: PrivacyState) -> None:
    """Every module a compiled function takes as an argument or names (globals, closure) trains
    under `state` unless it has a state of its own: a parameter that its graphs did not take
    (used in eager code after a graph break) is then refused, not released unclipped."""
    from torch.utils import _pytree as pytree

    for module in [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.nn.Module)] + \
            _named_modules_of(fn):
        if state_of_module(module) is None and all(getattr(p, STATE_ATTR, state) is state
                                                   for p in module.parameters()):
            own_module(module, state)


def _named_modules_of(fn: Any) -> list[torch.nn.Module]:
    """The modules a function's code names: globals it reads and closure cells."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    names = set(code.co_names)
    found = [v for k, v in getattr(fn, "__globals__", {}).items() if k in names]
    found += [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _filled(c)]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True
