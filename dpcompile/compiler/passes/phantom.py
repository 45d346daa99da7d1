"""phantom: exact per-sample norms of tied input/output embeddings without vocab-sized tensors.

A tied weight E (V×d) used as the input embedding and the output head gets, per sample,
G = G_in + G_out with G_in = Σ_s onehot(x_s) g_sᵀ and G_out = Σ_t u_t w_tᵀ (the head's
matmul rows). Phantom clipping (Ding et al., DPFormer) expands

    ‖G‖² = ‖G_in‖² + ‖G_out‖² + 2⟨G_in, G_out⟩,   ⟨G_in, G_out⟩ = Σ_{s,t} u_t[x_s] (g_s·w_t)

so the input part is a one-hot ghost norm, the output part a linear ghost norm and the
cross term a gather of u at the token ids: O(B·T²) memory instead of B·V·d. This pass
only recognises the pattern (an embedding site and a matmul site meeting in one add);
``book_keeping`` weighs it against instantiation in the cost model.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .base import CompileContext, run_recorded
from .param_grads import SHAPE_OPS, ParamGrad, Site, count_transposes

aten = torch.ops.aten


@dataclasses.dataclass
class PhantomPlan:
    embedding: Site
    linear: Site
    transposed: bool  # the matmul site computes the parameter's transpose (d×V)


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        rows = []
        for g in ctx.plan["param_grads"]:
            g.phantom = match(g)
            if g.phantom is not None:
                rows.append({"param": g.name, "embedding_site": g.phantom.embedding.node.name,
                             "linear_site": g.phantom.linear.node.name, "transposed": g.phantom.transposed})
        return {"table": rows}

    return run_recorded("phantom", "backward", gm, body)


def match(g: ParamGrad) -> PhantomPlan | None:
    if sorted(s.kind for s in g.sites) != ["embedding", "linear"]:
        return None
    adds = [n for n in g.post if n.target is aten.add.Tensor]
    if len(adds) != 1 or any(n.target not in SHAPE_OPS for n in g.post if n is not adds[0]):
        return None
    embedding = next(s for s in g.sites if s.kind == "embedding")
    linear = next(s for s in g.sites if s.kind == "linear")
    flips_in, flips_out = count_transposes(embedding.value, adds[0]), count_transposes(linear.value, adds[0])
    if flips_in is None or flips_out is None or flips_in % 2:
        return None
    return PhantomPlan(embedding, linear, transposed=bool(flips_out % 2))
