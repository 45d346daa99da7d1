"""The `dp` torch.compile backend.

    torch.compile(model, backend="dp", options={"max_grad_norm": 1.0, "noise_multiplier": 1.0,
                                                "sample_rate": q, "dataset_size": N})

Dynamo hands us a graph with parameters lifted as inputs. We run Inductor's
``compile_fx`` with our own inner compiler and a decomposition table that keeps the
backward ops the passes recognise (``embedding_dense_backward``, norm backwards,
``convolution_backward``). The forward graph is analysed (batch_dim); the backward
graph is rewritten by the DP pipeline, then decomposed and compiled by Inductor.
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import re
import time
import weakref
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ..privacy import kernels
from . import recurrent
from ..distributed import check_compile
from ..errors import DPCompileError
from ..options import DPOptions
from .passes import BACKWARD_PIPELINE, FORWARD_PIPELINE, run_pipeline
from .passes.batch_dim import check_inference_state_writes
from .passes.base import HOOKS, CompileContext, node_shape, to_expr
from ..privacy.state import IN_GRAPH_ATTR, STATE_ATTR, PrivacyState, guard_parameters, own_module
from .module import STATE_KEY
from .module import install as install_compile_hook
from .runtime import OwnParametersOnly, PrivateBackward, states_of_this_call

aten = torch.ops.aten
log = logging.getLogger("dpcompile")
KEPT_BACKWARD_OPS = (aten.embedding_dense_backward, aten.native_layer_norm_backward,
                     aten.native_group_norm_backward, aten.convolution_backward,
                     aten.nll_loss_backward, aten.nll_loss2d_backward)
# Inductor rewrites matmuls with a size-1 dim as broadcast-multiply + sum; with a batch of
# one sample that broadcast hides which dim holds the samples. Keep them as matmuls
# until after the DP passes (the backward re-trace still decomposes them).
KEPT_MATMULS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
_graph_ids = itertools.count()


def dp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
               mode: str | None = None, **unused: Any):
    state = _state_for(options, example_inputs)
    try:
        compiled = _compile(gm, example_inputs, state, mode)
    except DPCompileError as refusal:
        state.refusal = refusal  # torch._dynamo.config.suppress_errors would run the module eagerly
        raise
    state.refusal = None
    return compiled


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], state: PrivacyState, mode: str | None):
    check_compile(state)  # under DDP: refuses Dynamo's DDPOptimizer (one graph per bucket) and make_private models
    module = state.compiled_module()
    if module is not None:  # checked again here: FSDP2 may have sharded submodules since torch.compile
        own_module(module._orig_mod, state)
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and reason.graph_break:
        state.multi_graph = True  # another graph follows: clip factors need all of them
    # graph breaks: clip once the whole backward has run (deferred), unless clip groups let each graph
    # clip its own groups (PrivacyState checks at the end of the backward that no group spans two graphs)
    ctx = CompileContext(options=state.options, graph_id=next(_graph_ids), param_names={}, input_kinds=[],
                         multi_graph=state.multi_graph,
                         deferred=state.multi_graph and state.options.clip_groups is None)
    _classify_inputs(gm, example_inputs, ctx)
    ctx.clip_groups = state.clip_groups_of(ctx)
    ctx.group_table = state.clip_group_table
    recurrent.rewrite_calls(gm)
    ctx.length_plans = sum(1 for c in state.compiled if c.noise_key == ctx.noise_key and c.plan.get("size_guards"))
    if HOOKS.keep_graphs:  # export maps the graph inputs back to parameters and user inputs
        ctx.graphs["example_inputs"] = list(example_inputs)
    state.compiled.append(ctx)
    inner = functools.partial(_inner_compile, ctx=ctx, state=state)
    patches = {**_padding_patch(ctx.batch_size), **state.options.inductor_patches(default_mode=mode)}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, decompositions=aot_decompositions(),
                          config_patches=patches or None)


def _padding_patch(batch_size) -> dict:
    """Inductor's pad_mm zero-pads GEMM dims to multiples of 8 (bf16) or 4 (fp32) on GPUs when its
    benchmark says so. Rows hold B × (rows per sample), so with a static B that is not a multiple
    of 8 it may pad the sample rows, which batch_dim refuses (padding the batch dim invents
    samples). Such graphs compile without pad_mm; symbolic B is never padded, and with 8 | B only
    feature and vocabulary dims are (kept: the LM head's unaligned vocabulary)."""
    if getattr(batch_size, "free_symbols", None) or int(batch_size) % 8 == 0:
        return {}
    return {"shape_padding": False}


@functools.lru_cache(None)
def aot_decompositions() -> dict:
    """Inductor's decompositions, minus the ops the DP passes must see as they are."""
    return {op: fn for op, fn in select_decomp_table().items()
            if getattr(op, "overloadpacket", None) not in KEPT_BACKWARD_OPS + KEPT_MATMULS}


# ----------------------------------------------------------------------------- state

def _state_for(options: dict | None, example_inputs: Sequence[Any]) -> PrivacyState:
    """The privacy state of the module this graph belongs to.

    ``torch.compile(module, backend="dp")`` hands it over in the options (`compiler.module`);
    a compiled function finds it from the graph's parameters (their owner's state), or gets a
    state of its own. Every parameter the graph takes is marked as clipped here and guarded."""
    options = dict(options or {})
    owner = options.pop(STATE_KEY, None)
    state = owner() if owner is not None else None
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]

    owners = {id(s): s for s in (getattr(p, STATE_ATTR, None) for p in params) if s is not None}
    if state is None:
        if len(owners) > 1:
            raise DPCompileError(
                "dpcompile: this compiled function uses the parameters of several private models; each model's "
                "gradients are clipped and accounted by its own privacy state. Compile each model on its own")
        # A region after a graph break belongs to the state whose forward ran before it in the same
        # call of the compiled function: one state clips the whole backward once.
        earlier = states_of_this_call()
        state = next(iter(owners.values()), None) or (earlier[-1] if len(earlier) == 1 else None) \
            or PrivacyState(DPOptions.from_dict(options))
    state.no_graph_reason = None  # a dp graph takes these parameters now (a compiled function's eager call may have set it)
    foreign = [p for p in params if id(getattr(p, STATE_ATTR, state)) != id(state)]
    if foreign:
        raise DPCompileError(
            f"dpcompile: parameter {getattr(foreign[0], '_dpcompile_name', tuple(foreign[0].shape))} belongs to "
            "another private model (compiled separately with backend='dp'); a parameter can train under one "
            "privacy state only")
    for p in params:
        setattr(p, STATE_ATTR, state)
        setattr(p, IN_GRAPH_ATTR, True)
    guard_parameters(params)
    return state


def register_state(options: dict, module: torch.nn.Module) -> PrivacyState:
    """Create the privacy state before the first compile (make_private needs it for its loader)
    and put it into `options`, which make_private then passes to torch.compile."""
    state = PrivacyState(DPOptions.from_dict(options))
    own_module(module, state)
    options[STATE_KEY] = weakref.ref(state)
    return state


def _classify_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], ctx: CompileContext) -> None:
    """Kind of every graph input: "param", "buffer", "symint", "batched" (holds the samples along
    the sample_dim option's dimension; a vector of the batch's size along its only one) or "free". The batch size is that of the first tensor the
    user passed (not a module attribute Dynamo lifted in front of it)."""
    dim = ctx.options.sample_dim
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    pairs = list(zip(placeholders, example_inputs))
    kinds = {}
    for node, value in pairs:
        source = _source_name(node)
        if isinstance(value, torch.nn.Parameter) or "_parameters[" in source:
            kinds[node] = "param"
        elif "_buffers[" in source:
            kinds[node] = "buffer"
        elif not isinstance(value, torch.Tensor):
            kinds[node] = "symint"
    tensors = [(node, value) for node, value in pairs if node not in kinds]
    users = [(node, value) for node, value in tensors if _is_user_input(_source_name(node))]
    user_nodes = {node for node, _ in users}
    batch = next((size for size in (_fake_size(n, v, dim) for n, v in users or tensors) if size is not None), None)
    if batch is None:
        raise DPCompileError(
            f"dpcompile: the compiled model takes no batched tensor input; the first tensor argument must hold "
            f"the samples along dimension {dim} (the sample_dim option)")
    vectors = set()  # with sample_dim > 0: a user's vector of one value per sample (lengths of a packed batch)
    for node, value in tensors:
        size = _fake_size(node, value, dim)
        if size is not None and size[0] == batch[0]:
            kinds[node] = "batched"
        elif dim > 0 and node in user_nodes and value.dim() == 1 and _fake_size(node, value, 0)[0] == batch[0]:
            kinds[node] = "batched"
            vectors.add(node)
        else:
            if node in user_nodes:
                _check_shared_input(node, value, batch, dim)
            kinds[node] = "free"
    for node, value in pairs:
        kind = kinds[node]
        if kind in ("param", "buffer"):
            ctx.param_names[len(ctx.input_kinds)] = _param_name(_source_name(node), node.name)
        if kind == "param":
            ctx.params[len(ctx.input_kinds)] = value
        if node in vectors:
            ctx.input_sample_dims[len(ctx.input_kinds)] = 0
        ctx.input_kinds.append(kind)
    ctx.batch_size, ctx.batch_hint = batch


def _is_user_input(source: str) -> bool:
    """An argument of the call (L['x'], L['kwargs']['mask']), not a global or an attribute of self."""
    return not source.startswith(("L['self']", "G[")) and not re.match(r"^L\['[^']+'\]\.", source)


def _check_shared_input(node: fx.Node, value: torch.Tensor, batch: tuple, dim: int) -> None:
    """An input without the batch along `dim` is taken as shared by all samples; one that has
    the batch's size along another dimension may hold the samples there (time-major next to
    batch-first): refused, since clipping would cut it into the wrong samples."""
    fake = node.meta.get("example_value")
    shape = fake.shape if isinstance(fake, torch.Tensor) else value.shape
    elsewhere = [d for d in range(len(shape)) if d != dim and to_expr(shape[d]) == batch[0]]
    if elsewhere and int(batch[1]) > 1:
        raise DPCompileError(
            f"dpcompile: input `{_source_name(node)}` of shape {tuple(value.shape)} has {batch[1]} entries along "
            f"dimension {elsewhere[0]}, where the first input holds its {batch[1]} samples along dimension {dim}: "
            "dpcompile cannot prove which dimension holds this input's samples. Pass every per-sample input with "
            f"the samples along dimension {dim}, or set the sample_dim option to the dimension that holds them "
            "(e.g. sample_dim=1 for time-major (T, B, ...) inputs)")


def _fake_size(node: fx.Node, value: torch.Tensor, dim: int):
    """(size along `dim` as a sympy expression, its value), or None if the tensor has no such dim."""
    if value.dim() <= dim:
        return None
    fake = node.meta.get("example_value")
    size = fake.shape[dim] if isinstance(fake, torch.Tensor) else value.shape[dim]
    return to_expr(size), int(value.shape[dim])


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None and grapharg.source is not None else node.name


def _param_name(source: str, fallback: str) -> str:
    """L['self']._modules['fc']._parameters['weight'] -> fc.weight."""
    path = re.sub(r"^L\['[^']*'\]", "", source)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".") or fallback


# ----------------------------------------------------------------------------- compile

def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], *, ctx: CompileContext,
                   state: PrivacyState, **kwargs: Any):
    if kwargs.get("is_inference"):  # no backward (torch.no_grad(), a param-free region): state writes only
        check_inference_state_writes(gm, ctx)
        return _compile_graph(gm, example_inputs, kwargs)
    if not kwargs.get("is_backward"):
        run_pipeline(FORWARD_PIPELINE, gm, ctx)
        ctx.tangent_layouts = _tangent_layouts(gm)
        _keep_graph(ctx, "forward", gm)
        return OwnParametersOnly(_compile_graph(gm, example_inputs, kwargs), ctx, state)
    started = time.perf_counter()
    run_pipeline(BACKWARD_PIPELINE, gm, ctx)
    input_names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    decomposed, inputs = _decompose(gm, example_inputs, ctx)
    _keep_graph(ctx, "backward", decomposed, input_names=input_names)
    inputs = split_noise_input(decomposed, inputs, ctx)
    on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    with torch._inductor.config.patch(_backward_patches(state.options, on_gpu)):
        compiled = _compile_graph(decomposed, inputs, kwargs)
    _log_backward(ctx, time.perf_counter() - started)
    return PrivateBackward(compiled, state, ctx)


def _log_backward(ctx: CompileContext, seconds: float) -> None:
    """One INFO line per compiled dp backward (logging.getLogger("dpcompile")): what a long
    first step is spending its time on."""
    if not log.isEnabledFor(logging.INFO):
        return
    strategies = collections.Counter(row["strategy"] for r in ctx.records if r.name == "book_keeping"
                                     for row in (r.table or ()))
    plan = ", ".join(f"{n} {k}" for k, n in sorted(strategies.items())) or "no parameter here"
    log.info("dp backward of graph %d compiled in %.1f s: %d parameters (%s), batch %s", ctx.graph_id, seconds,
             len(ctx.params), plan, ctx.batch_size)


# Inductor unrolls reductions over fewer than `unroll_reductions_threshold` (8) elements into
# pointwise code. The batch sums Σ_b w_b g_b were its main target (now `dpcompile.privacy.kernels` on
# CUDA); with the kernel in place, keeping the threshold at 17 still paid on an H200 (2026-12-02,
# GPT-2 bf16 B=8 T=1024): lean plan 25.4 ms a step against 32.6 ms without it, auto plan 24.8
# against 25.1 ms, first step 1.00-1.26x Inductor's. GPU graphs only: Inductor's C++ backend
# spent minutes choosing tilings for unrolled kernels.
UNROLL_BATCH_BELOW = 17


# Every clipped sum and noise kernel reads the clip weights, so Inductor's fusion search, which
# groups nodes by the buffers they share and tries each against the next N of its group, met
# groups of ~50-100 members whose far pairs never fuse (distinct layers). On an H200 (LM, B = 32,
# T = 256) N = 16 instead of 64 cut the backward's fusion time from 2.6 to 1.5 s; step time
# unchanged (25.2 vs 26.5 ms, within run-to-run noise).
FUSION_PAIR_WINDOW = 16


def _backward_patches(options: DPOptions, on_gpu: bool) -> dict:
    """Inductor settings for the backward graph; a setting the user chose is kept."""
    chosen, config = dict(options.inductor), torch._inductor.config
    patches = {}
    if "max_fusion_buffer_group_pairwise_attempts" not in chosen:
        patches["max_fusion_buffer_group_pairwise_attempts"] = min(
            config.max_fusion_buffer_group_pairwise_attempts, FUSION_PAIR_WINDOW)
    if on_gpu and "unroll_reductions_threshold" not in chosen:  # CPU: see UNROLL_BATCH_BELOW
        patches["unroll_reductions_threshold"] = max(config.unroll_reductions_threshold, UNROLL_BATCH_BELOW)
    return patches


def _compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], kwargs: dict):
    if HOOKS.skip_inductor:  # inspection/export only need the graphs: run them as Python
        return make_boxed_func(gm.forward)
    return compile_fx_inner(gm, example_inputs, **kwargs)


def _keep_graph(ctx: CompileContext, which: str, gm: fx.GraphModule, **info: Any) -> None:
    """For inspection/export: a copy of the graph as it is before Inductor rewrites it in place."""
    if not HOOKS.keep_graphs:
        return
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    ctx.graphs[which] = fx.GraphModule(gm, graph)
    if which == "forward":  # user outputs come first, then what the backward saves
        info["forward_returns"] = torch._guards.TracingContext.get().fw_metadata.num_forward_returns
    ctx.graphs[which + "_info"] = info


def _tangent_layouts(fw_gm: fx.GraphModule) -> list[Any]:
    meta = torch._guards.TracingContext.get().fw_metadata
    outputs = list(fw_gm.graph.output_node().args[0])
    start = meta.num_mutated_inp_runtime_indices
    user = outputs[start:start + len(meta.output_info)]
    return [(node.meta.get("dp_layout"), node_shape(node))
            for node, info in zip(user, meta.output_info) if info.requires_grad]


def _decompose(gm: fx.GraphModule, example_inputs: Sequence[Any], ctx: CompileContext):
    """Trace the rewritten graph into Inductor-ready aten ops (our helper calls included)."""
    fake_mode = detect_fake_mode(example_inputs)
    device = next(x.device for x in example_inputs if isinstance(x, torch.Tensor))
    with fake_mode:
        extra = [torch.empty(shape, device=device, dtype=ctx.runtime_dtypes.get(name, torch.float32))
                 for name, shape in ctx.runtime_inputs.items()]
    inputs = list(example_inputs) + extra
    interpreter = fx.Interpreter(gm)
    with fake_mode, kernels.use_triton(ctx.options.triton_kernels):
        decomposed = make_fx(interpreter.run, decomposition_table=retrace_decompositions())(*inputs)
    return decomposed, inputs


def split_noise_input(gm: fx.GraphModule, inputs: list, ctx: CompileContext) -> list:
    """Give each privatized gradient its own noise input: a view of the flat ``dp_noise`` at run
    time (`PrivateBackward` cuts it up; exported graphs keep the flat input).

    Inductor bakes a slice's offset into the kernel that reads it, so with one shared input
    every layer's noise-adding kernel was distinct source: no kernel reuse across identical
    layers (a compile and an autotune each), and all of them landed in one group of Inductor's
    pairwise fusion search. Returns the new example inputs; records the cuts in
    ``ctx.plan["noise_pieces"]`` as (start, numel) in input order."""
    if "dp_noise" not in ctx.runtime_inputs:
        return inputs
    index = len(inputs) - len(ctx.runtime_inputs) + list(ctx.runtime_inputs).index("dp_noise")
    noise = list(gm.graph.find_nodes(op="placeholder"))[index]
    cuts = [_static_cut(user) for user in noise.users]
    if not cuts or None in cuts:
        return inputs  # read some other way: keep the flat input
    pieces = sorted(set(cuts))
    fake = inputs[index]
    with detect_fake_mode(inputs):  # views at the run-time offsets: Inductor sees the same alignment
        examples = [fake.narrow(0, start, numel) for start, numel in pieces]
    nodes = {}
    with gm.graph.inserting_after(noise):
        for cut, example in reversed(list(zip(pieces, examples))):
            nodes[cut] = gm.graph.placeholder(f"dp_noise_{cut[0]}")
            nodes[cut].meta["val"] = example
    for user, cut in zip(list(noise.users), cuts):
        user.replace_all_uses_with(nodes[cut])
        gm.graph.erase_node(user)
    gm.graph.erase_node(noise)
    gm.recompile()
    ctx.plan["noise_pieces"] = pieces
    return inputs[:index] + examples + inputs[index + 1:]


def _static_cut(node: fx.Node) -> tuple[int, int] | None:
    """(start, numel) of a ``slice(noise, 0, start, end)`` with static bounds and step 1."""
    if node.target is not aten.slice.Tensor:
        return None
    _, dim, start, end, *step = node.args
    if dim != 0 or step not in ([], [1]) or not all(isinstance(v, int) for v in (start, end)):
        return None
    return start, end - start


@functools.lru_cache(None)
def retrace_decompositions() -> dict:
    """Inductor's table, plus views that copy when re-tracing changed an input's strides.

    Re-tracing can decompose an op (e.g. a cropping constant_pad_nd) into a strided
    slice where AOT recorded a contiguous result; the graph's later `view` then fails.
    """
    table = dict(select_decomp_table())
    table[aten.view.default] = _view_or_copy
    return table


def _view_or_copy(x: torch.Tensor, size):
    """A plain view whenever x's strides allow one (a per-sample split of a transposed GEMM
    operand does: copying it cost a full transposed pass per weight); else a contiguous copy."""
    if x.is_contiguous() or _view_strides(x, size) is not None:
        return NotImplemented
    return aten.view.default(aten.clone.default(x, memory_format=torch.contiguous_format), size)


def _view_strides(x: torch.Tensor, size) -> list | None:
    """The strides `x.view(size)` would have, or None if it needs a copy (or cannot tell
    without guarding on a symbolic size)."""
    from torch._prims_common import infer_size
    from torch._subclasses.fake_impls import _compute_stride  # the rule aten.view itself applies

    return _compute_stride(x.shape, x.stride(), infer_size(size, x.numel()), size_oblivious=True)


install_compile_hook(dp_backend)  # torch.compile(module, backend="dp") protects the module first (compiler.module)
