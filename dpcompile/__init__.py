"""dpcompile: differentially private training as a torch.compile backend.

    model = torch.compile(net, backend="dp", options={"max_grad_norm": 1.0,
                                                     "noise_multiplier": 1.0, "sample_rate": q})
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
    dpcompile.privacy_spent(model, delta=1e-5)
"""
from __future__ import annotations

from .errors import DPCompileError
from .options import DPOptions

__version__ = "0.1.0"
__all__ = ["DPCompileError", "DPOptions", "privacy_spent", "privacy_state", "make_private"]


def privacy_state(model):
    """The PrivacyState (noise stream, steps, accountant) of a model compiled with backend='dp'."""
    from .state import state_of

    return state_of(model)


def privacy_spent(model, delta: float) -> float:
    """ε spent so far by `model` at the given δ (Poisson-sampled Gaussian mechanism, via dp-accounting)."""
    return privacy_state(model).epsilon(delta)


def make_private(*args, **kwargs):
    from .engine import make_private as _make_private

    return _make_private(*args, **kwargs)
