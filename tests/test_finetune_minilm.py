"""examples/finetune_minilm.py, the short CPU version of the GPU fine-tune: every layer of the stock
all-MiniLM-L6-v2 on Rotten Tomatoes snippets, private (ε = 8) next to non-private, JSON results whose
ε and steps agree with the accounting."""
from __future__ import annotations

import json

import pytest

from conftest import import_real_data_example


@pytest.mark.parametrize("clip_groups", [None, "block"])
def test_short_full_fine_tune_writes_consistent_results(tmp_path, clip_groups):
    finetune_minilm = import_real_data_example("finetune_minilm")
    out = tmp_path / "runs.json"
    args = ["--quick", "--full", "--train-size", "256", "--max-length", "24", "--batch-size", "64",
            "--physical-batch", "64", "--device", "cpu", "--out", str(out)]
    finetune_minilm.main(args + (["--clip-groups", clip_groups] if clip_groups else []))
    result = json.loads(out.read_text())
    private, public = (next(r for r in result["runs"] if (r["epsilon_target"] is None) == np) for np in (False, True))
    assert result["args"]["train_layers"] == 6 and result["args"]["schedule"] == "linear"
    assert result["args"]["clip_groups"] == clip_groups
    assert private["steps"] == 256 // 64 and 0 < private["sigma"] and 7.0 < private["epsilon"] <= 8.0
    assert public["epsilon"] == float("inf")
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["runs"])
