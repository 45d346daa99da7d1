"""lsg: low-rank, then sparse, per-sample gradients for selected Linear weights (Ito et al., LSG).

For a selected weight whose gradient is the linear site G = Σ_b a_b b_b (n×m), the
released gradient lives in a reduced space: the pair (G Rᵀ, Lᵀ G) of rank-r factors
(L: n×r with orthonormal columns, R: r×m with orthonormal rows), of which only the
k = density·r·(n+m) coordinates in ``index`` are kept. Per sample, the kept coordinates
come straight from the site's inputs (``per_sample.lsg_reduced``), never forming G_b;
their squared norm joins the sample's whole-gradient norm, so clipping bounds the reduced
vector and the noise is added to k coordinates only. The optimizer receives the n×m
matrix the noisy reduced vector stands for (``per_sample.lsg_reconstruct``).

Privacy: L, R and index are runtime inputs chosen by ``dpcompile.privacy.lsg.LSGProjector``
either from a seed (data-independent) or from the current weights and the last update,
which are post-processing of earlier noisy releases when the initial weights are public
(random init or a public checkpoint). Each step therefore releases clipped reduced vectors
(sensitivity R) plus N(0, σ²R²) per kept coordinate: the same Gaussian mechanism as
DP-SGD, and the accounting is unchanged.

This pass only plans: it picks the weights, adds the L/R/index graph inputs and attaches an
``LSGPlan``; ``book_keeping`` computes the norms and the clipped reduced sums, ``noise``
adds the noise and expands the result to the weight's shape.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ...errors import DPCompileError
from .base import CompileContext, run_recorded
from .param_grads import ParamGrad, count_transposes


@dataclasses.dataclass
class LSGPlan:
    left: fx.Node  # L, (n, r)
    right: fx.Node  # R, (r, m)
    index: fx.Node  # kept reduced coordinates, (k,) int64
    shape: tuple[int, int]  # (n, m) of the site matrix
    rank: int
    kept: int
    transposed: bool  # the site matrix is the parameter's transpose (HF Conv1D, x @ W)


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        return {"table": plan(gm, ctx)}

    return run_recorded("lsg", "backward", gm, body)


def plan(gm: fx.GraphModule, ctx: CompileContext) -> list[dict]:
    config = ctx.options.lsg
    grads: list[ParamGrad] = ctx.plan["param_grads"]
    ctx.plan["lsg"] = {}
    if config is None:
        return []
    chosen = [g for g in grads if config.selects(g.name)]
    if not chosen:
        raise DPCompileError(
            f"dpcompile: lsg layers {list(config.layers)} match no trainable parameter of this graph; "
            f"its parameters are {[g.name for g in grads]}")
    if ctx.deferred:
        raise DPCompileError(
            "dpcompile: lsg cannot be combined with graph breaks (the model was split into several graphs); "
            "remove the graph break (torch._dynamo.explain shows it) or drop the lsg option")
    rows = []
    for g in chosen:
        shape = _site_matrix(g)
        if shape is None:
            continue  # biases and norm scales stay in full-dimensional DP-SGD
        rank = config.rank
        if rank > min(shape):
            raise DPCompileError(
                f"dpcompile: lsg rank {rank} exceeds the smaller side of `{g.name}` {tuple(shape)}; lower lsg rank")
        kept = max(1, math.ceil(config.density * rank * sum(shape)))
        g.lsg = _add_inputs(gm.graph, ctx, g, shape, rank, kept)
        ctx.plan["lsg"][g.position] = g.lsg
        rows.append({"param": g.name, "shape": shape, "rank": rank, "reduced_dim": rank * sum(shape),
                     "kept": kept, "full_dim": shape[0] * shape[1], "transposed": g.lsg.transposed})
    return rows


def _site_matrix(g: ParamGrad) -> tuple[int, int] | None:
    """(n, m) of a Linear/matmul weight's site matrix; None for 1-D parameters."""
    param_shape = tuple(int(s) for s in g.output.meta["val"].shape)
    if len(param_shape) < 2:
        return None
    site = g.sites[0]
    if not (g.reshape_only and site.kind == "linear" and len(param_shape) == 2):
        raise DPCompileError(
            f"dpcompile: lsg selects `{g.name}` ({g.kind}, shape {param_shape}), but lsg only applies to "
            "Linear/matmul weights used once; narrow the lsg layers pattern (e.g. '*.weight' of Linear layers)")
    return tuple(int(s) for s in site.node.meta["val"].shape)


def _add_inputs(graph: fx.Graph, ctx: CompileContext, g: ParamGrad, shape: tuple[int, int], rank: int,
                kept: int) -> LSGPlan:
    n, m = shape
    flips = count_transposes(g.sites[0].value, g.output)
    if flips is None:
        raise DPCompileError(f"dpcompile: lsg cannot follow how the gradient of `{g.name}` is reshaped")
    specs = {"left": ((n, rank), torch.float32), "right": ((rank, m), torch.float32),
             "index": ((kept,), torch.int64)}
    nodes = {}
    for role, (size, dtype) in specs.items():
        name = f"lsg_{role}_{g.position}"
        last = list(graph.find_nodes(op="placeholder"))[-1]
        with graph.inserting_after(last):
            nodes[role] = graph.placeholder(name)
        ctx.runtime_inputs[name] = size
        ctx.runtime_dtypes[name] = dtype
    return LSGPlan(nodes["left"], nodes["right"], nodes["index"], shape, rank, kept, transposed=bool(flips % 2))
