"""How an inspection report is shown: its text tables, pictures of graph snapshots (SVG, no
graphviz needed) and the HTML report. The report (`inspection`) holds the facts and knows
nothing of its renderings; this module reads it.

Layout: networkx gives the layers (topological generations: every node one row below its
latest input); graph inputs and constants are then moved down to the row just above their
first user, and nodes are ordered within a row by the mean position of their inputs
(barycenter sweeps), which keeps most edges short and uncrossed for the small models one
looks at this way.
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .inspection import GraphSnapshot, NodeInfo, ParamPlan, Report

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN, LEGEND_H = 184, 40, 18, 34, 24, 64
COLORS = {  # fill, stroke
    "input": ("#eef2f7", "#8a99ad"),
    "param": ("#fff4d6", "#c9a227"),
    "runtime": ("#f1e6fb", "#8e44ad"),
    "dp": ("#e3f5e6", "#2e8b57"),
    "op": ("#ffffff", "#7f8c8d"),
    "output": ("#fde8e4", "#c0392b"),
}
LEGEND = [("input", "graph input / saved activation"), ("param", "parameter"),
          ("runtime", "noise / runtime input"), ("dp", "dpcompile per-sample op"), ("op", "aten op"),
          ("output", "gradients out")]
HIGHLIGHT = "#e67e22"


def node_kind(node: NodeInfo, labels: dict[str, tuple[str, str]]) -> str:
    if node.op == "output":
        return "output"
    if node.op == "placeholder":
        return "runtime" if node.is_runtime_input else labels.get(node.name, ("input", ""))[0]
    return "dp" if node.is_dp_helper or node.op == "get_attr" else "op"


def layers(snap: GraphSnapshot) -> list[list[str]]:
    """Rows of node names, top to bottom, ordered to keep edges short."""
    import networkx as nx

    graph = snap.to_networkx()
    level = {}
    for depth, generation in enumerate(nx.topological_generations(graph)):
        for name in generation:
            level[name] = depth
    for n in snap.nodes:  # inputs and constants: just above their first user
        users = [level[u] for u in graph.successors(n.name)]
        if n.op in ("placeholder", "get_attr") and users:
            level[n.name] = max(0, min(users) - 1)
    rows: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for n in snap.nodes:
        rows[level[n.name]].append(n.name)
    rows = [r for r in rows if r]
    _order_rows(rows, graph)
    return rows


def _order_rows(rows: list[list[str]], graph) -> None:
    """Barycenter heuristic: two sweeps down (by inputs), one up (by users)."""
    for neighbours, order in ((graph.predecessors, rows), (graph.predecessors, rows),
                              (graph.successors, rows[::-1])):
        position: dict[str, float] = {}
        for row in order:
            for i, name in enumerate(row):
                position.setdefault(name, i - (len(row) - 1) / 2)

            def key(name: str) -> float:
                near = [position[m] for m in neighbours(name) if m in position and m not in row]
                return sum(near) / len(near) if near else position[name]

            row.sort(key=key)
            for i, name in enumerate(row):
                position[name] = i - (len(row) - 1) / 2


def svg(snap: GraphSnapshot, highlight: Sequence[str] = (), title: str = "",
        labels: dict[str, tuple[str, str]] | None = None, highlight_label: str = "added by this pass") -> str:
    """The graph as a standalone SVG document; nodes in `highlight` get an orange border.
    `labels`: graph input name -> (kind, label), e.g. ("param", "fc1.weight")."""
    labels = labels or {}
    marked = set(highlight)
    rows = layers(snap)
    width = max(len(r) for r in rows) * (NODE_W + GAP_X) - GAP_X + 2 * MARGIN
    width = max(width, 760)
    height = MARGIN * 2 + LEGEND_H + len(rows) * (NODE_H + GAP_Y)
    xy = {}
    for depth, row in enumerate(rows):
        left = (width - (len(row) * (NODE_W + GAP_X) - GAP_X)) / 2
        for i, name in enumerate(row):
            xy[name] = (left + i * (NODE_W + GAP_X), MARGIN + LEGEND_H + depth * (NODE_H + GAP_Y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#95a5a6"/></marker></defs>',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{MARGIN}" y="{MARGIN + 4}" font-size="15" font-weight="bold">{_esc(title)}</text>']
    parts += _legend(marked, highlight_label)
    for n in snap.nodes:
        for src in n.inputs:
            parts.append(_edge(xy[src], xy[n.name]))
    for n in snap.nodes:
        parts.append(_box(n, xy[n.name], node_kind(n, labels), n.name in marked, labels.get(n.name, ("", ""))[1]))
    parts.append("</svg>")
    return "\n".join(parts)


def _legend(marked: set[str], highlight_label: str) -> list[str]:
    out, x, y = [], MARGIN, MARGIN + 26
    items = LEGEND + ([("added", highlight_label)] if marked else [])
    for kind, label in items:
        fill, stroke = COLORS.get(kind, ("#ffffff", HIGHLIGHT))
        width = 3 if kind == "added" else 1.2
        out.append(f'<rect x="{x}" y="{y}" width="16" height="12" rx="3" fill="{fill}" stroke="{stroke}" '
                   f'stroke-width="{width}"/>')
        out.append(f'<text x="{x + 22}" y="{y + 10}" font-size="11" fill="#34495e">{_esc(label)}</text>')
        x += 30 + 6.2 * len(label)
    return out


def _edge(a: tuple[float, float], b: tuple[float, float]) -> str:
    x1, y1 = a[0] + NODE_W / 2, a[1] + NODE_H
    x2, y2 = b[0] + NODE_W / 2, b[1]
    bend = max(GAP_Y * 0.8, (y2 - y1) * 0.4)
    return (f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2 - 1:.1f}" '
            f'fill="none" stroke="#b2bec3" stroke-width="1" marker-end="url(#arrow)"/>')


def _box(n: NodeInfo, at: tuple[float, float], kind: str, marked: bool, label: str) -> str:
    x, y = at
    fill, stroke = COLORS[kind]
    if marked:
        stroke = HIGHLIGHT
    top = label or n.name
    if n.op == "output":
        bottom = f"return {len(n.inputs)} tensors"
    elif n.op == "placeholder":
        bottom = f"{n.name if label else 'saved' if kind == 'input' else 'input'} {n.shape}"
    else:
        bottom = f"{n.target} {n.shape}"
    tip = f"{n.name} = {n.target}({', '.join(n.inputs)}) {n.shape} {n.layout} {n.module}".strip()
    return (f'<g class="node {kind}{" added" if marked else ""}" data-name="{_esc(n.name)}">'
            f'<title>{_esc(tip)}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{3 if marked else 1.2}"/>'
            f'<text x="{x + NODE_W / 2:.1f}" y="{y + 16:.1f}" font-size="11.5" font-weight="bold" '
            f'text-anchor="middle" fill="#2c3e50">{_esc(_clip(top, 27))}</text>'
            f'<text x="{x + NODE_W / 2:.1f}" y="{y + 31:.1f}" font-size="10" text-anchor="middle" '
            f'fill="#566573">{_esc(_clip(bottom, 32))}</text></g>')


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------- HTML report

def html_report(report: Report) -> str:

    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>dpcompile: {_esc(report.model_name)}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>dpcompile inspection: {_esc(report.model_name)}</h1>",
           f"<pre class='summary'>{_esc(str(report))}</pre>",
           "<h2>Per-parameter plan</h2>", _plan_table(report, human),
           "<h2>Privacy</h2>", f"<pre>{_esc(format_privacy(report.privacy_summary()))}</pre>"]
    for region, ctx in enumerate(report.contexts):
        out.append(f"<h2>Graph {region}: passes</h2>")
        labels = report.input_labels(region)
        diffs = report.diff(region)
        for record, diff in zip(ctx.records, diffs):
            out.append(f"<details{' open' if record.name == 'book_keeping' else ''}><summary>{record.graph} · "
                       f"<b>{record.name}</b>: {record.nodes_before} → {record.nodes_after} nodes, "
                       f"+{len(record.added)} −{len(record.removed)}</summary>")
            if record.notes:
                out.append("<p>" + "<br>".join(_esc(n) for n in record.notes) + "</p>")
            if diff.added or diff.removed:
                out.append("<p class='diff'>" + "".join(f"<span class='add'>+ {_esc(a)}</span>" for a in diff.added)
                           + "".join(f"<span class='del'>− {_esc(r)}</span>" for r in diff.removed) + "</p>")
            if record.graph_after is not None:
                out.append(f"<div class='pic'>{svg(record.graph_after, record.added, '', labels)}</div>")
                out.append(f"<details><summary>graph text</summary><pre>"
                           f"{_esc(record.graph_after.text(record.added))}</pre></details>")
            out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def _plan_table(report: Report, human) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("param", "module", "kind", "strategy", "FLOPs", "memory",
                                                "FLOPs(B)", "alternatives"))
    rows = []
    for r in report.table():
        alts = "<br>".join(f"{_esc(k)}: {human(f)} / {human(m, 'B')}" for k, (f, m) in r.alternatives.items())
        rows.append(f"<tr><td>{_esc(r.param)}</td><td>{_esc(r.module)}</td><td>{_esc(r.kind)}</td>"
                    f"<td class='s-{_esc(r.strategy)}'>{_esc(r.strategy)}</td><td>{human(r.flops)}</td>"
                    f"<td>{human(r.memory_bytes, 'B')}</td><td><code>{_esc(r.flops_expr)}</code></td>"
                    f"<td>{alts or '-'}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #2c3e50; }
pre { background: #f7f9fb; padding: 10px; overflow-x: auto; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #d5dbe1; padding: 4px 8px; }
th { background: #eef2f7; } .s-ghost { color: #2e86c1; } .s-instantiate { color: #ca6f1e; }
.s-phantom { color: #8e44ad; } .s-lsg { color: #16a085; }
details { margin: 8px 0; } summary { cursor: pointer; }
.diff span { display: inline-block; margin: 1px 6px; font-family: monospace; font-size: 12px; }
.add { color: #1e8449; } .del { color: #b03a2e; } .pic { overflow-x: auto; border: 1px solid #eee; }
"""


# ----------------------------------------------------------------------------- text formatting

def human(x: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (bytes: binary units)."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(x) < 1024 or suffix == "TiB":
                return f"{x:.0f} {suffix}" if suffix == "B" else f"{x:.1f} {suffix}"
            x /= 1024
    for suffix in ("", "k", "M", "G", "T", "P"):
        if abs(x) < 1000 or suffix == "P":
            return f"{x:.0f}{suffix}" if suffix == "" else f"{x:.2f}{suffix}"
        x /= 1000
    return str(x)


def format_table(rows: Sequence[ParamPlan]) -> str:
    header = ("param", "module", "kind", "strategy", "FLOPs", "memory", "traffic", "alternatives (FLOPs / memory)")
    body = [(r.param, r.module or "-", r.kind, r.strategy, human(r.flops), human(r.memory_bytes, "B"),
             human(r.traffic_bytes, "B"),
             "; ".join(f"{k}: {human(f)} / {human(m, 'B')}" for k, (f, m) in r.alternatives.items()) or "-")
            for r in rows]
    return _columns(header, body)


def _columns(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def format_privacy(summary: dict[str, Any]) -> str:
    s = summary
    clip = (f"flat: C_i = min(1, R/‖g_i‖), R = {s['max_grad_norm']:g}" if s["clipping"] == "flat"
            else f"automatic: C_i = R/(‖g_i‖ + γ), R = {s['max_grad_norm']:g}, γ = {s.get('automatic_gamma')}")
    mech = "Gaussian (DP-SGD)" if s["noise_mechanism"] == "gaussian" else f"BSR correlated noise, {s['bsr_bands']} bands"
    lines = [
        f"mechanism        : {mech}",
        f"clipping         : {clip}, per {s['clipped_per']}",
        f"noise            : σ = {s['noise_multiplier']:g}, std σ·R = {s['noise_std']:g} on "
        f"{s['noise_coordinates']} coordinates, once per logical step (runtime input; seed {s['seed']})",
        f"gradient         : (Σ_i C_i g_i + noise) / {s['divisor']}; loss reduction '{s['loss_reduction']}'",
        "sampling         : " + _sampling_text(s),
    ]
    if "epsilon_one_epoch" in s:
        e = s["epsilon_one_epoch"]
        lines.append(f"accounting       : ε = {e['epsilon']:.3f} at δ = {e['delta']:g} after one epoch "
                     f"({e['steps']} steps, {s['accountant'].upper()})")
    if "lsg" in s:
        lines.append(f"lsg              : {s['lsg']}")
    if s["graph_breaks"]:
        how = s.get("graph_break_release", "clipped and noised once after the whole backward")
        lines.append(f"graph breaks     : {s['graph_breaks']} ({how})")
    return "\n".join("  " + line for line in lines)


def _sampling_text(s: dict[str, Any]) -> str:
    if s["noise_mechanism"] == "bsr" and s.get("bsr_sample_rate") is not None:
        return (f"cyclic Poisson groups (amplified banded MF), b = {s['bsr_min_separation']} groups, group t mod b "
                f"at rate q = {s['bsr_sample_rate']:g} (ε from dpcompile.privacy_spent after training)")
    if s["noise_mechanism"] == "bsr":
        return (f"fixed-order cyclic batches, min separation b = {s['bsr_min_separation']}, max participations "
                f"k = {s['bsr_max_participations']} (ε from dpcompile.privacy_spent after training)")
    if s["sample_rate"]:
        return f"Poisson, q = {s['sample_rate']:g}"
    return "sample_rate not set: no ε accounting (pass it in options)"


def format_report(report: Report) -> str:
    opts = report.options
    ctx0 = report.contexts[0]
    breaks = len(report.contexts) - 1
    out = [f"dpcompile inspection of {report.model_name}: batch size {ctx0.batch_hint}, "
           f"{len(report.contexts)} graph(s), {breaks} graph break(s)",
           "Pipeline:",
           "  forward : " + " -> ".join(report.pipeline["forward"]) + " -> Inductor",
           "  backward: " + " -> ".join(report.pipeline["backward"]) + " -> decompose -> Inductor",
           ]
    for region, ctx in enumerate(report.contexts):
        out.append(f"Passes (graph {region}):")
        body = [(r.graph, r.name, f"{r.nodes_before} -> {r.nodes_after}", f"+{len(r.added)}", f"-{len(r.removed)}",
                 "; ".join(r.notes)) for r in ctx.records]
        out.append(_columns(("graph", "pass", "nodes", "added", "removed", "notes"), body))
    out.append(f"Per-parameter plan (cost model at B = {ctx0.batch_hint}, strategy '{opts.strategy}', "
               f"memory budget {opts.memory_budget_mb:g} MiB per layer):")
    out.append(format_table(report.table()))
    out.append("Privacy:")
    out.append(format_privacy(report.privacy_summary()))
    return "\n".join(out)
