"""noise: add Gaussian noise to the clipped sums and divide by the batch size.

The division is folded into the clip weights (`per_sample.noise_scales`, once per step):
w_b / d weights every clipped sum, and each gradient's privatization is then one
multiply-add of its own noise, (Σ_b w_b g_b + σR·z) / d = Σ_b (w_b/d) g_b + (σR/d)·z.

Two runtime inputs are appended to the backward graph, after those of earlier passes:
``dp_noise``, a flat float32 N(0, 1) vector covering every privatized gradient of the
graph (drawn by the runtime from the privacy state's seeded generator, so the stream is
reproducible and checkpointable; an lsg weight takes noise on its k kept coordinates
only and is expanded to its shape afterwards), and ``dp_scalars = [σ·R or 0, expected
batch size or 0]``. The noise std is a runtime value so that gradient-accumulation
micro-steps add none and the last one adds it once.

Rows that every sample's gradient leaves zero whatever the data (an embedding's padding_idx
row, `ParamGrad.zero_rows`) are released as exact zeros, without noise: their sensitivity
is 0 and which rows they are is fixed by the model, not by the data, so nothing is learnt
from them; noise there would move the padding vector from its initial value.

Correlated mode (``noise_mechanism="bsr"``): the graph is the same; ``dp_noise`` then holds
w_t = (C⁻¹Z)_t of the banded square root C instead of z_t, computed by the runtime's
recursion over the last p − 1 noise vectors of this graph's stream (`dpcompile.privacy.bsr`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...privacy import per_sample
from .base import CompileContext, run_recorded


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        return {"notes": add_noise(gm, ctx)}

    return run_recorded("noise", "backward", gm, body)


def add_noise(gm: fx.GraphModule, ctx: CompileContext) -> list[str]:
    if ctx.deferred:
        return ["graph-break mode: noise is added once per step after the whole backward (PrivacyState)"]
    graph = gm.graph
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_after(last_input):
        noise = graph.placeholder("dp_noise")
    with graph.inserting_after(noise):
        scalars = graph.placeholder("dp_scalars")
    weights = ctx.plan["weights"]
    with graph.inserting_after(weights):
        scales = graph.call_function(per_sample.noise_scales, (weights, scalars))
    with graph.inserting_after(scales):
        scaled_weights = graph.call_function(operator.getitem, (scales, 0))
        std = graph.call_function(operator.getitem, (scales, 1))
    weights.replace_all_uses_with(scaled_weights, delete_user_cb=lambda user: user is not scales)
    out_node = graph.output_node()
    outputs = list(out_node.args[0])
    offset = 0
    sizes = {}
    numels = {g.position: int(torch.Size(g.output.meta["val"].shape).numel()) for g in ctx.plan["param_grads"]}
    numels.update({position: plan.kept for position, plan in ctx.plan.get("lsg", {}).items()})
    expanders = ctx.plan.get("lsg_expand", {})
    with graph.inserting_before(out_node):
        for position, clipped in sorted(ctx.plan["clipped"].items()):
            noisy = _privatized(graph, clipped, noise, offset, std)
            outputs[position] = expanders[position](noisy) if position in expanders else noisy
            sizes[position] = (offset, numels[position])
            offset += numels[position]
        for summed, members in ctx.plan.get("packs", []):  # small gradients: one flat sum, noised once
            with graph.inserting_after(summed):
                noisy = _privatized(graph, summed, noise, offset, std)
            summed.replace_all_uses_with(noisy, delete_user_cb=lambda user: user is not noisy)
            for position, start, numel, _ in members:
                sizes[position] = (offset + start, numel)
            offset += sum(numel for _, _, numel, _ in members)
        for g in ctx.plan["param_grads"]:  # padding rows: zero in every sample's gradient (ParamGrad.zero_rows)
            if g.zero_rows and outputs[g.position] is not None:
                outputs[g.position] = graph.call_function(per_sample.zero_rows, (outputs[g.position], g.zero_rows))
    out_node.args = (tuple(outputs),)
    graph.eliminate_dead_code()
    gm.recompile()
    ctx.plan["noise_numel"] = offset
    ctx.plan["noise_slices"] = sizes
    ctx.runtime_inputs.update({"dp_noise": (offset,), "dp_scalars": (2,)})
    kind = "BSR-correlated noise (C⁻¹Z)_t" if ctx.options.noise_mechanism == "bsr" else "Gaussian noise"
    return [f"{kind} over {offset} gradient coordinates; std σ·R = "
            f"{ctx.options.noise_multiplier * ctx.options.max_grad_norm:g} (runtime input)"]


def _privatized(graph: fx.Graph, clipped: fx.Node, noise: fx.Node, offset: int, std: fx.Node) -> fx.Node:
    """clipped + std·z of its noise slice. A clipped sum that is a weighted sum itself takes the
    noise in the same node (one pass over the per-sample values, `per_sample.weighted_sum`);
    the unnoised one is left for dead-code elimination."""
    if clipped.target is per_sample.weighted_sum:
        weights, values, *dtype = clipped.args
        return graph.call_function(per_sample.weighted_sum,
                                   (weights, values, dtype[0] if dtype else None, noise, offset, std))
    return graph.call_function(per_sample.privatize, (clipped, noise, offset, std))
