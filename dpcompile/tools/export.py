"""Export the private training step to ONNX: forward, loss and the DP-rewritten backward.

    exported = dpcompile.export_onnx(model, torch.randn(8, 10), "step.onnx")

The exported graph is one call of the step that ``torch.compile(model, backend="dp")``
runs (same passes, same cost-model choices, same decompositions), minus Inductor:

    inputs : the trainable parameters (by name), input_0.., target, then the runtime
             inputs of the passes (lsg_* projections, if any), dp_noise, dp_scalars
    outputs: loss, grad.<param> per trainable parameter, sample_norms, dp_checks_ok

``grad.<param> = (Σ_i C_i g_i + std · z[slice]) / divisor`` with C_i the clip factors of
the per-sample gradients g_i, ``z = dp_noise`` (a standard normal vector, one slice per
parameter, offsets in the model's ``dpcompile.noise_slices`` metadata) and
``dp_scalars = [std = σ·R, expected batch size or 0 for the actual one]``.

Privacy contract for whoever runs the file: draw ``dp_noise`` fresh for every step from a
cryptographically sound N(0, 1) source (the graph cannot), pass ``dp_scalars[0] = σ·R``,
and apply the gradients only when ``dp_checks_ok`` is true. ONNX has no assertion op, so
the checks the compiled step makes at run time (per-sample norms finite; equal token
counts per sample for losses averaged over the tokens of the whole batch) become that
boolean output instead of being dropped. Privacy accounting stays with the caller
(``dpcompile.privacy.accounting``); shapes are static (re-export for another batch size).

``verify=True`` checks the file with ``onnx.checker``, runs it in onnxruntime, and
compares its gradients with those PyTorch computes for the same inputs and noise vector
through the dp backend itself (one more private step of a copy of the model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import DPCompileError, describe_node
from .inspection import Captured, capture_step

aten = torch.ops.aten
ASSERT_OPS = (aten._assert_async.msg, aten._assert_async.default)
CHECK_OPS = {aten._assert_scalar.default, aten._assert_tensor_metadata.default,  # removed by torch.onnx
             aten.sym_constrain_range_for_size.default, *ASSERT_OPS}


@dataclasses.dataclass
class ExportedStep:
    """An exported private training step and what is needed to run it."""

    model_proto: Any  # onnx.ModelProto
    path: str | None
    input_names: list[str]
    output_names: list[str]
    noise_slices: dict[str, tuple[int, int]]  # parameter -> (offset, numel) in dp_noise
    example_feeds: dict[str, Any]  # numpy arrays: the inputs used for verification
    errors: dict[str, float] = dataclasses.field(default_factory=dict)  # output -> max error / max |torch|

    def session(self):
        import onnxruntime as ort

        return ort.InferenceSession(self.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, Any] | None = None, session=None) -> dict[str, Any]:
        """Run the step in onnxruntime; feeds default to the example ones."""
        session = session or self.session()
        outputs = session.run(None, feeds or self.example_feeds)
        return dict(zip(self.output_names, outputs))


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike | None = None, *,
                target: torch.Tensor | None = None, loss_fn: Callable | None = None, options: dict | None = None,
                verify: bool = True, rtol: float = 1e-4, opset_version: int | None = None,
                optimize: bool = True) -> ExportedStep:
    """Export the private training step of `model` on inputs shaped like `example_inputs`
    (loss and options as in `dpcompile.inspect_model`) to an ONNX file at `path` (if given).
    Raises DPCompileError listing the ops ONNX cannot express, or when verify finds the ONNX
    gradients off PyTorch's by more than `rtol` of the largest gradient entry. optimize runs
    onnxscript's graph optimizer (smaller file; about half the export time)."""
    try:
        import onnx  # noqa: F401  (checker, save)
        import onnxruntime  # noqa: F401  (verification and ExportedStep.run)
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as err:
        raise DPCompileError(f"dpcompile export needs onnx, onnxruntime and onnxscript ({err}); "
                             "pip install 'dpcompile[onnx]'") from err
    with _quiet_exporter():
        return _export(model, example_inputs, path, target, loss_fn, options, verify, rtol, opset_version, optimize)


def _export(model, example_inputs, path, target, loss_fn, options, verify, rtol, opset_version, optimize):
    import onnx

    captured = capture_step(model, example_inputs, target=target, loss_fn=loss_fn, options=options,
                            snapshots=False, keep_graphs=True, device="cpu")  # ONNX files are device-free
    ctx = _single_region(captured)
    step = PrivateStep(ctx, captured)
    args = step.example_args(captured)
    program = _to_onnx(step, args, opset_version, optimize)
    proto = program.model_proto
    _add_metadata(proto, step, ctx)
    onnx.checker.check_model(proto, full_check=True)
    exported = ExportedStep(proto, None, step.input_names, step.output_names, step.noise_slices,
                            {name: a.detach().cpu().numpy() for name, a in zip(step.input_names, args)})
    if verify:
        exported.errors = verify_against_torch(exported, step, captured, rtol)
    if path is not None:
        exported.path = os.fspath(path)
        onnx.save_model(proto, exported.path)
    return exported


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's registry warns about every missing optional package (torchvision) each time."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------- the step as one module

class PrivateStep(nn.Module):
    """The forward graph and the rewritten backward graph of one compiled region, wired
    into forward(params..., inputs..., target, runtime inputs...) -> (loss, grads..., norms, ok)."""

    def __init__(self, ctx, captured: Captured) -> None:
        super().__init__()
        graphs = ctx.graphs
        self.fw, fw_checks = _exportable(graphs["forward"])
        self.bw, bw_checks = _exportable(graphs["backward"])
        self.n_fw_checks, self.n_bw_checks = fw_checks, bw_checks
        self.check_finite = ctx.options.check_finite
        grads = ctx.plan["param_grads"]
        self.grad_positions = [g.position for g in grads]
        self.param_names = [g.name for g in grads]
        self.fw_sources = self._forward_sources(ctx, captured)
        fw_outputs = list(graphs["forward"].graph.output_node().args[0])
        self.fw_output_names = [n.name if isinstance(n, fx.Node) else None for n in fw_outputs]
        self.loss_index = 0
        if graphs["forward_info"]["forward_returns"] != 1:
            raise DPCompileError("dpcompile export: the training step must return only the loss; the forward graph "
                                 f"returns {graphs['forward_info']['forward_returns']} values (does the model mutate "
                                 "its inputs or buffers?)")
        self.runtime_names = list(ctx.runtime_inputs)
        self.bw_input_names = graphs["backward_info"]["input_names"]
        unknown = set(self.bw_input_names) - set(self.fw_output_names) - set(self.runtime_names) - {"tangents_1"}
        if unknown:
            raise DPCompileError(f"dpcompile export: the backward graph reads {sorted(unknown)}, which neither the "
                                 "forward graph nor the DP runtime provides (random-number state of dropout in "
                                 "training mode?); export the model in eval() mode")
        self.n_bw_grads = len(ctx.input_kinds)
        slices = ctx.plan.get("noise_slices", {})
        self.noise_slices = {name: tuple(slices[pos]) for name, pos in zip(self.param_names, self.grad_positions)
                             if pos in slices}
        self.n_user = len(captured.inputs) + 1
        self.input_names = (self.param_names + [f"input_{i}" for i in range(len(captured.inputs))] + ["target"]
                            + self.runtime_names)
        self.output_names = ["loss"] + [f"grad.{n}" for n in self.param_names] + ["sample_norms", "dp_checks_ok"]

    def _forward_sources(self, ctx, captured: Captured) -> list[tuple[str, Any]]:
        """Where each forward-graph input comes from: ("param", j), ("user", k) or ("const", buffer)."""
        users = {id(t): k for k, t in enumerate((*captured.inputs, captured.target))}
        trainable = {pos: j for j, pos in enumerate(self.grad_positions)}
        sources = []
        for i, (kind, value) in enumerate(zip(ctx.input_kinds, ctx.graphs["example_inputs"])):
            if i in trainable:
                sources.append(("param", trainable[i]))
            elif id(value) in users:
                sources.append(("user", users[id(value)]))
            elif isinstance(value, torch.Tensor):  # buffers, frozen parameters, tensor attributes
                name = f"const_{i}"
                self.register_buffer(name, value.detach().clone())
                sources.append(("const", name))
            else:
                raise DPCompileError(f"dpcompile export: graph input #{i} ({kind}) is not a tensor ({value!r}); "
                                     "export needs static shapes (it compiles with dynamic=False)")
        return sources

    def example_args(self, captured: Captured) -> tuple[torch.Tensor, ...]:
        """Parameters, inputs and target of the capture; zero noise and the configured scalars."""
        params = dict(captured.model.named_parameters())
        ctx_runtime = _runtime_examples(captured)
        return (tuple(params[n].detach() for n in self.param_names) + tuple(captured.inputs)
                + (captured.target,) + tuple(ctx_runtime))

    def forward(self, *args: torch.Tensor):
        n_params = len(self.param_names)
        params, user, runtime = args[:n_params], args[n_params:n_params + self.n_user], args[n_params + self.n_user:]
        fw_in = [params[k] if kind == "param" else user[k] if kind == "user" else getattr(self, k)
                 for kind, k in self.fw_sources]
        fw_out = self.fw(*fw_in)
        checks = list(fw_out[len(fw_out) - self.n_fw_checks:]) if self.n_fw_checks else []
        env = {name: value for name, value in zip(self.fw_output_names, fw_out) if name is not None}
        loss = fw_out[self.loss_index]
        env["tangents_1"] = torch.ones_like(loss)
        env.update(zip(self.runtime_names, runtime))
        bw_out = self.bw(*[env[name] for name in self.bw_input_names])
        grads = [bw_out[pos] for pos in self.grad_positions]
        norms = bw_out[self.n_bw_grads]
        checks += list(bw_out[len(bw_out) - self.n_bw_checks:]) if self.n_bw_checks else []
        ok = torch.ones((), dtype=torch.bool)
        for c in checks:
            ok = ok & c
        if self.check_finite:
            ok = ok & torch.isfinite(norms).all()
        return (loss, *grads, norms, ok)


def _single_region(captured: Captured):
    if len(captured.contexts) != 1:
        raise DPCompileError(
            f"dpcompile export: the model compiled into {len(captured.contexts)} graphs (graph breaks); export needs "
            "one graph. Find the breaks with torch._dynamo.explain(model)(*inputs) and remove them.")
    ctx = captured.contexts[0]
    if ctx.deferred or "forward" not in ctx.graphs or "backward" not in ctx.graphs:
        raise DPCompileError("dpcompile export: this region clips after the whole backward (graph-break mode) and "
                             "cannot be exported as one step; remove the graph breaks")
    return ctx


def _runtime_examples(captured: Captured) -> list[torch.Tensor]:
    """The runtime inputs the dp backend feeds this step (noise as zeros: verification draws real noise)."""
    from ..compiler.runtime import PrivateBackward
    from ..privacy.state import state_of

    ctx = captured.contexts[0]
    state = state_of(captured.model)
    device = captured.inputs[0].device
    values = PrivateBackward(None, state, ctx)._runtime_inputs(device)
    return [torch.zeros_like(v) if name == "dp_noise" else v for name, v in zip(ctx.runtime_inputs, values)]


def _exportable(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` that ONNX can express: run-time assertions become extra boolean outputs
    (ONNX would drop them); prims without an ONNX translation (Inductor's decompositions
    emit some) and convolution_backward become equivalent aten code."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    checks = []
    for node in list(graph.nodes):
        if node.target in ASSERT_OPS:
            checks.append(node.args[0])
            graph.erase_node(node)
        elif node.target is aten.convolution_backward.default and _plain_conv(node):
            node.target = _same_layout(convolution_backward, node)
        elif node.target is aten._scaled_dot_product_flash_attention_for_cpu_backward.default and _no_dropout(node):
            node.target = _same_layout(attention_backward, node)
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "prims":
            node.target = _prim_reference(node.target) or node.target
    out = graph.output_node()
    out.args = (tuple(out.args[0]) + tuple(checks),)
    return fx.GraphModule(gm, graph), len(checks)


def _same_layout(fn: Callable, node: fx.Node) -> Callable:
    """`fn` with its outputs laid out in memory like the op it replaces (later views rely on it)."""
    vals = node.meta["val"]
    orders = [_dim_order(v) if isinstance(v, torch.Tensor) else None for v in vals]

    def replaced(*args, **kwargs):
        outs = fn(*args, **kwargs)
        return tuple(o if order is None or o is None else _in_order(o, order) for o, order in zip(outs, orders))

    replaced.__name__ = fn.__name__
    return replaced


def _dim_order(t: torch.Tensor) -> list[int]:
    """Dims from outermost to innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d))


def _in_order(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    inverse = [order.index(d) for d in range(len(order))]
    return t.permute(order).contiguous().permute(inverse)


def _prim_reference(op: torch._ops.OpOverload) -> Callable | None:
    """The aten implementation of a prim ONNX has no translation for (e.g. iota, Inductor's
    low-memory max pooling), or None."""
    import torch._prims as prims
    from torch._inductor import inductor_prims

    registered = _onnx_registered_ops()
    if registered is not None and op in registered:
        return None
    name = op._opname
    return (getattr(prims, f"_{name}_aten", None) or getattr(inductor_prims, f"{name}_aten", None)
            or EXTRA_PRIM_REFERENCES.get(name))


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return a * b + c  # Inductor's fused multiply-add; ONNX rounds once more


EXTRA_PRIM_REFERENCES = {"fma": _fma}


@functools.lru_cache(None)
def _onnx_registry():
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib()


@functools.lru_cache(None)
def _onnx_registered_ops() -> frozenset | None:
    """Ops torch.onnx translates directly; None if its (private) registry moved: then every prim
    with an aten reference is replaced, which exports as well."""
    try:
        return frozenset(metas[0].fx_target for metas in _onnx_registry().functions.values() if metas)
    except (ImportError, AttributeError):
        return None


def _plain_conv(node: fx.Node) -> bool:
    """Non-transposed 1-D/2-D convolution: the case `convolution_backward` below covers."""
    return not node.args[7] and node.args[1].meta["val"].dim() in (3, 4)


def _no_dropout(node: fx.Node) -> bool:
    q, k = node.args[1].meta["val"], node.args[2].meta["val"]
    return node.args[6] == 0.0 and q.shape[:-2] == k.shape[:-2]


def attention_backward(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None):
    """Flash-attention backward without dropout, in plain ops. With S = s·QKᵀ (+ mask) and
    P = softmax(S): dV = PᵀdO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = s·dS K, dK = s·dSᵀQ.
    P is recomputed rather than read from the saved logsumexp, whose ONNX translation of the
    forward op does not keep PyTorch's shape."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().mT) * s
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    g = grad_out.float()
    grad_v = probs.mT @ g
    grad_scores = probs * (g @ v.float().mT - (g * out.float()).sum(-1, keepdim=True))
    grad_q = (grad_scores @ k.float()) * s
    grad_k = (grad_scores.mT @ q.float()) * s
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask):
    """aten.convolution_backward of a plain 1-D/2-D convolution in exportable ops: the input
    gradient is the transposed convolution of `grad`, the weight gradient Σ grad ⊗ unfold(x)."""
    spatial = x.dim() - 2  # aten may give one value for every spatial dim (padding="valid" is [0])
    stride, padding, dilation = ([v[0]] * spatial if len(v) == 1 else list(v) for v in (stride, padding, dilation))
    one_d = x.dim() == 3
    if one_d:
        grad, x, weight = grad.unsqueeze(2), x.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    grad_input = grad_weight = grad_bias = None
    kernel = weight.shape[2:]
    if output_mask[0]:
        extra = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)]
        grad_input = aten.convolution.default(grad, weight, None, list(stride), list(padding), list(dilation), True,
                                              extra, groups)
        grad_input = grad_input.squeeze(2) if one_d else grad_input
    if output_mask[1]:
        n, c_out = grad.shape[0], grad.shape[1]
        cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        cols = cols.reshape(n, groups, -1, cols.shape[-1])
        g = grad.reshape(n, groups, c_out // groups, -1)
        grad_weight = torch.einsum("ngol,ngil->goi", g, cols).reshape(weight.shape)
        grad_weight = grad_weight.squeeze(2) if one_d else grad_weight
    if output_mask[2]:
        grad_bias = grad.sum([0, 2, 3])
    return grad_input, grad_weight, grad_bias


# ----------------------------------------------------------------------------- ONNX

def _to_onnx(step: PrivateStep, args: tuple, opset_version: int | None, optimize: bool):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(step, args, strict=False)
            return torch.onnx.export(program, args, input_names=step.input_names, output_names=step.output_names,
                                     dynamo=True, opset_version=opset_version, verbose=False, optimize=optimize)
    except DPCompileError:
        raise
    except Exception as err:  # name every op ONNX cannot express, with where it comes from
        missing = unsupported_ops(step, args)
        if missing:
            raise DPCompileError(_missing_message(missing, step)) from err
        raise DPCompileError(f"dpcompile export: torch.onnx.export failed: {err}") from err


def unsupported_ops(step: nn.Module, args: tuple) -> dict[str, int]:
    """Ops of the step (after the exporter's own decompositions) with no ONNX translation: name -> count."""
    from torch.onnx._internal.exporter import _dispatching, _fx_passes

    registry = _onnx_registry()
    program = _fx_passes.decompose_with_registry(torch.export.export(step, args, strict=False), registry)
    missing: dict[str, int] = {}
    for node in program.graph.nodes:
        if (node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload)
                or node.target in CHECK_OPS):
            continue
        function, _ = _dispatching.dispatch(node, registry)
        if function is None:
            name = str(node.target)
            missing[name] = missing.get(name, 0) + 1
    return missing


def _missing_message(missing: dict[str, int], step: PrivateStep) -> str:
    lines = ["dpcompile export: the private training step uses op(s) that ONNX (torch.onnx + onnxscript) cannot "
             "express:"]
    for name, count in sorted(missing.items()):
        where = _origins(name, step)
        lines.append(f"  - {name} ({count}x)" + (f": {where}" if where else ""))
    if any("inductor_random" in name or "inductor_seed" in name for name in missing):
        lines.append("Dropout in training mode draws its masks with Inductor's random number generator, which "
                     "ONNX cannot reproduce: export the model in eval() mode (model.eval()) or without dropout.")
    lines.append("Replace them in the model (or register an ONNX translation via torch.onnx's "
                 "custom_translation_table) and export again.")
    return "\n".join(lines)


def _origins(op_name: str, step: PrivateStep) -> str:
    """Where the op appears in the forward/backward graphs (module and source line when known)."""
    packet = op_name.split(".")[1] if op_name.count(".") >= 1 else op_name
    for which, gm in (("forward", step.fw), ("backward", step.bw)):
        for node in gm.graph.nodes:
            target = getattr(node.target, "_opname", None)
            if target == packet:
                return f"{which} graph, {describe_node(node)}"
    return ""


def _add_metadata(proto, step: PrivateStep, ctx) -> None:
    opts = ctx.options
    meta = {
        "dpcompile.noise_slices": json.dumps(step.noise_slices),
        "dpcompile.noise_numel": str(ctx.plan.get("noise_numel", 0)),
        "dpcompile.dp_scalars": "[noise std = noise_multiplier * max_grad_norm, expected batch size or 0]",
        "dpcompile.options": json.dumps({"max_grad_norm": opts.max_grad_norm, "noise_multiplier":
                                         opts.noise_multiplier, "clipping": opts.clipping,
                                         "loss_reduction": opts.loss_reduction, "noise_mechanism": opts.noise_mechanism,
                                         "expected_batch_size": opts.expected_batch_size}),
        "dpcompile.contract": "draw dp_noise ~ N(0, I) afresh every step; apply the gradients only if dp_checks_ok",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# ----------------------------------------------------------------------------- verification

def verify_against_torch(exported: ExportedStep, step: PrivateStep, captured: Captured,
                         rtol: float) -> dict[str, float]:
    """Run one more private step of the captured model in PyTorch (dp backend) and the ONNX
    file in onnxruntime on the same parameters, inputs and noise vector; compare."""
    from ..privacy.state import state_of

    state = state_of(captured.model)
    ctx = captured.contexts[0]
    feeds = dict(exported.example_feeds)
    if "dp_noise" in ctx.runtime_inputs:
        noise = state.noise(ctx.noise_key, ctx.runtime_inputs["dp_noise"][0], captured.inputs[0].device)
        feeds["dp_noise"] = noise.detach().cpu().numpy().copy()
        feeds["dp_scalars"] = _runtime_examples(captured)[step.runtime_names.index("dp_scalars")].cpu().numpy()
    params = dict(captured.model.named_parameters())
    for p in params.values():
        p.grad = None
    from .inspection import capture_graphs

    with capture_graphs(snapshots=False, skip_inductor=True):
        loss = captured.compiled(captured.model, captured.loss_fn, *captured.inputs, captured.target)
        loss.backward()
    reference = {"loss": loss.detach()}
    reference.update({f"grad.{n}": params[n].grad for n in step.param_names})
    reference["sample_norms"] = state.last_sample_norms
    got = exported.run(feeds)
    exported.example_feeds = feeds
    errors = {}
    for name, want in reference.items():
        have = torch.from_numpy(got[name])
        scale = max(float(want.abs().max()), 1e-12)
        errors[name] = float((have - want.cpu()).abs().max()) / scale
    bad = {k: v for k, v in errors.items() if v > rtol}
    if bad or not bool(got["dp_checks_ok"]):
        raise DPCompileError(f"dpcompile export: the ONNX step does not match PyTorch's private step on the same "
                             f"inputs and noise (max error relative to the largest entry: {bad}; dp_checks_ok = "
                             f"{bool(got['dp_checks_ok'])}). Please report this model.")
    return errors
