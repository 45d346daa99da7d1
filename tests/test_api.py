"""The public API shows real signatures and docs (help(dpcompile.make_private)) while `import
dpcompile` stays light."""
from __future__ import annotations

import inspect
import subprocess
import sys

import dpcompile


def test_public_functions_have_their_real_signatures_and_docs():
    for name, first in [("make_private", "module"), ("inspect_model", "model"), ("export_onnx", "model"),
                        ("check", "model"), ("fix", "model"), ("audit", "model")]:
        fn = getattr(dpcompile, name)
        params = list(inspect.signature(fn).parameters)
        assert params[0] == first and "args" not in params, (name, params)
        assert fn.__doc__ and len(fn.__doc__) > 40, name
    assert "max_grad_norm" in inspect.signature(dpcompile.make_private).parameters
    assert set(dpcompile.__all__) <= set(dir(dpcompile))


def test_import_dpcompile_does_not_load_the_compiler_stack():
    code = "import sys, dpcompile; print('dpcompile.engine' in sys.modules, 'dpcompile.tools.export' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    assert out == ["False", "False"]


def test_each_dp_backward_compile_is_logged_with_its_plan_and_time(caplog):
    import logging

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    with caplog.at_level(logging.INFO, logger="dpcompile"):
        F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    lines = [r.getMessage() for r in caplog.records if r.name == "dpcompile" and "dp backward" in r.getMessage()]
    assert len(lines) == 1 and "4 parameters" in lines[0] and " s:" in lines[0], lines
