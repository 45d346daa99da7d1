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
    from .privacy.state import state_of

    return state_of(model)


def privacy_spent(model, delta: float) -> float:
    """ε spent so far by `model` at the given δ, via dp-accounting: Poisson-sampled Gaussian mechanism
    (DP-SGD) or, with noise_mechanism="bsr", the Gaussian mechanism of the BSR factorization."""
    return privacy_state(model).epsilon(delta)


# The user API that needs the compiler stack is imported on first use (PEP 562), so `import
# dpcompile` stays light while help(dpcompile.make_private) shows the real signature and docs.
_LAZY = {"make_private": "engine", "inspect_model": "tools.inspection", "export_onnx": "tools.export",
         "check": "tools.validate", "fix": "tools.validate", "audit": "tools.audit"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpcompile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# The flat layout of dpcompile <= 0.1 (dpcompile.state, dpcompile.backends.dp, ...) stays importable:
# scripts, pickles and checkpoints that name an old module get the module at its new place.
_OLD_PATHS = {"backends": "compiler", "backends.dp": "compiler.backend", "backends.module": "compiler.module",
              "passes": "compiler.passes", "runtime": "compiler.runtime", "recurrent": "compiler.recurrent",
              "cost_model": "compiler.cost_model", "state": "privacy.state", "accounting": "privacy.accounting",
              "bsr": "privacy.bsr", "lsg": "privacy.lsg", "data": "privacy.sampling",
              "checkpoint": "privacy.checkpoint", "loss_tracking": "privacy.loss_tracking",
              "per_sample": "privacy.per_sample", "kernels": "privacy.kernels", "cli": "tools.cli",
              "inspection": "tools.inspection", "graph_render": "tools.graph_render", "export": "tools.export",
              "validate": "tools.validate", "audit": "tools.audit"}


def _new_path(name: str) -> str | None:
    """'dpcompile.passes.lsg' -> 'dpcompile.compiler.passes.lsg'; None for a module that did not move."""
    rest = name[len(__name__) + 1:].split(".") if name.startswith(__name__ + ".") else []
    for k in range(len(rest), 0, -1):
        moved = _OLD_PATHS.get(".".join(rest[:k]))
        if moved is not None:
            return ".".join([__name__, moved, *rest[k:]])
    return None


class _OldPathFinder:
    """A meta-path finder and loader that answers an old module name with the module itself."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        import importlib.util

        new = _new_path(name)
        return None if new is None else importlib.util.spec_from_loader(name, cls)

    @staticmethod
    def create_module(spec):
        import importlib

        module = importlib.import_module(_new_path(spec.name))
        spec.loader_state = module.__spec__  # the import system overwrites it with the old name's spec
        return module

    @staticmethod
    def exec_module(module):
        module.__spec__ = module.__spec__.loader_state


import sys as _sys

_sys.meta_path.insert(0, _OldPathFinder)  # before the path finders: an old name never loads a stale file


if _os.environ.get("DPCOMPILE_LOGS"):  # TORCH_LOGS-style: DPCOMPILE_LOGS=passes,diff,table,graphs
    from .tools.inspection import set_logs_from_env

    set_logs_from_env()
