"""The package's layers (issue 25): imports go one way and no package's modules import each
other in a cycle, lazy imports included (import-linter's contracts in pyproject.toml); the
top level stays small; the flat layout's module paths still import the same modules."""
from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import pytest

import dpcompile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    code = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "0 broken" in run.stdout, run.stdout + run.stderr


def test_top_level_holds_at_most_six_modules():
    top = sorted(p.name for p in (ROOT / "dpcompile").glob("*.py"))
    assert len(top) <= 6, top
    packages = sorted(p.parent.name for p in (ROOT / "dpcompile").glob("*/__init__.py"))
    assert packages == ["compiler", "distributed", "integrations", "privacy", "tools"], packages


@pytest.mark.parametrize("old, new", [("dpcompile.state", "dpcompile.privacy.state"),
                                      ("dpcompile.backends.dp", "dpcompile.compiler.backend"),
                                      ("dpcompile.passes.batch_dim", "dpcompile.compiler.passes.batch_dim"),
                                      ("dpcompile.data", "dpcompile.privacy.sampling"),
                                      ("dpcompile.inspection", "dpcompile.tools.inspection")])
def test_old_module_paths_are_the_moved_modules(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) and module.__name__ == new and module.__spec__.name == new


def test_public_entry_points():
    from importlib.metadata import entry_points

    assert "dp" in {ep.name for ep in entry_points(group="torch_dynamo_backends")}
    assert dpcompile.make_private.__module__ == "dpcompile.engine"
    run = subprocess.run([sys.executable, "-m", "dpcompile", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "inspect" in run.stdout, run.stderr
