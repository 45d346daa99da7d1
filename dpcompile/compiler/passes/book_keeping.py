"""book_keeping: per-sample norms, clip factors and re-weighted parameter gradients.

For every parameter found by ``param_grads`` the cost model picks a strategy:

- ``ghost`` (BK): the per-sample norm comes from Gram matrices of the site's inputs
  (linear, embedding); the clipped sum re-runs the site op with the per-sample rows of
  its gradient input scaled by the clip weights (a second GEMM, no per-sample tensor).
- ``instantiate``: per-sample gradients (B, *shape) are formed by a batched formula of
  the site op (``per_sample.instantiate_*``) and by vmapping the post ops; the norm is
  their sum of squares and the clipped sum is ``Σ_b w_b G_b`` (no second GEMM, B×
  parameter memory).

All layers' squared norms are summed into one per-sample norm, so clipping is over
the whole gradient of each sample. The clipped sums replace the gradient outputs and
the per-sample norms become an extra output (for the finite check and for logging).
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from .. import cost_model
from ...privacy import per_sample
from ...errors import DPCompileError, describe_node
from . import symbolic
from .base import CompileContext, node_shape, pad_amounts, run_recorded
from .batch_dim import (BAG_MODES, FREE_ROWS, Batched, Ragged, _kwargs, bag_structure, batched_args,
                        layout_of, trilinear_dims)
from .param_grads import ParamGrad, Site

aten = torch.ops.aten
CASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)
# Instantiated gradients with at most this many entries per sample (biases, norm scales) share
# one norm, one clipped sum and one noise kernel: a GPT-2 has ~100 of them, each otherwise
# three tiny kernels of its own (launches, and Inductor compile time).
PACK_NUMEL = 1 << 16
# Plans (compiles) per compiled region for dynamic lengths, each guarding the range of lengths it
# suits; the last one takes every further length. Keeps the recompiles well under Dynamo's limit
# (8), past which it would run the model eagerly, i.e. refuse it (no dp backward).
MAX_LENGTH_PLANS = 4


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        table = rewrite(gm, ctx)
        packed = sum(len(members) for _, members in ctx.plan.get("packs", []))
        notes = [f"{packed} small gradients share one norm, clipped sum and noise kernel"] if packed else []
        guards = ctx.plan.get("size_guards")
        if guards:
            notes.append(f"plan chosen at sizes {ctx.plan['size_hints']}; it holds for {', '.join(guards)} "
                         "(guarded: other sizes recompile)")
        return {"table": table, "notes": notes}

    return run_recorded("book_keeping", "backward", gm, body)


def rewrite(gm: fx.GraphModule, ctx: CompileContext) -> list[dict]:
    graph = gm.graph
    grads: list[ParamGrad] = ctx.plan["param_grads"]
    if not grads:
        if ctx.multi_graph:  # a graph-break piece without parameters (e.g. the loss): nothing to clip here
            ctx.extra_outputs = []
            return []
        raise DPCompileError("dpcompile: this graph computes no parameter gradient; nothing to make private")
    batch = ctx.batch_hint  # the example batch size: the cost model's B
    budget = ctx.options.memory_budget_mb * 2**20
    out_node = graph.output_node()
    table, sq_norms, finishers, per_sample_grads, small = [], [], [], [], []
    expanders = ctx.plan["lsg_expand"] = {}  # position -> reduced clipped sum -> parameter gradient
    chosen = []  # (costs, strategy asked, strategy chosen) of the cost model's choices
    if ctx.clip_groups:  # the backward's own nodes, which passes/schedule.py leaves in order
        ctx.plan["graph_nodes"] = set(graph.nodes)

    def group(g: ParamGrad) -> int:
        return ctx.clip_groups.get(g.position, 0)

    with graph.inserting_before(out_node):
        for g in grads:
            _pad_before_transpose(graph, g)
            _per_sample_frequencies(graph, g)
            costs = _costs(g, ctx.batch_size)
            sizes = symbolic.hints([e for c in costs.values() for e in (c.flops, c.memory, c.traffic)],
                                   exclude={cost_model.B})
            wanted = "phantom" if ctx.options.strategy == "ghost" and "phantom" in costs else ctx.options.strategy
            if ctx.deferred:
                strategy = "instantiate"
            else:
                strategy = cost_model.choose(costs, batch, wanted, budget, sizes)
                chosen.append((costs, wanted, strategy))
            if g.lsg is not None:
                strategy = "lsg"
                sq, finish = _lsg(graph, g, expanders)
            elif strategy == "ghost":
                sq, finish = _ghost(graph, g)
            elif strategy == "phantom":
                sq, finish = _phantom(graph, g)
            elif not ctx.deferred and _packable(g):
                small.append((g, _instantiate_site(graph, g.sites[0])))
                sq = None
            else:
                sq, finish, full = _instantiate(gm, g, per_sample_output=ctx.deferred)
                per_sample_grads.append(full)
            if sq is not None:
                sq_norms.append((group(g), sq))
                finishers.append((g, finish))
            flops, mem = costs[strategy].at(batch, sizes)
            table.append({"param": g.name, "kind": g.kind, "strategy": strategy,
                          "flops": flops, "memory_bytes": mem,
                          "traffic_bytes": costs[strategy].traffic_at(batch, sizes),
                          "flops_expr": str(costs[strategy].flops), "memory_expr": str(costs[strategy].memory),
                          "alternatives": {k: c.at(batch, sizes) for k, c in costs.items() if k != strategy}})
            if ctx.clip_groups:
                table[-1]["clip_group"] = group(g)
        _guard_plan(chosen, batch, budget, ctx)
        packs = {}  # clip group -> (its small gradients, their packed per-sample values)
        for k in dict.fromkeys(group(g) for g, _ in small):
            members = [(g, values) for g, values in small if group(g) == k]
            packed = graph.call_function(per_sample.pack, tuple(values for _, values in members))
            sq_norms.append((k, graph.call_function(per_sample.sq_norm, (packed,))))
            packs[k] = (members, packed)
        total, threshold = _norms_by_group(graph, ctx, sq_norms)
        if ctx.deferred:
            _defer(gm, ctx, grads, total, per_sample_grads)  # flat clipping only (clip groups clip in each graph)
            return table
        clip = graph.call_function(per_sample.clip_weights, (
            total, threshold, ctx.options.loss_reduction, ctx.options.clipping, ctx.options.automatic_gamma))
        weights = graph.call_function(operator.getitem, (clip, 0))
        norms = graph.call_function(operator.getitem, (clip, 1))
        ctx.plan["weights"], ctx.plan["sample_norms"] = weights, norms
        rows = {}

        def weights_of(k: int) -> fx.Node:  # group-wise: group k's row of the (K, B) weights
            if not ctx.clip_groups:
                return weights
            if k not in rows:
                rows[k] = graph.call_function(per_sample.group_row, (weights, k))
            return rows[k]

        ctx.plan["clipped"] = {g.position: finish(weights_of(group(g))) for g, finish in finishers}
        ctx.plan["packs"] = [_pack_finish(graph, members, packed, weights_of(k))
                             for k, (members, packed) in packs.items()]
    outputs = list(out_node.args[0])
    with graph.inserting_before(out_node):
        for position, clipped in ctx.plan["clipped"].items():
            outputs[position] = expanders[position](clipped) if position in expanders else clipped
        for _, members in ctx.plan["packs"]:
            for position, _, _, gradient in members:
                outputs[position] = gradient
    out_node.args = (tuple(outputs) + (norms,),)
    ctx.extra_outputs = ["sample_norms"]
    _trim_tuple_sites(graph)
    graph.eliminate_dead_code()
    gm.recompile()
    return table


def _norms_by_group(graph: fx.Graph, ctx: CompileContext, sq_norms: list[tuple[int, fx.Node]]):
    """(per-sample squared norms, their clipping threshold): flat, the sum over every gradient,
    (B,), and R; group-wise, one sum per clip group, (K, B), and R/√K (`privacy.groups`)."""
    if not ctx.clip_groups:
        total = graph.call_function(per_sample.total_sq_norm, tuple(sq for _, sq in sq_norms))
        return total, ctx.options.max_grad_norm
    groups = sorted({k for k, _ in sq_norms})
    totals = [graph.call_function(per_sample.total_sq_norm, tuple(sq for j, sq in sq_norms if j == k))
              for k in groups]
    table = ctx.group_table
    return graph.call_function(per_sample.stack_groups, (len(table), groups, *totals)), table.threshold


def _defer(gm: fx.GraphModule, ctx: CompileContext, grads: list[ParamGrad], total: fx.Node,
           per_sample_grads: list[fx.Node]) -> None:
    """Graph breaks: the clip factor needs the norms of every graph of the step, so this graph
    returns its per-sample norms² and per-sample gradients instead of gradients; the runtime
    clips and adds noise once the whole backward has run (``PrivacyState``)."""
    out_node = gm.graph.output_node()
    outputs = list(out_node.args[0])
    for g in grads:
        outputs[g.position] = None
    out_node.args = (tuple(outputs) + (total, *per_sample_grads),)
    ctx.plan["deferred_positions"] = [g.position for g in grads]
    ctx.plan["deferred_zero_rows"] = [g.zero_rows for g in grads]  # released unnoised, as `noise` does
    ctx.extra_outputs = ["sample_sq_norms"] + [f"per_sample_grad:{g.name}" for g in grads]
    _trim_tuple_sites(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _pad_before_transpose(graph: fx.Graph, g: ParamGrad) -> None:
    """pad(xᵀ) -> pad'(x)ᵀ for the row operand of a linear site (pad_mm writes pad(xᵀ) for
    unaligned vocabularies). Splitting pad(xᵀ) per sample made Inductor store it transposed
    (an 823 MB pass for a GPT-2 head at B·T = 8192); pad'(x) is stored as x is, read in place
    as a transposed GEMM operand, and is often the very pad the input-gradient GEMM already
    made (then reused)."""
    for site in g.sites:
        pad = site.node.args[0] if site.kind == "linear" else None
        if (getattr(pad, "target", None) is not aten.constant_pad_nd.default
                or pad.args[0].target is not aten.permute.default or list(pad.args[0].args[1]) != [1, 0]):
            continue
        rows, cols, value = _pad_2d(pad)  # of xᵀ
        if cols != (0, 0):  # sample rows stay unpadded
            continue
        x = pad.args[0].args[0]
        padded = next((n for n in x.users if n.target is aten.constant_pad_nd.default
                       and _pad_2d(n) == (cols, rows, value)), None)
        if padded is None:
            x_pad = [*rows, *cols]  # pairs run from x's last dim, which is xᵀ's first
            padded = graph.create_node("call_function", aten.constant_pad_nd.default, (x, x_pad, value))
            padded.meta.update(val=aten.constant_pad_nd.default(x.meta["val"], x_pad, value),
                               dp_layout=x.meta.get("dp_layout"))
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order[padded] > order[site.node]:
            site.node.prepend(padded)  # its only input, x, comes before the site (it feeds pad)
        transposed = graph.create_node("call_function", aten.permute.default, (padded, [1, 0]))
        site.node.prepend(transposed)
        transposed.meta.update(pad.meta)
        site.node.replace_input_with(pad, transposed)


def _per_sample_frequencies(graph: fx.Graph, g: ParamGrad) -> None:
    """scale_grad_by_freq: the batch gradient divides each token's rows by the token's count in
    the whole batch, which couples the samples. A sample's own gradient (that of its loss
    alone) divides by the count in that sample: the rows are scaled so before the site,
    which then sums them unscaled, and every strategy sees an ordinary embedding."""
    for site in g.sites:
        if site.kind != "embedding" or not site.node.args[4]:
            continue
        grad, indices, num_weights, padding_idx, _ = site.node.args
        li = _index_layout(site)
        if li is None:
            raise DPCompileError(
                f"dpcompile: {describe_node(site.node)} uses scale_grad_by_freq=True, which divides by each token's "
                "count in its sample, but dpcompile cannot tell which sample these indices belong to. Fix: pass "
                "per-sample indices (samples along the sample dim) or use scale_grad_by_freq=False.")
        with graph.inserting_before(site.node):
            scaled = graph.call_function(per_sample.frequency_scaled, (grad, indices, li, num_weights))
        scaled.meta.update(grad.meta)
        site.node.args = (scaled, indices, num_weights, padding_idx, False)


def _pad_2d(pad: fx.Node) -> tuple:
    """((before, after) of dim 0, (before, after) of dim 1, fill value) of a 2-D constant_pad_nd."""
    return pad_amounts(pad.args[1], 2, 0), pad_amounts(pad.args[1], 2, 1), pad.args[2] if len(pad.args) > 2 else 0.0


# ------------------------------------------------------------------ costs

def _guard_plan(chosen: list, batch: int, budget: float, ctx: CompileContext) -> None:
    """Dynamic lengths: guard the range of each length symbol over which this plan stays good
    (`cost_model.plan_range`), so that Dynamo recompiles only outside it: a few buckets of
    lengths, not one compile per length. The batch size is not guarded, as for static
    lengths: costs are linear in B (only the memory budget could change with it), and a
    guard would recompile Poisson batches by size."""
    exprs = [e for costs, _, _ in chosen for c in costs.values() for e in (c.flops, c.memory, c.traffic)]
    sizes = symbolic.hints(exprs, exclude={cost_model.B})
    guards = []
    if ctx.length_plans >= MAX_LENGTH_PLANS - 1:  # the last plan serves all further lengths
        sizes = {}
    for symbol in sorted(set(sizes) - getattr(ctx.batch_size, "free_symbols", set()), key=str):
        lowest, highest = symbolic.value_range(symbol)
        lo, hi = cost_model.plan_range(chosen, batch, budget, sizes, symbol, lowest, highest)
        guards += symbolic.guard_range(symbol, lo, hi)
    if guards:
        ctx.plan["size_guards"] = guards
        ctx.plan["size_hints"] = {str(s): v for s, v in sizes.items()}


def _costs(g: ParamGrad, batch_size: sympy.Expr) -> dict[str, cost_model.Cost]:
    numel = int(torch.Size(g.output.meta["val"].shape).numel())
    site = g.sites[0]
    if g.phantom is not None:
        emb, lin = g.phantom.embedding, g.phantom.linear
        grad, la = emb.node.args[0], lin.node.args[0].meta["dp_layout"]
        rows_in = symbolic.size(sympy.simplify(sympy.Mul(*node_shape(grad)[:-1]) / batch_size))
        return cost_model.phantom(rows_in, la.outer * la.inner, int(node_shape(grad)[-1]), int(emb.node.args[2]))
    if g.norm_preserving and site.kind == "linear":
        a, b = site.node.args
        la = _operand_layout(site.node, 0)
        n, m = int(node_shape(a)[0]), int(node_shape(b)[1])
        costs = cost_model.linear(la.outer * la.inner, n, m, site.node.meta["val"].dtype.itemsize)
        if g.lsg is not None:
            costs.update(cost_model.lsg(la.outer * la.inner, n, m, g.lsg.rank, g.lsg.kept))
        return costs
    if g.norm_preserving and site.kind == "embedding" and _ghostable_embedding(site):
        grad = site.node.args[0]
        rows = symbolic.size(sympy.simplify(sympy.Mul(*node_shape(grad)[:-1]) / batch_size))
        return cost_model.embedding(rows, int(node_shape(grad)[-1]), int(site.node.args[2]))
    rows = sympy.Max(*(_rows_per_sample(s) for s in g.sites))
    costs = cost_model.generic(numel, rows)
    if g.norm_preserving and site.kind == "bilinear" and _ghostable_trilinear(site.node):
        costs["ghost"] = _trilinear_ghost_cost(site.node)
    if g.norm_preserving and site.kind == "embedding_bag" and layout_of(site.node.args[0]) == Batched(0):
        d = int(node_shape(site.node.args[0])[1])  # one bag per sample: ‖u_b‖²‖g_b‖² (the sort is not priced)
        costs["ghost"] = cost_model.Cost(3 * cost_model.B * d, cost_model.B, traffic=cost_model.B * d * 4)
    return costs


def _trilinear_rows(node: fx.Node) -> tuple[int, list, tuple]:
    """(common position p of the samples' rows, each input's dim positions, the rows' layout)."""
    positions = trilinear_dims(node)
    k, lay = next((k, layout_of(a)) for k, a in enumerate(node.args[:3]) if isinstance(layout_of(a), Batched))
    return positions[k][lay.dim], positions, _layout(node.args[k])


def _ghostable_trilinear(node: fx.Node) -> bool:
    """Summed over the rows only, all three inputs hold the rows, and every other dim comes
    from one input: each sample's gradient is Σ_t u_t ⊗ v_t ⊗ w_t (nn.Bilinear's weight)."""
    p, positions, _ = _trilinear_rows(node)
    rest = [d for dims in positions for d in dims if d != p]
    return list(node.args[6]) == [p] and all(p in dims for dims in positions) and len(rest) == len(set(rest))


def _trilinear_ghost_cost(node: fx.Node) -> cost_model.Cost:
    """Three T×T Grams, priced as a linear site's two over widths n + m = the inputs' widths."""
    p, positions, _ = _trilinear_rows(node)
    lay = next(layout_of(a) for a in node.args[:3] if isinstance(layout_of(a), Batched))
    widths = [sympy.Mul(*(size for d, size in zip(dims, node_shape(x)) if d != p))
              for x, dims in zip(node.args[:3], positions)]
    return cost_model.linear(lay.outer * lay.inner, widths[0], widths[1] + widths[2])["ghost"]


def _bag_args(node: fx.Node) -> tuple:
    """The per_sample bag helpers' arguments after the bag rows: (indices, offsets or None
    for the 2-D form, per-sample weights, max indices, mode, padding_idx, table rows)."""
    kw = _kwargs(node)
    ragged = isinstance(layout_of(kw["offsets"]), Ragged)
    _, step = bag_structure(node, kw["indices"], kw["offsets"] if ragged else None, layout_of(kw["grad"]))
    mode = kw["mode"] if isinstance(kw["mode"], int) else BAG_MODES.index(kw["mode"])
    return (kw["indices"], kw["offsets"] if step is None else None, kw.get("per_sample_weights"),
            kw["maximum_indices"], mode, kw.get("padding_idx", -1), kw["num_weights"])


def _ghostable_embedding(site: Site) -> bool:
    grad = site.node.args[0]
    lg = grad.meta["dp_layout"]
    return isinstance(lg, Batched) and lg.dim < grad.meta["val"].dim() - 1 and _index_layout(site) is not None


def _index_layout(site: Site) -> tuple | None:
    """How to split an embedding's indices per sample: their own layout, or, for sample-free
    indices with one index per gradient row (e.g. expanded token-type ids), the gradient's."""
    grad, indices = site.node.args[0], site.node.args[1]
    if isinstance(indices.meta.get("dp_layout"), Batched):
        return _layout(indices)
    if node_shape(indices) == node_shape(grad)[:-1]:
        return _layout(grad)
    return None


def _rows_per_sample(site: Site) -> sympy.Expr:
    return sympy.Max(1, *(lay.outer * lay.inner for _, lay in batched_args(site.node)))


# ------------------------------------------------------------------ strategies

def _layout(node: fx.Node) -> tuple:
    """The node's layout as helper arguments (symbolic sizes as nodes of its graph)."""
    return symbolic.graph_layout(node.graph, node.meta["dp_layout"].as_tuple())


def _operand_layout(mm: fx.Node, index: int) -> Batched:
    """The sample rows of operand `index` of a linear site: its own layout, or, for a FREE
    operand (a zero initial state), the rows batch_dim matched to the other operand's samples."""
    lay = mm.args[index].meta["dp_layout"]
    return lay if isinstance(lay, Batched) else mm.meta[FREE_ROWS][index]


def _mm_layouts(mm: fx.Node) -> tuple[tuple, tuple]:
    return tuple(symbolic.graph_layout(mm.graph, _operand_layout(mm, i).as_tuple()) for i in (0, 1))


def _ghost(graph: fx.Graph, g: ParamGrad):
    site = g.sites[0]
    if site.kind == "linear":
        a, b = site.node.args
        sq = graph.call_function(per_sample.ghost_sq_norm_linear, (a, b, *_mm_layouts(site.node)))
    elif site.kind == "bilinear":
        p, positions, layout = _trilinear_rows(site.node)
        sq = graph.call_function(per_sample.ghost_sq_norm_trilinear, (*site.node.args[:3], positions, p, layout))
    elif site.kind == "embedding_bag":  # the clipped sum from the same definitions, not the kernel
        grad, bag = site.node.args[0], _bag_args(site.node)
        sq = graph.call_function(per_sample.ghost_sq_norm_bag, (grad, *bag))
        return sq, lambda weights: _replay_post(graph, g, {site.value: graph.call_function(
            per_sample.bag_weighted_sum, (weights, grad, _layout(grad), *bag))})
    else:
        grad, indices, _, padding_idx, scale_by_freq = site.node.args
        sq = graph.call_function(per_sample.ghost_sq_norm_embedding,
                                 (grad, indices, _layout(grad), _index_layout(site), padding_idx))

    def finish(weights: fx.Node) -> fx.Node:
        return _replay_post(graph, g, {site.value: _weighted_site(graph, site, weights)})

    return sq, finish


def _phantom(graph: fx.Graph, g: ParamGrad):
    emb, lin = g.phantom.embedding, g.phantom.linear
    grad, indices, _, padding_idx, _ = emb.node.args
    a, b = lin.node.args
    sq = graph.call_function(per_sample.phantom_sq_norm, (
        grad, indices, _layout(grad), _index_layout(emb), padding_idx, a, b, *_mm_layouts(lin.node),
        g.phantom.transposed))

    def finish(weights: fx.Node) -> fx.Node:
        return _replay_post(graph, g, {s.value: _weighted_site(graph, s, weights) for s in (emb, lin)})

    return sq, finish


def _lsg(graph: fx.Graph, g: ParamGrad, expanders: dict):
    """Norms and clipped sums of the kept low-rank coordinates (see passes/lsg.py)."""
    site, plan = g.sites[0], g.lsg
    a, b = site.node.args
    reduced = graph.call_function(per_sample.lsg_reduced,
                                  (a, b, *_mm_layouts(site.node), plan.left, plan.right, plan.index))
    sq = graph.call_function(per_sample.sq_norm, (reduced,))
    dtype = site.node.meta["val"].dtype

    def expand(coords: fx.Node) -> fx.Node:
        full = graph.call_function(per_sample.lsg_reconstruct, (coords, plan.index, plan.left, plan.right, dtype))
        return _replay_post(graph, g, {site.value: full})

    def finish(weights: fx.Node) -> fx.Node:
        return graph.call_function(per_sample.weighted_sum, (weights, reduced))

    expanders[g.position] = expand
    return sq, finish


def _weighted_site(graph: fx.Graph, site: Site, weights: fx.Node) -> fx.Node:
    """The site op re-run with its per-sample input rows scaled by the clip weights (BK)."""
    arg = next(a for a in site.node.args if isinstance(a, fx.Node) and isinstance(a.meta["dp_layout"], Batched))
    scaled = graph.call_function(per_sample.per_sample_rows, (weights, arg, _layout(arg)))
    return graph.call_function(site.node.target, tuple(scaled if a is arg else a for a in site.node.args),
                               site.node.kwargs)


def _packable(g: ParamGrad) -> bool:
    """Small, and its gradient is the site's per-sample value reshaped or cast: same entries,
    so noise added to the packed sum lands on the parameter's own coordinates."""
    if g.lsg is not None or g.phantom is not None or not g.reshape_only:
        return False
    numel = int(torch.Size(g.output.meta["val"].shape).numel())
    site_numel = sympy.Mul(*node_shape(g.sites[0].value))  # no int(): a dynamic length would be specialized
    return site_numel.is_number and numel == int(site_numel) <= PACK_NUMEL


def _pack_finish(graph: fx.Graph, small: list, packed: fx.Node, weights: fx.Node):
    """(Σ_b w_b x_b of the packed values, [(position, start, numel, gradient read from it)]).
    The noise pass noises the flat sum once, under every member's gradient. Like the
    instantiate fast path, entries are cast to the parameter's dtype before the post ops."""
    summed = graph.call_function(per_sample.weighted_sum, (weights, packed, torch.float32))
    members, start = [], 0
    for g, _ in small:
        site = g.sites[0]
        numel = int(torch.Size(site.value.meta["val"].shape).numel())
        piece = graph.call_function(per_sample.unpack, (summed, start, _static_shape(site.value),
                                                        g.output.meta["val"].dtype))
        members.append((g.position, start, numel, _replay_post(graph, g, {site.value: piece}, cast=False)))
        start += numel
    return summed, members


def _instantiate(gm: fx.GraphModule, g: ParamGrad, per_sample_output: bool = False):
    """Per-sample values of the sites; returns (norms², finish, per-sample gradients or None).

    When the post ops keep every entry (transposes, casts, reshapes, dropping zero padding),
    the norm is taken at the site and the post ops run once on the clipped sum: no per-sample
    copy through them (pad_mm's slice and autocast's float32 cast would each write one).
    """
    graph = gm.graph
    per_site = [_instantiate_site(graph, s) for s in g.sites]
    if g.post and g.norm_preserving and not per_sample_output:
        site_values, dtype = per_site[0], g.output.meta["val"].dtype
        sq = graph.call_function(per_sample.sq_norm, (site_values,))

        def finish_at_site(weights: fx.Node) -> fx.Node:
            summed = graph.call_function(per_sample.weighted_sum, (weights, site_values, dtype))
            return _replay_post(graph, g, {g.sites[0].value: summed}, cast=False)

        return sq, finish_at_site, None
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

    return sq, finish, full


def _instantiate_site(graph: fx.Graph, site: Site) -> fx.Node:
    """A node computing this site's per-sample values, (B, *site output shape)."""
    node, call = site.node, graph.call_function
    args = node.args
    if site.kind == "linear":
        return call(per_sample.instantiate_linear, (*args, *_mm_layouts(node)))
    if site.kind == "sum":
        dims = args[1] if len(args) > 1 else None
        return call(per_sample.instantiate_sum, (args[0], _layout(args[0]), dims, _shape_args(node)))
    if site.kind == "embedding":
        grad, indices, num_weights, padding_idx, _ = args
        li = _index_layout(site)
        return call(per_sample.instantiate_embedding, (grad, indices, _layout(grad), li, num_weights, padding_idx))
    if site.kind == "layer_norm":
        grad, x, normalized, mean, rstd = args[:5]
        return call(per_sample.instantiate_layer_norm,
                    (grad, x, mean, rstd, _layout(grad), len(normalized), site.index))
    if site.kind == "group_norm":
        grad, x, mean, rstd, _, _, _, _, groups = args[:9]
        return call(per_sample.instantiate_group_norm, (grad, x, mean, rstd, _layout(grad), groups, site.index))
    if site.kind == "embedding_bag":
        return call(per_sample.instantiate_bag, (args[0], _layout(args[0]), *_bag_args(node)))
    if site.kind == "bilinear":
        p, positions, layout = _trilinear_rows(node)
        rank = len(positions[0]) + len(args[3])
        return call(per_sample.instantiate_trilinear, (*args[:3], positions, list(args[6]), rank, p, layout))
    if site.kind == "conv":
        grad, x, weight, _, stride, padding, dilation, transposed, output_padding, groups = args[:10]
        return call(per_sample.instantiate_conv, (grad, x, weight, _layout(grad), stride, padding, dilation,
                                                  transposed, output_padding, groups, site.index))
    raise DPCompileError(f"dpcompile: no per-sample formula for the {site.kind} site {describe_node(node)}")


def _static_shape(node: fx.Node) -> list[int]:
    return [int(s) for s in node.meta["val"].shape]


def _shape_args(node: fx.Node) -> list:
    """The node's shape as helper arguments: ints, and nodes for dynamic sizes (e.g. the (T, d)
    sum over samples feeding a position embedding's backward). int() of a SymInt would add a
    guard specializing the graph to this length."""
    return [symbolic.graph_value(node.graph, s) for s in node_shape(node)]


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
        if n.target is aten.embedding_dense_backward.default:
            env[n].target = per_sample.embedding_grad_onehot  # vmap-friendly (see its docstring)
    sub.output(env[g.output])
    return fx.GraphModule(gm, sub), leaves


def _replay_post(graph: fx.Graph, g: ParamGrad, env: dict[fx.Node, fx.Node], cast: bool = True) -> fx.Node:
    """Copy the post ops reading the weighted site values; returns the new gradient.

    cast=False: the values already have the gradient's dtype, so the post ops' dtype casts
    are dropped (the ops are shape-only; a same-dtype cast of a graph output would cost
    Inductor a copy kernel)."""
    for n in g.post:
        if not cast and n.target in CASTS and set(n.kwargs) <= {"dtype"}:
            env[n] = env.get(n.args[0], n.args[0])
        else:
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
