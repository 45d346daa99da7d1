"""book_keeping: per-sample norms, clip factors and re-weighted parameter gradients.

For every parameter found by ``param_grads`` the cost model picks a strategy:

- ``ghost`` (BK): the per-sample norm comes from Gram matrices of the site's inputs
  (linear, embedding); the clipped sum re-runs the site op with the per-sample rows of
  its gradient input scaled by the clip weights (a second GEMM, no per-sample tensor).
- ``instantiate``: per-sample gradients (B, *shape) are formed by vmapping the site op
  and the post ops; the norm is their sum of squares and the clipped sum is
  ``Σ_b w_b G_b`` (no second GEMM, B× parameter memory).

All layers' squared norms are summed into one per-sample norm, so clipping is over
the whole gradient of each sample. The clipped sums replace the gradient outputs and
the per-sample norms become an extra output (for the finite check and for logging).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import cost_model, per_sample
from ..errors import DPCompileError, describe_node
from .base import CompileContext, node_shape, run_recorded
from .batch_dim import Batched
from .param_grads import ParamGrad, Site

aten = torch.ops.aten


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        table = rewrite(gm, ctx)
        return {"table": table}

    return run_recorded("book_keeping", "backward", gm, body)


def rewrite(gm: fx.GraphModule, ctx: CompileContext) -> list[dict]:
    graph = gm.graph
    grads: list[ParamGrad] = ctx.plan["param_grads"]
    if not grads:
        raise DPCompileError("dpcompile: this graph computes no parameter gradient; nothing to make private")
    batch = _batch_hint(ctx)
    budget = ctx.options.memory_budget_mb * 2**20
    out_node = graph.output_node()
    table, sq_norms, finishers = [], [], []
    with graph.inserting_before(out_node):
        for g in grads:
            costs = _costs(g)
            strategy = cost_model.choose(costs, batch, ctx.options.strategy, budget)
            if strategy == "ghost":
                sq, finish = _ghost(graph, g)
            else:
                sq, finish = _instantiate(gm, g)
            sq_norms.append(sq)
            finishers.append((g, finish))
            flops, mem = costs[strategy].at(batch)
            table.append({"param": g.name, "kind": g.kind, "strategy": strategy,
                          "flops": flops, "memory_bytes": mem,
                          "flops_expr": str(costs[strategy].flops), "memory_expr": str(costs[strategy].memory),
                          "alternatives": {k: c.at(batch) for k, c in costs.items() if k != strategy}})
        total = graph.call_function(per_sample.total_sq_norm, tuple(sq_norms))
        clip = graph.call_function(per_sample.clip_weights, (
            total, ctx.options.max_grad_norm, ctx.options.loss_reduction, ctx.options.clipping,
            ctx.options.automatic_gamma))
        weights = graph.call_function(operator.getitem, (clip, 0))
        norms = graph.call_function(operator.getitem, (clip, 1))
        ctx.plan["weights"], ctx.plan["sample_norms"] = weights, norms
        ctx.plan["clipped"] = {g.position: finish(weights) for g, finish in finishers}
    outputs = list(out_node.args[0])
    for position, clipped in ctx.plan["clipped"].items():
        outputs[position] = clipped
    out_node.args = (tuple(outputs) + (norms,),)
    ctx.extra_outputs = ["sample_norms"]
    _trim_tuple_sites(graph)
    graph.eliminate_dead_code()
    gm.recompile()
    return table


def _batch_hint(ctx: CompileContext) -> int:
    size = ctx.batch_size
    try:
        return int(size)
    except TypeError:
        return int(ctx.batch_hint or 64)


# ------------------------------------------------------------------ costs

def _costs(g: ParamGrad) -> dict[str, cost_model.Cost]:
    numel = int(torch.Size(g.output.meta["val"].shape).numel())
    site = g.sites[0]
    if g.reshape_only and site.kind == "linear":
        a, b = site.node.args
        la = a.meta["dp_layout"]
        n, m = int(node_shape(a)[0]), int(node_shape(b)[1])
        return cost_model.linear(la.outer * la.inner, n, m)
    if g.reshape_only and site.kind == "embedding" and _ghostable_embedding(site):
        grad = site.node.args[0]
        lg = grad.meta["dp_layout"]
        rows = int(torch.Size([int(s) for s in node_shape(grad)[:-1]]).numel()) // _batch_extent(grad)
        return cost_model.embedding(rows, int(node_shape(grad)[-1]), int(site.node.args[2]))
    rows = max(_rows_per_sample(s) for s in g.sites)
    return cost_model.generic(numel, rows)


def _ghostable_embedding(site: Site) -> bool:
    grad, indices = site.node.args[0], site.node.args[1]
    lg, li = grad.meta["dp_layout"], indices.meta.get("dp_layout")
    return isinstance(lg, Batched) and isinstance(li, Batched) and lg.dim < grad.meta["val"].dim() - 1


def _batch_extent(node: fx.Node) -> int:
    """How many elements of `node`'s leading dims belong to one sample, times B (concrete)."""
    lay = node.meta["dp_layout"]
    shape = node_shape(node)
    return int(shape[lay.dim] / (lay.outer * lay.inner))


def _rows_per_sample(site: Site) -> int:
    lays = [a.meta["dp_layout"] for a in _tensor_args(site.node) if isinstance(a.meta.get("dp_layout"), Batched)]
    return max((l.outer * l.inner for l in lays), default=1)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]


# ------------------------------------------------------------------ strategies

def _layout(node: fx.Node) -> tuple[int, int, int]:
    lay = node.meta["dp_layout"]
    return (lay.dim, lay.outer, lay.inner)


def _ghost(graph: fx.Graph, g: ParamGrad):
    site = g.sites[0]
    if site.kind == "linear":
        a, b = site.node.args
        sq = graph.call_function(per_sample.ghost_sq_norm_linear, (a, b, _layout(a), _layout(b)))
    else:
        grad, indices, _, padding_idx, scale_by_freq = site.node.args
        sq = graph.call_function(per_sample.ghost_sq_norm_embedding,
                                 (grad, indices, _layout(grad), _layout(indices), padding_idx))

    def finish(weights: fx.Node) -> fx.Node:
        # Re-run the site with its gradient input re-weighted per sample; post ops are linear.
        arg = next(a for a in site.node.args if isinstance(a, fx.Node) and isinstance(a.meta["dp_layout"], Batched))
        scaled = graph.call_function(per_sample.per_sample_rows, (weights, arg, _layout(arg)))
        new_site = graph.call_function(site.node.target,
                                       tuple(scaled if a is arg else a for a in site.node.args), site.node.kwargs)
        return _replay_post(graph, g, {site.value: new_site})

    return sq, finish


def _instantiate(gm: fx.GraphModule, g: ParamGrad):
    graph = gm.graph
    per_site = [_instantiate_site(graph, s) for s in g.sites]
    if g.post:
        post_gm, leaves = _extract_post(gm, g)
        attr = f"dp_post_{g.position}"
        gm.add_submodule(attr, post_gm)
        post_ref = graph.get_attr(attr)
        full = graph.call_function(per_sample.instantiate_post,
                                   (post_ref, len(per_site), *per_site, *leaves))
    else:
        full = per_site[0]
    sq = graph.call_function(per_sample.sq_norm, (full,))

    def finish(weights: fx.Node) -> fx.Node:
        return graph.call_function(per_sample.weighted_sum, (weights, full))

    return sq, finish


def _instantiate_site(graph: fx.Graph, site: Site) -> fx.Node:
    node = site.node
    if node.target is aten.embedding_dense_backward.default and node.args[4]:
        raise DPCompileError(
            f"dpcompile: {describe_node(node)} uses scale_grad_by_freq=True, which scales by counts over the whole "
            "batch (mixing samples). Use nn.Embedding(..., scale_grad_by_freq=False).")
    args, in_dims = [], []
    for a in node.args:
        lay = a.meta.get("dp_layout") if isinstance(a, fx.Node) else None
        if isinstance(lay, Batched):
            args.append(graph.call_function(per_sample.batch_front, (a, _layout(a))))
            in_dims.append(0)
        else:
            args.append(_only_needed_output(node, a, site))
            in_dims.append(None)
    return graph.call_function(per_sample.instantiate_site, (node.target, tuple(in_dims), site.index, *args))


def _only_needed_output(node: fx.Node, arg, site: Site):
    """For tuple sites, ask only for the parameter gradient being instantiated."""
    if site.index is not None and arg is node.args[-1] and isinstance(arg, (list, tuple)):
        return [i == site.index for i in range(len(arg))]
    return arg


def _extract_post(gm: fx.GraphModule, g: ParamGrad) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The post ops as a standalone graph: inputs = site values, then sample-free leaves."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, s in enumerate(g.sites):
        env[s.value] = sub.placeholder(f"site_{i}")
    leaves: list[fx.Node] = []
    post = set(g.post)

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n in post:
                raise DPCompileError(f"dpcompile: post op {n.name} used before it is defined")
            env[n] = sub.placeholder(f"leaf_{len(leaves)}")
            leaves.append(n)
        return env[n]

    for n in g.post:
        env[n] = sub.node_copy(n, lookup)
    sub.output(env[g.output])
    return fx.GraphModule(gm, sub), leaves


def _replay_post(graph: fx.Graph, g: ParamGrad, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """Copy the post ops reading the weighted site values; returns the new gradient."""
    for n in g.post:
        env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    return env[g.output]


def _trim_tuple_sites(graph: fx.Graph) -> None:
    """Stop conv/norm backward ops from computing parameter grads nobody reads any more."""
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.target not in (aten.convolution_backward.default, aten.native_layer_norm_backward.default,
                               aten.native_group_norm_backward.default):
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        mask = node.args[-1]
        node.args = node.args[:-1] + ([bool(m) and i in used for i, m in enumerate(mask)],)
