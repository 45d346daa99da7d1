"""schedule: with clip groups, every node the dp passes added runs as early as its inputs allow.

Flat clipping needs every layer's norm before any clip factor is known, so the clipped sums
run at the end of the backward and each layer's BK operands (output gradients, per-sample
values) stay alive until then. A clip group's factor is known once its own norms are: placed
right after their inputs, a group's norms, factor, clipped sums and noise run while the
backward goes on to the next group, and free their operands there. The backward's own nodes
keep their order; flat and graph-break graphs are left as they are.

Before (group-wise, two blocks; the backward reaches block 2 first):
    dW2 … dW1 …  sq2 sq1  clip  w2 w1  sum2 sum1  noise2 noise1  output
After:
    dW2 sq2 … w2 sum2 noise2 … dW1 sq1 … w1 sum1 noise1 … output
(the (K, B) table of squared norms still joins the groups; each w_k reads only its row.)
"""
from __future__ import annotations

import torch.fx as fx

from .base import CompileContext, run_recorded


def run(gm: fx.GraphModule, ctx: CompileContext):
    return run_recorded("schedule", "backward", gm, lambda: {"notes": schedule_early(gm, ctx)})


def schedule_early(gm: fx.GraphModule, ctx: CompileContext) -> list[str]:
    original = ctx.plan.pop("graph_nodes", None)  # set by book_keeping for clip groups only
    if original is None:
        return []
    graph = gm.graph
    fixed = [n for n in graph.nodes if n in original or n.op in ("placeholder", "output")]
    order = {n: i for i, n in enumerate(fixed)}
    anchor: dict[fx.Node, fx.Node] = {}  # added node -> the latest backward node it depends on
    after: dict[fx.Node, list[fx.Node]] = {}  # backward node -> added nodes to run right after it
    for node in (n for n in graph.nodes if n not in order):
        deps = [anchor.get(a, a) for a in node.all_input_nodes]
        anchor[node] = max(deps, key=order.__getitem__, default=_last_placeholder(fixed))
        after.setdefault(anchor[node], []).append(node)
    moved = 0
    for base in fixed:
        cursor = base
        for node in after.get(base, []):
            if cursor.next is not node:
                moved += 1
            cursor.append(node)
            cursor = node
    if not moved:
        return []
    graph.lint()
    gm.recompile()
    return [f"{moved} dp nodes moved next to their inputs (each clip group is clipped as soon as its norms are known)"]


def _last_placeholder(nodes: list[fx.Node]) -> fx.Node:
    return [n for n in nodes if n.op == "placeholder"][-1]
