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
graph by the backend (`dpcompile.backends.dp._state_for`).
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch

from ..errors import DPCompileError
from ..options import DPOptions
from ..state import SECRET_OPTIONS, PrivacyState, own_module, state_of_module

STATE_KEY = "__dpcompile_state__"  # weakref to the module's PrivacyState, in the options the backend receives
_ORIGINAL_OPTIMIZE = None


def install() -> None:
    """Wrap ``torch._dynamo.optimize`` once (idempotent)."""
    global _ORIGINAL_OPTIMIZE
    import torch._dynamo

    if _ORIGINAL_OPTIMIZE is not None:
        return
    _ORIGINAL_OPTIMIZE = torch._dynamo.optimize
    torch._dynamo.optimize = functools.wraps(_ORIGINAL_OPTIMIZE)(_optimize)
    from .. import checkpoint

    checkpoint.install()  # the accounting rides in optimizer checkpoints


def _optimize(*args: Any, **kwargs: Any):
    decorator = _ORIGINAL_OPTIMIZE(*args, **kwargs)
    backend = kwargs.get("backend", args[0] if args else None)
    return _PrivateDecorator(decorator, backend) if _is_dp(backend) else decorator


def _is_dp(backend: Any) -> bool:
    from .dp import dp_backend

    return backend == "dp" or backend is dp_backend or getattr(backend, "compiler_fn", None) is dp_backend


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
            compiled = self.inner(fn)
            return compiled if compiled is fn else _private_function(compiled, None)
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
        return _private_function(compiled, state)  # nn.Module.compile(): the compiled _call_impl


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


def _call_privately(call: Any, state: PrivacyState | None, args: tuple, kwargs: dict) -> Any:
    """Run the compiled call; surface a refusal as itself; track the outputs for the loss.

    `state` None: a compiled function, whose state is that of the parameters its graphs took."""
    from ..runtime import states_used

    try:
        with states_used() as used:
            out = call(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = unwrap_refusal(e)
        if inner is e:
            raise
        raise inner.with_traceback(None) from None
    if state is None:
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
        return _call_privately(super().__call__, state, args, kwargs)


def _private_function(compiled: Any, state: PrivacyState | None) -> Any:
    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _call_privately(compiled, state, args, kwargs)

    return call
