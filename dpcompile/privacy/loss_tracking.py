"""Follow the batch's samples through a loss computed outside the compiled model.

dpcompile's backward graph only sees the gradient that arrives at the model's
outputs. It is correct only if the loss is a per-sample separable reduction,
``loss = c * sum_b f_b(out_b)`` with ``c = 1/B`` ("mean") or ``c = 1`` ("sum").
:func:`track_outputs` wraps the compiled model's outputs in :class:`SampleTensor`,
a light ``torch.Tensor`` subclass whose ``__torch_function__`` applies one rule
per torch function (the table ``RULES`` at the bottom of this module) to work
out, for every value derived from the outputs, where the samples are:

``Batched(dim, flat)``
    the samples lie along ``dim``; ``flat`` rows per sample (sample-major) when
    inner elements were merged into that dim (``(B, T, V).view(-1, V)`` has
    ``Batched(0, flat=T)``).
``Reduced(kind)``
    summed (``"sum"``) or averaged (``"mean"``) over the samples, every sample
    weighted equally, possibly scaled by constants: a loss.
``Single(i)``, ``Partial(indices)``
    a value computed from sample ``i`` alone (``for o in out``, ``out[i]``), and a running sum
    of such values over distinct samples (``sum(losses)``). Stacking all B single values in
    order gives ``Batched``; summing all of them gives ``Reduced("sum")``. Anything else
    that combines values of different samples is refused.
``Mixed(where)``
    only ever a value that cannot carry gradient (computed under ``no_grad``,
    ``.detach()``-ed, integer results): a statistic that mixes the samples,
    fine for a metric. Combining it with a value that carries gradient is
    refused, because it would make one sample's gradient depend on the others
    (``out - out.detach().mean(0)``).

When ``loss.backward()`` (or ``torch.autograd.backward``/``grad``) starts from
a ``Reduced`` scalar, the owner of the outputs is told the reduction
(``owner.loss_verdict("mean")``) before any gradient flows. Anything the rules
cannot prove per-sample raises :class:`~dpcompile.errors.DPCompileError` naming
the op, the user's source line and the fix.

Example, with ``out = model(x)`` of shape ``(B, T, V)`` and targets ``y`` of
shape ``(B, T)`` (``mask = y != -100``)::

    out                                   # Batched(0)           (track_outputs)
    logits = out[:, :-1]                  # Batched(0)           slicing another dim
    per_tok = F.cross_entropy(            # Batched(0)           (B, T-1), 0 where ignored
        logits.transpose(1, 2), y[:, 1:],
        reduction="none")
    per_seq = per_tok.sum(1)              # Batched(0)           per-sample reduction
    per_seq = per_seq / mask[:, 1:].sum(1)  # Batched(0)         divided by its own count
    loss = per_seq.mean()                 # Reduced("mean")
    loss = loss + 0.1 * out.pow(2).mean() # Reduced("mean")      same kind, constant factor
    loss.backward()                       # owner.loss_verdict("mean"), then backward

and what is refused::

    out - out.mean(0)                     # a statistic of the whole batch in each sample
    a @ b.T                               # every sample paired with every other (InfoNCE)
    out.softmax(0)                        # normalised across the samples
    F.cross_entropy(out.view(-1, V), y.view(-1))   # if some y == -100: the mean divides
                                          # by the batch's count of valid tokens
    loss.mean() + other.sum()             # mean and sum: the per-sample scale is ambiguous

Values that cannot feed a backward never raise here (metrics, printing,
``.item()``); they keep their lineage so that a batch statistic cannot sneak
back into the loss as a constant.

Not seen (taken as constants or per-sample data): untracked tensors and Python
numbers computed from the batch outside the outputs (``w / w.sum()`` over the
batch's targets, a count from ``.item()``), values that leave torch (numpy
writes into an output's memory), and outputs whose dim 0 has ``batch_size``
entries that are not the samples (a time-major ``(T, B)`` output with T == B).
"""
from __future__ import annotations

import functools
import inspect
import linecache
import numbers
import operator
import os
import sys
import weakref
from dataclasses import dataclass
from math import prod
from typing import Any, Callable, NoReturn

import torch
import torch.nn.functional as F

from dpcompile.errors import DPCompileError

__all__ = ["SampleTensor", "Batched", "Reduced", "Mixed", "track_outputs", "sample_state", "RULES"]

_DISABLED = torch._C.DisableTorchFunctionSubclass
_FIX = ("Fix: compute the loss inside the compiled model, or use a per-sample loss with "
        "reduction='none' followed by .mean()/.sum().")


# ----------------------------------------------------------------------------- states

@dataclass(frozen=True)
class Batched:
    """The samples lie along `dim`, `flat` consecutive rows per sample."""
    dim: int
    flat: int = 1


@dataclass(frozen=True)
class Reduced:
    """A sum or mean over the samples, every sample weighted equally ("mean" or "sum")."""
    kind: str


@dataclass(frozen=True)
class Mixed:
    """A value (never carrying gradient) that mixes the samples; `where` names the op."""
    where: str


@dataclass(frozen=True)
class Single:
    """A value computed from sample `index` alone (iterating over the samples: ``for o in out``)."""
    index: int


@dataclass(frozen=True)
class Partial:
    """A sum of per-sample values of the samples in `indices` (``sum(losses)`` part way through)."""
    indices: frozenset


State = Batched | Reduced | Mixed | Single | Partial


class _Unsafe(Exception):
    """Raised by a rule: the op would make a sample's value depend on other samples."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


_MIX = ("combines per-sample values with a value reduced over the whole batch: "
        "every sample would see a statistic of the whole batch")


class _Source:
    """One call of track_outputs: the owner (weakly), the batch size and the
    autograd nodes of all its outputs (tracked or not), to recognise an untracked
    value computed from them."""
    __slots__ = ("owner_ref", "batch_size", "nodes", "__weakref__")

    def __init__(self, owner: Any, batch_size: int):
        try:
            self.owner_ref = weakref.ref(owner)
        except TypeError:  # an owner type without weak references
            self.owner_ref = lambda: owner
        self.batch_size = int(batch_size)
        self.nodes: list = []

    def owner(self):
        return self.owner_ref()


# ----------------------------------------------------------------------------- the tensor

class SampleTensor(torch.Tensor):
    """A tensor derived from a private model's outputs; see the module docstring.

    Attributes: ``_dp_state`` (a State), ``_dp_source`` (a _Source),
    ``_dp_version`` (``_version`` when the state was last known right) and
    ``_dp_guard`` (shares memory with a value that carries gradient).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BACKWARDS:
            with _DISABLED():
                run = _prepare_backward(func, args, kwargs)
            return run()
        with _DISABLED():
            if func in _RAW:
                return func(*args, **kwargs)
            call = _Call(func, args, kwargs)
            if not call.tracked:
                return call.run()
            return _dispatch(call)

    def __repr__(self, *, tensor_contents=None):
        with _as_plain(self):
            return torch.Tensor.__repr__(self, tensor_contents=tensor_contents)

    def __format__(self, format_spec):
        with _as_plain(self):
            return torch.Tensor.__format__(self, format_spec)

    def __reduce_ex__(self, proto):
        # Pickle (and torch.save) a plain tensor: the tracking state holds a weak reference.
        with _DISABLED():
            plain = self.detach()
            if self.requires_grad:
                plain.requires_grad_(True)
        return plain.__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        import copy
        with _DISABLED():
            if self.requires_grad and not self.is_leaf:
                raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) "
                                   "support the deepcopy protocol at the moment.")
            plain = self.detach()
            if self.requires_grad:
                plain.requires_grad_(True)
        return copy.deepcopy(plain, memo)


class _as_plain:
    """Temporarily make a SampleTensor a plain tensor (printing, formatting)."""

    def __init__(self, t):
        self.t = t

    def __enter__(self):
        self.t.__class__ = torch.Tensor

    def __exit__(self, *exc):
        self.t.__class__ = SampleTensor


def sample_state(t: Any) -> State | None:
    """The tracking state of `t`, or None for anything untracked."""
    return t._dp_state if isinstance(t, SampleTensor) else None


def _attach(t: torch.Tensor, state: State, source: _Source, guard: bool = False) -> None:
    t._dp_state = state
    t._dp_source = source
    t._dp_version = t._version
    t._dp_guard = guard


# ----------------------------------------------------------------------------- public API

def track_outputs(outputs, batch_size: int, owner, sample_dim: int = 0):
    """Wrap the compiled model's outputs so that the loss computed from them is analysed.

    Every tensor with ``shape[sample_dim] == batch_size`` becomes ``Batched(sample_dim)``
    (else, with ``shape[0] == batch_size``, ``Batched(0)``: a sample-major output of a model
    with time-major inputs); every 0-dim tensor that requires grad (a loss computed inside
    the compiled graph) becomes ``Reduced(owner.in_graph_reduction)``; anything
    else is returned as it is. Containers are rebuilt with torch's pytree (tuples,
    lists, dicts, namedtuples, HF ModelOutput). No data is copied: the wrapper is
    an autograd alias of the output, so requires_grad and the graph are kept.
    ``owner.loss_verdict(kind)`` is called right before a backward from a loss, and
    ``owner.loss_verdict(None)`` when it is over. A loss whose reduction differs from
    ``owner.in_graph_reduction`` (``.sum()`` where the graphs were compiled for a mean) is
    backpropagated with its seed gradient scaled by 1/B (or B), so the graphs see the
    reduction they were compiled for: the released gradient does not depend on it.
    """
    from torch.utils import _pytree as pytree

    source = _Source(owner, batch_size)

    def wrap(t):
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            source.nodes.append(t.grad_fn)
        if type(t) is not torch.Tensor:  # not a tensor, already tracked, or another subclass
            return t
        if t.dim() > sample_dim and t.shape[sample_dim] == source.batch_size:
            state = Batched(sample_dim)
        elif t.dim() >= 1 and t.shape[0] == source.batch_size:
            state = Batched(0)
        elif t.dim() == 0 and t.requires_grad:
            kind = owner.in_graph_reduction
            if kind not in ("mean", "sum"):
                raise DPCompileError(f"owner.in_graph_reduction must be 'mean' or 'sum', not {kind!r}")
            state = Reduced(kind)
        else:
            return t
        with _DISABLED():
            w = t.as_subclass(SampleTensor)
            _attach(w, state, source)
        return w

    return pytree.tree_map(wrap, outputs)


# ----------------------------------------------------------------------------- dispatch

class _Call:
    """One torch function call with tracked arguments."""
    __slots__ = ("func", "args", "kwargs", "leaves", "tracked", "_res", "_ran")

    def __init__(self, func, args, kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.leaves = _leaves(args) + _leaves(tuple(kwargs.values())) if kwargs else _leaves(args)
        self.tracked = [x for x in self.leaves if isinstance(x, SampleTensor)]
        self._ran = False

    @property
    def name(self) -> str:
        return _op_name(self.func)

    def run(self):
        if not self._ran:
            self._res = self.func(*self.args, **self.kwargs)
            self._ran = True
        return self._res

    def arg(self, pos: int, name: str, default=None):
        if len(self.args) > pos:
            return self.args[pos]
        return self.kwargs.get(name, default)


def _dispatch(call: _Call):
    _check_versions(call)
    rule = RULES.get(call.func)
    if any(isinstance(t._dp_state, (Single, Partial)) for t in call.tracked):
        return _dispatch_pieces(call, rule)
    if _is_inplace(call.func) or call.kwargs.get("out") is not None:
        return _dispatch_inplace(call, rule)
    if rule is None:
        res = call.run()
        if not _tensors(res):
            return res
        if _requires_grad(res):
            _refuse(call, _Unsafe("has no rule in dpcompile's loss tracking, so dpcompile cannot "
                                  "tell how it combines the samples"))
        return _mark(res, _mixed(call), call, False)
    try:
        _reject_mixed_inputs(call)
        state = rule(call)
    except _Unsafe as why:
        predicted = torch.is_grad_enabled() and any(t.requires_grad for t in call.tracked)
        if rule is _loss and not call._ran and predicted:
            _refuse(call, why)  # losses are differentiable: no need to run it (and warn) first
        try:
            res = call.run()
        except Exception:  # e.g. the target-size check of a loss, before torch's own
            if predicted:
                _refuse(call, why)
            raise
        if _requires_grad(res):
            _refuse(call, why)
        return _mark(res, _mixed(call), call, False)
    res = call.run()
    if rule is _pointwise and call.kwargs.get("inplace"):
        for t in call.tracked:  # F.relu(x, inplace=True): per-sample, keep x's record current
            t._dp_version = t._version
    grad = _requires_grad(res)
    if grad:
        _check_grad_inputs(call, rule, state)
    return _mark(res, state, call, grad)


def _dispatch_inplace(call: _Call, rule):
    target = call.kwargs.get("out")
    if target is None:
        target = call.args[0] if call.args else None
    grad_involved = any(isinstance(x, torch.Tensor) and x.requires_grad for x in call.leaves) and (
        torch.is_grad_enabled() or getattr(target, "requires_grad", False))
    if not isinstance(target, SampleTensor):
        if grad_involved:
            _refuse(call, _Unsafe("writes a value computed from the model outputs into an untracked "
                                  "tensor in place", "Write `acc = acc + loss` instead of `acc += loss`."))
        return call.run()
    if target._dp_guard and not target.requires_grad:
        _refuse(call, _Unsafe("modifies in place a tensor that shares memory with a model output "
                              "(through .detach() or .data): the output's new values would reach the "
                              "gradient unseen", "Take .clone() first."))
    try:
        if rule is None or call.kwargs.get("out") is not None:
            raise _Unsafe("modifies a tracked tensor in place with an op that has no in-place rule")
        _reject_mixed_inputs(call)
        new = rule(call)
        old = target._dp_state
        if not (new == old or (isinstance(new, Reduced) and isinstance(old, Reduced))):
            raise _Unsafe("changes in place where the samples are")
    except _Unsafe as why:
        if grad_involved or target.requires_grad:
            _refuse(call, why)
        res = call.run()
        target._dp_state, target._dp_version = _mixed(call), target._version
        return res
    res = call.run()
    target._dp_state, target._dp_version = new, target._version
    return res


def _dispatch_pieces(call: _Call, rule):
    """An op on per-sample pieces (Single / Partial values): any op on one sample's values is
    per-sample; stacking all samples' values in order, or adding them up, rebuilds the batch."""
    try:
        if _is_inplace(call.func) or call.kwargs.get("out") is not None:
            raise _Unsafe("modifies one sample's value in place", "Use the out-of-place op.")
        state = _pieces_state(call, rule)
    except _Unsafe as why:
        res = call.run()
        if _requires_grad(res):
            _refuse(call, why)
        return _mark(res, _mixed(call), call, False)
    res = call.run()
    grad = _requires_grad(res)
    if grad:
        _check_grad_inputs(call, rule, state)
    return _mark(res, state, call, grad)


def _pieces_state(call: _Call, rule) -> State:
    states = [t._dp_state for t in call.tracked]
    if all(isinstance(s, Single) for s in states) and len(set(states)) == 1:
        return states[0]  # any function of one sample's values stays that sample's
    if rule is _STACK or rule is _CAT:
        return _stacked_pieces(call, rule is _STACK)
    if rule is _additive and call.func not in _NEGATIONS:
        return _summed_pieces(call, states)
    if rule in (_mul, _div) and len(states) == 1 and isinstance(states[0], Partial):
        other = call.arg(1, "other", 1) if call.tracked[0] is call.arg(0, "input") else call.arg(0, "input")
        if isinstance(other, numbers.Real) and (rule is _mul or call.tracked[0] is call.arg(0, "input")):
            return states[0]  # a constant factor of every term
    raise _Unsafe("combines the values of different samples (from iterating over the samples)")


def _stacked_pieces(call: _Call, stack: bool) -> Batched:
    tensors = list(call.arg(0, "tensors"))
    dim = call.arg(1, "dim", 0)
    batch = call.tracked[0]._dp_source.batch_size
    if [_st(t) for t in tensors] != [Single(i) for i in range(batch)]:
        raise _Unsafe("puts together per-sample values that are not all the batch's samples, once each, in order")
    if stack:
        return Batched(_norm_dim(dim, tensors[0].ndim + 1))
    d = _norm_dim(dim, tensors[0].ndim)
    if any(t.shape[d] != 1 for t in tensors):
        raise _Unsafe("concatenates per-sample values with more than one row each along the new sample dim")
    return Batched(d)


def _summed_pieces(call: _Call, states) -> State:
    indices: set = set()
    for s in states:
        new = {s.index} if isinstance(s, Single) else set(s.indices) if isinstance(s, Partial) else None
        if new is None or new & indices:
            raise _Unsafe("adds values of different samples that are not one term per sample")
        indices |= new
    untracked = [x for x in (call.arg(0, "input"), call.arg(1, "other", 0))
                 if isinstance(x, torch.Tensor) and not isinstance(x, SampleTensor)]
    if untracked:
        raise _Unsafe("adds a tensor to a running sum of per-sample values")
    if call.func in _SUBTRACTIONS and len(states) > 1:
        raise _Unsafe("subtracts one sample's value from another's")
    if len(indices) == call.tracked[0]._dp_source.batch_size:
        return Reduced("sum")
    return Partial(frozenset(indices))


def _reject_mixed_inputs(call: _Call) -> None:
    for t in call.tracked:
        if isinstance(t._dp_state, Mixed):
            raise _Unsafe(f"uses a value that already mixes the samples (made by {t._dp_state.where})")


def _check_versions(call: _Call) -> None:
    for t in call.tracked:
        if t._version != t._dp_version:
            if t.requires_grad:
                _refuse(call, _Unsafe("uses a model output that was modified in place where dpcompile "
                                      "could not see it (through .detach(), .data or another view)"))
            t._dp_state, t._dp_version = Mixed("an in-place change dpcompile did not see"), t._version


def _check_grad_inputs(call: _Call, rule, state) -> None:
    # loss + regulariser(params) is fine (the added gradient does not depend on the batch),
    # unless the added term was computed from an output that is not tracked.
    regulariser = rule is _additive and isinstance(state, Reduced)
    for x in call.leaves:
        if isinstance(x, torch.Tensor) and not isinstance(x, SampleTensor) and x.requires_grad and not (
                regulariser and not _from_outputs(x, call.tracked)):
            _refuse(call, _Unsafe(
                "combines the model outputs with a tensor that requires grad but is not a tracked output "
                "of the compiled model (a parameter or module used outside it, or an output without the "
                "batch on dim 0): its gradient would be computed from the batch without clipping or noise",
                "Move that computation inside the compiled model, or .detach() the tensor."))


def _from_outputs(x: torch.Tensor, tracked) -> bool:
    """Whether the autograd graph of `x` reaches an output of the tracked values' sources."""
    targets = {id(n) for t in tracked for n in t._dp_source.nodes}
    seen, stack = set(), [x.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if id(node) in targets:
            return True
        seen.add(id(node))
        stack.extend(f for f, _ in node.next_functions)
    return False


def _grad_source(call: _Call) -> _Source:
    sources = {id(t._dp_source): t._dp_source for t in call.tracked if t.requires_grad}
    if len(sources) > 1:
        owners = {id(s.owner()) for s in sources.values()}
        if len(owners) > 1:
            _refuse(call, _Unsafe("combines the outputs of two different private models into one value",
                                  "Compute and backpropagate a separate loss for each model."))
        _refuse(call, _Unsafe(
            "combines the outputs of two forward passes of the same model into one loss: a sample in "
            "both would have its gradient clipped separately in each, so its influence could exceed R",
            "Run one forward pass per backward (put all inputs into one batch)."))
    if sources:
        return next(iter(sources.values()))
    return call.tracked[0]._dp_source


def _mark(res, state, call: _Call, grad: bool):
    """Turn the plain tensors of `res` into SampleTensors carrying `state` (a list: one each).

    `grad`: whether `res` requires grad (then its tracked inputs must share one source).
    """
    outs = _tensors(res)
    if state is None or not outs:
        return res
    states = state if isinstance(state, list) else [state] * len(outs)
    source = _grad_source(call) if grad else call.tracked[0]._dp_source
    inputs = [id(x) for x in call.leaves if isinstance(x, torch.Tensor)]
    for t, st in zip(outs, states):
        if id(t) in inputs or type(t) is not torch.Tensor or st is None:
            continue  # an argument returned as is, another subclass, or untracked
        t.__class__ = SampleTensor
        guard = not t.requires_grad and any(
            _shares_memory(t, p) for p in call.tracked if p.requires_grad or p._dp_guard)
        _attach(t, st, source, guard)
    return res


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        pa = a.untyped_storage().data_ptr()
        return pa != 0 and pa == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


def _mixed(call: _Call) -> Mixed:
    return Mixed(f"`{call.name}` at {_user_line()}")


def _leaves(obj) -> list:
    """The leaves of nested tuples/lists/dicts (torch function arguments), cheaply."""
    out = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, (tuple, list)) and not isinstance(x, torch.Size):
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        else:
            out.append(x)
    return out


def _broadcast(*shapes) -> tuple:
    """torch.broadcast_shapes without its Python overhead (errors are left to the op)."""
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, size in enumerate(s, nd - len(s)):
            if size != 1:
                if out[i] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = size
    return tuple(out)


def _tensors(res) -> list:
    if isinstance(res, torch.Tensor):
        return [res]
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in _tensors(r)]
    return []


def _requires_grad(res) -> bool:
    return any(t.requires_grad for t in _tensors(res))


def _is_inplace(func) -> bool:
    known = _INPLACE_CACHE.get(func)
    if known is None:
        name = getattr(func, "__name__", "")
        known = _INPLACE_CACHE[func] = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
    return known


_INPLACE_CACHE: dict = {}


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                    "__irshift__", "__imatmul__", "__setitem__"}


# ----------------------------------------------------------------------------- errors

_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _user_line() -> str:
    """'file:line: `code`' of the first frame outside torch and dpcompile."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_SKIP_DIRS) and not fn.startswith("<frozen"):
            code = linecache.getline(fn, f.f_lineno).strip()
            return f"{fn}:{f.f_lineno}: `{code}`" if code else f"{fn}:{f.f_lineno}"
        f = f.f_back
    return "<unknown source line>"


def _refuse(call_or_name, why: _Unsafe) -> NoReturn:
    name = call_or_name if isinstance(call_or_name, str) else call_or_name.name
    msg = f"dpcompile cannot make this loss private: `{name}` at {_user_line()} {why.reason}."
    if why.hint:
        msg += f" {why.hint}"
    raise DPCompileError(f"{msg} {_FIX}")


def _op_name(func) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__" and hasattr(func, "__self__"):
        return f"Tensor.{func.__self__.__name__}"
    name = name or repr(func)
    qual = getattr(func, "__qualname__", name) or name
    mod = getattr(func, "__module__", None) or ""
    head = qual.split(".")[0]
    if head in ("TensorBase", "Tensor"):
        return "Tensor." + qual.split(".")[-1]
    if mod.startswith(("torch.nn.functional", "torch._C._nn")):
        return "F." + name
    if mod.startswith("torch._C._linalg"):
        return "torch.linalg." + name.removeprefix("linalg_")
    if mod in ("torch", "torch.functional", "torch._C._VariableFunctions") or head == "_VariableFunctionsClass":
        return "torch." + name
    return f"{mod}.{name}" if mod else name


# ----------------------------------------------------------------------------- backward

def _prepare_backward(func, args, kwargs) -> Callable[[], Any]:
    """Check the roots of a backward, deliver the verdict, return the real backward."""
    name = _op_name(func)
    if func is torch.Tensor.backward:
        roots, grads, key = args[0], (args[1] if len(args) > 1 else kwargs.get("gradient")), None
    elif func is torch.autograd.backward:
        roots, key = (args[0] if args else kwargs["tensors"]), "tensors"
        grads = args[1] if len(args) > 1 else kwargs.get("grad_tensors")
    else:  # torch.autograd.grad
        roots, key = (args[0] if args else kwargs["outputs"]), "outputs"
        grads = args[2] if len(args) > 2 else kwargs.get("grad_outputs")
    single = isinstance(roots, torch.Tensor)
    roots = [roots] if single else list(roots)
    grads = [grads] if grads is None or isinstance(grads, torch.Tensor) else list(grads)
    grads += [None] * (len(roots) - len(grads))
    kinds, sources = set(), {}
    for r, g in zip(roots, grads):
        if not isinstance(r, SampleTensor):
            continue
        if r._version != r._dp_version and r.requires_grad:
            _refuse(name, _Unsafe("starts from a loss that was modified in place where dpcompile could not see it"))
        st = r._dp_state
        if isinstance(st, Batched):
            _refuse(name, _Unsafe("starts a backward from a per-sample tensor (one value per sample): the "
                                  "gradient given for it cannot be analysed",
                                  "Reduce it with .mean() or .sum() first."))
        if isinstance(st, Mixed):
            _refuse(name, _Unsafe(f"starts a backward from a value that mixes the samples (made by {st.where})"))
        if isinstance(st, (Single, Partial)):
            _refuse(name, _Unsafe("starts a backward from the loss of only some of the batch's samples",
                                  "Stack or sum every sample's loss first."))
        if r.numel() != 1:
            _refuse(name, _Unsafe("starts a backward from a non-scalar tensor: a user-given gradient for it "
                                  "cannot be analysed", "Reduce it to a scalar loss first."))
        if g is not None and (isinstance(g, SampleTensor) or (isinstance(g, torch.Tensor) and (
                g.numel() != 1 or g.requires_grad))):
            _refuse(name, _Unsafe("is given a gradient tensor that dpcompile cannot analyse"))
        kinds.add(st.kind)
        sources[id(r._dp_source)] = r._dp_source
    if len(kinds) > 1:
        _refuse(name, _Unsafe("starts from a mean-reduced and a sum-reduced loss at once: the per-sample "
                              "scale is ambiguous", "Use the same reduction for every loss."))
    if len({id(s.owner()) for s in sources.values()}) > 1:
        _refuse(name, _Unsafe("starts from the losses of two different private models at once",
                              "Call backward on each model's loss separately."))
    if len(sources) > 1:
        _refuse(name, _Unsafe("starts from losses of two forward passes of the same model at once: a sample "
                              "in both would have its gradient clipped separately in each"))
    tracked = [r for r in roots if isinstance(r, SampleTensor)]
    for r in roots:
        if tracked and not isinstance(r, SampleTensor) and isinstance(r, torch.Tensor) and _from_outputs(r, tracked):
            _refuse(name, _Unsafe("also starts from an untracked value computed from the model outputs"))
    owner, kind = None, None
    if sources and any(r.requires_grad for r in tracked):
        source = next(iter(sources.values()))
        owner, kind = source.owner(), kinds.pop()
        scale = _seed_scale(kind, owner, source.batch_size)
        if scale != 1.0:
            grads = [_scaled_seed(r, g, scale) if isinstance(r, SampleTensor) else g for r, g in zip(roots, grads)]
    # The real backward runs on plain autograd aliases, outside this module's dispatch.
    with torch.enable_grad():
        plain = [r.as_subclass(torch.Tensor) if isinstance(r, SampleTensor) else r for r in roots]
    if key is None:  # Tensor.backward(gradient, retain_graph, create_graph, inputs)
        named = dict(zip(("gradient", "retain_graph", "create_graph", "inputs"), args[1:]), **kwargs)
        run = functools.partial(
            torch.autograd.backward, plain[0], grads[0], named.get("retain_graph"),
            named.get("create_graph", False), inputs=named.get("inputs"))
        return _with_verdict(owner, kind, run)
    args, kwargs = list(args), dict(kwargs)
    _put(args, kwargs, 0, key, plain[0] if single else plain)
    if any(g is not None for g in grads):
        grad_pos, grad_key = (1, "grad_tensors") if func is torch.autograd.backward else (2, "grad_outputs")
        _put(args, kwargs, grad_pos, grad_key, grads[0] if single else grads)
    if any(isinstance(x, SampleTensor) for x in _leaves((args, kwargs))):
        def run():  # gradients with respect to tracked tensors (inputs=...): no re-dispatch
            with _DISABLED():
                return func(*args, **kwargs)
        return _with_verdict(owner, kind, run)
    return _with_verdict(owner, kind, lambda: func(*args, **kwargs))


def _put(args: list, kwargs: dict, pos: int, key: str, value) -> None:
    """Set one argument of a call, positional if it was given positionally."""
    if len(args) > pos:
        args[pos] = value
    else:
        kwargs[key] = value


def _seed_scale(kind: str, owner, batch_size: int) -> float:
    """The seed-gradient factor that makes a `kind` loss look like the owner's graphs expect."""
    compiled = getattr(owner, "in_graph_reduction", kind) if owner is not None else kind
    if kind == compiled:
        return 1.0
    return 1.0 / batch_size if compiled == "mean" else float(batch_size)


def _scaled_seed(root: torch.Tensor, grad, scale: float) -> torch.Tensor:
    with _DISABLED():
        base = torch.ones_like(root.as_subclass(torch.Tensor)) if grad is None else grad
        return base * scale


def _with_verdict(owner, kind, run: Callable[[], Any]) -> Callable[[], Any]:
    """`run` with the owner told the loss's reduction for exactly its duration."""
    if owner is None:
        return run

    def run_with_verdict():
        owner.loss_verdict(kind)
        try:
            return run()
        finally:
            owner.loss_verdict(None)

    return run_with_verdict


# ----------------------------------------------------------------------------- rule helpers

def _st(x) -> State | None:
    return x._dp_state if isinstance(x, SampleTensor) else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + max(ndim, 1) if d < 0 else d


def _dims(value, ndim: int) -> set[int]:
    """The dims a `dim=` argument names (None or () means all)."""
    if value is None or isinstance(value, torch.dtype) or (isinstance(value, (tuple, list)) and not value):
        return set(range(ndim))
    if isinstance(value, (tuple, list, torch.Size)):
        return {_norm_dim(operator.index(v), ndim) for v in value}
    return {_norm_dim(operator.index(value), ndim)}


def _first(res) -> torch.Tensor:
    return _tensors(res)[0]


def _align(operands) -> Batched | None:
    """Batched layout of a broadcasting op over `operands` (tensors and numbers)."""
    tensors = [x for x in operands if isinstance(x, torch.Tensor)]
    shape = _broadcast(*(t.shape for t in tensors))
    nd = len(shape)
    layout = None
    for t in tensors:
        st = _st(t)
        if st is None:
            continue
        if not isinstance(st, Batched):
            raise _Unsafe(_MIX)
        here = (st.dim + nd - t.ndim, st.flat)
        if layout is None:
            layout = here
        elif layout != here:
            raise _Unsafe("pairs values of different samples (their sample dims do not line up), "
                          "e.g. out[:, None] - out[None]")
    if layout is None:
        return None  # no tracked operand (e.g. only an out= tensor is tracked)
    dim, flat = layout
    rows = shape[dim]
    for j in range(nd):  # out (B, 1) against y (B,): every sample paired with every entry of y
        if j == dim or rows <= 1 or shape[j] != rows:
            continue
        spread = all(_size_at(t, j, nd) == 1 for t in tensors if _st(t) is not None)
        if spread and any(_size_at(t, j, nd) == rows for t in tensors if _st(t) is None):
            raise _Unsafe(f"broadcasts the samples against an untracked tensor with {rows} entries (the "
                          f"number of sample rows) along dim {j}: each sample would be paired with every "
                          f"entry, as with an output of shape (B, 1) and a target of shape (B,)",
                          "Give the tensor the output's sample dim (e.g. y.view(-1, 1)), or expand the output "
                          "explicitly (out.expand(-1, N)) if the pairing is intended.")
    return Batched(dim, flat)


def _size_at(t: torch.Tensor, j: int, nd: int) -> int:
    i = j - (nd - t.ndim)
    return t.shape[i] if i >= 0 else 1


def _is_multiple_inverse(factor, batch: int) -> bool:
    """factor == 1 / (m * batch) for an integer m >= 1."""
    try:
        if factor <= 0:
            return False
        n = 1.0 / float(factor)
    except (TypeError, ZeroDivisionError, OverflowError):
        return False
    m = round(n / batch)
    return m >= 1 and abs(n - m * batch) <= 1e-6 * n


# ----------------------------------------------------------------------------- rules

def _identity(call):
    """Casts, copies, .detach(): the value keeps its layout."""
    return _st(call.arg(0, "input"))


def _fresh(call):
    """zeros_like(out), out.new_zeros(...): a constant, untracked."""
    return None


def _additive(call):
    """a + b, a - b, -a: linear, so batch-reduced losses of one kind may be added."""
    ops = [call.arg(0, "input"), call.arg(1, "other", 0)]
    states = [_st(x) for x in ops]
    if any(isinstance(s, Reduced) for s in states):
        if any(isinstance(s, Batched) for s in states):
            raise _Unsafe(_MIX)
        kinds = {s.kind for s in states if isinstance(s, Reduced)}
        if len(kinds) > 1:
            raise _Unsafe("adds a mean-reduced loss and a sum-reduced loss: the per-sample scale is ambiguous",
                          "Use the same reduction for every term.")
        return Reduced(kinds.pop())
    return _align(ops)


def _scaling(denominator: int | None):
    """a * b or a / b (`denominator`: index of the divisor operand)."""
    def rule(call):
        if call.kwargs.get("rounding_mode") is not None:
            return _pointwise(call)  # floor / trunc division is not linear
        ops = [call.arg(0, "input"), call.arg(1, "other", 1)]
        states = [_st(x) for x in ops]
        reduced = [i for i, s in enumerate(states) if isinstance(s, Reduced)]
        if not reduced:
            return _align(ops)
        if any(isinstance(s, Batched) for s in states):
            raise _Unsafe(_MIX)
        if len(reduced) == 2:
            raise _Unsafe("multiplies or divides two values reduced over the batch: the result is not a "
                          "sum of per-sample losses")
        i = reduced[0]
        if denominator == i:
            raise _Unsafe("divides by a value reduced over the batch: every sample's gradient would depend "
                          "on the whole batch")
        other = ops[1 - i]
        if denominator is None and _is_loss_scale(other):
            return states[i]  # GradScaler.scale(loss): a global constant factor, undone before the step
        if not isinstance(other, numbers.Real):
            raise _Unsafe("scales a loss reduced over the batch by a tensor, which dpcompile cannot tell from "
                          "a statistic of the batch (e.g. the number of the batch's valid tokens)",
                          "Scale by a Python number.")
        kind = states[i].kind
        factor = (1.0 / other if other else float("inf")) if denominator is not None else other
        if kind == "sum" and _is_multiple_inverse(factor, ops[i]._dp_source.batch_size):
            kind = "mean"  # loss.sum() / len(x)
        return Reduced(kind)
    return rule


_mul, _div, _rdiv = _scaling(None), _scaling(1), _scaling(0)

_GRAD_SCALERS = (os.path.join("torch", "amp", "grad_scaler.py"), os.path.join("torch", "cuda", "amp", "grad_scaler.py"))


def _is_loss_scale(x) -> bool:
    """A one-element untracked tensor multiplied in by torch.amp.GradScaler.scale."""
    if not isinstance(x, torch.Tensor) or isinstance(x, SampleTensor) or x.numel() != 1 or x.requires_grad:
        return False
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_SKIP_DIRS[1]):
        f = f.f_back
    return f is not None and f.f_code.co_filename.endswith(_GRAD_SCALERS)


def _pointwise(call):
    """Elementwise functions: per-sample on Batched, refused on a batch-reduced value."""
    if call.func is torch.where and len(call.args) + len(call.kwargs) == 1:
        raise _Unsafe("lists the positions of nonzero values across the samples")
    ops = [x for x in call.leaves if isinstance(x, torch.Tensor)]
    if any(isinstance(_st(x), Reduced) for x in ops):
        raise _Unsafe("applies a nonlinear function to a value reduced over the batch: every sample's "
                      "gradient would depend on the whole batch")
    return _align(ops)


def _reduction(kind: str | None, pos: int = 1, name: str = "dim", default=None):
    """sum/mean (`kind`) or a nonlinear reduction (None) over the dims at `pos`/`name`."""
    def rule(call):
        x = call.arg(0, "input")
        other = call.arg(1, "other")
        if call.func in _MAX_MIN and isinstance(other, torch.Tensor):
            return _pointwise(call)  # torch.max(a, b) is elementwise
        st = _st(x)
        value = call.arg(pos, name, default)
        if isinstance(value, bool) and call.func in _STD_VAR:
            value = None  # std(x, unbiased)
        dims = _dims(value, x.ndim)
        if isinstance(st, Reduced):
            if kind is None:
                raise _Unsafe("applies a nonlinear reduction to a value reduced over the batch")
            return st
        if st is None:
            return None
        if st.dim in dims:
            if kind is None:
                raise _Unsafe("reduces across the samples with a nonlinear function of the whole batch")
            return Reduced(kind)
        nd = _first(call.run()).ndim
        return Batched(st.dim - sum(1 for d in dims if d < st.dim) if nd < x.ndim else st.dim, st.flat)
    return rule


def _along(pos: int = 1, name: str = "dim", default=-1):
    """softmax / sort / cumsum / flip...: fine along any dim but the samples'."""
    def rule(call):
        x = call.arg(0, "input")
        st = _st(x)
        if isinstance(st, Reduced):
            raise _Unsafe("normalises, sorts or accumulates a value reduced over the batch")
        if st is None:
            return None
        if call.func in _FLIPS:
            value = _FLIPS[call.func] if _FLIPS[call.func] is not None else (
                call.args[1:] if len(call.args) > 1 else call.kwargs.get("dims"))
            if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], (tuple, list)):
                value = value[0]
        elif call.func in (F.softmax, F.log_softmax, F.softmin) and call.arg(pos, name) is None:
            value = F._get_softmax_dim(call.func.__name__, x.ndim, 3)
        else:
            value = call.arg(pos, name, default)
        if value is None:
            raise _Unsafe("works over the flattened tensor, across the samples")
        if st.dim in _dims(value, x.ndim):
            raise _Unsafe("works along the sample dim (normalising, sorting, accumulating or shifting across "
                          "the samples): every sample's value would depend on the others")
        return st
    return rule


def _reshape(call):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze."""
    x = call.arg(0, "input")
    st = _st(x)
    if not isinstance(st, Batched):
        return st
    return _map_reshape(tuple(x.shape), st, tuple(_first(call.run()).shape))


def _map_reshape(shape, st: Batched, out) -> Batched:
    """Where the samples are after reshaping `shape` to `out` (row-major order)."""
    d, k = st.dim, st.flat
    batch = shape[d] // k
    outer, inner = prod(shape[:d]), prod(shape[d + 1:])
    if prod(shape) == 0:
        raise _Unsafe("reshapes an empty tensor")
    before = 1
    for j, size in enumerate(out):
        if before == outer:
            rest = prod(out[j + 1:])
            if rest and (k * inner) % rest == 0 and size == batch * (k * inner // rest):
                return Batched(j, k * inner // rest)
        before *= size
        if before > outer:
            break
    raise _Unsafe("reshapes the samples into each other: the new shape does not keep each sample's "
                  "elements in whole rows of one dim")


def _view(call):
    """Views that keep the sample dim whole (transpose, narrow, select, split, unbind...).

    The op is re-run on a meta tensor of the same shape: the sample dim is the
    output dim with the input sample dim's stride and size.
    """
    x = call.arg(0, "input")
    st = _st(x)
    if not isinstance(st, Batched):
        return st
    probe = torch.empty(tuple(x.shape), device="meta")
    try:
        res = call.func(probe, *call.args[1:], **call.kwargs)
    except Exception as exc:  # an argument the meta probe cannot take
        raise _Unsafe(f"could not be followed by dpcompile ({type(exc).__name__})") from None
    stride, size = probe.stride(st.dim), x.shape[st.dim]
    pieces = _sample_pieces(call, st, x)
    if pieces is not None:
        return pieces
    states = []
    for out in _tensors(res):
        found = [j for j in range(out.ndim) if out.stride(j) == stride and out.shape[j] == size]
        if not found:
            raise _Unsafe("selects, slices or moves the samples (not keeping the sample dim whole)")
        states.append(Batched(found[0], st.flat))
    return states if isinstance(res, (tuple, list)) else states[0]


def _sample_pieces(call: _Call, st: Batched, x: torch.Tensor):
    """unbind / select along the sample dim (iterating over the samples): one Single per sample."""
    if st.flat != 1 or x.shape[st.dim] != x._dp_source.batch_size:
        return None
    name = call.name.rsplit(".", 1)[-1]
    dim = call.arg(1, "dim", 0)
    if name == "unbind" and _norm_dim(dim, x.ndim) == st.dim:
        return [Single(i) for i in range(x.shape[st.dim])]
    if name == "select" and _norm_dim(dim, x.ndim) == st.dim:
        return Single(operator.index(call.arg(2, "index")) % x.shape[st.dim])
    return None


def _expand(call):
    """expand / expand_as / broadcast_to: new leading dims shift the samples."""
    x = call.arg(0, "input")
    st = _st(x)
    if not isinstance(st, Batched):
        return st
    return Batched(st.dim + _first(call.run()).ndim - x.ndim, st.flat)


def _repeat(call):
    x = call.args[0]
    st = _st(x)
    sizes = call.args[1:] if len(call.args) > 1 else call.kwargs.get("repeats", ())
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    if not isinstance(st, Batched):
        return st
    dim = st.dim + len(sizes) - x.ndim
    if sizes[dim] != 1:
        raise _Unsafe("repeats the samples along the sample dim")
    return Batched(dim, st.flat)


def _getitem(call):
    x, key = call.args[0], call.args[1]
    st = _st(x)
    if isinstance(st, Reduced):
        if any(t is not x for t in call.tracked):
            raise _Unsafe("indexes a value reduced over the batch with indices computed from the model outputs")
        return st
    if st is None:
        raise _Unsafe("indexes a tensor with indices computed from the model outputs")
    single = _single_sample_key(x, st, key)
    if single is not None:
        return single
    return _index_state(tuple(x.shape), st, key)[0]


def _single_sample_key(x: torch.Tensor, st: Batched, key):
    """out[i], out[i:i+1] (and more basic indices after them) on batch-first outputs: sample i's
    own values."""
    head = key[0] if isinstance(key, tuple) and key else key
    rest = key[1:] if isinstance(key, tuple) else ()
    size = x.shape[0]
    if st.dim != 0 or st.flat != 1 or isinstance(head, (bool, torch.Tensor)) or size != x._dp_source.batch_size:
        return None
    if isinstance(head, slice):
        picked = range(*head.indices(size))
        if len(picked) != 1 or size == 1:
            return None
        index = picked[0]
    else:
        try:
            index = operator.index(head)
        except TypeError:
            return None
    if any(isinstance(k, torch.Tensor) or type(k).__module__ == "numpy" or isinstance(k, (list, range))
           for k in rest):
        return None
    return Single(index % x.shape[0])


def _setitem(call):
    x, key, value = call.args[0], call.args[1], call.args[2]
    st, vst = _st(x), _st(value)
    if isinstance(st, Reduced):
        if vst is not None:
            raise _Unsafe("writes a tracked value into a value reduced over the batch")
        return st
    view, nd = _index_state(tuple(x.shape), st, key)
    if vst is not None and not (isinstance(vst, Batched) and value.ndim <= nd
                                and vst == Batched(view.dim - (nd - value.ndim), view.flat)):
        raise _Unsafe("writes values of other samples (or a batch statistic) into the samples")
    return st


def _index_state(shape, st: Batched, key) -> tuple[Batched, int]:
    """Where the samples are in x[key] (and its ndim), or _Unsafe."""
    entries = []
    for k in key if isinstance(key, tuple) else (key,):
        if k is None or isinstance(k, bool):
            entries.append(("new", k))
        elif k is Ellipsis:
            entries.append(("...", k))
        elif isinstance(k, slice):
            entries.append(("slice", k))
        elif isinstance(k, (torch.Tensor, list, range)) or type(k).__module__ == "numpy":
            try:
                t = k if isinstance(k, torch.Tensor) else torch.as_tensor(list(k) if isinstance(k, range) else k)
            except (TypeError, ValueError, RuntimeError):
                raise _Unsafe("uses a list index that dpcompile does not analyse") from None
            if t.dtype in (torch.bool, torch.uint8):
                entries.append(("mask", t))
            elif t.ndim == 0 and not isinstance(k, torch.Tensor):
                entries.append(("int", int(t)))
            else:
                entries.append(("index", t))
        else:
            try:
                entries.append(("int", operator.index(k)))
            except TypeError:
                raise _Unsafe(f"uses an index ({type(k).__name__}) that dpcompile does not analyse") from None
    used = sum(v.ndim if kind == "mask" else 1 for kind, v in entries if kind in ("int", "slice", "index", "mask"))
    if any(kind == "..." for kind, _ in entries):
        i = next(i for i, (kind, _) in enumerate(entries) if kind == "...")
        entries[i:i + 1] = [("slice", slice(None))] * (len(shape) - used)
    else:
        entries += [("slice", slice(None))] * (len(shape) - used)
    d, size = st.dim, shape[st.dim]
    in_dim, basic, first_adv, sample, adv = 0, 0, None, None, []
    for pos, (kind, v) in enumerate(entries):
        if kind == "new":
            basic += 1
        elif kind == "int":
            if in_dim == d:
                raise _Unsafe("picks a single sample")
            in_dim += 1
        elif kind == "slice":
            if in_dim == d:
                if v.indices(size) != (0, size, 1):
                    raise _Unsafe("slices the sample dim (keeping some samples, or reordering them)")
                sample = ("basic", basic)
            basic, in_dim = basic + 1, in_dim + 1
        else:
            span = v.ndim if kind == "mask" else 1
            first_adv = basic if first_adv is None else first_adv
            if in_dim <= d < in_dim + span:
                if kind == "mask":
                    raise _Unsafe("selects samples with a mask")
                if not _is_arange(v, size):
                    raise _Unsafe("indexes the samples (picks, reorders or repeats them)")
                sample = ("adv",)
            adv.append((pos, 1 if kind == "mask" else v.ndim, v, kind))
            in_dim += span
    if sample is None:
        raise _Unsafe("uses an index that dpcompile does not analyse")
    if not adv:
        return Batched(sample[1], st.flat), basic
    adjacent = all(b[0] - a[0] == 1 for a, b in zip(adv, adv[1:]))
    adv_nd = max(n for _, n, _, _ in adv)
    block = first_adv if adjacent else 0
    if sample[0] == "adv":  # x[torch.arange(B), y]: each sample's own entry
        for _, n, v, kind in adv:
            vst = _st(v)
            if kind == "mask" or n > 1 or (n == 1 and v.shape[0] != size) or (
                    vst is not None and vst != Batched(0, st.flat)):
                raise _Unsafe("pairs the samples with indices that do not line up with them")
        return Batched(block, st.flat), basic + adv_nd
    if any(_st(v) is not None for _, _, v, _ in adv):
        raise _Unsafe("indexes every sample with indices computed from the model outputs (each sample would "
                      "use every sample's index)", "Use x.gather(dim, index) with one index row per sample.")
    dim = sample[1] + adv_nd if (not adjacent or sample[1] >= first_adv) else sample[1]
    return Batched(dim, st.flat), basic + adv_nd


def _is_arange(v: torch.Tensor, n: int) -> bool:
    return (v.ndim == 1 and v.shape[0] == n and not v.is_floating_point()
            and bool(torch.equal(v, torch.arange(n, device=v.device, dtype=v.dtype))))


def _gather(call):
    """gather / take_along_dim along a non-sample dim, with one index row per sample."""
    x = call.arg(0, "input")
    if call.func is torch.take_along_dim or call.func is torch.Tensor.take_along_dim:
        index, dim = call.arg(1, "indices"), call.arg(2, "dim")
    else:
        dim, index = call.arg(1, "dim"), call.arg(2, "index")
    st, ist = _st(x), _st(index)
    if isinstance(st, Reduced) or isinstance(ist, Reduced):
        raise _Unsafe("gathers from or with a value reduced over the batch")
    if dim is None:
        raise _Unsafe("gathers from the flattened tensor, across the samples")
    if st is None:
        raise _Unsafe("gathers with indices computed from the model outputs")
    if _norm_dim(dim, x.ndim) == st.dim:
        raise _Unsafe("gathers along the sample dim")
    if index.ndim != x.ndim or index.shape[st.dim] != x.shape[st.dim] or (
            ist is not None and ist != st):
        raise _Unsafe("gathers with an index whose rows do not line up with the samples")
    return st


def _index_select(call):
    x, dim, index = call.arg(0, "input"), call.arg(1, "dim"), call.arg(2, "index")
    st = _st(x)
    if _st(index) is not None:
        raise _Unsafe("selects with indices computed from the model outputs")
    if isinstance(st, Batched) and _norm_dim(dim, x.ndim) == st.dim:
        raise _Unsafe("selects samples along the sample dim")
    return st


def _cat(stack: bool):
    def rule(call):
        tensors = list(call.arg(0, "tensors"))
        dim = call.arg(1, "dim", 0)
        states = [_st(t) for t in tensors]
        if any(isinstance(s, Reduced) for s in states):
            if any(isinstance(s, Batched) for s in states):
                raise _Unsafe(_MIX)
            kinds = {s.kind for s in states if isinstance(s, Reduced)}
            if len(kinds) > 1:
                raise _Unsafe("puts a mean-reduced and a sum-reduced loss together: the per-sample scale is ambiguous")
            return Reduced(kinds.pop())
        layouts = {(s.dim, s.flat) for s in states if s is not None}
        refs = [t for t, s in zip(tensors, states) if s is not None]
        if len(layouts) > 1 or len({t.ndim for t in refs}) > 1:
            raise _Unsafe("puts together tensors whose samples do not line up")
        (sdim, flat), ndim = layouts.pop(), refs[0].ndim
        if stack:
            new = _norm_dim(dim, ndim + 1)
            return Batched(sdim + (1 if new <= sdim else 0), flat)
        if _norm_dim(dim, ndim) == sdim:
            raise _Unsafe("concatenates along the sample dim: rows of other data (or the same samples twice) "
                          "would join the batch's sample axis, and a later loss over the rows would mix them",
                          "Concatenate along another dim, or compute each part's per-sample loss separately.")
        return Batched(sdim, flat)
    return rule


def _matmul(call):
    a, b = call.arg(0, "input"), call.arg(1, "other")
    if call.func is torch.Tensor.__rmatmul__:
        a, b = b, a
    sa, sb = _st(a), _st(b)
    if isinstance(sa, Reduced) or isinstance(sb, Reduced):
        raise _Unsafe("multiplies a value reduced over the batch")
    na, nb = a.ndim, b.ndim
    nbatch = max(na - 2, nb - 2, 0)
    nout = nbatch + (na >= 2) + (nb >= 2)
    roles = []
    for st, nd, left in ((sa, na, True), (sb, nb, False)):
        if st is None:
            continue
        d = st.dim
        if nd == 1 or d == (nd - 1 if left else nd - 2):
            raise _Unsafe("contracts over the samples (a weighted sum across the batch)")
        if left and d == nd - 2:
            roles.append(("rows", nout - (2 if nb >= 2 else 1), st.flat))
        elif not left and d == nd - 1:
            roles.append(("cols", nout - 1, st.flat))
        else:
            roles.append(("batch", nbatch - (nd - 2) + d, st.flat))
    if len(roles) == 2 and (roles[0] != roles[1] or roles[0][0] != "batch"):
        raise _Unsafe("pairs every sample with every other sample (like a @ b.T over the batch, an in-batch "
                      "similarity matrix)")
    return Batched(roles[0][1], roles[0][2])


def _linear(call):
    x, w, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    st = _st(x)
    if _st(w) is not None or _st(bias) is not None:
        raise _Unsafe("uses values computed from the model outputs as a weight")
    if isinstance(st, Reduced):
        raise _Unsafe("applies a linear layer to a value reduced over the batch")
    if st.dim == x.ndim - 1:
        raise _Unsafe("contracts over the samples")
    return st


def _einsum(call):
    eq = call.args[0].replace(" ", "")
    ops = call.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
        ops = tuple(ops[0])
    if "..." in eq:
        raise _Unsafe("uses an einsum equation with '...', which dpcompile does not analyse")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "->" not in eq:
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    layout = set()
    for term, t in zip(terms, ops):
        st = _st(t)
        if isinstance(st, Reduced):
            raise _Unsafe("multiplies a value reduced over the batch")
        if st is not None:
            layout.add((term[st.dim], st.flat))
    if len(layout) > 1:
        raise _Unsafe("pairs every sample with every other sample (different einsum letters for the samples)")
    letter, flat = layout.pop()
    if letter not in rhs:
        raise _Unsafe("sums over the samples inside einsum", "Keep the sample letter in the output, then .sum().")
    return Batched(rhs.index(letter), flat)


def _last_dims(call):
    """layer_norm / rms_norm over the trailing normalized_shape dims."""
    x, shape = call.arg(0, "input"), call.arg(1, "normalized_shape")
    st = _st(x)
    n = 1 if isinstance(shape, int) else len(shape)
    if any(_st(call.arg(i, nm)) is not None for i, nm in ((2, "weight"), (3, "bias"))):
        raise _Unsafe("uses values computed from the model outputs as a weight")
    if not isinstance(st, Batched) or st.dim >= x.ndim - n:
        raise _Unsafe("normalises over the samples")
    return st


def _pair_reduce(call):
    """cosine_similarity(x1, x2, dim) / pairwise_distance(x1, x2) (last dim)."""
    x1, x2 = call.arg(0, "x1"), call.arg(1, "x2")
    st = _align([x1, x2])
    nd = max(x1.ndim, x2.ndim)
    is_cos = call.func in (torch.cosine_similarity, F.cosine_similarity)
    dim = _norm_dim(call.arg(2, "dim", 1), nd) if is_cos else nd - 1
    if dim == st.dim:
        raise _Unsafe("reduces across the samples")
    out_nd = _first(call.run()).ndim
    return Batched(st.dim - (1 if dim < st.dim and out_nd < nd else 0), st.flat)


def _pad(call):
    x, pad = call.arg(0, "input"), call.arg(1, "pad")
    st = _st(x)
    if not isinstance(st, Batched):
        raise _Unsafe("pads a value reduced over the batch")
    back = x.ndim - 1 - st.dim  # the sample dim counted from the last
    if 2 * back + 1 < len(pad) and (pad[2 * back] or pad[2 * back + 1]):
        raise _Unsafe("pads the sample dim")
    return st


def _one_hot(call):
    st = _st(call.arg(0, "tensor"))
    if isinstance(st, Reduced):
        raise _Unsafe("one-hot encodes a value reduced over the batch")
    return st


# ----------------------------------------------------------------------------- losses

# name -> (form, tensor arguments that hold per-sample data)
_LOSSES = {
    "cross_entropy": ("class", ("input", "target")),
    "nll_loss": ("class", ("input", "target")),
    "mse_loss": ("elementwise", ("input", "target", "weight")),
    "l1_loss": ("elementwise", ("input", "target", "weight")),
    "smooth_l1_loss": ("elementwise", ("input", "target")),
    "huber_loss": ("elementwise", ("input", "target", "weight")),
    "binary_cross_entropy": ("elementwise", ("input", "target", "weight")),
    "binary_cross_entropy_with_logits": ("elementwise", ("input", "target", "weight")),
    "soft_margin_loss": ("elementwise", ("input", "target")),
    "poisson_nll_loss": ("elementwise", ("input", "target")),
    "gaussian_nll_loss": ("elementwise", ("input", "target", "var")),
    "kl_div": ("elementwise", ("input", "target")),
    "margin_ranking_loss": ("elementwise", ("input1", "input2", "target")),
    "hinge_embedding_loss": ("elementwise", ("input", "target")),
    "cosine_embedding_loss": ("rows", ("input1", "input2", "target")),
    "triplet_margin_loss": ("rows", ("anchor", "positive", "negative")),
    "multilabel_soft_margin_loss": ("rows", ("input", "target")),
    "multi_margin_loss": ("rows", ("input", "target")),
}
_SIGNATURES: dict = {}


def _loss(call):
    """The torch.nn.functional losses: per-sample with 'none', Reduced with 'mean'/'sum'."""
    name = call.func.__name__
    form, roles = _LOSSES[name]
    sig = _SIGNATURES.get(call.func) or _SIGNATURES.setdefault(call.func, inspect.signature(call.func))
    bound = sig.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    b = bound.arguments
    reduction = b.get("reduction", "mean")
    if b.get("size_average") is not None or b.get("reduce") is not None:
        reduction = torch.nn._reduction.legacy_get_string(b.get("size_average"), b.get("reduce"))
    data = [(r, b[r]) for r in roles if isinstance(b.get(r), torch.Tensor)]
    for r, t in data + [(w, b.get(w)) for w in ("weight", "pos_weight") if w not in roles]:
        if isinstance(_st(t), Reduced):
            raise _Unsafe(f"gets a value reduced over the batch as `{r}`: the loss would compare every sample "
                          f"with a statistic of the whole batch")
        if r in ("weight", "pos_weight") and r not in roles and _st(t) is not None:
            raise _Unsafe(f"gets `{r}` computed from the model outputs")
    per = {"class": _class_loss, "elementwise": _elementwise_loss, "rows": _rows_loss}[form](b, data)
    if reduction == "none" or per is None:
        return per
    if reduction == "sum":
        return Reduced("sum")
    if reduction == "batchmean":  # kl_div: sum / input.size(0)
        rows = b["input"].shape[0] if b["input"].ndim else 1
        batch = next(t._dp_source.batch_size for _, t in data if isinstance(t, SampleTensor))
        return Reduced("mean" if rows % batch == 0 else "sum")
    if reduction != "mean":
        raise _Unsafe(f"uses reduction={reduction!r}, which dpcompile does not analyse")
    if form == "class":
        _check_class_mean(name, b)
    elif any(b.get(w) is not None for w in ("weight", "pos_weight")):
        _check_weighted_mean(call, b)
    return Reduced("mean")


def _class_loss(b, data):
    x, y = b["input"], b["target"]
    sx, sy = _st(x), _st(y)
    if sx is None:
        if sy is None:
            return None
        raise _Unsafe("gets the model outputs only as a target")
    if x.ndim < 2:
        raise _Unsafe("gets an input without a batch dim (the class scores of a single sample)")
    if sx.dim == 1:
        raise _Unsafe("has the samples on dim 1, the class dim")
    rows = x.shape[sx.dim]
    out_dim = 0 if sx.dim == 0 else sx.dim - 1
    y_dim = sx.dim if y.is_floating_point() and y.ndim == x.ndim else out_dim
    if sy is not None:
        if sy != Batched(y_dim, sx.flat):
            raise _Unsafe("pairs each sample's scores with another sample's target")
    elif y.ndim <= y_dim or y.shape[y_dim] != rows:
        got = tuple(y.shape)
        raise _Unsafe(f"gets a target of shape {got} for {rows} rows of model output along dim {sx.dim}: the "
                      f"targets do not line up with the samples (a time-major (T, B) target, or another batch's?)")
    return Batched(out_dim, sx.flat)


def _elementwise_loss(b, data):
    tensors = [t for _, t in data]
    if all(_st(t) is None for t in tensors):
        return None
    st = _align(tensors)
    nd = len(_broadcast(*(t.shape for t in tensors)))
    rows = next(_size_at(t, st.dim, nd) for t in tensors if _st(t) is not None)
    for r, t in data:
        if _st(t) is None and t.numel() > 1:
            pos = st.dim - (nd - t.ndim)
            if pos < 0 or t.shape[pos] not in (1, rows):
                raise _Unsafe(f"gets `{r}` of shape {tuple(t.shape)}, whose entries do not line up with the "
                              f"{rows} sample rows of the model output after broadcasting: each sample would be "
                              f"compared with other samples' entries")
    return st


def _rows_loss(b, data):
    tracked = [(r, t) for r, t in data if _st(t) is not None]
    if not tracked:
        return None
    layouts = {_st(t) for _, t in tracked}
    st = layouts.pop()
    if layouts or not isinstance(st, Batched) or st.dim != 0 or any(t.ndim < 2 for _, t in tracked):
        raise _Unsafe("needs the samples on dim 0 of every input (one row per sample)")
    rows = tracked[0][1].shape[0]
    for r, t in data:
        if _st(t) is None and t.ndim >= 1 and t.shape[0] != rows:
            raise _Unsafe(f"gets `{r}` with {t.shape[0]} rows for {rows} sample rows of model output")
    return st


def _check_class_mean(name: str, b) -> None:
    if b.get("weight") is not None:
        raise _Unsafe("averages with class weights (weight=...): reduction='mean' divides by the summed weights "
                      "of the batch's targets, so each sample's share depends on the other samples' labels",
                      "Use reduction='none' and then .mean() (each weighted sample counts 1/B) or .sum().")
    y, ignore = b["target"], b.get("ignore_index", -100)
    if not y.is_floating_point() and bool((y == ignore).any()):
        raise _Unsafe(
            f"averages over the targets that are not ignore_index={ignore}: reduction='mean' divides by the "
            f"number of non-ignored targets in the whole batch, which depends on the other samples",
            f"Average per sequence instead: with mask = y != {ignore}, "
            f"(F.{name}(logits.transpose(1, 2), y, reduction='none', ignore_index={ignore}).sum(1) "
            f"/ mask.sum(1)).mean().")


def _check_weighted_mean(call: _Call, b) -> None:
    """A weighted 'mean' must be the plain mean of the weighted per-element losses."""
    result = call.run()
    kwargs = {k: v for k, v in b.items() if k not in ("size_average", "reduce")}
    kwargs["reduction"] = "none"
    with torch.no_grad():
        reference = call.func(**kwargs).mean()
        same = torch.allclose(result.detach().float(), reference.float(), rtol=1e-4, atol=1e-6)
    if not same:
        raise _Unsafe("averages with weights: reduction='mean' divides by the sum of the weights, which "
                      "depends on the other samples", "Use reduction='none' and then .mean().")


# ----------------------------------------------------------------------------- the table

_NS = {"torch": torch, "Tensor": torch.Tensor, "F": F, "linalg": torch.linalg, "special": torch.special}


def _resolve(names: str) -> list:
    """'add Tensor.T F.relu' -> the function objects (a bare name: torch.X and Tensor.X)."""
    found = []
    for name in names.split():
        spaces = [_NS[name.split(".")[0]]] if "." in name else [torch, torch.Tensor]
        attr = name.split(".")[-1]
        for ns in spaces:
            if ns is torch.Tensor:
                static = inspect.getattr_static(ns, attr, None)
                if static is None:
                    continue
                # a property's getter is what __torch_function__ receives (Tensor.T -> Tensor.T.__get__)
                fn = getattr(ns, attr) if callable(static) else static.__get__
            else:
                fn = getattr(ns, attr, None)
                if fn is None:
                    continue
            found.append(fn)
    return found


def _getset(name: str):
    return inspect.getattr_static(torch.Tensor, name).__get__


_POINTWISE = """abs absolute acos arccos acosh arccosh asin arcsin asinh arcsinh atan arctan atan2 arctan2 atanh
    arctanh ceil clamp clip clamp_min clamp_max cos cosh deg2rad rad2deg digamma erf erfc erfinv exp exp2 expm1
    floor frac lgamma log log10 log1p log2 logit i0 nan_to_num pow float_power reciprocal rsqrt sigmoid sign sgn
    sin sinc sinh sqrt square tan tanh trunc fix xlogy where masked_fill maximum minimum fmax fmin hypot lerp
    addcmul addcdiv copysign fmod remainder floor_divide logaddexp logaddexp2 heaviside relu round
    eq ne lt le gt ge greater greater_equal less less_equal not_equal isnan isinf isfinite isposinf isneginf
    isclose logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor bitwise_not
    signbit long int bool short char byte copy_ threshold
    __pow__ __rpow__ __mod__ __rmod__ __floordiv__ __rfloordiv__ __abs__ __eq__ __ne__ __lt__ __le__ __gt__
    __ge__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __invert__
    F.relu F.relu6 F.elu F.selu F.celu F.gelu F.silu F.mish F.softplus F.softsign F.hardtanh F.hardsigmoid
    F.hardswish F.leaky_relu F.logsigmoid F.sigmoid F.tanh F.tanhshrink F.softshrink F.hardshrink F.threshold
    F.dropout F.dropout1d F.dropout2d F.dropout3d F.alpha_dropout F.feature_alpha_dropout F.rrelu
    special.expit special.erf special.erfc special.logit special.xlogy special.entr special.log1p"""
_INPLACE_POINTWISE = " ".join(f"Tensor.{n}_" for n in _POINTWISE.split()
                              if "." not in n and not n.endswith("_") and hasattr(torch.Tensor, n + "_"))

_CAT, _STACK = _cat(stack=False), _cat(stack=True)

_RULE_SPEC: list[tuple[Callable, str]] = [
    (_identity, "to float double half bfloat16 contiguous clone detach detach_ cpu cuda requires_grad_ type_as "
                "Tensor.data positive __pos__ Tensor.type pin_memory"),
    (_fresh, "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones "
             "new_full new_empty new_tensor"),
    (_additive, "add sub subtract rsub neg negative __add__ __radd__ __sub__ __rsub__ __neg__ __iadd__ __isub__ "
                "Tensor.add_ Tensor.sub_ Tensor.subtract_ Tensor.neg_"),
    (_mul, "mul multiply __mul__ __rmul__ __imul__ Tensor.mul_ Tensor.multiply_"),
    (_div, "div divide true_divide __truediv__ __div__ __itruediv__ Tensor.div_ Tensor.divide_ Tensor.true_divide_"),
    (_rdiv, "__rtruediv__ __rdiv__"),
    (_pointwise, _POINTWISE + " " + _INPLACE_POINTWISE + " Tensor.masked_fill_ Tensor.clamp_ Tensor.__ipow__"),
    (_reduction("sum"), "sum nansum"),
    (_reduction("mean"), "mean"),
    (_reduction(None), "amax amin logsumexp prod all any argmax argmin count_nonzero nanmean median nanmedian "
                       "std var std_mean var_mean max min"),
    (_reduction(None, pos=1, default=-1), "mode"),
    (_reduction(None, pos=2, default=-1), "kthvalue"),
    (_reduction(None, pos=2), "norm linalg.vector_norm linalg.norm"),
    (_reduction(None, pos=99), "aminmax"),
    (_along(pos=1), "softmax log_softmax cumsum cumprod logcumsumexp cummax cummin sort argsort"),
    (_along(pos=1, default=None), "F.softmax F.log_softmax F.softmin"),
    (_along(pos=2), "topk diff"),
    (_along(pos=2, default=1), "F.normalize"),
    (_along(pos=1, default=-1), "F.glu"),
    (_along(pos=4, default=-1), "F.gumbel_softmax"),
    (_along(pos=2, name="dims", default=None), "roll"),
    (_along(), "flip fliplr flipud msort"),
    (_reshape, "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as ravel"),
    (_view, "transpose swapaxes swapdims permute movedim moveaxis t adjoint Tensor.T Tensor.mT Tensor.H "
            "Tensor.mH narrow select split chunk unbind tensor_split unfold diagonal"),
    (_expand, "expand expand_as broadcast_to"),
    (_repeat, "Tensor.repeat"),
    (_getitem, "__getitem__"),
    (_setitem, "__setitem__"),
    (_gather, "gather take_along_dim"),
    (_index_select, "index_select"),
    (_CAT, "cat concat concatenate"),
    (_STACK, "stack"),
    (_matmul, "matmul mm bmm __matmul__ __rmatmul__"),
    (_linear, "F.linear"),
    (_einsum, "einsum"),
    (_last_dims, "F.layer_norm F.rms_norm"),
    (_pair_reduce, "cosine_similarity F.pairwise_distance"),
    (_pad, "F.pad"),
    (_one_hot, "F.one_hot"),
    (_loss, " ".join(f"F.{n}" for n in _LOSSES)),
]

_FLIPS: dict = {}
_MAX_MIN: set = set()
_STD_VAR: set = set()
RULES: dict[Callable, Callable] = {}
"""op -> rule(call) returning the result's State (a list: one per output), None
(untracked result) or raising _Unsafe. An op that is not here is refused when its
result carries gradient."""


def _build() -> None:
    for rule, names in _RULE_SPEC:
        for fn in _resolve(names):
            RULES.setdefault(fn, rule)
    for names, dims in (("flip", None), ("fliplr", (1,)), ("flipud", (0,)), ("msort", (0,))):
        for fn in _resolve(names):
            _FLIPS[fn] = dims
    _MAX_MIN.update(_resolve("max min"))
    _STD_VAR.update(_resolve("std var std_mean var_mean"))


_build()
_NEGATIONS = set(_resolve("neg negative __neg__ Tensor.neg_"))
_SUBTRACTIONS = set(_resolve("sub subtract rsub __sub__ __rsub__ __isub__ Tensor.sub_ Tensor.subtract_"))

# Results returned untouched (tensors that are not derived values of the loss).
_RAW = {_getset("grad"), _getset("_base")}
_BACKWARDS = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
