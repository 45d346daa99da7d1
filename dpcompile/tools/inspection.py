"""See what the DP compiler did to a model: pipeline, graphs before/after each pass, the
per-parameter plan of the cost model, a per-pass diff and the privacy settings.

    report = dpcompile.inspect_model(model, torch.randn(8, 10))
    print(report)                        # like torch._dynamo.explain: one screen
    report.graph("book_keeping", "after").text()
    report.table()                       # strategy, FLOPs, memory per parameter
    report.render("graph.svg")           # or .html: a full report with pictures

`inspect_model` runs one private training step of a *copy* of the model (loss inside
the compiled region, default: cross-entropy against random class ids drawn over the
output's last dim) with the graphs executed as Python instead of Inductor kernels: the
passes and their decisions are exactly those of ``torch.compile(model, backend="dp")``
with the same options and example batch size, only the final code generation is skipped.

Snapshots of every graph are kept only while inspecting (`capture_graphs`), since large
models have large graphs. ``DPCOMPILE_LOGS=passes,diff,table,graphs`` (or `set_logs`)
logs the same information while training, through the ``dpcompile`` logger, in the
manner of ``TORCH_LOGS``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DPCompileError, module_path
from ..compiler.passes.base import HOOKS, CompileContext, PassRecord
from . import graph_render
from .graph_render import format_privacy, format_report, format_table, human

log = logging.getLogger("dpcompile")
LOG_TOPICS = ("passes", "diff", "table", "graphs")
DEFAULT_OPTIONS = {"max_grad_norm": 1.0, "noise_multiplier": 1.0}
RUNTIME_INPUT_PREFIXES = ("dp_", "lsg_")


# ----------------------------------------------------------------------------- snapshots

@dataclasses.dataclass
class NodeInfo:
    """One FX node, reduced to what the text, the picture and the diff show."""

    name: str
    op: str  # placeholder / call_function / get_attr / output ...
    target: str  # short op name: aten.mm, per_sample.clip_weights, getitem
    inputs: list[str]
    args: str  # the call's arguments: %node names and constants
    shape: str  # f32[8, 24], or "" for non-tensors
    layout: str  # where the samples are (batch_dim pass): B@0, agg, free, or ""
    module: str = ""  # the nn.Module that emitted it, when known

    @property
    def is_dp_helper(self) -> bool:
        return self.target.startswith("per_sample.")

    @property
    def is_runtime_input(self) -> bool:
        return self.op == "placeholder" and self.name.startswith(RUNTIME_INPUT_PREFIXES)


@dataclasses.dataclass
class GraphSnapshot:
    """A graph at one point of the pipeline: its nodes and its Python code."""

    nodes: list[NodeInfo]
    code: str

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def text(self, highlight: Sequence[str] = ()) -> str:
        """One line per node; nodes in `highlight` (e.g. added by a pass) marked with '+'."""
        marked = set(highlight)
        return "\n".join(_node_line(n, "+" if n.name in marked else " ") for n in self.nodes)

    def to_networkx(self):
        """A networkx.DiGraph: node attributes are the NodeInfo fields, edges go producer -> user."""
        import networkx as nx

        graph = nx.DiGraph()
        for n in self.nodes:
            graph.add_node(n.name, **dataclasses.asdict(n))
        for n in self.nodes:
            for src in n.inputs:
                graph.add_edge(src, n.name)
        return graph

    def __str__(self) -> str:
        return self.text()


def snapshot(gm: fx.GraphModule) -> GraphSnapshot:
    nodes = [NodeInfo(name=n.name, op=n.op, target=_target_name(n), inputs=[a.name for a in n.all_input_nodes],
                      args=_args_text(n),
                      shape=_shape_text(n.meta.get("val")), layout=_layout_text(n.meta.get("dp_layout")),
                      module=(module_path(n) or "") if n.op == "call_function" else "")
             for n in gm.graph.nodes]
    return GraphSnapshot(nodes, gm.graph.python_code("self").src)


def _node_line(n: NodeInfo, mark: str) -> str:
    if n.op == "placeholder":
        rhs = "input"
    elif n.op == "output":
        rhs = "return (" + ", ".join(f"%{a}" for a in n.inputs) + ")"
    else:
        rhs = f"{n.target}({n.args})"
    info = "  ".join(x for x in (n.shape, n.layout and f"[{n.layout}]", n.module and f"# {n.module}") if x)
    return f"{mark} %{n.name} = {rhs}" + (f"  {info}" if info else "")


def _target_name(node: fx.Node) -> str:
    target = node.target
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op if node.op != "get_attr" else f"get_attr {target}"
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}"
        return name if target._overloadname == "default" else f"{name}.{target._overloadname}"
    module = getattr(target, "__module__", "") or ""
    short = module.rsplit(".", 1)[-1]
    name = getattr(target, "__name__", str(target))
    return f"{short}.{name}" if short and short not in ("_operator", "operator", "builtins") else name


def _args_text(node: fx.Node) -> str:
    def show(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"%{a.name}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(show(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        text = repr(a)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _shape_text(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dtype = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "b8"}.get(val.dtype,
                                                                                              str(val.dtype))
        return f"{dtype}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_shape_text(v) or "-" for v in val) + ")"
    return ""


def _layout_text(layout: Any) -> str:
    if layout is None:
        return ""
    if isinstance(layout, (list, tuple)):
        return ",".join(_layout_text(x) or "-" for x in layout)
    if hasattr(layout, "dim"):
        extra = "".join(f" {k}={getattr(layout, k)}" for k in ("outer", "inner") if getattr(layout, k) != 1)
        return f"B@{layout.dim}{extra}"
    return str(layout).lower()


# ----------------------------------------------------------------------------- capture and logging

@contextlib.contextmanager
def capture_graphs(snapshots: bool = True, keep_graphs: bool = False, skip_inductor: bool = False) -> Iterator[None]:
    """While active, compiled regions keep a snapshot of each graph before/after each pass
    (`PassRecord.graph_before/after`) and, with keep_graphs, the final forward/backward FX
    graphs (`CompileContext.graphs`, used by export). skip_inductor runs those graphs as
    Python instead of compiling kernels (fast, for inspection only)."""
    saved = (HOOKS.snapshot, HOOKS.keep_graphs, HOOKS.skip_inductor)
    HOOKS.snapshot = snapshot if snapshots else saved[0]
    HOOKS.keep_graphs = keep_graphs or saved[1]
    HOOKS.skip_inductor = skip_inductor or saved[2]
    try:
        yield
    finally:
        HOOKS.snapshot, HOOKS.keep_graphs, HOOKS.skip_inductor = saved


_log_topics: set[str] = set()


def set_logs(passes: bool = False, diff: bool = False, table: bool = False, graphs: bool = False) -> None:
    """Log what each pass does while models compile (like ``torch._logging.set_logs``):
    passes = one line per pass, diff = nodes added/removed, table = per-parameter plan,
    graphs = the graph after each pass. All False turns logging off."""
    _log_topics.clear()
    _log_topics.update(t for t, on in zip(LOG_TOPICS, (passes, diff, table, graphs)) if on)
    if _log_pass in HOOKS.observers:
        HOOKS.observers.remove(_log_pass)
    if _log_topics:
        HOOKS.observers.append(_log_pass)
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[dpcompile] %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)


def set_logs_from_env(value: str | None = None) -> None:
    """``DPCOMPILE_LOGS=passes,diff,table,graphs`` (or ``all``); unknown topics are an error."""
    value = os.environ.get("DPCOMPILE_LOGS", "") if value is None else value
    topics = {t.strip().lstrip("+") for t in value.split(",") if t.strip()}
    if "all" in topics:
        topics = set(LOG_TOPICS)
    unknown = sorted(topics - set(LOG_TOPICS))
    if unknown:
        raise DPCompileError(f"DPCOMPILE_LOGS: unknown topic(s) {unknown}; valid: {list(LOG_TOPICS)} or 'all'")
    set_logs(**{t: True for t in topics})


def _log_pass(record: PassRecord, gm: fx.GraphModule, ctx: CompileContext) -> None:
    where = f"graph {ctx.graph_id} {record.graph}"
    if "passes" in _log_topics:
        notes = f"  ({'; '.join(record.notes)})" if record.notes else ""
        log.info("%s %-12s %d -> %d nodes, +%d -%d%s", where, record.name, record.nodes_before,
                 record.nodes_after, len(record.added), len(record.removed), notes)
    if "diff" in _log_topics and (record.added or record.removed):
        log.info("%s %s added: %s; removed: %s", where, record.name, ", ".join(record.added) or "-",
                 ", ".join(record.removed) or "-")
    if "table" in _log_topics and record.name == "book_keeping" and record.table:
        log.info("%s per-parameter plan:\n%s", where, format_table(plan_rows(record, {})))
    if "graphs" in _log_topics:
        log.info("%s after %s:\n%s", where, record.name, snapshot(gm).text(record.added))


# ----------------------------------------------------------------------------- report

@dataclasses.dataclass
class ParamPlan:
    """One row of the per-parameter table (book_keeping's decision)."""

    param: str
    module: str  # class of the owning nn.Module, when known
    kind: str  # site kind from param_grads: linear, conv, embedding, layer_norm, sum, shared(...)
    strategy: str  # ghost / instantiate / phantom / lsg
    flops: float  # cost-model extra FLOPs of the per-sample norm + clipped sum at the example batch size
    memory_bytes: float  # extra bytes alive at once (what memory_budget_mb limits)
    flops_expr: str  # the same, symbolic in the batch size B
    memory_expr: str
    alternatives: dict[str, tuple[float, float]]  # other strategies: (FLOPs, bytes)
    traffic_bytes: float = 0.0  # extra bytes read and written


@dataclasses.dataclass
class PassDiff:
    graph: str
    name: str
    added: list[str]  # "name = op"
    removed: list[str]


class Report:
    """What the DP compiler did to one model: see the module docstring."""

    def __init__(self, contexts: Sequence[CompileContext], model_name: str = "model",
                 modules: dict[str, str] | None = None, user_inputs: Sequence[str] = ()) -> None:
        if not contexts:
            raise DPCompileError("dpcompile inspection: nothing was compiled (did the model run forward and backward "
                                 "under torch.compile(..., backend='dp')?)")
        self.contexts = list(contexts)
        self.model_name = model_name
        self.modules = modules or {}
        self.user_inputs = list(user_inputs)  # names of the compiled region's tensor inputs, in order
        self.options = self.contexts[0].options

    # -- pipeline and records ----------------------------------------------------------
    @property
    def pipeline(self) -> dict[str, list[str]]:
        from ..compiler.passes import BACKWARD_PIPELINE, FORWARD_PIPELINE

        return {"forward": [n for n, _ in FORWARD_PIPELINE], "backward": [n for n, _ in BACKWARD_PIPELINE]}

    def records(self, region: int = 0) -> list[PassRecord]:
        return self._context(region).records

    def record(self, name: str, which: str = "backward", region: int = 0) -> PassRecord:
        for r in self.records(region):
            if r.name == name and r.graph == which:
                return r
        valid = [f"{r.graph}:{r.name}" for r in self.records(region)]
        raise DPCompileError(f"dpcompile inspection: no pass `{name}` on the {which} graph; recorded: {valid}")

    def graph(self, name: str, when: str = "after", which: str = "backward", region: int = 0) -> GraphSnapshot:
        """The graph before or after pass `name` (snapshots exist when captured by inspect_model)."""
        if when not in ("before", "after"):
            raise DPCompileError(f"dpcompile inspection: when must be 'before' or 'after', got {when!r}")
        record = self.record(name, which, region)
        snap = record.graph_before if when == "before" else record.graph_after
        if snap is None:
            raise DPCompileError("dpcompile inspection: this model was compiled without graph snapshots; use "
                                 "dpcompile.inspect_model(...) or compile inside dpcompile.tools.inspection.capture_graphs()")
        return snap

    def _context(self, region: int) -> CompileContext:
        if not 0 <= region < len(self.contexts):
            raise DPCompileError(f"dpcompile inspection: region {region} does not exist; this model compiled "
                                 f"{len(self.contexts)} graph(s)")
        return self.contexts[region]

    # -- per-parameter plan -------------------------------------------------------------
    def table(self) -> list[ParamPlan]:
        rows = []
        for ctx in self.contexts:
            for record in ctx.records:
                if record.name == "book_keeping":
                    rows.extend(plan_rows(record, self.modules))
        return rows

    # -- diff ----------------------------------------------------------------------------
    def diff(self, region: int = 0) -> list[PassDiff]:
        out = []
        for r in self.records(region):
            ops = {n.name: n.target for n in r.graph_after.nodes} if r.graph_after is not None else {}
            before = {n.name: n.target for n in r.graph_before.nodes} if r.graph_before is not None else {}
            out.append(PassDiff(r.graph, r.name, [_named_op(n, ops) for n in r.added],
                                [_named_op(n, before) for n in r.removed]))
        return out

    # -- privacy ---------------------------------------------------------------------------
    def privacy_summary(self, delta: float = 1e-5) -> dict[str, Any]:
        opts = self.options
        summary: dict[str, Any] = {
            "noise_mechanism": opts.noise_mechanism,
            "clipping": opts.clipping,
            "max_grad_norm": opts.max_grad_norm,
            "noise_multiplier": opts.noise_multiplier,
            "noise_std": opts.noise_multiplier * opts.max_grad_norm,
            "loss_reduction": opts.loss_reduction,
            "divisor": opts.expected_batch_size or "actual batch size",
            "sample_rate": opts.sample_rate,
            "accountant": opts.accountant,
            "seed": "secret (OS entropy)" if opts.insecure_seed is None else f"insecure_seed={opts.insecure_seed}",
            "noise_coordinates": sum(c.plan.get("noise_numel", 0) for c in self.contexts),
            "graph_breaks": len(self.contexts) - 1,
            "clipped_per": "sample, over the whole model gradient (all graphs)",
        }
        if opts.clipping == "automatic":
            summary["automatic_gamma"] = opts.automatic_gamma
        if opts.clip_groups is not None:
            table = next((c.group_table for c in self.contexts if c.group_table is not None), None)
            k, threshold = (len(table), table.threshold) if table is not None else (0, 0.0)
            summary["clipped_per"] = (f"sample and clip group ({opts.clip_groups!r}: {k} groups, each clipped to "
                                      f"R/√K = {threshold:.4g}; Σ_k (R/√K)² = R²)")
            summary["graph_break_release"] = "each graph clips and noises its own clip groups (none may span two)"
        if opts.noise_mechanism == "bsr":
            summary["bsr_bands"] = opts.bsr_bands or len(opts.bsr_coefficients or ())
            summary["bsr_min_separation"] = opts.bsr_min_separation
            summary["bsr_max_participations"] = opts.bsr_max_participations
            summary["bsr_sample_rate"] = opts.bsr_sample_rate
        if opts.lsg is not None:
            summary["lsg"] = dataclasses.asdict(opts.lsg)
        if opts.sample_rate and opts.noise_multiplier > 0 and opts.noise_mechanism == "gaussian":
            from ..privacy.accounting import epsilon

            steps = max(1, round(1 / opts.sample_rate))
            summary["epsilon_one_epoch"] = {"delta": delta, "steps": steps,
                                            "epsilon": epsilon(opts.noise_multiplier, opts.sample_rate, steps,
                                                               delta, opts.accountant)}
        return summary

    # -- output ----------------------------------------------------------------------------
    def render(self, path: str | os.PathLike, name: str = "noise", when: str = "after",
               which: str = "backward", region: int = 0, highlight: str = "all") -> str:
        """Write `path`: .svg = the graph after (or before) pass `name` with the nodes that all
        passes so far added (highlight="all") or that this pass added (highlight="pass") outlined;
        .html = the whole report with a picture per pass. Returns the path."""
        path = os.fspath(path)
        if path.endswith(".html"):
            text = graph_render.html_report(self)
        elif path.endswith(".svg"):
            outlined = "added by the DP passes" if highlight == "all" else f"added by {name}"
            text = graph_render.svg(self.graph(name, when, which, region),
                                    highlight=self._highlight(name, when, which, region, highlight),
                                    title=f"{self.model_name}: {which} graph {when} {name} (outlined: {outlined})",
                                    labels=self.input_labels(region), highlight_label=outlined)
        else:
            raise DPCompileError(f"dpcompile inspection: render() writes .svg or .html files, got {path!r}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def input_labels(self, region: int = 0) -> dict[str, tuple[str, str]]:
        """Graph input name -> (kind, label): parameters by name, user inputs by position,
        the loss gradient; AOTAutograd names them primals_i / tangents_i in both graphs."""
        ctx = self._context(region)
        labels, user = {}, 0
        for i, kind in enumerate(ctx.input_kinds):
            if kind == "param":
                labels[f"primals_{i + 1}"] = ("param", ctx.param_names[i])
            elif kind in ("batched", "free"):
                name = self.user_inputs[user] if user < len(self.user_inputs) else f"input {user}"
                labels[f"primals_{i + 1}"] = ("input", name)
                user += 1
        labels["tangents_1"] = ("input", "d loss (1.0)")
        return labels

    def _highlight(self, name: str, when: str, which: str, region: int, mode: str) -> list[str]:
        if mode not in ("pass", "all"):
            raise DPCompileError(f"dpcompile inspection: highlight must be 'pass' or 'all', got {mode!r}")
        record = self.record(name, which, region)
        if mode == "pass":
            return record.added if when == "after" else record.removed
        added: set[str] = set()
        for r in self.records(region):
            if r.graph == which and (r is not record or when == "after"):
                added |= set(r.added)
                added -= set(r.removed)
            if r is record:
                break
        return sorted(added)

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        return f"<dpcompile Report of {self.model_name}: {len(self.contexts)} graph(s), {len(self.table())} parameters>"


def plan_rows(record: PassRecord, modules: dict[str, str]) -> list[ParamPlan]:
    rows = []
    for row in record.table:
        name = row["param"]
        rows.append(ParamPlan(param=name, module=modules.get(name, ""), kind=row["kind"], strategy=row["strategy"],
                              flops=row["flops"], memory_bytes=row["memory_bytes"],
                              flops_expr=row.get("flops_expr", ""), memory_expr=row.get("memory_expr", ""),
                              alternatives=dict(row.get("alternatives", {})),
                              traffic_bytes=row.get("traffic_bytes", 0.0)))
    return rows


def _named_op(name: str, ops: dict[str, str]) -> str:
    return f"{name} = {ops[name]}" if name in ops else name


# ----------------------------------------------------------------------------- running a model

def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim (class scores), mean over samples (and over tokens for
    sequence outputs: every sample has the same number of tokens, so this is the mean of the
    per-sample means)."""
    output = model_output(output)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def model_output(output: Any) -> torch.Tensor:
    """The score tensor of a model's output: itself, `.logits` (Hugging Face) or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DPCompileError(f"dpcompile: cannot find the scores in a model output of type {type(output).__name__}; "
                         "pass loss_fn(output, target)")


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, mean over samples of each sample's mean."""
    return F.mse_loss(model_output(output), target)


def random_target(output: torch.Tensor, kind: str = "classes", seed: int = 0) -> torch.Tensor:
    """Targets for the default losses: class ids over output's last dim, or Gaussian regression targets."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "classes":
        return torch.randint(0, output.shape[-1], output.shape[:-1], generator=gen).to(output.device)
    if kind == "regression":
        return torch.randn(output.shape, generator=gen).to(output.device, output.dtype)
    raise DPCompileError(f"dpcompile: target kind must be 'classes' or 'regression', got {kind!r}")


def training_step(model: nn.Module, loss_fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """model + loss in one compiled region (so the export holds the loss):
    training_step(model, loss_fn, *inputs, target) -> scalar loss. The model is an argument,
    so its parameters keep their own names (fc1.weight) in the compiled graphs."""
    *inputs, target = args
    return loss_fn(model(*inputs), target)


@dataclasses.dataclass
class Captured:
    """One private step of a copy of the model, compiled with inspection hooks on."""

    model: nn.Module  # the copy (its parameters carry the privacy state)
    loss_fn: Callable
    compiled: Callable  # torch.compile(training_step): call as compiled(model, loss_fn, *inputs, target)
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    contexts: list[CompileContext]
    loss: torch.Tensor


def as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise DPCompileError("dpcompile: example_inputs must be a tensor or a tuple of tensors whose dimension 0 "
                             f"holds the samples; got {type(example_inputs).__name__}")
    return inputs


def capture_step(model: nn.Module, example_inputs: Any, *, target: torch.Tensor | None = None,
                 loss_fn: Callable | None = None, options: dict | None = None, snapshots: bool = True,
                 keep_graphs: bool = False, device: torch.device | str | None = None) -> Captured:
    """Compile a copy of `model` (with the loss inside) with backend 'dp' and run one backward
    (on `device` if given, else where the model and inputs are)."""
    if not isinstance(model, nn.Module):
        raise DPCompileError(f"dpcompile: expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(getattr(model, "_orig_mod", model))  # a torch.compile'd module: its original
    inputs = as_inputs(example_inputs)
    if device is not None:
        model = model.to(device)
        inputs = tuple(x.to(device) for x in inputs)
        target = target.to(device) if target is not None else None
    loss_fn = loss_fn or default_loss
    if target is None:
        with torch.no_grad():
            target = random_target(model_output(model(*inputs)),
                                   "classes" if loss_fn is default_loss else "regression")
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    # One cache entry at a time on this code object: the previous inspection's copy goes (it would
    # count towards dynamo's recompile limit); this one stays for re-runs of the same step (export).
    torch._dynamo.reset_code(training_step.__code__)
    compiled = torch.compile(training_step, backend="dp", options=opts, dynamic=False)
    with capture_graphs(snapshots=snapshots, keep_graphs=keep_graphs, skip_inductor=True):
        loss = compiled(model, loss_fn, *inputs, target)
        loss.backward()
    from ..privacy.state import state_of

    contexts = [c for c in state_of(model).compiled if c.records]
    return Captured(model, loss_fn, compiled, inputs, target, contexts, loss.detach())


def inspect_model(model: nn.Module, example_inputs: Any, *, target: torch.Tensor | None = None,
                  loss_fn: Callable | None = None, options: dict | None = None) -> Report:
    """Compile a copy of `model` with backend 'dp', run one private step on `example_inputs`
    and report what every pass did. `loss_fn(output, target)` defaults to cross-entropy
    against random class ids over the output's last dim; `target` overrides them (with another
    loss_fn and no target: Gaussian targets shaped like the output). `options` are the dp
    backend options (defaults: max_grad_norm 1, noise_multiplier 1)."""
    captured = capture_step(model, example_inputs, target=target, loss_fn=loss_fn, options=options)
    names = [f"input {i}" for i in range(len(captured.inputs))] + ["target"]
    return Report(captured.contexts, model_name=type(captured.model).__name__,
                  modules=param_modules(captured.model), user_inputs=names)


def report_of(model: nn.Module) -> Report:
    """The report of a model already compiled with backend 'dp' and run (graph snapshots only
    if it was compiled inside `capture_graphs()`)."""
    from ..privacy.state import state_of

    model = getattr(model, "_orig_mod", model)
    return Report(state_of(model).compiled, model_name=type(model).__name__, modules=param_modules(model))


def param_modules(model: nn.Module) -> dict[str, str]:
    """Parameter name -> class name of the module that owns it."""
    out = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            out[f"{module_name}.{pname}" if module_name else pname] = type(module).__name__
    return out
