"""bench/step_time.py stays runnable with one command (a CPU smoke run; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

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
