"""Accounting: dp-accounting wrapper checked against an exact closed form and against itself."""
from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from dpcompile.accounting import PrivacyAccountant, calibrate_noise_multiplier, epsilon


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """T Gaussian mechanisms of multiplier σ = one with μ = √T/σ (Balle & Wang 2018, tight δ(ε))."""
    mu = math.sqrt(steps) / sigma

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("steps", [1, 10, 100])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_full_batch_matches_the_exact_gaussian_composition(sigma, steps, delta):
    exact = exact_gaussian_epsilon(sigma, steps, delta)
    pld = epsilon(sigma, 1.0, steps, delta, "pld")
    rdp = epsilon(sigma, 1.0, steps, delta, "rdp")
    assert abs(pld - exact) / exact < 0.01
    assert exact <= rdp < 2 * exact


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("sigma", [0.8, 1.0, 1.5])
def test_subsampled_pld_is_tighter_than_rdp_and_matches_dp_accounting(q, sigma):
    steps, delta = 500, 1e-5
    pld = epsilon(sigma, q, steps, delta, "pld")
    rdp = epsilon(sigma, q, steps, delta, "rdp")
    assert 0 < pld <= rdp * 1.001
    direct = rdp_privacy_accountant.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert rdp == pytest.approx(direct.get_epsilon(delta), rel=1e-9)


def test_epsilon_is_monotone():
    base = epsilon(1.0, 0.01, 300, 1e-5)
    assert epsilon(1.2, 0.01, 300, 1e-5) < base
    assert epsilon(1.0, 0.01, 600, 1e-5) > base
    assert epsilon(1.0, 0.02, 300, 1e-5) > base


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_calibration_is_safe_and_near_tight(target, mechanism):
    q, steps, delta = 0.01, 1000, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps, mechanism=mechanism)
    assert epsilon(sigma, q, steps, delta, mechanism) <= target
    assert epsilon(sigma * 0.97, q, steps, delta, mechanism) > target * 0.999


def test_history_merges_composes_and_round_trips():
    acc = PrivacyAccountant()
    acc.step(1.0, 0.01, 100)
    acc.step(1.0, 0.01, 100)
    assert acc.history == [(1.0, 0.01, 200)] and acc.steps == 200
    acc.step(2.0, 0.01, 200)
    mixed = acc.get_epsilon(1e-5)
    assert epsilon(2.0, 0.01, 400, 1e-5) < mixed < epsilon(1.0, 0.01, 400, 1e-5)
    clone = PrivacyAccountant("rdp")
    clone.load_state_dict(acc.state_dict())
    assert clone.mechanism == "pld" and clone.get_epsilon(1e-5) == mixed
    assert PrivacyAccountant().get_epsilon(1e-5) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: PrivacyAccountant("gdp"), "mechanism"),
    (lambda: PrivacyAccountant().step(0.0, 0.1), "noise_multiplier"),
    (lambda: PrivacyAccountant().step(1.0, 0.0), "sample_rate"),
    (lambda: PrivacyAccountant().get_epsilon(1.5), "delta"),
    (lambda: calibrate_noise_multiplier(-1, 1e-5, 0.1, 10), "target_epsilon"),
])
def test_invalid_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
