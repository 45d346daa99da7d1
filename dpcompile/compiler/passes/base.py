"""What every pass shares: the compile context it reads and the record it returns."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from ...options import DPOptions


@dataclasses.dataclass
class PassRecord:
    """What one pass did to one graph: for inspection tools and tests."""

    name: str
    graph: str  # "forward" or "backward"
    nodes_before: int = 0
    nodes_after: int = 0
    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    code_after: str = ""
    graph_before: Any = None  # snapshots, only while HOOKS.snapshot is set (dpcompile.tools.inspection)
    graph_after: Any = None


@dataclasses.dataclass
class CompileContext:
    """State shared by the passes of one compiled region (one forward + its backward)."""

    options: DPOptions
    graph_id: int
    param_names: dict[int, str]  # forward input index -> parameter name
    input_kinds: list[str]  # per forward input: "param", "buffer", "batched", "free", "symint"
    input_sample_dims: dict[int, int] = dataclasses.field(default_factory=dict)  # batched input -> dim, if not sample_dim
    batch_size: sympy.Expr | None = None  # B, an Integer (static) or symbol expression (dynamic)
    batch_hint: int | None = None  # B of the example inputs (for cost decisions when B is symbolic)
    length_plans: int = 0  # earlier compiles of this region whose plan guards a range of lengths
    forward_layouts: dict[str, Any] = dataclasses.field(default_factory=dict)
    forward_sample_ids: dict[str, Any] = dataclasses.field(default_factory=dict)  # see batch_dim.SAMPLE_IDS
    tangent_layouts: list[Any] = dataclasses.field(default_factory=list)
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)  # filled by the backward passes
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    multi_graph: bool = False  # the model is split by graph breaks
    deferred: bool = False  # graph-break mode: clip and noise after the whole backward
    clip_groups: dict[int, int] = dataclasses.field(default_factory=dict)  # input -> clip group ({}: flat)
    group_table: Any = None  # with clip groups: the model's privacy.groups.GroupTable (K, R/√K)
    params: dict[int, Any] = dataclasses.field(default_factory=dict)  # forward input index -> Parameter
    runtime_inputs: dict[str, tuple] = dataclasses.field(default_factory=dict)  # extra backward inputs: shape
    runtime_dtypes: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)  # if not float32
    extra_outputs: list[str] = dataclasses.field(default_factory=list)  # extra backward outputs
    graphs: dict[str, Any] = dataclasses.field(default_factory=dict)  # pre-Inductor graphs (HOOKS.keep_graphs)

    @property
    def noise_key(self) -> str:
        """Names the graph's noise stream: the same for recompiles of the same region, so a
        resumed run (or a recompile for a new batch size) draws the same noise at the same step."""
        return ",".join(sorted(self.param_names.values()))


Pass = Callable[[fx.GraphModule, CompileContext], PassRecord]


@dataclasses.dataclass
class InspectionHooks:
    """What the passes keep beyond their records; all off by default (big models have big graphs).
    `dpcompile.tools.inspection` turns them on (`capture_graphs()`, ``DPCOMPILE_LOGS``)."""

    snapshot: Callable[[fx.GraphModule], Any] | None = None  # graph -> snapshot, before/after each pass
    keep_graphs: bool = False  # keep the final forward/backward FX graphs (before Inductor) in ctx.graphs
    skip_inductor: bool = False  # run those graphs as Python (quick inspection/export; no kernels)
    observers: list[Callable[[PassRecord, fx.GraphModule, CompileContext], None]] = dataclasses.field(
        default_factory=list)  # called after each pass (the DPCOMPILE_LOGS logger)


HOOKS = InspectionHooks()


def to_expr(size: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def node_shape(node: Any) -> list[sympy.Expr] | None:
    """The shape of a tensor-valued node as sympy expressions, or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [to_expr(s) for s in val.shape]
    return None


def pad_amounts(pad: list, ndim: int, dim: int) -> tuple:
    """(before, after) that constant_pad_nd's `pad` adds to `dim`: pairs run from the last dim back."""
    i = 2 * (ndim - 1 - dim)
    return (pad[i], pad[i + 1]) if i + 1 < len(pad) else (0, 0)


def run_recorded(name: str, which: str, gm: fx.GraphModule, body: Callable[[], None]) -> PassRecord:
    """Run `body` (which edits gm in place) and record the nodes it added/removed."""
    before = {n.name for n in gm.graph.nodes}
    record = PassRecord(name=name, graph=which, nodes_before=len(before))
    if HOOKS.snapshot is not None:
        record.graph_before = HOOKS.snapshot(gm)
    body_record = body()
    after = {n.name for n in gm.graph.nodes}
    record.nodes_after = len(after)
    record.added = sorted(after - before)
    record.removed = sorted(before - after)
    if isinstance(body_record, dict):
        record.notes.extend(body_record.get("notes", []))
        record.table.extend(body_record.get("table", []))
    record.code_after = gm.code if hasattr(gm, "code") else ""
    if HOOKS.snapshot is not None:
        record.graph_after = HOOKS.snapshot(gm)
    return record
