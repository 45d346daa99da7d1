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
           "export_onnx", "check", "fix", "audit"]


def privacy_state(model):
    """The PrivacyState (noise stream, steps, accountant) of a model compiled with backend='dp'."""
    from .state import state_of

    return state_of(model)


def privacy_spent(model, delta: float) -> float:
    """ε spent so far by `model` at the given δ, via dp-accounting: Poisson-sampled Gaussian mechanism
    (DP-SGD) or, with noise_mechanism="bsr", the Gaussian mechanism of the BSR factorization."""
    return privacy_state(model).epsilon(delta)


# The user API that needs the compiler stack is imported on first use (PEP 562), so `import
# dpcompile` stays light while help(dpcompile.make_private) shows the real signature and docs.
_LAZY = {"make_private": "engine", "inspect_model": "inspection", "export_onnx": "export",
         "check": "validate", "fix": "validate", "audit": "audit"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpcompile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if _os.environ.get("DPCOMPILE_LOGS"):  # TORCH_LOGS-style: DPCOMPILE_LOGS=passes,diff,table,graphs
    from .inspection import set_logs_from_env

    set_logs_from_env()
