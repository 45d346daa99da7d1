"""Inspection tools: graphs before/after each pass, per-pass diff, per-parameter plan, privacy
summary, pictures, logging and the `dpcompile` command line."""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET

import dp_accounting
import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile.tools import cli, inspection
from dpcompile.compiler import cost_model
from dpcompile.errors import DPCompileError
from dpcompile.compiler.passes import BACKWARD_PIPELINE, FORWARD_PIPELINE
from models import CNN, MLP


class SeqNet(nn.Module):
    """A 64x64 weight applied to T = 40 tokens per sample: the ghost norm costs more FLOPs
    (2BT²(n+m)) but less memory (2BT²) than instantiation (2BTnm FLOPs, Bnm memory)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64, bias=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


@pytest.fixture(scope="module")
def mlp_report():
    torch.manual_seed(0)
    return inspection.inspect_model(MLP(), torch.randn(8, 10), options={"noise_multiplier": 1.3, "insecure_seed": 1})


def test_report_lists_the_pipeline_and_a_record_per_pass(mlp_report):
    assert mlp_report.pipeline == {"forward": [n for n, _ in FORWARD_PIPELINE],
                                   "backward": [n for n, _ in BACKWARD_PIPELINE]}
    recorded = [(r.graph, r.name) for r in mlp_report.records()]
    assert recorded == ([("forward", n) for n, _ in FORWARD_PIPELINE] + [("backward", n) for n, _ in BACKWARD_PIPELINE])
    text = str(mlp_report)
    for name, _ in BACKWARD_PIPELINE:
        assert name in text
    assert "fc1.weight" in text and "ghost" in text and "σ = 1.3" in text


def test_snapshots_chain_and_the_diff_is_what_each_pass_changed(mlp_report):
    backward = [r for r in mlp_report.records() if r.graph == "backward"]
    for earlier, later in zip(backward, backward[1:]):
        assert earlier.graph_after.names() == later.graph_before.names()
    for r in backward:
        before, after = set(r.graph_before.names()), set(r.graph_after.names())
        assert sorted(after - before) == r.added and sorted(before - after) == r.removed
        assert len(r.graph_after) == r.nodes_after
    diff = {d.name: d for d in mlp_report.diff() if d.graph == "backward"}
    added_ops = [a.split(" = ")[1] for a in diff["book_keeping"].added]
    ghost = [row.param for row in mlp_report.table() if row.strategy == "ghost"]
    assert added_ops.count("per_sample.ghost_sq_norm_linear") == len(ghost) == 3  # the three Linear weights
    assert added_ops.count("per_sample.clip_weights") == 1 and added_ops.count("per_sample.total_sq_norm") == 1
    # BK: the original weight-gradient GEMMs are gone, replaced by re-weighted ones
    assert [r.split(" = ")[1] for r in diff["book_keeping"].removed].count("aten.mm") == 3
    noise_ops = [a.split(" = ")[1] for a in diff["noise"].added]
    assert len(mlp_report.table()) == 6  # three weights noised one by one, the three biases packed: one more
    assert noise_ops.count("per_sample.privatize") == len(ghost)  # the ghost weights' re-weighted GEMMs
    assert noise_ops.count("per_sample.weighted_sum") == 1  # the biases' packed sum takes its noise itself
    assert {"dp_noise = placeholder", "dp_scalars = placeholder"} <= set(diff["noise"].added)
    assert "+ %clip_weights = per_sample.clip_weights(%total_sq_norm, 1.0, 'mean', 'flat'" in \
        mlp_report.graph("book_keeping").text(backward[4].added)


def test_graph_analysis_noise_comes_after_clipping_on_every_gradient(mlp_report):
    """networkx view of the final graph: every gradient output goes through a noising node
    (privatize, or a weighted sum given the noise), which reads the clip weights, which read
    every layer's per-sample norm."""
    final = mlp_report.graph("noise", "after")
    g = final.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    node = {n.name: n for n in final.nodes}
    clip = next(n for n in node if node[n].target == "per_sample.clip_weights")
    norms = [n for n in node if node[n].target in ("per_sample.ghost_sq_norm_linear", "per_sample.sq_norm")]
    assert len(norms) == 4 and all(clip in nx.descendants(g, n) for n in norms)  # 3 weights, 1 for the packed biases
    packed = next(n for n in node if node[n].target == "per_sample.pack")
    assert len(node[packed].inputs) == 3 and any(packed in nx.ancestors(g, n) for n in norms)
    grads = list(node["output"].inputs)[:-1]  # the last output holds the sample norms
    assert len(grads) == 6
    noising = ("per_sample.privatize", "per_sample.weighted_sum")  # only noised weighted sums are left
    for grad in grads:  # every gradient is (a view of) a noising output that reads the clip weights and noise
        noised = [a for a in nx.ancestors(g, grad) | {grad} if node[a].target in noising]
        assert noised and all(clip in nx.ancestors(g, r) and "dp_noise" in nx.ancestors(g, r) for r in noised)


def _plan_for(budget_mb, strategy="auto"):
    torch.manual_seed(0)
    report = inspection.inspect_model(SeqNet(), torch.randn(2, 40, 64),
                                      options={"memory_budget_mb": budget_mb, "strategy": strategy})
    row = next(r for r in report.table() if r.param == "proj.weight")
    return report, row


@pytest.mark.parametrize("budget_mb,want", [(0.0, "ghost"), (0.028, "ghost"), (1.0, "instantiate")])
def test_table_strategy_is_the_cost_model_choice_under_the_memory_budget(budget_mb, want):
    B, T, n, m, e = 2, 40, 64, 64, 4
    # extra FLOPs, bytes alive, bytes moved (cost_model's docstring; Grams: fastDP §3)
    ghost = (2 * B * T**2 * (n + m) + B * T**2, 2 * B * T**2 * 4, 3 * B * T * (n + m) * e + 4 * B * T**2 * 4)
    inst = (3 * B * n * m, B * n * m * e, 3 * B * n * m * e)
    def time(c):
        return c[0] + cost_model.MACHINE_BALANCE * c[2]
    assert time(inst) < time(ghost) and ghost[1] < 0.028 * 2**20 < inst[1]  # the three budgets straddle the choice
    report, row = _plan_for(budget_mb)
    assert (row.module, row.kind, row.strategy) == ("Linear", "linear", want)
    assert (row.flops, row.memory_bytes, row.traffic_bytes) == (ghost if want == "ghost" else inst)
    other = "instantiate" if want == "ghost" else "ghost"
    assert row.alternatives[other] == (inst if other == "instantiate" else ghost)[:2]
    helper = "per_sample.ghost_sq_norm_linear" if want == "ghost" else "per_sample.instantiate_linear"
    added = report.graph("book_keeping").nodes
    assert any(n.target == helper and n.name in report.record("book_keeping").added for n in added)


def test_privacy_summary_accounts_with_dp_accounting():
    torch.manual_seed(0)
    opts = {"noise_multiplier": 1.1, "max_grad_norm": 0.7, "sample_rate": 0.05, "expected_batch_size": 8.0}
    report = inspection.inspect_model(MLP(), torch.randn(8, 10), options=opts)
    s = report.privacy_summary(delta=1e-5)
    assert s["noise_std"] == pytest.approx(0.77) and s["divisor"] == 8.0 and s["clipping"] == "flat"
    assert s["noise_coordinates"] == sum(p.numel() for p in MLP().parameters())
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 20)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event)
    assert s["epsilon_one_epoch"]["steps"] == 20
    assert s["epsilon_one_epoch"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-2)
    assert "ε = " in str(report) and "std σ·R = 0.77" in str(report)


def test_render_svg_outlines_added_nodes_and_html_has_every_pass(mlp_report, tmp_path):
    svg = ET.parse(mlp_report.render(tmp_path / "g.svg", "book_keeping", highlight="pass")).getroot()
    groups = [g for g in svg.iter("{http://www.w3.org/2000/svg}g") if "node" in g.get("class", "")]
    assert len(groups) == len(mlp_report.graph("book_keeping"))
    outlined = {g.get("data-name") for g in groups if "added" in g.get("class")}
    assert outlined == set(mlp_report.record("book_keeping").added)
    html = (tmp_path / "r.html")
    mlp_report.render(html)
    text = html.read_text()
    assert text.count("<svg") == len(mlp_report.records()) and "<table>" in text and "fc2.weight" in text


def test_compiled_model_report_without_snapshots_says_how_to_get_them():
    net = CNN()
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    with inspection.capture_graphs(snapshots=False, skip_inductor=True):
        x, y = CNN.batch(4)
        F.cross_entropy(model(x), y).backward()
    report = inspection.report_of(net)
    assert {r.param: r.module for r in report.table()}["conv1.weight"] == "Conv2d"
    with pytest.raises(DPCompileError, match="without graph snapshots"):
        report.graph("book_keeping")
    with pytest.raises(DPCompileError, match="no pass `nope`"):
        report.record("nope")


def test_dpcompile_logs_report_each_pass(caplog):
    inspection.set_logs_from_env("passes,table")
    try:
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
        with caplog.at_level(logging.INFO, logger="dpcompile"), inspection.capture_graphs(snapshots=False,
                                                                                           skip_inductor=True):
            F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    finally:
        inspection.set_logs()
    text = caplog.text
    for name, _ in BACKWARD_PIPELINE:
        assert f"backward {name}" in text
    assert "per-parameter plan" in text and "0.weight" in text
    with pytest.raises(DPCompileError, match="unknown topic"):
        inspection.set_logs_from_env("passes,bogus")


def test_cli_pipeline_and_inspect_a_model_file(tmp_path, capsys):
    assert cli.main(["pipeline"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name, _ in BACKWARD_PIPELINE)
    model_file = tmp_path / "net.py"
    model_file.write_text("import torch.nn as nn\n\ndef build():\n"
                          "    return nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(40, 4))\n")
    code = cli.main(["inspect", f"{model_file}:build", "--input-shape", "4,5:int64:30", "--json",
                     str(tmp_path / "t.json"), "--svg", str(tmp_path / "g.svg"), "--graph", "noise"])
    assert code == 0
    out = capsys.readouterr().out
    assert "backward graph after noise" in out and "per_sample.privatize" in out
    table = json.loads((tmp_path / "t.json").read_text())["table"]
    assert [(r["param"], r["module"]) for r in table] == [("0.weight", "Embedding"), ("2.weight", "Linear"),
                                                          ("2.bias", "Linear")]
    assert ET.parse(tmp_path / "g.svg").getroot().tag.endswith("svg")


def test_cli_reports_bad_arguments(capsys):
    assert cli.main(["inspect", "models:NoSuchModel", "--input-shape", "4,10"]) == 2
    assert "has no attribute 'NoSuchModel'" in capsys.readouterr().err
    assert cli.main(["inspect", "models:MLP", "--input-shape", "4,10:int64"]) == 2
    assert "integer inputs need an upper bound" in capsys.readouterr().err
    assert dpcompile.inspect_model is not None and dpcompile.export_onnx is not None


def test_cli_errors_are_one_line_and_exit_2_unless_verbose(tmp_path, capsys):
    """A model the backend refuses (BatchNorm) or a file that does not load: one `error:` line."""
    model_file = tmp_path / "bn.py"
    model_file.write_text("import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8))\n")
    assert cli.main(["inspect", f"{model_file}:model", "--input-shape", "4,10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dpcompile") and "BatchNorm" in err[0], err
    assert cli.main(["inspect", str(tmp_path / "missing.py") + ":model", "--input-shape", "4,10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    with pytest.raises(Exception):
        cli.main(["--verbose", "inspect", str(tmp_path / "missing.py") + ":model", "--input-shape", "4,10"])
