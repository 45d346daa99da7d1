import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cached graphs or automatic-dynamic state)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
