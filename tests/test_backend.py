"""The backend is reachable by name after `pip install`, and compiles once per region."""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile import DPCompileError

ROOT = Path(__file__).resolve().parents[1]


def test_dp_backend_is_registered_through_the_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("dp") == "dpcompile.compiler.backend:dp_backend"
    assert "dp" in torch._dynamo.list_backends()


def test_a_dropped_private_model_and_its_privacy_state_are_freed():
    """Hyper-parameter sweeps build many private models in one process: once the user drops a
    model (and Dynamo's caches), nothing of dpcompile keeps its parameters or state alive."""
    import gc
    import weakref

    def train_once():
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        model = torch.compile(net, backend="dp", options={"max_grad_norm": 1.0, "sample_rate": 0.1,
                                                            "expected_batch_size": 4})
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
        return weakref.ref(net[0].weight), weakref.ref(dpcompile.privacy_state(model))

    param, state = train_once()
    torch._dynamo.reset()
    gc.collect()
    assert param() is None and state() is None


def test_variable_batch_sizes_compile_at_most_twice():
    """Static first compile, then one symbolic-batch compile serves every later size."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    for b in [8, 5, 11, 3, 17, 9, 4]:
        F.cross_entropy(model(torch.randn(b, 6)), torch.randint(0, 3, (b,))).backward()
    state = dpcompile.privacy_state(net)
    assert len(state.compiled) == 2
    assert state.compiled[1].batch_size.free_symbols  # the second compile is symbolic in B
    assert state.steps == 7


def test_a_trained_private_model_deep_copies_without_its_privacy_state():
    """EMA and evaluation copies: copy.deepcopy works after training (the state holds compiled graphs
    and fake tensors that cannot be copied), and the copy does not claim the original's privacy."""
    import copy

    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 1.0, "sample_rate": 0.01,
                                                            "expected_batch_size": 8})
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    for original in (net, model):
        twin = copy.deepcopy(original)
        with pytest.raises(DPCompileError, match="no privacy state"):
            dpcompile.privacy_state(twin)
        copied = getattr(twin, "_orig_mod", twin)
        assert copied is not net
        torch.testing.assert_close(copied(torch.ones(2, 6)), net(torch.ones(2, 6)))
    assert dpcompile.privacy_state(model) is dpcompile.privacy_state(net)
    assert dpcompile.privacy_state(net).steps == 1


def _record_compiles(monkeypatch, record=lambda gm, example_inputs: (gm, list(example_inputs))) -> list:
    """What `record(gm, example_inputs)` returns for each graph the dp backend hands to Inductor
    (forward, then backward), in order."""
    from dpcompile.compiler import backend as dp

    seen, compile_graph = [], dp._compile_graph

    def recording(gm, example_inputs, kwargs):
        seen.append(record(gm, example_inputs))
        return compile_graph(gm, example_inputs, kwargs)

    monkeypatch.setattr(dp, "_compile_graph", recording)
    return seen


def _inductor_settings_seen(monkeypatch, options: dict | None, names: tuple[str, ...], batch: int = 8,
                           **compile_kwargs) -> list[dict]:
    """Compile and run one step; the Inductor settings each graph (forward, backward) was compiled under."""
    def setting(name: str):
        value = torch._inductor.config
        for part in name.split("."):
            value = getattr(value, part)
        return value

    seen = _record_compiles(monkeypatch, lambda gm, example_inputs: {name: setting(name) for name in names})
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    options = None if options is None else {"noise_multiplier": 0.0, **options}
    model = torch.compile(net, backend="dp", options=options, **compile_kwargs)
    F.cross_entropy(model(torch.randn(batch, 6)), torch.randint(0, 3, (batch,))).backward()
    assert net[0].weight.grad is not None
    return seen


def test_inductor_options_reach_both_graphs_and_mode_maps_to_its_settings(monkeypatch):
    names = ("combo_kernels", "max_autotune")
    seen = _inductor_settings_seen(monkeypatch, {}, names)
    assert seen == [{"combo_kernels": False, "max_autotune": False}] * 2
    seen = _inductor_settings_seen(monkeypatch, {"inductor": {"combo_kernels": True}}, names)
    assert [s["combo_kernels"] for s in seen] == [True, True]  # forward, then backward
    seen = _inductor_settings_seen(monkeypatch, {"mode": "max-autotune-no-cudagraphs"}, names)
    assert [s["max_autotune"] for s in seen] == [True, True]
    seen = _inductor_settings_seen(monkeypatch, None, names, mode="max-autotune-no-cudagraphs")  # the keyword
    assert [s["max_autotune"] for s in seen] == [True, True]
    assert not torch._inductor.config.max_autotune and not torch._inductor.config.combo_kernels  # restored


def test_per_sample_gemms_read_transposed_operands_in_place(monkeypatch):
    """Splitting a transposed GEMM operand per sample is a view: the re-trace must not copy it
    (a copy is a full transposed pass over every layer's output gradient). Static and symbolic B.
    Views that need a copy still get one, with the right values."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from dpcompile.compiler import backend as dp

    graphs = _record_compiles(monkeypatch, lambda gm, example_inputs: gm)
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0, "strategy": "instantiate"})
    for b in (8, 5):  # sequences (4 rows per sample: a real GEMM); the second size compiles symbolic B
        F.cross_entropy(model(torch.randn(b, 4, 6)).mean(1), torch.randint(0, 3, (b,))).backward()
    bmms = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.aten.bmm.default]
    assert len(bmms) == 4  # two weights, two compiles

    def copies_upstream(node, depth=4):
        if not isinstance(node, torch.fx.Node) or depth == 0:
            return False
        return node.target is torch.ops.aten.clone.default or any(copies_upstream(a, depth - 1) for a in node.args)

    assert not any(copies_upstream(a) for n in bmms for a in n.args), [str(b.args) for b in bmms]
    x = torch.randn(8, 6)
    flat = make_fx(lambda t: t.t().view(48), decomposition_table=dp.retrace_decompositions())(x)
    assert torch.ops.aten.clone.default in [n.target for n in flat.graph.nodes]
    assert torch.equal(flat(x), x.t().reshape(48))


def test_gemm_padding_is_off_when_it_could_pad_the_sample_rows(monkeypatch):
    """pad_mm pads GEMM dims to multiples of 8/4 on GPUs; with a static batch size that 8 does not
    divide it could pad the sample rows (refused by batch_dim), so those graphs compile without it.
    Batches of a multiple of 8 keep it (the LM head's vocabulary), and the user's setting wins."""
    default = torch._inductor.config.shape_padding
    assert [s["shape_padding"] for s in _inductor_settings_seen(monkeypatch, {}, ("shape_padding",), batch=6)] == [
        False, False]
    assert [s["shape_padding"] for s in _inductor_settings_seen(monkeypatch, {}, ("shape_padding",), batch=16)] == [
        default, default]
    seen = _inductor_settings_seen(monkeypatch, {"inductor": {"shape_padding": True}}, ("shape_padding",), batch=6)
    assert [s["shape_padding"] for s in seen] == [True, True]


def test_backward_inductor_settings_unroll_batch_sums_on_gpu_and_narrow_the_fusion_search(monkeypatch):
    """On GPUs, reductions over up to 16 elements become pointwise code (dp.UNROLL_BATCH_BELOW);
    CPU graphs keep Inductor's threshold (its C++ tiling search is slow on unrolled kernels). The
    backward's fusion search tries fewer pairs per shared buffer (dp.FUSION_PAIR_WINDOW). A value
    the user sets wins; the forward graph keeps Inductor's settings."""
    from dpcompile.compiler.backend import FUSION_PAIR_WINDOW, UNROLL_BATCH_BELOW, _backward_patches
    from dpcompile.options import DPOptions

    config = torch._inductor.config
    unroll, window = config.unroll_reductions_threshold, config.max_fusion_buffer_group_pairwise_attempts
    assert UNROLL_BATCH_BELOW > unroll and FUSION_PAIR_WINDOW < window  # else the patches do nothing
    assert _backward_patches(DPOptions.from_dict({}), on_gpu=True) == {
        "unroll_reductions_threshold": UNROLL_BATCH_BELOW, "max_fusion_buffer_group_pairwise_attempts": FUSION_PAIR_WINDOW}
    assert _backward_patches(DPOptions.from_dict({}), on_gpu=False) == {
        "max_fusion_buffer_group_pairwise_attempts": FUSION_PAIR_WINDOW}
    user = {"unroll_reductions_threshold": 3, "max_fusion_buffer_group_pairwise_attempts": 99}
    assert _backward_patches(DPOptions.from_dict({"inductor": user}), on_gpu=True) == {}
    names = ("unroll_reductions_threshold", "max_fusion_buffer_group_pairwise_attempts")
    seen = _inductor_settings_seen(monkeypatch, {}, names)  # [forward, backward]; this test's graphs run on CPU
    assert seen == [dict(zip(names, (unroll, window))), dict(zip(names, (unroll, FUSION_PAIR_WINDOW)))]
    seen = _inductor_settings_seen(monkeypatch, {"inductor": user}, names)
    assert seen == [user, user]


def test_small_gradients_share_one_norm_sum_and_noise_kernel():
    """Biases, norm scales and other small instantiated gradients are packed: one per-sample norm,
    one clipped sum and one noise addition for all of them (not three tiny kernels each)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))
    report = dpcompile.inspect_model(net, torch.randn(8, 6), options={"strategy": "instantiate"},
                                     target=torch.randint(0, 3, (8,)))
    notes = [n for r in report.records() if r.name == "book_keeping" for n in r.notes]
    assert notes == ["6 small gradients share one norm, clipped sum and noise kernel"]
    text = report.graph("noise").text()
    assert text.count("per_sample.pack(") == 1 and text.count("per_sample.sq_norm(") == 1, text
    summed = [line for line in text.splitlines() if "per_sample.weighted_sum(" in line]
    assert len(summed) == 1 and "dp_noise" in summed[0], text  # the pack's sum takes its noise in the same node
    assert "per_sample.privatize(" not in text, text


def _backward_graph_seen(monkeypatch, net: nn.Module, step) -> tuple:
    """Compile `net` with the dp backend, run `step(model)`; the backward graph Inductor got
    and its example inputs."""
    graphs = _record_compiles(monkeypatch)
    step(torch.compile(net, backend="dp", options={"sample_rate": 0.01, "expected_batch_size": 4,
                                                "strategy": "instantiate"}))
    return graphs[-1]


def test_each_privatized_gradient_reads_its_own_noise_input(monkeypatch):
    """Inductor gets one noise input per privatized gradient (views of the flat draw), never a
    slice of one shared input: a slice bakes its offset into the kernel, so identical layers
    could not share their noise-adding kernels. Numerics: tests/test_noise.py."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 300))
    gm, example_inputs = _backward_graph_seen(
        monkeypatch, net, lambda model: F.mse_loss(model(torch.randn(8, 300)), torch.randn(8, 300)).backward())
    ctx = dpcompile.privacy_state(net).compiled[0]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    noise = [n for n in placeholders if n.name.startswith("dp_noise")]
    assert len(noise) == 4 and "dp_noise" not in [n.name for n in noise]  # 3 weights, 1 pack of 3 biases
    assert not any(u.target is torch.ops.aten.slice.Tensor for n in noise for u in n.users)
    pieces = ctx.plan["noise_pieces"]
    assert sum(numel for _, numel in pieces) == ctx.plan["noise_numel"] == sum(p.numel() for p in net.parameters())
    examples = [example_inputs[placeholders.index(n)] for n in noise]
    assert [(x.storage_offset(), x.numel()) for x in examples] == pieces
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_no_same_dtype_casts_reach_inductor(monkeypatch):
    """Under autocast, a float32 parameter's gradient is a bf16 site cast to float32. The clipped
    sums are already float32, so replaying that cast would be a no-op that Inductor compiles
    as one copy kernel per packed gradient (a GPT-2 had 48)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(torch.randn(8, 16)).float(), torch.randint(0, 4, (8,)))
        loss.backward()

    gm, _ = _backward_graph_seen(monkeypatch, net, step)
    casts = [n for n in gm.graph.nodes if n.target is torch.ops.prims.convert_element_type.default]
    assert casts  # the bf16 sites are cast to float32 for the per-sample sums
    same = [n.name for n in casts if n.args[0].meta["val"].dtype == n.meta["val"].dtype]
    assert not same, same
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_inspection_records_every_pass():
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    ctx = dpcompile.privacy_state(net).compiled[0]
    names = [(r.graph, r.name) for r in ctx.records]
    assert names == [("forward", "batch_dim"), ("backward", "batch_dim"), ("backward", "param_grads"),
                     ("backward", "phantom"), ("backward", "lsg"), ("backward", "book_keeping"),
                     ("backward", "noise"), ("backward", "schedule")]
    table = next(r for r in ctx.records if r.name == "book_keeping").table
    assert {row["param"] for row in table} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(row["strategy"] in ("ghost", "instantiate") and row["flops"] > 0 for row in table)
    assert next(r for r in ctx.records if r.name == "noise").added  # noise nodes were inserted


def test_ci_runs_the_test_command_written_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in readme
