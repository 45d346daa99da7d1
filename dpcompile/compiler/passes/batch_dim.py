"""batch_dim: find, for every tensor of the graph, which dimension holds the samples.

Each node gets a *layout* in ``node.meta["dp_layout"]``:

- ``Batched(dim, outer, inner)``: dimension ``dim`` has size ``outer * B * inner`` and
  index ``(o * B + b) * inner + r`` belongs to sample ``b``. Plain batch dims have
  outer = inner = 1; ``view(x, [B*T, d])`` gives inner = T, a time-major flatten
  ``[T*B, d]`` gives outer = T.
- ``FREE``: does not depend on any sample (parameters, constants, random masks).
- ``AGG``: combines all samples (a loss, a parameter gradient).

Multi-output ops get a tuple of layouts. The rules are structural (positions, not
sizes), so they hold for static and for symbolic batch sizes. Any op that would
let one sample's data reach another sample's values (BatchNorm statistics, a
softmax or reduction across the batch feeding per-sample values) is refused with
an error naming the module and source line; so is any op without a rule.

The forward graph is also checked for *model state written from batch data*
(``check_state_writes``): a buffer, parameter or module tensor attribute whose new
value depends on the samples (a Batched or AGG layout) or on the batch size (a
symbolic size of the batch) is refused. Such state ends up in ``state_dict()`` and
checkpoints holding an exact batch statistic, while the privacy guarantee covers
only the noisy gradients. Writes from constants, from parameters or from the
state's own old value (a step counter) are accepted.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.operator_schemas import normalize_function

from ...privacy import per_sample
from ...errors import DPCompileError, describe_node
from . import symbolic
from .base import CompileContext, node_shape, pad_amounts, run_recorded, to_expr

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Batched:
    dim: int
    outer: int | sympy.Expr = 1  # sympy expressions of shape symbols under dynamic lengths (passes/symbolic.py)
    inner: int | sympy.Expr = 1

    def at(self, dim: int) -> "Batched":
        return Batched(dim, self.outer, self.inner)

    def as_tuple(self) -> tuple[int, int, int]:
        """(dim, outer, inner): the form the per_sample helpers take inside graphs."""
        return (self.dim, self.outer, self.inner)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FREE = _Marker("FREE")
AGG = _Marker("AGG")


@dataclasses.dataclass(frozen=True)
class Ragged:
    """EmbeddingBag's offsets form: 1-D values (role "values": the indices, per-sample weights)
    that the offsets (role "offsets", one start per sample, the graph input `offsets`) cut into
    the samples' bags. The offsets are data too (each start depends on the lengths of the
    samples before it), so both are followed only into the EmbeddingBag ops."""
    offsets: str
    role: str


class SampleMixingError(DPCompileError):
    pass


def run(gm: fx.GraphModule, ctx: CompileContext, which: str = "backward"):
    """Annotate every node with its layout; raise on ops that mix samples."""

    def body():
        propagate(gm.graph, ctx, which)
        if which == "forward":
            check_state_writes(gm.graph, ctx)
        if which == "backward":
            guard_token_means(gm.graph, ctx)

    return run_recorded("batch_dim", which, gm, body)


def check_inference_state_writes(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """State writes of a graph AOT compiles without a backward (no output needs a gradient: a
    forward under torch.no_grad(), a region after a graph break that uses no parameter).
    Nothing there must stay per sample, so sample-mixing ops are not refused; an op whose
    rule would refuse it counts as carrying samples (AGG), and writes of model state from
    batch data are refused as in training forwards."""
    propagate(gm.graph, ctx, "inference")
    check_state_writes(gm.graph, ctx)


def propagate(graph: fx.Graph, ctx: CompileContext, which: str) -> None:
    """`which`: "forward", "backward", or "inference" (a forward whose refusals only mark AGG)."""
    graph.owning_module.meta["dp_batch_size"] = ctx.batch_size
    placeholders = list(graph.find_nodes(op="placeholder"))
    if which in ("forward", "inference"):
        graph.owning_module.meta[STATE_NAMES] = _state_names(placeholders, ctx)
    start = _placeholder_layouts(placeholders, ctx, which)
    if which in ("forward", "inference"):
        start.update(_ragged_bag_inputs(graph, start))
    for node in graph.nodes:
        if node.op == "placeholder":
            node.meta["dp_layout"] = start[node.name]
            if which == "backward" and node.name in ctx.forward_sample_ids:
                node.meta[SAMPLE_IDS] = ctx.forward_sample_ids[node.name]
        elif node.op == "call_function":
            node.meta["dp_graph"] = which
            node.meta["dp_layout"] = _infer(node, ctx) if which != "inference" else _infer_or_agg(node, ctx)
            if node.meta["dp_layout"] is FREE:
                _track_sample_ids(node, ctx)
        elif node.op == "output":
            continue
        else:
            raise DPCompileError(f"dpcompile: unexpected {node.op} node {node.name} in an aot graph")
    if which == "forward":
        ctx.forward_layouts = {n.name: n.meta["dp_layout"] for n in graph.nodes if "dp_layout" in n.meta}
        ctx.forward_sample_ids = {n.name: n.meta[SAMPLE_IDS] for n in graph.nodes if SAMPLE_IDS in n.meta}


def _infer_or_agg(node: fx.Node, ctx: CompileContext) -> Any:
    """An inference graph's layout: a refused op is taken to mix samples (AGG); state writes are still refused."""
    try:
        return _infer(node, ctx)
    except StateWriteError:
        raise
    except DPCompileError:
        val = node.meta.get("val")
        return tuple(AGG for _ in val) if isinstance(val, (list, tuple)) else AGG


def _placeholder_layouts(placeholders: list[fx.Node], ctx: CompileContext, which: str) -> dict[str, Any]:
    if which in ("forward", "inference"):
        if len(placeholders) != len(ctx.input_kinds):
            raise DPCompileError(
                f"dpcompile: forward graph has {len(placeholders)} inputs but dynamo gave "
                f"{len(ctx.input_kinds)}; this model's input structure is not supported yet"
            )
        dims = ctx.input_sample_dims
        return {p.name: (Batched(dims.get(i, ctx.options.sample_dim)) if kind == "batched" else FREE)
                for i, (p, kind) in enumerate(zip(placeholders, ctx.input_kinds))}
    layouts = {}
    tangents = [p for p in placeholders if p.name.startswith("tangents")]
    if len(tangents) != len(ctx.tangent_layouts):
        raise DPCompileError(
            f"dpcompile: backward graph has {len(tangents)} tangents for "
            f"{len(ctx.tangent_layouts)} differentiable outputs; models that mutate their "
            "inputs in place are not supported"
        )
    for p, (layout, shape) in zip(tangents, ctx.tangent_layouts):
        if layout is None or node_shape(p) != shape:
            raise DPCompileError(
                f"dpcompile: cannot match backward input {p.name} (shape {node_shape(p)}) to a forward output "
                f"(shape {shape}); refusing rather than guessing which samples it holds")
        layouts[p.name] = layout
    for p in placeholders:
        if p.name in layouts:
            continue
        if p.name not in ctx.forward_layouts:
            raise DPCompileError(f"dpcompile: backward input {p.name} is not a saved forward value")
        layouts[p.name] = ctx.forward_layouts[p.name]
    return layouts


# --------------------------------------------------------------------------- helpers

def _is_inplace(op: torch._ops.OpOverload) -> bool:
    """An op that writes its first argument (torch.Tag.inplace from torch 2.12; the schema's alias
    annotation before)."""
    tag = getattr(torch.Tag, "inplace", None)
    if tag is not None:
        return tag in op.tags
    args = op._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write \
        and not any(a.kwarg_only and a.name == "out" for a in args)


def layout_of(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return arg.meta.get("dp_layout", FREE)
    if isinstance(arg, (list, tuple)):
        return [layout_of(a) for a in arg]
    return FREE


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor))
    return out


def batched_args(node: fx.Node) -> list[tuple[fx.Node, Batched]]:
    return [(a, a.meta["dp_layout"]) for a in _tensor_args(node) if isinstance(a.meta.get("dp_layout"), Batched)]


def _kwargs(node: fx.Node) -> dict[str, Any]:
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise DPCompileError(f"dpcompile: cannot read the arguments of {describe_node(node)}")
    return normalized.kwargs


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _mix(node: fx.Node, why: str, fix: str = "") -> SampleMixingError:
    msg = f"dpcompile: {describe_node(node)} {why}; per-sample gradients would be wrong, so it is refused."
    if fix:
        msg += f" Fix: {fix}"
    return SampleMixingError(msg)


def _free_or_agg(node: fx.Node) -> Any:
    return AGG if any(layout_of(a) is AGG for a in _tensor_args(node)) else FREE


def _same_layout(node: fx.Node, aligned: list[Batched]) -> Batched:
    if len(set(aligned)) > 1:
        raise _mix(node, f"combines tensors that hold samples along different dimensions ({sorted(set(aligned), key=str)})")
    return aligned[0]


# --------------------------------------------------------------------------- rules

def _pointwise(node: fx.Node) -> Any:
    out_nd = _ndim(node)
    out_shape = node_shape(node)
    aligned = []
    for arg, lay in batched_args(node):
        dim = lay.dim + out_nd - _ndim(arg)
        if node_shape(arg)[lay.dim] != out_shape[dim]:
            raise _mix(node, "broadcasts a per-sample dimension")
        aligned.append(lay.at(dim))
    if not aligned:
        return _free_or_agg(node)
    if any(layout_of(a) is AGG for a in _tensor_args(node)):
        if node.meta.get("dp_graph") == "backward":
            _pointwise_with_agg_refused(node)
        raise _mix(node, "combines a value aggregated over the batch (e.g. batch statistics or a loss) with per-sample values",
                   "compute batch statistics per sample (GroupNorm/LayerNorm instead of BatchNorm)")
    return _same_layout(node, aligned)


def _view(node: fx.Node) -> Any:
    src = node.args[0]
    lay = layout_of(src)
    if not isinstance(lay, Batched):
        return lay
    in_shape, out_shape = node_shape(src), node_shape(node)
    return _map_view(node, lay, [symbolic.exact(s) for s in in_shape], [symbolic.exact(s) for s in out_shape])


def _map_view(node: fx.Node, lay: Batched, in_shape, out_shape) -> Batched:
    """Where the batch factor of `lay` lands when `in_shape` is reshaped to `out_shape`."""
    B = _batch_size(node)
    before = sympy.Mul(*in_shape[: lay.dim]) * lay.outer  # elements-worth of index above the batch factor
    pre = sympy.Integer(1)
    for j, size in enumerate(out_shape):
        outer = sympy.simplify(before / pre)
        inner = sympy.simplify(pre * size / (before * B))
        if outer.is_integer and inner.is_integer and (outer - 1).is_nonnegative and (inner - 1).is_nonnegative:
            return Batched(j, symbolic.size(outer), symbolic.size(inner))
        pre = pre * size
    raise _mix(node, "reshapes the batch dimension so that samples are split across dimensions")


def _batch_size(node: fx.Node) -> sympy.Expr:
    return node.graph.owning_module.meta["dp_batch_size"]


def _as_strided(node: fx.Node) -> Any:
    """as_strided that only re-views a contiguous tensor (decompositions emit these): a reshape."""
    src = node.args[0]
    lay = layout_of(src)
    if not isinstance(lay, Batched):
        return lay
    val, out = src.meta["val"], node.meta["val"]
    offset = node.args[3] if len(node.args) > 3 else 0
    if val.is_contiguous() and out.is_contiguous() and val.numel() == out.numel() and not offset:
        return _map_view(node, lay, node_shape(src), node_shape(node))
    raise _mix(node, "re-strides a per-sample tensor in a way dpcompile cannot follow")


def _permute(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    dims = [d % _ndim(node) for d in node.args[1]]
    return lay.at(dims.index(lay.dim))


def _transpose(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    nd = max(_ndim(node), 1)
    d0, d1 = (node.args[1] % nd, node.args[2] % nd) if len(node.args) > 2 else (0, 1)
    return lay.at({d0: d1, d1: d0}.get(lay.dim, lay.dim))


def _expand(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    return lay.at(lay.dim + _ndim(node) - _ndim(node.args[0]))


def _unsqueeze(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    dim = node.args[1] % _ndim(node)
    return lay.at(lay.dim + (1 if dim <= lay.dim else 0))


def _squeeze(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    return _map_view(node, lay, node_shape(node.args[0]), node_shape(node))


def _same_as_first(node: fx.Node) -> Any:
    return layout_of(node.args[0])


def _along_dim(node: fx.Node) -> Any:
    """Ops that mix values along one dim (softmax, cumsum, sort...): not along the batch."""
    aligned = [lay for _, lay in batched_args(node)]
    if not aligned:
        return _free_or_agg(node)
    lay = _same_layout(node, aligned)
    kw = _kwargs(node)
    dims = kw.get("dim", kw.get("dims"))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if any(d % _ndim(node.args[0]) == lay.dim for d in dims):
        raise _mix(node, "mixes values across the batch dimension")
    return _multi(node, lay)


def _multi(node: fx.Node, lay: Any) -> Any:
    """Same layout for each tensor output of a (possibly multi-output) node.

    An output too small to hold the batch dim is marked AGG (not FREE): it may still
    depend on the samples, and AGG values are refused wherever they meet per-sample ones.
    """
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return tuple(lay if isinstance(v, torch.Tensor) and v.dim() > lay.dim else AGG for v in val) \
            if isinstance(lay, Batched) else tuple(lay for _ in val)
    return lay


def _dim_arg(node: fx.Node) -> int:
    """The op's `dim` argument, normalized against its first input's rank."""
    return _kwargs(node).get("dim", 0) % max(_ndim(node.args[0]), 1)


def _reduction(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return _multi(node, lay)
    kw = _kwargs(node)
    nd = _ndim(node.args[0])
    dims = kw.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    dims = [d % nd for d in dims] or list(range(nd))
    if lay.dim in dims:
        return _multi(node, AGG)
    shift = 0 if kw.get("keepdim", False) else sum(d < lay.dim for d in dims)
    return _multi(node, lay.at(lay.dim - shift))


def _select_or_slice(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    kw = _kwargs(node)
    dim = _dim_arg(node)
    if dim == lay.dim:
        in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
        if node.target is aten.slice.Tensor and in_shape == out_shape and kw.get("step", 1) == 1:
            return lay  # full slice: identity
        raise _mix(node, "indexes into the batch dimension (selects samples)",
                   "index along another dimension, or select samples before calling the model")
    if node.target is aten.select.int and dim < lay.dim:
        return lay.at(lay.dim - 1)
    return lay


def _scatter_into(node: fx.Node) -> Any:
    """slice_scatter / select_scatter (backward of slicing): `src` written into `input` along `dim`."""
    base, src = node.args[0], node.args[1]
    dim = _dim_arg(node)
    lays = []
    if isinstance(layout_of(base), Batched):
        lays.append(layout_of(base))
    ls = layout_of(src)
    if isinstance(ls, Batched):
        selected = node.target is aten.select_scatter.default
        lays.append(ls.at(ls.dim + 1) if selected and dim <= ls.dim else ls)
    if not lays:
        return _free_or_agg(node)
    if AGG in (layout_of(base), ls):
        raise _mix(node, "writes aggregated values into per-sample values")
    lay = _same_layout(node, lays)
    if dim == lay.dim and node_shape(base) != node_shape(src):
        raise _mix(node, "writes into part of the batch dimension")
    return lay


def _split(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return _multi(node, lay)
    dim = _dim_arg(node)
    if dim == lay.dim:
        raise _mix(node, "splits the batch dimension")
    if node.target is aten.unbind.int and dim < lay.dim:
        lay = lay.at(lay.dim - 1)
    return _multi(node, lay)


def _cat(node: fx.Node) -> Any:
    tensors = node.args[0]
    out_nd = _ndim(node)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out_nd
    aligned = []
    for t in tensors:
        lay = layout_of(t)
        if isinstance(lay, Batched):
            d = lay.dim + (1 if node.target is aten.stack.default and dim <= lay.dim else 0)
            aligned.append(lay.at(d))
    if not aligned:
        return AGG if any(layout_of(t) is AGG for t in tensors) else FREE
    if any(layout_of(t) is AGG for t in tensors):
        raise _mix(node, "concatenates aggregated values with per-sample values")
    lay = _same_layout(node, aligned)
    if lay.dim == dim and node.target is aten.cat.default:
        raise _mix(node, "concatenates along the batch dimension")
    return lay


def _index_select(node: fx.Node) -> Any:
    src, dim, index = node.args[0], node.args[1] % max(_ndim(node.args[0]), 1), node.args[2]
    ls, li = layout_of(src), layout_of(index)
    if isinstance(li, Batched) and not isinstance(ls, Batched):
        if ls is AGG:
            raise _mix(node, "gathers aggregated values with per-sample indices")
        return Batched(dim + li.dim, li.outer, li.inner)
    if isinstance(ls, Batched) and not isinstance(li, Batched) and ls.dim != dim:
        return ls
    if not isinstance(ls, Batched) and not isinstance(li, Batched):
        return _free_or_agg(node)
    raise _mix(node, "selects along the batch dimension")


def _gather_scatter(node: fx.Node) -> Any:
    aligned = [lay for _, lay in batched_args(node)]
    if not aligned:
        return _free_or_agg(node)
    lay = _same_layout(node, aligned)
    if node.args[1] % _ndim(node) == lay.dim:
        raise _mix(node, "gathers/scatters along the batch dimension")
    return lay


def _embedding(node: fx.Node) -> Any:
    weight, indices = node.args[0], node.args[1]
    if isinstance(layout_of(weight), Batched) or layout_of(weight) is AGG:
        raise _mix(node, "uses a per-sample embedding table")
    return layout_of(indices)


def _mm(node: fx.Node) -> Any:
    a, b = node.args[-2], node.args[-1]
    la, lb = layout_of(a), layout_of(b)
    bias_lay = layout_of(node.args[0]) if node.target is aten.addmm.default else FREE
    if isinstance(la, Batched) and isinstance(lb, Batched):
        if la.dim == 1 and lb.dim == 0 and la == lb.at(1):
            out = AGG  # contraction over the samples: a parameter-gradient site
        else:
            raise _mix(node, "multiplies two per-sample matrices along different dimensions")
    elif isinstance(la, Batched):
        out = la if la.dim == 0 else _free_rows_site(node, la, lb, 1)
    elif isinstance(lb, Batched):
        out = lb if lb.dim == 1 else _free_rows_site(node, lb, la, 0)
    else:
        out = AGG if AGG in (la, lb) else FREE
    if isinstance(bias_lay, Batched) or (bias_lay is AGG and isinstance(out, Batched)):
        if bias_lay != out:
            raise _mix(node, "adds a bias laid out differently from the product")
    return out


FREE_ROWS = "dp_free_rows"  # node.meta key: {operand index: the sample rows a FREE operand is split by}


def _free_rows_site(node: fx.Node, lay: Batched, other_lay: Any, other: int) -> Any:
    """mm contracting the sample rows of one operand with the rows of a FREE one (a zero initial
    hidden state, a constant): Σ_n g_n ⊗ c_n = Σ_b Σ_{n of b} g_n ⊗ c_n, a per-sample sum (a
    parameter-gradient site). The contracted dim has the same size in both operands, so the
    FREE operand's rows line up with the samples' rows; its row n is shared, not a sample's."""
    if lay.dim != other or other_lay is not FREE:  # a's dim 1 or b's dim 0: the contracted one
        raise _mix(node, "contracts a per-sample dimension with shared weights")
    node.meta[FREE_ROWS] = {other: lay.at(1 - other)}
    return AGG


def trilinear_dims(node: fx.Node) -> list[list[int | None]]:
    """For each input of ``_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim)``: the
    position in the common (expanded) space of each of its dims. The op unsqueezes input k
    at the positions expand_k, multiplies the three and sums over sumdim (nn.Bilinear:
    y = x1ᵀ W x2; its weight gradient sums g ⊗ x1 ⊗ x2 over the rows)."""
    out = []
    for k in range(3):
        expand = set(node.args[3 + k])
        rank = _ndim(node.args[k]) + len(expand)
        out.append([pos for pos in range(rank) if pos not in expand])
    return out


def _trilinear(node: fx.Node) -> Any:
    """Samples at one position p of the common space, in every input that has p (inputs
    expanded at p are shared by the samples): summed over p, the result combines all
    samples (a parameter-gradient site); else each sample's result reads only its rows."""
    positions = trilinear_dims(node)
    aligned = [lay.at(dims[lay.dim]) for dims, lay in zip(positions, map(layout_of, node.args[:3]))
               if isinstance(lay, Batched)]
    if not aligned:
        return _free_or_agg(node)
    if AGG in map(layout_of, node.args[:3]):
        raise _mix(node, "multiplies values aggregated over the batch with per-sample values")
    lay = _same_layout(node, aligned)
    sizes = {node_shape(node.args[k])[dims.index(lay.dim)] for k, dims in enumerate(positions) if lay.dim in dims}
    if len(sizes) > 1:
        raise _mix(node, "broadcasts a per-sample dimension")
    sumdim = set(node.args[6])
    if lay.dim in sumdim:
        return AGG
    return lay.at(lay.dim - sum(1 for d in sumdim if d < lay.dim))


# --------------------------------------------------------------------------- EmbeddingBag

BAG_MODES = ("sum", "mean", "max")
_BAG_FORWARDS = ("_embedding_bag", "_embedding_bag_forward_only")
# Ops that pass ragged values on unchanged (same shape): dtype casts, copies.
_RAGGED_SAME = ("view", "_unsafe_view", "reshape", "clone", "contiguous", "alias", "detach", "_to_copy",
                "convert_element_type", "lift_fresh_copy")


def _ragged_bag_inputs(graph: fx.Graph, start: dict[str, Any]) -> dict[str, Ragged]:
    """EmbeddingBag in offsets form, bag(indices, offsets) with one offset per sample: the
    graph inputs behind its offsets, indices and per-sample weights get Ragged layouts.
    The inputs were classified by their sizes alone, which say nothing of the bags."""
    out: dict[str, Ragged] = {}
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in _BAG_FORWARDS:
            continue
        kw = _kwargs(node)
        offsets = _input_behind(kw["offsets"])
        if offsets is None or start.get(offsets.name) != Batched(0) or _ndim(kw["offsets"]) != 1:
            continue
        out[offsets.name] = Ragged(offsets.name, "offsets")
        for values in (kw["indices"], kw.get("per_sample_weights")):
            root = _input_behind(values) if values is not None else None
            if root is not None and _ndim(values) == 1:
                out[root.name] = Ragged(offsets.name, "values")
    return out


def _input_behind(node: Any) -> fx.Node | None:
    """The graph input `node` is, or copies through same-shape ops; None if computed otherwise."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _packet_name(node) in _RAGGED_SAME \
            and node_shape(node) == node_shape(node.args[0]):
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def _packet_name(node: fx.Node) -> str:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def _ragged(node: fx.Node) -> Any:
    """Ops reading EmbeddingBag's offsets-form values: the bag ops, and same-shape copies."""
    name = _packet_name(node)
    rule = RULES.get(getattr(node.target, "overloadpacket", None))
    if rule in (_embedding_bag, _embedding_bag_backward, _embedding_bag_weights_backward):
        return rule(node)
    if name in _RAGGED_SAME and len(_tensor_args(node)) == 1 and node_shape(node) == node_shape(node.args[0]):
        return layout_of(node.args[0])
    raise _mix(node, "reads the indices or offsets of an EmbeddingBag given in offsets form: they group the "
                     "samples' values by data-dependent offsets, which dpcompile follows only into EmbeddingBag",
               "use them only as EmbeddingBag's arguments, or pass a 2-D (batch, length) input padded with "
               "padding_idx")


def bag_structure(node: fx.Node, indices: fx.Node, offsets: fx.Node | None, bags: int | None) -> tuple[Any, Any]:
    """(layout of the bags, step): how an EmbeddingBag op's indices form the samples' bags.

    2-D input (batch, L): the op reads the flattened indices and offsets 0, L, 2L... (an iota
    in the forward graph): bag k holds indices kL..kL+L-1, so with indices laid out as
    Batched(0, outer, inner), L | inner, the bags are Batched(0, outer, inner / L); the step
    is L. Offsets form: one bag per sample (the offsets input holds the samples), step None.
    `offsets` is None in backward graphs, where the forward's check stands for the saved iota
    and the step follows from the layouts; `bags` is then the gradient's layout."""
    li = layout_of(indices)
    if isinstance(li, Ragged):
        lo = layout_of(offsets) if offsets is not None else Ragged(li.offsets, "offsets")
        if lo != Ragged(li.offsets, "offsets") or (bags is not None and bags != Batched(0)):
            raise _mix(node, "takes offsets that are not the ones its indices were grouped by")
        return Batched(0), None
    if isinstance(li, Batched) and li.dim == 0 and _ndim(indices) == 1:
        if offsets is None:
            if isinstance(bags, Batched) and bags.dim == 0 and bags.outer == li.outer:
                step = sympy.simplify(sympy.sympify(li.inner) / bags.inner)
                if step.is_integer:
                    return bags, int(step) if step.is_Integer else step
        else:
            step = _iota_step(offsets)
            if step is not None and sympy.simplify(sympy.sympify(li.inner) % step) == 0 \
                    and sympy.simplify(node_shape(offsets)[0] * step - node_shape(indices)[0]) == 0:
                return Batched(0, li.outer, li.inner // step if isinstance(li.inner, int) else li.inner / step), step
    raise _mix(node, "is an EmbeddingBag whose bags dpcompile cannot match to samples",
               "pass a 2-D (batch, length) input padded with padding_idx; or 1-D indices with offsets holding one "
               "bag per sample (include_last_offset=False), the model reading a tensor with the samples along "
               "dimension 0 (dense features, or the offsets) before the EmbeddingBag: dpcompile takes the batch "
               "size from the first tensor input the model reads")


def _iota_step(node: Any) -> int | None:
    """s for offsets 0, s, 2s, ... built in the graph (EmbeddingBag's 2-D form), else None."""
    if not isinstance(node, fx.Node) or _packet_name(node) != "iota" or layout_of(node) is not FREE:
        return None
    kw = dict(node.kwargs)
    start, step = kw.get("start", node.args[1] if len(node.args) > 1 else 0), kw.get("step", 1)
    return step if start == 0 and isinstance(step, int) and step > 0 else None


def _embedding_bag(node: fx.Node) -> Any:
    """(bags, index per entry, bag sizes, max indices) of EmbeddingBag: each output row sums (or
    averages, or maxes) the rows its own bag's indices look up."""
    kw = _kwargs(node)
    if not _carries_samples(kw["indices"]) and not _carries_samples(kw["offsets"]):
        return _multi(node, _free_or_agg(node))
    if isinstance(layout_of(kw["weight"]), Batched) or layout_of(kw["weight"]) is AGG:
        raise _mix(node, "uses a per-sample embedding table")
    for flag, fix in (("scale_grad_by_freq", "scale_grad_by_freq=False"), ("sparse", "sparse=False"),
                      ("include_last_offset", "include_last_offset=False")):
        if kw.get(flag, False):
            raise _mix(node, f"is an EmbeddingBag with {flag}=True, which dpcompile does not split per sample",
                       f"use {fix}")
    bags, _ = bag_structure(node, kw["indices"], kw["offsets"], None)
    weights = kw.get("per_sample_weights")
    if weights is not None and layout_of(weights) != layout_of(kw["indices"]):
        raise _mix(node, "takes per-sample weights laid out differently from its indices")
    val = node.meta["val"]

    def laid(value: torch.Tensor, like: Any) -> Any:  # empty outputs (offset2bag in sum mode) hold nothing
        return FREE if isinstance(value.numel(), int) and value.numel() == 0 else like

    return (bags, laid(val[1], layout_of(kw["indices"])), laid(val[2], bags), laid(val[3], bags))


def _embedding_bag_backward(node: fx.Node) -> Any:
    """The table's gradient: a sum over all bags (a parameter-gradient site)."""
    kw = _kwargs(node)
    bag_structure(node, kw["indices"], kw["offsets"] if isinstance(layout_of(kw["offsets"]), Ragged) else None,
                  layout_of(kw["grad"]))
    return AGG


def _embedding_bag_weights_backward(node: fx.Node) -> Any:
    """Gradient of the per-sample weights: one value per index, from its own bag's gradient row."""
    kw = _kwargs(node)
    bag_structure(node, kw["indices"], kw["offsets"] if isinstance(layout_of(kw["offsets"]), Ragged) else None,
                  layout_of(kw["grad"]))
    return layout_of(kw["indices"])


def _bmm(node: fx.Node) -> Any:
    a, b = node.args[-2], node.args[-1]
    la, lb = layout_of(a), layout_of(b)
    batched = [l for l in (la, lb) if isinstance(l, Batched)]
    if not batched:
        return _free_or_agg(node)
    if all(l.dim == 0 for l in batched) and len(set(batched)) == 1:
        return batched[0]
    if isinstance(la, Batched) and isinstance(lb, Batched) and la.dim == 2 and lb.dim == 1 and la.at(1) == lb:
        return AGG
    raise _mix(node, "batched matmul whose samples are not along dimension 0")


def _batch_first(node: fx.Node) -> Any:
    """Ops that treat dim 0 as independent items (conv, pooling, group norm...)."""
    return _dim0_items(node, "needs the samples along dimension 0", rest=FREE)


def _dim0_items(node: fx.Node, why: str, rest: Any) -> Any:
    """Ops whose tensor inputs hold the samples on dim 0; outputs of another size get `rest`."""
    aligned = [lay for _, lay in batched_args(node)]
    if not aligned:
        return _multi(node, _free_or_agg(node))
    lay = _same_layout(node, aligned)
    if lay.dim != 0:
        raise _mix(node, why)
    return _multi_by_size(node, lay, rest)


def _multi_by_size(node: fx.Node, lay: Batched, rest: Any) -> Any:
    """Outputs whose dim 0 matches the batched input's dim 0 keep `lay`; others get `rest`."""
    val = node.meta.get("val")
    lead = node_shape(batched_args(node)[0][0])[0]
    def one(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and sympy.simplify(to_expr(v.shape[0]) - lead) == 0:
            return lay
        return rest
    if isinstance(val, (list, tuple)):
        return tuple(one(v) for v in val)
    return one(val)


def _constant_pad(node: fx.Node) -> Any:
    """Padding other dims keeps each sample's entries in place (Inductor's pad_mm pads the
    vocab dim of transposed LM-head gradients); padding the batch dim invents samples."""
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return lay
    amounts = pad_amounts(node.args[1], _ndim(node), lay.dim)
    if any(not (isinstance(amount, int) and amount == 0) for amount in amounts):
        raise _mix(node, "pads the batch dimension")
    return lay


def _grad_site(node: fx.Node) -> Any:
    """Backward ops that return grad_input (per sample) and parameter grads (summed)."""
    aligned = [lay for _, lay in batched_args(node)]
    if not aligned:
        return _multi(node, _free_or_agg(node))
    lay = _same_layout(node, aligned)
    first = node_shape(node.args[0])
    if node.target is aten.native_layer_norm_backward.default:
        if lay.dim >= len(first) - len(node.args[2]):
            raise _mix(node, "normalizes over the batch dimension")
    elif lay.dim != 0:
        raise _mix(node, "needs the samples along dimension 0")
    return (lay, AGG, AGG)


def _layer_norm(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return _multi(node, lay)
    if lay.dim >= _ndim(node.args[0]) - len(node.args[1]):
        raise _mix(node, "normalizes over the batch dimension")
    return (lay, lay, lay)


def _batch_norm(node: fx.Node) -> Any:
    training = node.args[5] if node.target is not aten._native_batch_norm_legit_no_training.default else False
    if node.target in (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
                       aten._native_batch_norm_legit_functional.default):
        training = node.args[5] if node.target is not aten._native_batch_norm_legit.no_stats else node.args[3]
    if training and isinstance(layout_of(node.args[0]), Batched):
        raise _mix(
            node, "is BatchNorm in training mode: it normalizes each sample with statistics of the whole batch",
            "replace nn.BatchNorm with nn.GroupNorm (e.g. nn.GroupNorm(min(32, C), C)) or nn.LayerNorm, "
            "or call .eval() on the BatchNorm layers to use their running statistics",
        )
    return _multi(node, layout_of(node.args[0]))


def _attention(node: fx.Node) -> Any:
    """SDPA kernels: extra outputs (seeds, ...) are sample-free forward, sums over samples backward."""
    backward = "backward" in str(node.target)
    return _dim0_items(node, "attends with the samples outside dimension 0", rest=AGG if backward else FREE)


def _nll_forward(node: fx.Node) -> Any:
    lay = layout_of(node.args[0])
    if not isinstance(lay, Batched):
        return _multi(node, lay)
    reduction = node.args[3]
    return (lay.at(lay.dim) if reduction == 0 else AGG, AGG)


TOKEN_MEAN = "dp_token_mean"


def _nll_backward(node: fx.Node) -> Any:
    """grad_out, self, target, weight, reduction, ignore_index, total_weight: a mean (1) divides
    by the count of non-ignored tokens of the whole batch. That is a mean over samples of
    per-sample token means only when every sample has the same count (HF's causal-LM loss
    ignores one position per sequence, classification none): accepted under a run-time
    check of exactly that (``guard_token_means``); class weights are refused."""
    if node.args[4] == 1 and isinstance(layout_of(node.args[1]), Batched):
        if node.args[3] is not None:
            raise _mix(node, "averages a class-weighted loss over the whole batch, so one sample's gradient "
                             "depends on the other samples' labels",
                       "compute the weighted loss per sequence, then average over sequences")
        node.meta[TOKEN_MEAN] = True
    return layout_of(node.args[1])


def guard_token_means(graph: fx.Graph, ctx: CompileContext) -> None:
    """Route each batch-wide token count through a run-time check that all samples count alike."""
    for node in [n for n in graph.nodes if n.meta.get(TOKEN_MEAN)]:
        if ctx.options.loss_reduction != "mean":
            raise _mix(node, f"is a mean over the batch's tokens but the loss_reduction option is "
                             f"'{ctx.options.loss_reduction}', so clipping would see mis-scaled per-sample gradients",
                       "set loss_reduction='mean' for a model that returns a mean loss")
        target, ignore_index, total_weight = node.args[2], node.args[5], node.args[6]
        lay = layout_of(target)
        layout = symbolic.graph_layout(graph, lay.as_tuple()) if isinstance(lay, Batched) else None
        with graph.inserting_before(node):
            checked = graph.call_function(per_sample.checked_token_count,
                                          (total_weight, target, ignore_index, layout, describe_node(node)))
        checked.meta.update(total_weight.meta)
        node.update_arg(6, checked)


def _pointwise_with_agg_refused(node: fx.Node) -> Any:
    raise _mix(node, "scales per-sample gradients by a value computed from the whole batch (e.g. a loss "
                     "averaged over all non-ignored tokens of the batch), so one sample's gradient depends "
                     "on the others",
               "average the loss per sequence first (mean over its own tokens), then over sequences, "
               "outside the compiled model or with reduction='sum' inside it")


def _embedding_backward(node: fx.Node) -> Any:
    lg = layout_of(node.args[0])
    return AGG if isinstance(lg, Batched) or lg is AGG else FREE


def _factory(node: fx.Node) -> Any:
    return FREE


# Sample ids: a sample-free 0..B-1 range. Hugging Face builds attention masks as
# mask[arange(B)[:, None, None], kv_idx]; indexing the batch dim with sample ids keeps
# every sample's row in place, any other batch index would move rows between samples.
SAMPLE_IDS = "dp_sample_ids"
_ID_SHAPE_OPS = ("view", "_unsafe_view", "reshape", "unsqueeze", "expand", "permute", "clone", "_to_copy", "alias")


def _track_sample_ids(node: fx.Node, ctx: CompileContext) -> None:
    """Record in meta[SAMPLE_IDS] the dim along which a sample-free tensor holds 0..B-1."""
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if name in ("iota", "arange") and _is_batch_range(node, ctx):
        node.meta[SAMPLE_IDS] = Batched(0)
    elif name in _ID_SHAPE_OPS and isinstance(node.args[0], fx.Node) and SAMPLE_IDS in node.args[0].meta:
        src = node.args[0]
        saved, src.meta["dp_layout"] = src.meta["dp_layout"], src.meta[SAMPLE_IDS]
        try:
            ids = RULES[packet](node)
        finally:
            src.meta["dp_layout"] = saved
        if isinstance(ids, Batched) and ids.outer == ids.inner == 1:
            node.meta[SAMPLE_IDS] = ids


def _is_batch_range(node: fx.Node, ctx: CompileContext) -> bool:
    shape = node_shape(node)
    if shape is None or len(shape) != 1 or sympy.simplify(shape[0] - ctx.batch_size) != 0:
        return False
    kw = dict(node.kwargs)
    if node.target.overloadpacket.__name__ == "iota":
        return kw.get("start", 0) == 0 and kw.get("step", 1) == 1
    start = node.args[0] if len(node.args) > 1 else 0
    step = node.args[2] if len(node.args) > 2 else 1
    return start == 0 and step == 1


def _index(node: fx.Node) -> Any:
    """x[i_0, ..., i_k] with tensor indices (None: a full slice). Allowed when the batch dim is
    not indexed and every index is sample-free (reflect/replicate padding, x[:, idx]): each
    sample's values are gathered from its own slice; or when the batch dim is indexed by
    sample ids. ``_unsafe_masked_index`` (reflect padding's backward) also takes a mask,
    which must be sample-free."""
    masked = node.target is aten._unsafe_masked_index.default
    x, indices = node.args[0], list(node.args[2] if masked else node.args[1])
    lx = layout_of(x)
    if not batched_args(node):
        return _free_or_agg(node)
    if masked and layout_of(node.args[1]) is not FREE:
        return _refuse_index(node)
    if isinstance(lx, Batched) and _integer_indices(indices) and all(layout_of(i) is FREE for i in indices):
        if lx.dim >= len(indices) or indices[lx.dim] is None:
            return lx.at(_unindexed_dim(indices, lx.dim))
        ids = indices[lx.dim]
        if lx.outer == lx.inner == 1 and SAMPLE_IDS in ids.meta and None not in indices:
            return Batched(ids.meta[SAMPLE_IDS].dim + _index_rank(indices) - ids.meta["val"].dim())
    return _refuse_index(node)


def _integer_indices(indices: list) -> bool:
    """Integer index tensors (a boolean mask consumes several dims: not followed here)."""
    return all(i is None or (isinstance(i, fx.Node) and not i.meta["val"].dtype.is_floating_point
                             and i.meta["val"].dtype not in (torch.bool, torch.uint8)) for i in indices)


def _index_rank(indices: list) -> int:
    """Rank of the indices' broadcast shape: the dims advanced indexing puts in the result."""
    return max(i.meta["val"].dim() for i in indices if i is not None)


def _unindexed_dim(indices: list, dim: int) -> int:
    """Where x's dim `dim`, not indexed, lands in x[indices]: the indexed dims are replaced in
    place by the indices' broadcast dims when adjacent, else those go first (numpy's rule)."""
    indexed = [k for k, i in enumerate(indices) if i is not None]
    rank = _index_rank(indices)
    if indexed == list(range(indexed[0], indexed[-1] + 1)):
        return dim if dim < indexed[0] else dim - len(indexed) + rank
    return rank + sum(1 for k in range(dim) if k not in indexed)


def _index_put(node: fx.Node) -> Any:
    """The backward of _index: values written back to the rows named by sample ids, or along
    dims other than the batch dim with sample-free indices."""
    base, indices, values = node.args[0], list(node.args[1]), node.args[2]
    lb, lv = layout_of(base), layout_of(values)
    if not batched_args(node):
        return _free_or_agg(node)
    free = _integer_indices(indices) and all(layout_of(i) is FREE for i in indices)
    for d, ids in enumerate(indices):
        if isinstance(ids, fx.Node) and SAMPLE_IDS in ids.meta and None not in indices:
            expected = Batched(ids.meta[SAMPLE_IDS].dim + _index_rank(indices) - ids.meta["val"].dim())
            others_free = all(layout_of(i) is FREE for k, i in enumerate(indices) if k != d)
            if lv == expected and lb in (FREE, Batched(d)) and others_free:
                return Batched(d)
    if free and isinstance(lv, Batched) and _ndim(values) == _ndim(node) - len(
            [i for i in indices if i is not None]) + _index_rank(indices):
        for d in range(_ndim(node)):
            lay = lv.at(d)
            if ((d >= len(indices) or indices[d] is None) and lv.dim == _unindexed_dim(indices, d)
                    and lb in (FREE, lay) and node_shape(values)[lv.dim] == node_shape(node)[d]):
                return lay
    return _refuse_index(node)


def _refuse_index(node: fx.Node) -> Any:
    if not batched_args(node):
        return _free_or_agg(node)
    raise _mix(node, "uses advanced indexing on a per-sample tensor, which dpcompile cannot yet prove sample-safe",
               "use torch.gather / index_select along a non-batch dimension")


# --------------------------------------------------------------------------- state writes
#
# Model state written from batch data (an EMA of the inputs, a sample counter, BatchNorm's
# running statistics, nn.Embedding's max_norm renormalisation) ends up in state_dict() and
# checkpoints holding an exact batch statistic; the privacy guarantee covers only the noisy
# gradients. The forward graph writes state three ways, all checked by `check_state_writes`:
# an in-place op into a state placeholder (AOT keeps `copy_(buffer, new_value)` in the graph),
# an input mutation AOT moves out of the graph (the graph's first outputs are the new values),
# and an attribute assignment (`self.avg = ...`, which Dynamo replays after the graph from one
# of its outputs). A write is refused when its new value carries samples (Batched or AGG
# layout) or the batch size (a symbolic size of the batch: under Poisson sampling the batch
# size is private too). A static batch size is a plain constant in the graph, so a write of
# `x.shape[0]` compiled with static shapes is not caught here.

STATE_NAMES = "dp_state_names"  # owning_module.meta: placeholder name -> (kind word, state name)
_KIND_WORDS = {"param": "parameter", "buffer": "buffer"}
_SHAPE_QUERIES = ("sym_size", "sym_stride", "sym_numel", "sym_storage_offset")
_BATCH_NORMS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm", "miopen_batch_norm", "batch_norm")


class StateWriteError(DPCompileError):
    """The forward pass writes model state (a buffer, parameter or tensor attribute) from batch data."""


@dataclasses.dataclass
class _Write:
    what: str  # "buffer `avg`"
    value: list  # the nodes the new value is computed from
    site: fx.Node  # the node the error names (op, module, source line)
    sized: bool = False  # known to depend on the batch size (a stored symbolic number)


def check_state_writes(graph: fx.Graph, ctx: CompileContext) -> None:
    """Refuse writes of model state whose new value depends on the samples or on the batch size."""
    sized = _size_dependent(graph, _batch_symbols(ctx.batch_size))
    for write in _state_writes(graph):
        if any(_carries_samples(v) for v in write.value) or not (write.value or write.sized):
            raise _state_write_error(write, "depends on the samples' data")
        if write.sized or any(v in sized for v in write.value):
            raise _state_write_error(write, "depends on the batch size, which is private under Poisson sampling "
                                            "(a release must not reveal it)")


def _state_write_error(write: _Write, reason: str) -> StateWriteError:
    msg = (f"dpcompile: the forward pass writes {write.what} from batch data: {describe_node(write.site)} "
           f"computes its new value, which {reason}. The model (its state_dict(), checkpoints, the module "
           "object) would keep that value exactly, while the privacy guarantee covers only the noisy gradients, "
           "so it is refused. Fix: keep batch statistics out of module state (return them from forward() if the "
           "training loop needs them), or make them private by other means; computing them under "
           "torch.no_grad() or outside the private model does not make them private.")
    if _from_batch_norm(write.value):
        msg += (" For BatchNorm, use nn.GroupNorm or nn.LayerNorm instead (dpcompile.fix makes that "
                "replacement), or call .eval() on the BatchNorm layers to use fixed running statistics.")
    return StateWriteError(msg)


def _state_writes(graph: fx.Graph) -> list[_Write]:
    """Every write of model state in the forward graph, in graph order, then out-of-graph ones."""
    names = graph.owning_module.meta.get(STATE_NAMES, {})
    placeholders = list(graph.find_nodes(op="placeholder"))
    return (_in_graph_writes(graph, names) + _returned_mutations(graph, placeholders, names)
            + _attribute_assignments(graph, placeholders))


def _in_graph_writes(graph: fx.Graph, names: dict) -> list[_Write]:
    writes = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for dest in _written_args(node):
            base = _view_base(dest)
            if base.op == "placeholder" and base.name in names:
                value = [a for a in node.all_input_nodes if a is not dest]
                first = [node.args[1]] if node.target is aten.copy_.default else [node]
                writes.append(_Write(_label(names[base.name]), value, _site(first + value, node)))
    return writes


def _returned_mutations(graph: fx.Graph, placeholders: list[fx.Node], names: dict) -> list[_Write]:
    """Input mutations AOT keeps out of the graph: its first outputs are the inputs' new values."""
    meta = _fw_metadata()
    if meta is None:
        return []
    outputs = list(graph.output_node().args[0])
    writes = []
    for out, index in zip(outputs, meta.mutated_inp_runtime_indices):
        p = placeholders[index] if index < len(placeholders) else None
        if p is not None and p.name in names and isinstance(out, fx.Node):
            writes.append(_Write(_label(names[p.name]), [out], out))
    return writes


def _attribute_assignments(graph: fx.Graph, placeholders: list[fx.Node]) -> list[_Write]:
    """`self.avg = value`, register_buffer in forward: Dynamo stores one of the graph's outputs
    (or inputs) on the module after the graph has run. A stored Python number (`self.n =
    x.shape[0]`) is its symbolic expression."""
    tx = _dynamo_tx()
    if tx is None:
        return []
    try:
        dynamo_graph = tx.output.graph
        dynamo_outputs = list(dynamo_graph.find_nodes(op="output")[0].args[0])
        dynamo_inputs = list(dynamo_graph.find_nodes(op="placeholder"))
        stored = list(_stored_on_modules(tx))
    except Exception as exc:  # a Dynamo version whose side-effect records look different
        raise StateWriteError(f"dpcompile: cannot read which module attributes the forward pass assigns "
                              f"({type(exc).__name__}: {exc}), so it cannot check them for batch data; refusing "
                              "rather than guessing") from exc
    meta = _fw_metadata()
    skip = meta.num_mutated_inp_runtime_indices if meta is not None else 0
    outputs = list(graph.output_node().args[0])
    symbols = _batch_symbols(graph.owning_module.meta.get("dp_batch_size"))
    writes = []
    for what, vt, node in stored:
        number = getattr(vt, "sym_num", None)
        if isinstance(number, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            if _mentions(number, symbols) or free_unbacked_symbols(number):
                writes.append(_Write(what, [], node, sized=_mentions(number, symbols)))
            continue
        if node in dynamo_outputs and skip + dynamo_outputs.index(node) < len(outputs):
            target = outputs[skip + dynamo_outputs.index(node)]
        elif node in dynamo_inputs and len(dynamo_inputs) == len(placeholders):
            target = placeholders[dynamo_inputs.index(node)]
        else:
            raise StateWriteError(f"dpcompile: the forward pass assigns {what} a value dpcompile cannot find "
                                  f"among the graph's inputs or outputs ({describe_node(node)}), so it cannot "
                                  "check it for batch data; refusing rather than guessing")
        writes.append(_Write(what, [target], target))
    return writes


def _stored_on_modules(tx: Any):
    """(what, variable, Dynamo graph node) for each tensor or number the traced code assigned to
    a module attribute or put in a module's _buffers / _parameters."""
    from torch._dynamo.variables.lazy import LazyVariableTracker

    effects = tx.output.side_effects
    for var in list(effects.id_to_variable.values()):
        if not effects.is_modified(var) or getattr(var, "source", None) is None:
            continue  # objects created inside the graph are not model state
        name = _source_name(var.source)
        state_dict = _state_dict_source(name) if name is not None else None
        if isinstance(getattr(var, "value", None), torch.nn.Module):
            prefix = _state_path(name) if name is not None else type(var.value).__name__
            items = effects.store_attr_mutations.get(var, {}).items()
            kind = "attribute"
        elif state_dict is not None and hasattr(var, "items"):
            prefix = _state_path(state_dict[0])
            original = var.original_items  # what the dict held before the traced code ran
            items = [(key.vt.as_python_constant(), vt) for key, vt in var.items.items()
                     if var.is_new_item(original.get(key.vt), vt)]
            kind = "buffer" if state_dict[1] == "_buffers" else "parameter"
        else:
            continue
        for attr, vt in items:
            if isinstance(vt, LazyVariableTracker) and not vt.is_realized():
                continue  # never touched by the traced code
            proxy = getattr(vt, "proxy", None)
            if isinstance(getattr(proxy, "node", None), fx.Node):
                yield f"{kind} `{'.'.join(p for p in (prefix, str(attr)) if p)}`", vt, proxy.node


def _source_name(source: Any) -> str | None:
    """A source's name, None for one that has none (Dynamo's TempLocalSource raises)."""
    try:
        return source.name
    except NotImplementedError:
        return None


def _state_dict_source(name: str) -> tuple[str, str] | None:
    """L['self']._modules['fc']._buffers (or .__dict__['_buffers']) -> (L['self']._modules['fc'], _buffers)."""
    match = re.fullmatch(r"(.*?)(?:\.__dict__\['|\.)(_buffers|_parameters)(?:'\])?", name)
    return (match.group(1), match.group(2)) if match else None


def _state_names(placeholders: list[fx.Node], ctx: CompileContext) -> dict[str, tuple[str, str]]:
    """The forward placeholders that hold model state: name -> ("buffer", "bn.running_mean")."""
    sources = _dynamo_input_sources(len(placeholders))
    names = {}
    for i, (p, kind) in enumerate(zip(placeholders, ctx.input_kinds)):
        if kind in _KIND_WORDS:
            names[p.name] = (_KIND_WORDS[kind], ctx.param_names.get(i, p.name))
        elif kind in ("free", "batched") and sources is not None and _is_module_attribute(sources[i]):
            names[p.name] = ("tensor attribute", _state_path(sources[i].name))
    return names


def _dynamo_input_sources(count: int) -> list | None:
    """Dynamo's source of each graph input (L['self'].cache, L['x']...), when Dynamo is tracing."""
    tx = _dynamo_tx()
    if tx is None:
        return None
    inputs = list(tx.output.graph.find_nodes(op="placeholder"))
    if len(inputs) != count:
        return None
    return [getattr(p.meta.get("grapharg"), "source", None) for p in inputs]


def _is_module_attribute(source: Any) -> bool:
    """L['self'].cache, L['self']._modules['fc'].cache: a tensor attribute of a module (not of
    a user input such as a batch dataclass)."""
    from torch._dynamo.source import AttrSource

    return isinstance(source, AttrSource) and "NNModuleSource" in type(getattr(source, "base", None)).__name__


def _state_path(source_name: str) -> str:
    """L['self']._modules['fc']._buffers['avg'] -> fc.avg."""
    path = re.sub(r"^L\['[^']*'\]", "", source_name)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def _dynamo_tx() -> Any:
    """The Dynamo frame being compiled (the passes run inside its backend call), or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None


def _fw_metadata() -> Any:
    tracing = torch._guards.TracingContext.try_get()
    return getattr(tracing, "fw_metadata", None)


def _label(kind_and_name: tuple[str, str]) -> str:
    return f"{kind_and_name[0]} `{kind_and_name[1]}`"


def _written_args(node: fx.Node) -> list[fx.Node]:
    """The arguments an op writes (Tensor(a!) in its schema)."""
    out = []
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            out.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node))
    return out


def _view_base(node: fx.Node) -> fx.Node:
    while (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
           and node.target.is_view and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def _site(candidates: list, fallback: fx.Node) -> fx.Node:
    """The first candidate with a user source line (AOT's epilogue copies have none)."""
    return next((c for c in candidates if isinstance(c, fx.Node) and c.meta.get("stack_trace")), fallback)


def _carries_samples(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    lay = layout_of(node)
    return any(l is not FREE for l in (lay if isinstance(lay, (tuple, list)) else [lay]))


def _batch_symbols(batch_size: Any) -> set:
    return set(getattr(batch_size, "free_symbols", ()) or ())


def _size_dependent(graph: fx.Graph, symbols: set) -> set[fx.Node]:
    """Nodes whose value depends on the symbolic batch size: sizes whose expression holds
    it, tensors whose shape does, and everything computed from either. A shape query
    (sym_size...) depends only on its own expression: x.shape[1] of a batched x is not B."""
    if not symbols:
        return set()
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        query = getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in _SHAPE_QUERIES
        if _mentions(node.meta.get("val"), symbols) or (not query and any(a in out for a in node.all_input_nodes)):
            out.add(node)
    return out


def _mentions(val: Any, symbols: set) -> bool:
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return bool(val.node.expr.free_symbols & symbols)
    if isinstance(val, torch.Tensor):
        return any(_mentions(s, symbols) for s in val.shape)
    if isinstance(val, (list, tuple)):
        return any(_mentions(v, symbols) for v in val)
    return False


def _from_batch_norm(nodes: list) -> bool:
    """Whether a batch norm computed any of `nodes` (its running statistics)."""
    seen, todo = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in _BATCH_NORMS:
            return True
        todo.extend(node.all_input_nodes)
    return False


def _in_place(node: fx.Node) -> Any:
    """In-place ops in a functionalized graph: AOT's copy of a mutated input's new value into
    the input. Writes into a per-sample input are pointwise; writes into model state are
    checked by check_state_writes (the value written is AGG if it carries samples)."""
    if isinstance(layout_of(node.args[0]), Batched):
        return _pointwise(node)
    return AGG if batched_args(node) else _free_or_agg(node)


def _embedding_renorm(node: fx.Node) -> Any:
    """nn.Embedding(max_norm=...): renormalises, in place, the rows the indices look up."""
    weight, indices = node.args[0], node.args[1]
    if layout_of(indices) is FREE and layout_of(weight) is FREE:
        return FREE
    names = node.graph.owning_module.meta.get(STATE_NAMES, {})
    base = _view_base(weight) if isinstance(weight, fx.Node) else None
    what = _label(names[base.name]) if base is not None and base.name in names else "the embedding table"
    raise StateWriteError(
        f"dpcompile: {describe_node(node)} writes {what} from batch data: max_norm renormalises the rows this "
        "batch looked up, which reveals them (the new weights record which tokens the batch used, and the "
        "privacy guarantee covers only the noisy gradients), so it is refused. Fix: drop max_norm, or "
        "renormalise all rows under torch.no_grad() after each optimizer step.")


def _packets(*names: str) -> list[Any]:
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            out.append(packet)
    return out


RULES: dict[Any, Callable[[fx.Node], Any]] = {}


def _register(rule: Callable[[fx.Node], Any], *names: str) -> None:
    for packet in _packets(*names):
        RULES[packet] = rule


_register(_view, "view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "unflatten", "flatten")
_register(_permute, "permute")
_register(_as_strided, "as_strided")
_register(_transpose, "transpose", "t", "swapaxes")
_register(_expand, "expand", "expand_copy")
_register(_unsqueeze, "unsqueeze")
_register(_squeeze, "squeeze")
_register(_same_as_first, "clone", "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy",
          "type_as", "_conj", "resolve_conj", "resolve_neg", "native_dropout", "_assert_tensor_metadata")
_register(_along_dim, "_softmax", "_log_softmax", "softmax", "log_softmax", "_softmax_backward_data",
          "_log_softmax_backward_data", "cumsum", "cumprod", "sort", "topk", "flip", "roll", "logcumsumexp")
_register(_reduction, "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "var", "std",
          "var_mean", "std_mean", "logsumexp", "linalg_vector_norm", "any", "all", "norm")
_register(_select_or_slice, "select", "slice", "narrow")
_register(_scatter_into, "slice_scatter", "select_scatter")
_register(_split, "split", "split_with_sizes", "unbind", "chunk", "unsafe_split", "tensor_split")
_register(_cat, "cat", "stack")
_register(_index_select, "index_select")
_register(_gather_scatter, "gather", "scatter", "scatter_add", "scatter_reduce")
_register(_embedding, "embedding")
_register(_mm, "mm", "addmm")
_register(_bmm, "bmm", "baddbmm")
_register(_trilinear, "_trilinear")
_register(_embedding_bag, *_BAG_FORWARDS)
_register(_embedding_bag_backward, "_embedding_bag_backward")
_register(_embedding_bag_weights_backward, "_embedding_bag_per_sample_weights_backward")
_register(_batch_first, "convolution", "_convolution", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
          "max_pool3d_with_indices", "avg_pool2d", "avg_pool2d_backward", "avg_pool1d", "avg_pool3d",
          "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "adaptive_avg_pool1d", "upsample_nearest2d",
          "upsample_bilinear2d", "upsample_nearest2d_backward", "upsample_bilinear2d_backward", "im2col", "col2im",
          "native_group_norm", *(f"{kind}_pad{n}d{grad}" for kind in ("reflection", "replication")
                                 for n in (1, 2, 3) for grad in ("", "_backward")))
_register(_constant_pad, "constant_pad_nd")
_register(_grad_site, "convolution_backward", "native_layer_norm_backward", "native_group_norm_backward")
_register(_layer_norm, "native_layer_norm")
_register(_batch_norm, "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
          "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm")
_register(_attention, "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
          "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
          "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
          "_efficient_attention_backward", "_scaled_dot_product_fused_attention_overrideable",
          "_scaled_dot_product_fused_attention_overrideable_backward")
_register(_nll_forward, "nll_loss_forward", "nll_loss2d_forward")
_register(_nll_backward, "nll_loss_backward", "nll_loss2d_backward")
_register(_embedding_backward, "embedding_dense_backward")
_register(_factory, "full", "zeros", "ones", "empty", "empty_strided", "arange", "scalar_tensor", "full_like",
          "zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "rand_like",
          "randn_like", "bernoulli", "rand", "randn", "randint", "randint_like", "iota", "sym_size", "sym_numel",
          "sym_stride", "sym_storage_offset", "_local_scalar_dense", "detach_copy")
_register(_index, "index", "_unsafe_index", "_unsafe_masked_index")
_register(_index_put, "index_put", "_unsafe_index_put")
_register(_refuse_index, "masked_select", "nonzero")
_register(_embedding_renorm, "embedding_renorm", "embedding_renorm_")
_register(_pointwise, "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "lerp", "addcmul", "addcdiv",
          "threshold_backward", "gelu_backward", "silu_backward", "sigmoid_backward", "tanh_backward",
          "hardtanh_backward", "leaky_relu_backward", "elu_backward", "softplus_backward", "mish_backward",
          "native_dropout_backward", "_foreach_add", "copy", "fill", "logical_not", "bitwise_not")

_PRIMS = {
    "iota": _factory, "convert_element_type": _same_as_first, "device_put": _same_as_first,
    "broadcast_in_dim": _expand, "squeeze": _squeeze, "var": _reduction, "sum": _reduction,
    "philox_rand": _factory, "rev": _along_dim,
    # Inductor's decomposition of max pooling (per-sample windows over the spatial dims).
    "_low_memory_max_pool_with_offsets": _batch_first, "_low_memory_max_pool_offsets_to_indices": _batch_first,
}


def _infer(node: fx.Node, ctx: CompileContext) -> Any:
    target = node.target
    if target is operator.getitem:
        parent = layout_of(node.args[0])
        return parent[node.args[1]] if isinstance(parent, (tuple, list)) else parent
    if any(isinstance(layout_of(a), Ragged) for a in _tensor_args(node)):
        return _ragged(node)
    if not isinstance(target, torch._ops.OpOverload):
        # Python-level ops on sizes (operator.mul on SymInts, sym_float...).
        if any(isinstance(layout_of(a), Batched) for a in _tensor_args(node)):
            raise _mix(node, "is not an aten op and takes per-sample tensors")
        return FREE
    rule = RULES.get(target.overloadpacket)
    if rule is None and _is_inplace(target):
        rule = _in_place
    if rule is None and target.namespace == "prims":
        rule = _PRIMS.get(target.overloadpacket.__name__)
    if rule is None and torch.Tag.pointwise in target.tags:
        rule = _pointwise
    if rule is None:
        if not batched_args(node):
            return _multi(node, _free_or_agg(node)) if isinstance(node.meta.get("val"), (list, tuple)) else _free_or_agg(node)
        raise DPCompileError(
            f"dpcompile: {describe_node(node)} has no batch-dimension rule, so dpcompile cannot prove it keeps "
            "samples apart and refuses it. Rewrite the model with standard ops, or open an issue naming this op."
        )
    return rule(node)
