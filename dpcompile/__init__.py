"""dpcompile: differentially private training as a torch.compile backend.

    model = torch.compile(net, backend="dp", options={"max_grad_norm": 1.0,
                                                     "noise_multiplier": 1.0, "sample_rate": q,
                                                     "dataset_size": N})
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
    dpcompile.privacy_spent(model, delta=1e-5)
"""
from __future__ import annotations

import os as _os

from .errors import DPCompileError
from .options import DPOptions

__version__ = "0.1.0"
__all__ = ["DPCompileError", "DPOptions", "privacy_spent", "privacy_state", "make_private", "inspect_model",
           "export_onnx", "check", "fix"]


def privacy_state(model):
    """The PrivacyState (noise stream, steps, accountant) of a model compiled with backend='dp'."""
    from .state import state_of

    return state_of(model)


def privacy_spent(model, delta: float) -> float:
    """ε spent so far by `model` at the given δ, via dp-accounting: Poisson-sampled Gaussian mechanism
    (DP-SGD) or, with noise_mechanism="bsr", the Gaussian mechanism of the BSR factorization."""
    return privacy_state(model).epsilon(delta)


def make_private(*args, **kwargs):
    from .engine import make_private as _make_private

    return _make_private(*args, **kwargs)


def inspect_model(*args, **kwargs):
    """Compile a copy of a model with backend 'dp', run one private step and return a Report
    (pipeline, graphs before/after each pass, per-parameter plan, diff, privacy summary)."""
    from .inspection import inspect_model as _inspect_model

    return _inspect_model(*args, **kwargs)


def export_onnx(*args, **kwargs):
    """Export the private training step (forward, loss, clipped and noised backward) to ONNX."""
    from .export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


def check(model, *example_inputs, **kwargs):
    """Every module the dp backend would refuse, with reason and fix (and, given example inputs, what a
    private trial step of a copy refuses); see `dpcompile.validate.check`."""
    from .validate import check as _check

    return _check(model, *example_inputs, **kwargs)


def fix(model):
    """Replace, in place, the modules that have a private drop-in equivalent (BatchNorm -> GroupNorm, ...)."""
    from .validate import fix as _fix

    return _fix(model)


if _os.environ.get("DPCOMPILE_LOGS"):  # TORCH_LOGS-style: DPCOMPILE_LOGS=passes,diff,table,graphs
    from .inspection import set_logs_from_env

    set_logs_from_env()
