"""ONNX export of the private training step: checked by onnx.checker, run in onnxruntime and
compared with the float64 torch.func oracle (clipped per-sample gradients plus the same noise)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpcompile.tools import cli
from dpcompile.errors import DPCompileError
from dpcompile.tools.export import export_onnx
from models import CNN, MLP, BreakNet, oracle_clipped_sum


def assert_matches_oracle(model, x, y, exported, outputs, R, sigma, feeds):
    """grad = (Σ_i C_i g_i + σR z[slice]) / B with z the dp_noise fed to the ONNX step."""
    clipped, norms = oracle_clipped_sum(model, x, y, R)
    noise = torch.from_numpy(feeds["dp_noise"]).double()
    B = x.shape[0]
    want = {}
    for name, total in clipped.items():
        offset, numel = exported.noise_slices[name]
        want[name] = (total + sigma * R * noise[offset:offset + numel].view(total.shape)) / B
    scale = max(float(w.abs().max()) for w in want.values())
    for name, w in want.items():
        err = float((torch.from_numpy(outputs[f"grad.{name}"]).double() - w).abs().max()) / scale
        assert err < 1e-4, f"{name}: ONNX gradient off the oracle by {err:.2e} of the largest entry"
    np.testing.assert_allclose(outputs["sample_norms"], norms.numpy(), rtol=1e-4)
    assert bool(outputs["dp_checks_ok"])


def test_mlp_step_exports_checks_and_matches_the_oracle(tmp_path):
    torch.manual_seed(0)
    model, (x, y) = MLP(), MLP.batch(8)
    R, sigma = 0.05, 0.8  # small R: every sample is clipped
    exported = export_onnx(model, x, tmp_path / "mlp.onnx", target=y,
                           options={"max_grad_norm": R, "noise_multiplier": sigma, "insecure_seed": 3})
    proto = onnx.load(str(tmp_path / "mlp.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    names = [n for n, _ in model.named_parameters()]
    assert [i.name for i in proto.graph.input] == names + ["input_0", "target", "dp_noise", "dp_scalars"]
    assert [o.name for o in proto.graph.output] == (["loss"] + [f"grad.{n}" for n in names]
                                                    + ["sample_norms", "dp_checks_ok"])
    meta = {p.key: p.value for p in proto.metadata_props}
    slices = json.loads(meta["dpcompile.noise_slices"])
    assert sum(numel for _, numel in slices.values()) == int(meta["dpcompile.noise_numel"]) == 989
    assert max(exported.errors.values()) < 1e-4  # verified against the dp backend's own step
    feeds = exported.example_feeds
    assert float(np.abs(feeds["dp_noise"]).max()) > 0 and feeds["dp_scalars"].tolist() == pytest.approx([0.04, 0])
    session = exported.session()
    outputs = exported.run(feeds, session)
    assert_matches_oracle(model, x, y, exported, outputs, R, sigma, feeds)
    # the noise input enters linearly with std dp_scalars[0], divided by the batch size
    other = dict(feeds, dp_noise=np.random.default_rng(1).standard_normal(feeds["dp_noise"].shape).astype(np.float32))
    moved = exported.run(other, session)
    offset, numel = exported.noise_slices["out.weight"]
    delta = (other["dp_noise"] - feeds["dp_noise"])[offset:offset + numel].reshape(5, 24) * sigma * R / 8
    np.testing.assert_allclose(moved["grad.out.weight"] - outputs["grad.out.weight"], delta, atol=1e-6)


def test_cnn_step_matches_the_oracle_and_flags_failed_checks():
    torch.manual_seed(1)
    model, (x, y) = CNN(), CNN.batch(4)
    exported = export_onnx(model, x, target=y, options={"max_grad_norm": 0.5, "noise_multiplier": 1.0, "insecure_seed": 5},
                           optimize=False)
    session = exported.session()
    feeds = exported.example_feeds
    assert_matches_oracle(model, x, y, exported, exported.run(feeds, session), 0.5, 1.0, feeds)
    # the compiled step refuses these; ONNX has no assertion op, so the exported step says so in dp_checks_ok
    uneven = dict(feeds, target=np.array([-100, 1, 2, 3], dtype=np.int64))  # one sample without a counted target
    assert not bool(exported.run(uneven, session)["dp_checks_ok"])
    nan_input = dict(feeds, input_0=np.where(np.arange(feeds["input_0"].size).reshape(feeds["input_0"].shape) == 0,
                                             np.nan, feeds["input_0"]).astype(np.float32))
    assert not bool(exported.run(nan_input, session)["dp_checks_ok"])


class ValidConvs(nn.Module):
    """padding="valid" reaches aten as a single 0 for every spatial dim."""

    def __init__(self):
        super().__init__()
        self.c2, self.c1, self.head = nn.Conv2d(3, 4, 3, padding="valid"), nn.Conv1d(3, 4, 3, padding="valid"), \
            nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([self.c2(x).mean((2, 3)), self.c1(x.mean(2)).mean(2)], 1))


def test_valid_padded_convolutions_export_like_the_oracle():
    torch.manual_seed(2)
    model, x, y = ValidConvs(), torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    exported = export_onnx(model, x, target=y, options={"max_grad_norm": 0.5, "noise_multiplier": 1.0,
                                                         "insecure_seed": 5}, optimize=False)
    feeds = exported.example_feeds
    assert_matches_oracle(model, x, y, exported, exported.run(feeds, exported.session()), 0.5, 1.0, feeds)


class Special(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.lgamma(F.softplus(self.fc(x)) + 1.0)


def test_unsupported_ops_are_listed_with_their_origin():
    with pytest.raises(DPCompileError) as info:
        export_onnx(Special(), torch.randn(4, 6), verify=False)
    message = str(info.value)
    assert "lgamma" in message and "digamma" in message  # forward op and its backward
    assert "forward graph" in message and "test_export.py" in message


def test_graph_breaks_are_refused():
    with pytest.raises(DPCompileError, match="graph breaks"):
        export_onnx(BreakNet(), BreakNet.batch(4)[0], verify=False)


def test_cli_export_writes_a_runnable_file(tmp_path, capsys):
    out = tmp_path / "step.onnx"
    assert cli.main(["export", "models:MLP", "--input-shape", "4,10", "-o", str(out), "--no-optimize",
                     "--noise-multiplier", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs PyTorch" in text and "dp_checks_ok" in text
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["dpcompile.options"])["noise_multiplier"] == 0.5
