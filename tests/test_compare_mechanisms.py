"""examples/compare_mechanisms.py --quick end to end: four mechanisms at equal ε, JSON results whose
ε, σ and expected errors agree with the accounting they claim."""
from __future__ import annotations

import json
import math

import pytest

from conftest import import_real_data_example
from dpcompile.privacy import bsr


def test_quick_comparison_writes_consistent_results(tmp_path):
    compare_mechanisms = import_real_data_example("compare_mechanisms")
    out = tmp_path / "results.json"
    compare_mechanisms.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    runs = results["mechanisms"]
    assert set(runs) == {"dpsgd", "bsr", "amplified", "lsg"} and results["device"] and results["date"]
    n, batch, eps, delta = results["train_reviews"], 32, 8.0, 1e-5
    steps = n // batch
    for name, r in runs.items():
        assert r["steps"] == steps and 0.9 * eps < r["epsilon"] <= eps and r["delta"] == delta, name
        assert len(r["accuracy"]) == 1 and 0 <= r["accuracy_mean"] <= 1 and r["accuracy_std"] == 0.0
    # ε spent recomputed from each mechanism's own accounting, at the σ it ran with
    q = batch / n
    assert runs["lsg"]["sigma"] == runs["dpsgd"]["sigma"]
    bands = math.ceil(n / batch)
    c_bsr = bsr.bsr_coefficients(bands)
    assert runs["bsr"]["epsilon"] == pytest.approx(
        bsr.epsilon(runs["bsr"]["sigma"], c_bsr, steps, delta, bands), rel=1e-6)
    c_amp = bsr.bsr_coefficients(2)
    assert runs["amplified"]["epsilon"] == pytest.approx(
        bsr.amplified_epsilon(runs["amplified"]["sigma"], c_amp, steps, delta, 2, 2 * q), rel=1e-6)
    # the reported expected errors are those of the factorization each run used
    for name, kwargs in {"dpsgd": dict(sample_rate=q), "bsr": dict(coefficients=c_bsr, groups=bands),
                         "amplified": dict(coefficients=c_amp, groups=2, sample_rate=2 * q)}.items():
        want = bsr.expected_error(name, eps, delta, steps, **kwargs)
        assert runs[name]["expected_rmse"] == pytest.approx(want["rmse"], rel=1e-9)
        assert runs[name]["sigma"] == pytest.approx(want["sigma"], rel=1e-6)
    assert runs["lsg"]["expected_rmse"] == runs["dpsgd"]["expected_rmse"]
