"""bench/step_time.py and bench/hf_suite.py stay runnable with one command (CPU smoke runs; no
timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--dtype", "fp32", "--layers", "1", "--seq", "16", "--batch", "2", "--vocab", "64",
        "--width", "64", "--steps", "1", "--warmup", "1"]


def _bench(tmp_path, *args):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "step_time.py"), *TINY, *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, {r["mode"]: r for r in json.loads(out.read_text())["rows"]}


def test_bench_runs_both_compilers_and_splits_their_first_step_by_phase(tmp_path):
    stdout, rows = _bench(tmp_path, "--modes", "compile,dp-auto", "--compile-times",
                          "--profile-compile", str(tmp_path / "profiles"))
    for mode in ("compile", "dp-auto"):
        assert rows[mode]["ms"] > 0 and rows[mode]["first_step_s"] > 0, rows[mode]
        assert f"--- {mode}: first-step compile phases" in stdout
        assert (tmp_path / "profiles" / f"{mode}.pstats").stat().st_size > 0
        assert "cumulative" in (tmp_path / "profiles" / f"{mode}.txt").read_text()
    assert "bw_compiler" in stdout.split("--- dp-auto")[1]  # the dp backward was compiled and timed


def test_bench_dp_options_reach_the_dp_backend(tmp_path):
    """An invalid option must come back as that mode's error: proof that it was passed through."""
    _, rows = _bench(tmp_path, "--modes", "dp-auto", "--dp-options", '{"memory_budget_mb": -1}')
    assert "memory_budget_mb" in rows["dp-auto"]["error"]


def test_hf_suite_tiny_runs_every_mode_and_its_dp_rows_are_private(tmp_path):
    """bench/hf_suite.py --tiny on CPU: a row for every (workload, mode) with every field, the
    ratios to compile filled in, and dp rows whose steps the privacy state counted as noisy releases."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "bench"))  # for its MODES and FIELDS (bench/ is no package)
    import hf_suite as suite
    workloads = ("gpt2-256", "vit-base")  # a causal LM with tied embeddings; a conv-patch classifier
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_suite.py"), "--tiny", "--device", "cpu",
                           "--workloads", ",".join(workloads), "--steps", "1", "--warmup", "1", "--timeout", "400",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["workload"], r["mode"]): r for r in json.loads((tmp_path / "hf_suite.json").read_text())}
    assert set(rows) == {(w, m) for w in workloads for m in suite.MODES}
    for key, r in rows.items():
        assert set(r) == set(suite.FIELDS), key
        assert r["device"].startswith("cpu") and r["torch"] and r["date"] and "hf_suite.py" in r["command"], key
        assert r["ms"] or r["error"], key  # opacus-ghost: an error row where opacus is missing or refuses
    for w in workloads:
        for mode in ("eager", "compile", "dp"):
            r = rows[w, mode]
            assert r["error"] is None and r["ms"] > 0 and r["first_step_s"] > 0, r
        dp = rows[w, "dp"]
        assert dp["private_steps"] == 3, dp  # first step + warm-up + timed step, each clipped and noised
        assert dp["throughput_vs_compile"] > 0 and dp["first_step_vs_compile"] > 0, dp
        assert dp["memory_vs_compile"] is None  # no CUDA memory counters on CPU
    assert "thr/comp" in done.stdout
