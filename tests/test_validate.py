"""dpcompile.check lists what the dp backend would refuse (reason and fix) without training;
dpcompile.fix replaces what has a private drop-in equivalent."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from models import oracle_clipped_sum


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.emb = nn.Embedding(10, 4, max_norm=1.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inorm(self.bn(self.conv(x)))
        return self.head(F.relu(h).mean((2, 3)))


def test_check_names_every_refused_module_with_reason_and_fix():
    model = Mixed()
    model.head.register_full_backward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = dpcompile.check(model, torch.randn(4, 3, 6, 6))
    assert not report.ok
    found = {(p.module, p.kind): p for p in report.problems}
    assert set(found) == {("bn", "BatchNorm2d"), ("inorm", "InstanceNorm2d"), ("emb", "Embedding"),
                          ("head", "Linear")}
    assert "GroupNorm" in found[("bn", "BatchNorm2d")].fix and found[("bn", "BatchNorm2d")].fixable
    assert not found[("emb", "Embedding")].fixable and "max_norm" in found[("emb", "Embedding")].reason
    assert report.trial.startswith("refused")
    text = str(report)
    assert "bn (BatchNorm2d)" in text and "[dpcompile.fix]" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained
    assert all(p.grad is None for p in model.parameters())


def test_check_reports_an_op_level_refusal_from_the_trial_step():
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0)  # mixes samples: no module rule sees it, the passes do

    report = dpcompile.check(Centred(), torch.randn(5, 4))
    assert [p.module for p in report.problems] == ["(trial step)"]
    assert "test_validate.py" in report.problems[0].reason


def test_a_supported_model_passes_the_check():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    report = dpcompile.check(model, torch.randn(4, 3, 6, 6))
    assert report.ok and report.trial == "passed", str(report)


def test_fix_replaces_batch_norm_and_the_fixed_model_trains_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    scale = model[1].weight.detach().clone()
    assert dpcompile.fix(model) is model
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 8
    assert torch.equal(model[1].weight.detach(), scale)  # affine parameters carried over
    x, y = torch.randn(6, 3, 6, 6) * torch.linspace(0.1, 8, 6)[:, None, None, None], torch.randint(0, 3, (6,))
    _, norms = oracle_clipped_sum(model, x, y, 1.0)
    R = float(norms.median())
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": R})
    F.cross_entropy(compiled(x), y).backward()
    want, _ = oracle_clipped_sum(model, x, y, R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double() * 6, want[name], rtol=1e-4, atol=1e-6)
    assert dpcompile.check(model, x).ok


def test_fix_keeps_frozen_batch_norm_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model[1].eval()  # frozen running statistics are private: no refusal, nothing to replace
    dpcompile.fix(model)
    assert isinstance(model[1], nn.BatchNorm1d)
    assert dpcompile.check(model).ok
