"""Sizes that change from batch to batch: dynamic sequence lengths (and batch sizes).

When Dynamo traces a dimension as dynamic (``dynamic=True``, ``mark_dynamic``, or its
automatic dynamic shapes after a second length), shapes hold sympy expressions of shape
symbols, e.g. ``s27`` for the sequence length T. Then a layout (`batch_dim.Batched`) can
have symbolic ``outer``/``inner`` (``view(x, [B*T, d])`` gives inner = T), and:

- the per-sample helpers need those values at run time: `graph_layout` passes each
  symbolic entry as an FX node that computes it from the graph's inputs, so one compiled
  graph serves every length (a constant would be wrong for the next batch);
- the cost model's choices depend on T (ghost norms cost ~T², instantiation does not):
  they are made at the example sizes (`hints`), and `guard_range` adds a Dynamo guard on
  the range of T over which the plan stays good (`cost_model.plan_range`), so Dynamo
  recompiles only for a batch outside it: a few buckets of lengths, not one compile per
  length. Strategies give the same clipped gradients, so a guard is about speed and
  memory, never about what is released.
"""
from __future__ import annotations

import operator
import weakref
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._sympy.functions import FloorDiv

from ...errors import DPCompileError

aten = torch.ops.aten
_NODES: "weakref.WeakKeyDictionary[fx.Graph, dict]" = weakref.WeakKeyDictionary()  # graph -> {expr: node}


def size(expr: Any) -> int | sympy.Expr:
    """An int when the size is static, else the sympy expression (layouts keep either)."""
    expr = sympy.sympify(expr)
    return int(expr) if expr.is_number else expr


def exact(expr: Any) -> sympy.Expr:
    """`expr` with every floor division that divides exactly written as a quotient, which sympy
    can simplify: with duck sizing (B and T equal at compile time share one symbol s), a view's
    size reads (s**2)//s, whose quotient by s sympy could not tell to be an integer."""
    def divides(e) -> bool:
        return isinstance(e, FloorDiv) and sympy.simplify(e.args[0] / e.args[1]).is_integer is True

    return sympy.sympify(expr).replace(divides, lambda e: sympy.simplify(e.args[0] / e.args[1]))


def graph_layout(graph: fx.Graph, layout: tuple) -> tuple:
    """A layout (dim, outer, inner) as graph arguments: symbolic entries become FX nodes."""
    return tuple(graph_value(graph, v) if i else v for i, v in enumerate(layout))


def graph_value(graph: fx.Graph, expr: Any) -> int | fx.Node:
    """`expr` as an int or as an FX node (SymInt-valued) computed from the graph's inputs."""
    expr = sympy.sympify(expr)
    if expr.is_number:
        if not expr.is_Integer:  # a fraction of a size (a coefficient of a product): no exact node for it
            _cannot_compute(expr)
        return int(expr)
    cache = _NODES.setdefault(graph, {})
    node = cache.get(expr)
    if node is None or node._erased or node.graph is not graph:
        node = cache[expr] = _emit(graph, expr)
    return node


def _emit(graph: fx.Graph, expr: sympy.Expr) -> fx.Node:
    if isinstance(expr, sympy.Symbol):
        return _symbol_node(graph, expr)
    if isinstance(expr, sympy.Mul):
        op, args = operator.mul, expr.args
    elif isinstance(expr, sympy.Add):
        op, args = operator.add, expr.args
    elif isinstance(expr, FloorDiv):
        op, args = operator.floordiv, expr.args
    elif isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
        op, args = operator.mul, [expr.base] * int(expr.exp)
    else:
        _cannot_compute(expr)
    values = [graph_value(graph, a) for a in args]
    result = values[0]
    for v in values[1:]:
        result = _apply(graph, op, result, v)
    return result


def _cannot_compute(expr) -> None:
    raise DPCompileError(
        f"dpcompile: the per-sample layout needs the size {expr}, which dpcompile cannot compute inside the graph "
        "(only integer products, sums and floor divisions of dynamic sizes). Mark that dimension static "
        "(torch._dynamo.mark_static) or pad inputs to a fixed length")


def _apply(graph: fx.Graph, op, a, b) -> fx.Node:
    nodes = [v for v in (a, b) if isinstance(v, fx.Node)]
    with graph.inserting_after(_latest(nodes)):
        node = graph.call_function(op, (a, b))
    node.meta["val"] = op(*(v.meta["val"] if isinstance(v, fx.Node) else v for v in (a, b)))
    return node


def _latest(nodes: list[fx.Node]) -> fx.Node:
    """The node of `nodes` that comes last in graph order (a new node goes after it)."""
    last = nodes[0]
    for other in nodes[1:]:
        cursor = last.next
        while cursor.op != "root" and cursor is not other:
            cursor = cursor.next
        if cursor is other:
            last = other
    return last


def _symbol_node(graph: fx.Graph, symbol: sympy.Symbol) -> fx.Node:
    """A SymInt input holding `symbol`, or the size of an input tensor that is exactly it."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and val.node.expr == symbol:
            return node
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == symbol:
                    with graph.inserting_after(placeholders[-1]):
                        out = graph.call_function(aten.sym_size.int, (node, d))
                    out.meta["val"] = s
                    return out
    raise DPCompileError(
        f"dpcompile: the per-sample layout needs the dynamic size {symbol}, which no input of this backward graph "
        "carries. Mark that dimension static (torch._dynamo.mark_static) or pad inputs to a fixed length")


# ------------------------------------------------------------------ hints and guards

def _shape_env():
    mode = detect_fake_mode()
    return getattr(mode, "shape_env", None)


def hints(exprs: list[Any], exclude: frozenset = frozenset()) -> dict[sympy.Symbol, int]:
    """The example value of every shape symbol in `exprs` but `exclude` (no guard: decisions only)."""
    symbols = set().union(*(getattr(sympy.sympify(e), "free_symbols", set()) for e in exprs)) - set(exclude)
    if not symbols:
        return {}
    env = _shape_env()
    if env is None:
        raise DPCompileError(f"dpcompile: symbolic sizes {sorted(map(str, symbols))} without a shape environment")
    hint = getattr(env, "guarding_hint_or_throw", None) or env.size_hint  # the latter before torch 2.13
    return {s: int(hint(s)) for s in symbols}


def value_range(symbol: sympy.Symbol) -> tuple[int, int | None]:
    """(lowest, highest or None) value Dynamo allows for `symbol` (typically (2, None))."""
    env = _shape_env()
    vr = env.var_to_range.get(symbol) if env is not None else None
    if vr is None:
        return 1, None
    lower = int(vr.lower) if isinstance(vr.lower, sympy.Integer) else 1  # not ±int_oo
    upper = int(vr.upper) if isinstance(vr.upper, sympy.Integer) else None
    return lower, upper


def guard_range(symbol: sympy.Symbol, lo: int | None, hi: int | None) -> list[str]:
    """Guard lo <= symbol <= hi (either side may be None); returns the guards as text.

    A backward with symbolic sizes saves SymInts for itself, so AOTAutograd compiles it while
    Dynamo compiles the forward, and the guard joins the frame's guards: a batch outside the
    range recompiles (with the same dimension still dynamic), one inside reuses the graph."""
    env = _shape_env()
    if env.frozen:  # compiled lazily, after Dynamo fixed the guards: the plan then serves every size
        return []
    added = []
    for bound, rel in ((lo, sympy.Ge), (hi, sympy.Le)):
        if bound is None:
            continue
        expr = rel(symbol, bound)
        if env.evaluate_expr(expr) != sympy.true:
            raise DPCompileError(f"dpcompile: internal error, the example sizes do not satisfy {expr}")
        added.append(str(expr))
    return added
