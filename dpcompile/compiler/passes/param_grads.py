"""param_grads: map each parameter to the backward subgraph that produces its gradient.

A parameter's gradient is a sum over samples. We look for the *sites* where that sum
happens, the ops whose inputs are per-sample and whose output is not:

- ``linear``: ``mm(Gᵀ, A)`` contracting the (flattened) batch rows: nn.Linear with any
  number of leading dims, HF ``Conv1D``, any matmul against a parameter;
- ``sum``: a reduction over the batch dim: biases, elementwise scales (RMSNorm...);
- ``embedding``: ``embedding_dense_backward``;
- ``embedding_bag``: ``_embedding_bag_backward`` (nn.EmbeddingBag, every mode);
- ``conv``: ``convolution_backward`` (weight and bias);
- ``bilinear``: ``_trilinear`` summing over the rows (nn.Bilinear's weight);
- ``layer_norm`` / ``group_norm``: the affine parts of their backward ops.

Between the sites and the gradient output there may be *post* ops that no longer see
samples (views, adds of several uses of a shared parameter, a sum over positions
already reduced over the batch...). They must be linear in the sites: then the
per-sample gradient is ``post(site_b)`` and the clipped sum is ``post(Σ_b C_b site_b)``.
Anything else is refused with an error naming the parameter and the op.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ...errors import DPCompileError, describe_node
from .base import CompileContext, node_shape, pad_amounts, run_recorded
from .batch_dim import AGG, FREE, Batched, batched_args

aten = torch.ops.aten

# Sites whose parameter gradients are output #1 (weight) and #2 (bias) of a tuple.
TUPLE_SITES = {
    aten.convolution_backward.default: "conv",
    aten.native_layer_norm_backward.default: "layer_norm",
    aten.native_group_norm_backward.default: "group_norm",
}
# Post ops: op -> how its AGG (site-dependent) inputs may appear to stay linear.
SHAPE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.t.default, aten.transpose.int, aten.clone.default, aten.alias.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.contiguous.default, aten._to_copy.default, aten.expand.default,
    torch.ops.prims.convert_element_type.default,  # autocast: bf16 site, fp32 parameter
}
LINEAR_OPS = SHAPE_OPS | {
    aten.sum.dim_IntList, aten.sum.default, aten.neg.default, aten.cat.default, aten.slice.Tensor,
    aten.select.int, aten.embedding_dense_backward.default, aten.mm.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar,
}


@dataclasses.dataclass
class Site:
    node: fx.Node  # the op that sums over samples
    value: fx.Node  # what the post ops consume: `node`, or its getitem
    kind: str  # linear / sum / embedding / embedding_bag / conv / bilinear / layer_norm / group_norm
    index: int | None = None  # output index for tuple sites


@dataclasses.dataclass
class ParamGrad:
    name: str
    position: int  # index in the backward outputs
    output: fx.Node
    sites: list[Site]
    post: list[fx.Node]  # linear, sample-free ops from the sites to `output`, in graph order
    phantom: Any = None  # a phantom.PhantomPlan for tied embeddings
    lsg: Any = None  # an lsg.LSGPlan for low-rank + sparse weights

    @property
    def reshape_only(self) -> bool:
        return len(self.sites) == 1 and all(n.target in SHAPE_OPS for n in self.post)

    @property
    def norm_preserving(self) -> bool:
        """One site, and post ops that keep every per-sample entry or drop only zero padding:
        the site's per-sample norm is the parameter's (ghost norms apply)."""
        return len(self.sites) == 1 and all(n.target in SHAPE_OPS or drops_only_padding(n) for n in self.post)

    @property
    def zero_rows(self) -> list[int]:
        """Rows of the gradient that are zero in every sample's gradient by construction, whatever
        the data: the padding_idx row of an embedding table used by that one lookup (no post op
        moves rows). The noise pass leaves them exactly zero: a data-independent set of
        coordinates with sensitivity 0 needs no noise, and noise there would move the padding
        vector, which the model expects to stay as initialised."""
        if len(self.sites) != 1 or not all(n.target in _SAME_DIMS for n in self.post):
            return []
        row = padding_index(self.sites[0])
        return [row] if row is not None and row >= 0 else []

    @property
    def kind(self) -> str:
        kinds = sorted({s.kind for s in self.sites})
        if len(self.sites) > 1:
            return "shared(" + "+".join(kinds) + ")"
        return kinds[0]


def run(gm: fx.GraphModule, ctx: CompileContext):
    def body():
        grads = find_param_grads(gm.graph, ctx)
        ctx.plan["param_grads"] = grads
        return {
            "table": [{"param": g.name, "kind": g.kind, "sites": [s.node.name for s in g.sites],
                       "post_ops": len(g.post)} for g in grads],
        }

    return run_recorded("param_grads", "backward", gm, body)


def find_param_grads(graph: fx.Graph, ctx: CompileContext) -> list[ParamGrad]:
    outputs = list(graph.output_node().args[0])
    if len(outputs) != len(ctx.input_kinds):
        raise DPCompileError(
            f"dpcompile: backward graph returns {len(outputs)} gradients for {len(ctx.input_kinds)} inputs"
        )
    order = {n: i for i, n in enumerate(graph.nodes)}
    grads = []
    for position, (out, kind) in enumerate(zip(outputs, ctx.input_kinds)):
        if out is None:
            continue
        name = ctx.param_names.get(position, f"input #{position}")
        if kind == "buffer":
            raise DPCompileError(f"dpcompile: buffer `{name}` receives a gradient; make it a Parameter or detach it")
        if kind != "param":
            continue  # gradient w.r.t. a user input: not released by the optimizer
        sites, post = _trace_back(out, name)
        grads.append(ParamGrad(name, position, out, sites, sorted(post, key=order.__getitem__)))
    return grads


def _trace_back(out: fx.Node, name: str) -> tuple[list[Site], set[fx.Node]]:
    sites: dict[fx.Node, Site] = {}
    post: set[fx.Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in post or node in sites:
            continue
        site = _as_site(node)
        if site is not None:
            sites[node] = site
            continue
        layout = node.meta.get("dp_layout")
        if isinstance(layout, Batched):
            raise DPCompileError(f"dpcompile: gradient of `{name}` is still per-sample at {describe_node(node)}")
        if layout is FREE:
            raise _sample_free(name, node)
        _check_linear(node, name)
        post.add(node)
        stack.extend(a for a in _node_args(node) if a.meta.get("dp_layout") is AGG)
    if not sites:
        raise DPCompileError(f"dpcompile: could not find where the gradient of `{name}` is summed over samples")
    return list(sites.values()), post


def _node_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(x, fx.Node):
                out.append(x)
    return out


def _as_site(node: fx.Node) -> Site | None:
    """The summation site `node` is (or reads from), if any."""
    if node.target is operator.getitem and node.args[0].target in TUPLE_SITES:
        parent, index = node.args
        if index not in (1, 2) or not batched_args(parent):
            return None
        return Site(parent, node, TUPLE_SITES[parent.target], index)
    if not batched_args(node):
        return None
    if node.target in (aten.mm.default,):
        return Site(node, node, "linear")
    if node.target in (aten.sum.dim_IntList, aten.sum.default):
        return Site(node, node, "sum")
    if node.target is aten.embedding_dense_backward.default:
        return Site(node, node, "embedding")
    if node.target is aten._trilinear.default:
        return Site(node, node, "bilinear")
    if node.target is aten._embedding_bag_backward.default:
        return Site(node, node, "embedding_bag")
    raise DPCompileError(
        f"dpcompile: a parameter gradient is summed over samples by {describe_node(node)}, which dpcompile "
        "cannot split per sample; it supports Linear/matmul, Bilinear, convolutions, Embedding, "
        "EmbeddingBag, LayerNorm, GroupNorm, biases and elementwise scales."
    )


def padding_index(site: Site) -> int | None:
    """The padding_idx argument of an embedding site (-1: none), None for other sites."""
    if site.kind == "embedding":
        return site.node.args[3]
    if site.kind == "embedding_bag":
        return site.node.args[11] if len(site.node.args) > 11 else site.node.kwargs.get("padding_idx", -1)
    return None


def _sample_free(name: str, node: fx.Node) -> DPCompileError:
    return DPCompileError(
        f"dpcompile: gradient of parameter `{name}` has a part that does not come from any sample "
        f"({describe_node(node)}), e.g. a regulariser computed inside the compiled model. "
        "Compute such terms outside the compiled region, or use the optimizer's weight_decay."
    )


def _check_linear(node: fx.Node, name: str) -> None:
    """Post ops must be linear in the site values, or per-sample splitting is invalid."""
    ok = node.target in LINEAR_OPS
    tensor_args = [a for a in _node_args(node) if isinstance(a.meta.get("val"), torch.Tensor)]
    dependent = [a for a in tensor_args if a.meta.get("dp_layout") is AGG]
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        free = [a for a in tensor_args if a.meta.get("dp_layout") is FREE]
        if free:
            raise _sample_free(name, free[0])
    elif node.target in (aten.mul.Tensor, aten.mm.default):
        ok = ok and len(dependent) == 1
    elif node.target is aten.div.Tensor:
        ok = ok and dependent == tensor_args[:1]
    elif node.target is aten.embedding_dense_backward.default:
        ok = ok and dependent == [node.args[0]]
    elif node.target is aten.where.self:
        ok = _masked_select(node)
    if not ok:
        raise DPCompileError(
            f"dpcompile: gradient of parameter `{name}` goes through {describe_node(node)} after being summed "
            "over samples, and that op is not linear, so it cannot be split per sample."
        )


def _masked_select(node: fx.Node) -> bool:
    """where(mask, g, 0) with a sample-free mask is linear in g (the backward of where(mask, x, c):
    the constant branch gets no gradient). A per-sample mask or a nonzero branch is not."""
    cond, *branches = node.args
    if not isinstance(cond, fx.Node) or cond.meta.get("dp_layout") is not FREE:
        return False
    dependent = [b for b in branches if isinstance(b, fx.Node) and b.meta.get("dp_layout") is AGG]
    return len(dependent) == 1 and all(b is dependent[0] or _is_zero(b) for b in branches)


def _is_zero(x) -> bool:
    """A constant zero: a number, or a zero-filled tensor made in the graph."""
    if isinstance(x, (int, float, bool)):
        return x == 0
    if not isinstance(x, fx.Node):
        return False
    if x.target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return True
    if x.target in (aten.full.default, aten.full_like.default):
        return len(x.args) > 1 and _is_zero(x.args[1])
    if x.target is aten.scalar_tensor.default:
        return _is_zero(x.args[0])
    return False


def count_transposes(start: fx.Node, stop: fx.Node) -> int | None:
    """Number of 2-D transposes on the single-user path start -> stop (None if it branches
    or permutes more than two dims)."""
    count, node = 0, start
    while node is not stop:
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if node.target in (aten.t.default, aten.transpose.int) or (
                node.target is aten.permute.default and list(node.args[1]) == [1, 0]):
            count += 1
        elif node.target is aten.permute.default:
            return None
    return count


# Ops through which a dim keeps its index (dtype casts, copies).
_SAME_DIMS = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten._to_copy.default,
              torch.ops.prims.convert_element_type.default}


def drops_only_padding(node: fx.Node) -> bool:
    """A slice keeping [0, end) of a dim whose entries from `end` on are zero padding.

    Inductor's pad_mm pads an unaligned GEMM operand with zeros and slices the result back
    (the vocab dim of LM-head gradients on GPUs); the rows it drops are zero in every
    sample's gradient, so the per-sample norm is unchanged."""
    if node.target is not aten.slice.Tensor:
        return False
    x, dim, start, end, step = _slice_args(node)
    shape = node_shape(x)
    dim = dim % len(shape)
    if start not in (None, 0) or step != 1 or not isinstance(end, int) or not shape[dim].is_Integer:
        return False
    end = end + int(shape[dim]) if end < 0 else end  # pad_mm slices with a negative end
    tail = _zero_tail(x, dim)
    return tail is not None and tail <= end


def _slice_args(node: fx.Node) -> tuple:
    """slice.Tensor(x, dim=0, start=None, end=None, step=1) with the defaults filled in."""
    defaults = (None, 0, None, None, 1)
    return tuple(node.args) + defaults[len(node.args):]


def _zero_tail(node: fx.Node, dim: int) -> int | None:
    """k such that node[..., k:, ...] (along `dim`) is structurally zero, if the graph shows it."""
    target = node.target
    if target is aten.constant_pad_nd.default:
        x, pad = node.args[0], node.args[1]
        value = node.args[2] if len(node.args) > 2 else 0
        left, right = pad_amounts(pad, len(node_shape(node)), dim)
        size = node_shape(x)[dim]
        if value != 0 or not all(isinstance(v, int) for v in (left, right)) or not size.is_Integer:
            return None
        size = int(size)
        if right > 0:
            return left + size
        inner = _zero_tail(x, dim)
        return None if inner is None else left + inner
    if target in _SAME_DIMS:
        return _zero_tail(node.args[0], dim)
    if target in (aten.t.default, aten.transpose.int, aten.permute.default):
        ndim = len(node_shape(node))
        if target is aten.permute.default:
            order = [d % ndim for d in node.args[1]]
        else:
            a, b = (0, 1) if target is aten.t.default else (node.args[1] % ndim, node.args[2] % ndim)
            order = list(range(ndim))
            order[a], order[b] = b, a
        return _zero_tail(node.args[0], order[dim])
    if target is aten.mm.default:  # rows come from the first operand, columns from the second
        return _zero_tail(node.args[0], 0) if dim == 0 else _zero_tail(node.args[1], 1)
    return None
