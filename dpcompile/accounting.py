"""Privacy accounting for Poisson-subsampled DP-SGD, on Google's `dp-accounting`.

Guarantee: (ε, δ)-DP under add/remove-one neighbouring datasets, for a sequence of
steps that each (a) include every record independently with probability q (Poisson
sampling), (b) clip each record's gradient to L2 norm R, sum, and (c) add N(0, σ²R²I).
A step is a `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`; a history of segments
with different (σ, q) composes. PLD (privacy loss distributions) is tight up to
discretization; RDP is a looser, faster upper bound.
"""
from __future__ import annotations

import math
from typing import Any

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

MECHANISMS = ("pld", "rdp")
# PLD discretization of the privacy-loss values: 1e-3 keeps ε within ~0.1% of the
# 1e-4 default on the tests' grid while being ~10x faster for 1000s of steps.
PLD_DISCRETIZATION = 1e-3


class PrivacyAccountant:
    """History of (σ, q, steps) segments and the ε they spend."""

    def __init__(self, mechanism: str = "pld") -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"accountant mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        _check(noise_multiplier, sample_rate, num_steps)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + num_steps)
        elif num_steps:
            self.history.append((float(noise_multiplier), float(sample_rate), int(num_steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not self.history:
            return 0.0
        return _epsilon(self.history, delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mechanism"] not in MECHANISMS:
            raise ValueError(f"unknown accountant mechanism {state['mechanism']!r}")
        self.mechanism = state["mechanism"]
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: str = "pld") -> float:
    accountant = PrivacyAccountant(mechanism)
    accountant.step(noise_multiplier, sample_rate, steps)
    return accountant.get_epsilon(delta)


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               mechanism: str = "pld", rel_tol: float = 0.01) -> float:
    """Smallest σ (within rel_tol) whose ε after `steps` steps is at most target_epsilon."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon!r}")
    _check(1.0, sample_rate, steps)

    def eps(sigma: float) -> float:
        return epsilon(sigma, sample_rate, steps, target_delta, mechanism)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches ε={target_epsilon} in {steps} steps")
    while high - low > rel_tol * high:
        mid = (low + high) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def _check(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _event(history) -> dp_accounting.DpEvent:
    parts = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)) if q < 1
        else dp_accounting.GaussianDpEvent(sigma), n) for sigma, q, n in history]
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)


def _epsilon(history, delta: float, mechanism: str) -> float:
    if mechanism == "pld":
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_event(history))
    return float(accountant.get_epsilon(delta))
