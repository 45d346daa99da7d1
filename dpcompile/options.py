"""Options of the `dp` backend: `torch.compile(model, backend="dp", options={...})`."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .errors import DPCompileError

CLIPPING_MODES = ("flat", "automatic")
LOSS_REDUCTIONS = ("mean", "sum")
STRATEGIES = ("auto", "ghost", "instantiate")
ACCOUNTANTS = ("pld", "rdp")


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """Privacy and compilation settings.

    max_grad_norm: clipping bound R on each sample's whole gradient.
    noise_multiplier: σ; Gaussian noise of std σ·R is added to the clipped sum.
    sample_rate: Poisson sampling rate q, used only by the accountant.
    expected_batch_size: divisor of the noisy sum (Opacus' convention). None: the
        actual batch size of each step.
    loss_reduction: how the loss seen by backward combines samples: "mean" (the
        default of F.cross_entropy) or "sum". Used to recover each sample's own
        gradient before clipping; clipping bounds each contribution either way.
    clipping: "flat" (C_i = min(1, R/‖g_i‖)) or "automatic" (C_i = R/(‖g_i‖+γ), Bu et al.).
    strategy: per-layer norm strategy: "auto" (sympy cost model), "ghost" or
        "instantiate" where possible.
    memory_budget_mb: per-layer memory the cost model may spend on instantiated
        per-sample gradients; above it, ghost norms are used.
    seed: seed of the noise stream; None draws one from the OS (recorded in state_dict).
    accountant: "pld" or "rdp" (dp-accounting).
    check_finite: raise if any per-sample gradient norm is NaN/inf (one device sync a step).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    loss_reduction: str = "mean"
    clipping: str = "flat"
    automatic_gamma: float = 0.01
    strategy: str = "auto"
    memory_budget_mb: float = 256.0
    seed: int | None = None
    accountant: str = "pld"
    check_finite: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "DPOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DPCompileError(
                f"unknown dp backend option(s) {unknown}; valid options are {sorted(known)}"
            )
        if options.get("seed") is None:
            options["seed"] = int.from_bytes(os.urandom(8), "little") >> 1
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise DPCompileError(f"dp backend option {message}")

        need(_is_number(self.max_grad_norm) and self.max_grad_norm > 0,
             f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}")
        need(_is_number(self.noise_multiplier) and self.noise_multiplier >= 0,
             f"noise_multiplier must be a number >= 0, got {self.noise_multiplier!r}")
        need(self.sample_rate is None or (_is_number(self.sample_rate) and 0 < self.sample_rate <= 1),
             f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        need(self.expected_batch_size is None
             or (_is_number(self.expected_batch_size) and self.expected_batch_size > 0),
             f"expected_batch_size must be a positive number, got {self.expected_batch_size!r}")
        need(self.loss_reduction in LOSS_REDUCTIONS,
             f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        need(self.clipping in CLIPPING_MODES,
             f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        need(_is_number(self.automatic_gamma) and self.automatic_gamma > 0,
             f"automatic_gamma must be a positive number, got {self.automatic_gamma!r}")
        need(self.strategy in STRATEGIES,
             f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(_is_number(self.memory_budget_mb) and self.memory_budget_mb >= 0,
             f"memory_budget_mb must be a number >= 0, got {self.memory_budget_mb!r}")
        need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        need(self.accountant in ACCOUNTANTS,
             f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
