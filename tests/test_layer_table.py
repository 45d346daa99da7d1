"""The README's supported-layers table is the one docs/layer_table.py builds from the tests' markers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_layer_table_is_current():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "layer_table.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
