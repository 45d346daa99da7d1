"""dpcompile.privacy.accounting: checked against an exact closed form, against dp_accounting used
directly, and against the properties any correct accountant must have."""
from __future__ import annotations

import functools
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from dpcompile.privacy.accounting import (MIN_ACCOUNTED_NOISE_MULTIPLIER, PrivacyAccountant,
                                          calibrate_noise_multiplier, epsilon)


# --- independent oracle: the analytic Gaussian mechanism ------------------------------------
def analytic_gaussian_delta(eps: float, mu: float) -> float:
    """Tight δ(ε) of the Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018, Thm. 8):
    δ(ε) = Φ(-ε/μ + μ/2) − e^ε Φ(-ε/μ − μ/2), the second term in log space (e^ε may be huge)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε with δ(ε) <= delta, by root finding (δ(ε) is decreasing in ε)."""
    if analytic_gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while analytic_gaussian_delta(hi, mu) > delta:
        hi *= 2
    return optimize.brentq(lambda e: analytic_gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12)


def exact_full_batch_epsilon(sigma: float, steps: int, delta: float) -> float:
    """T-fold composition of Gaussian mechanisms of multiplier σ is one with μ = √T / σ."""
    return analytic_gaussian_epsilon(math.sqrt(steps) / sigma, delta)


def test_oracle_sanity():
    # At ε = 0, δ is the total-variation distance between N(0,1) and N(μ,1): 2Φ(μ/2) − 1.
    for mu in (0.1, 1.0, 3.0):
        assert analytic_gaussian_delta(0.0, mu) == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1, rel=1e-12)
    # The classical bound σ = √(2 ln(1.25/δ)) / ε (valid for ε < 1) can only be looser.
    delta, eps = 1e-5, 0.5
    sigma_classic = math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert exact_full_batch_epsilon(sigma_classic, 1, delta) < eps
    # Composition: more steps, or less noise, can only cost more.
    assert exact_full_batch_epsilon(1.0, 1, 1e-5) < exact_full_batch_epsilon(1.0, 2, 1e-5)
    assert exact_full_batch_epsilon(2.0, 5, 1e-5) < exact_full_batch_epsilon(1.0, 5, 1e-5)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("steps", [1, 10, 100])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_full_batch_matches_the_analytic_gaussian(sigma, steps, delta):
    exact = exact_full_batch_epsilon(sigma, steps, delta)
    pld = epsilon(sigma, 1.0, steps, delta, "pld")
    rdp = epsilon(sigma, 1.0, steps, delta, "rdp")
    assert abs(pld - exact) / exact < 0.01, (pld, exact)
    assert pld >= exact * (1 - 1e-6), "pessimistic PLD must not under-report ε"
    assert exact <= rdp < 2 * exact, (rdp, exact)
    acc = PrivacyAccountant("pld")
    for _ in range(steps):  # step by step: merged into one segment, same answer
        acc.step(sigma, 1.0)
    assert acc.steps == steps and acc.get_epsilon(delta) == pld


# --- Poisson-subsampled grid ---------------------------------------------------------------
QS, SIGMAS, STEPS = (0.001, 0.01, 0.1), (0.8, 1.0, 1.5), (100, 1000)
DELTA = 1e-5


@functools.lru_cache(maxsize=None)
def eps_of(sigma: float, q: float, steps: int, mechanism: str) -> float:
    return epsilon(sigma, q, steps, DELTA, mechanism)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("steps", STEPS)
def test_subsampled_pld_is_finite_positive_and_tighter_than_rdp(q, sigma, steps):
    pld, rdp = eps_of(sigma, q, steps, "pld"), eps_of(sigma, q, steps, "rdp")
    assert 0 < pld < math.inf and 0 < rdp < math.inf
    assert pld <= rdp * 1.001, (pld, rdp)
    # Subsampling amplifies privacy: never worse than the full-batch Gaussian.
    assert pld < exact_full_batch_epsilon(sigma, steps, DELTA)


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_epsilon_is_monotone_in_sigma_steps_and_q(mechanism):
    for q in QS:
        for steps in STEPS:
            values = [eps_of(s, q, steps, mechanism) for s in SIGMAS]
            assert values == sorted(values, reverse=True) and len(set(values)) == len(values), (q, steps, values)
    for q in QS:
        for sigma in SIGMAS:
            assert eps_of(sigma, q, 100, mechanism) < eps_of(sigma, q, 1000, mechanism)
    for sigma in SIGMAS:
        for steps in STEPS:
            values = [eps_of(sigma, q, steps, mechanism) for q in QS]
            assert values == sorted(values) and len(set(values)) == len(values), (sigma, steps, values)


def _direct_rdp(event: dp_accounting.DpEvent, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def _direct_pld(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def _subsampled(sigma: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("steps", STEPS)
def test_rdp_equals_dp_accounting_used_directly(q, sigma, steps):
    acc = PrivacyAccountant("rdp")
    acc.step(sigma, q, steps)
    direct = _direct_rdp(dp_accounting.SelfComposedDpEvent(_subsampled(sigma, q), steps), DELTA)
    assert acc.get_epsilon(DELTA) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("q, sigma, steps", [
    (0.001, 0.8, 100), (0.001, 1.5, 100), (0.001, 1.0, 1000), (0.001, 1.5, 1000),
    (0.01, 0.8, 100), (0.01, 1.5, 100), (0.01, 1.5, 1000), (0.1, 1.0, 100), (0.1, 1.5, 100),
])
def test_pld_matches_dp_accounting_used_directly_at_a_fine_grid(q, sigma, steps):
    # dp_accounting's own default discretisation (1e-4) is the reference; it is itself within
    # 0.2 % of the converged value on these cases (the small-ε ones are where a fixed 1e-3 grid
    # would be off by up to 15 %).
    acc = PrivacyAccountant("pld")
    acc.step(sigma, q, steps)
    direct = _direct_pld(dp_accounting.SelfComposedDpEvent(_subsampled(sigma, q), steps), DELTA, 1e-4)
    assert acc.get_epsilon(DELTA) == pytest.approx(direct, rel=0.01)


def test_multi_segment_matches_dp_accounting_used_directly():
    acc = PrivacyAccountant("rdp")
    acc.step(1.0, 0.01, 300)
    acc.step(2.0, 0.02, 200)
    acc.step(1.0, 1.0, 3)
    direct = _direct_rdp(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(_subsampled(1.0, 0.01), 300),
        dp_accounting.SelfComposedDpEvent(_subsampled(2.0, 0.02), 200),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 3),
    ]), DELTA)
    assert acc.get_epsilon(DELTA) == pytest.approx(direct, rel=1e-12)


# --- calibration ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("steps", [100, 1000])
@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_calibration_is_safe_and_near_tight(target, steps, mechanism):
    q, delta = 0.01, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps, mechanism=mechanism)
    assert isinstance(sigma, float) and sigma > 0
    assert epsilon(sigma, q, steps, delta, mechanism) <= target
    assert epsilon(sigma * (1 - 0.02), q, steps, delta, mechanism) > target * 0.999


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_full_batch_calibration_matches_the_analytic_gaussian(target):
    steps, delta = 100, 1e-5
    # σ* with exact ε(σ*) = target, by root finding on the oracle (ε decreasing in σ).
    exact_sigma = optimize.brentq(lambda s: exact_full_batch_epsilon(s, steps, delta) - target, 0.1, 1e3, rtol=1e-10)
    sigma = calibrate_noise_multiplier(target, delta, 1.0, steps, mechanism="pld", rel_tol=0.005)
    assert exact_sigma * (1 - 1e-6) <= sigma <= exact_sigma * 1.006


def test_calibration_tolerance_is_respected():
    coarse = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 100, rel_tol=0.2)
    fine = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 100, rel_tol=0.001)
    assert epsilon(coarse, 0.01, 100, 1e-5) <= 3.0 and epsilon(fine, 0.01, 100, 1e-5) <= 3.0
    assert fine <= coarse and epsilon(fine * 0.995, 0.01, 100, 1e-5) > 3.0


def test_calibration_floor_for_very_loose_targets():
    # A target this loose is met by any sigma down to the search floor (0.1): that is returned.
    sigma = calibrate_noise_multiplier(1e4, 1e-5, 0.01, 10)
    assert sigma == pytest.approx(0.1) and epsilon(sigma, 0.01, 10, 1e-5) <= 1e4


# --- history, composition, checkpoints -----------------------------------------------------
def test_history_merges_consecutive_equal_segments_only():
    acc = PrivacyAccountant()
    acc.step(1.0, 0.01, 100)
    acc.step(1.0, 0.01, 50)
    acc.step(1, 0.01)  # an int σ is the same σ
    assert acc.history == [(1.0, 0.01, 151)] and acc.steps == 151
    acc.step(1.0, 0.01, 0)  # no-op
    acc.step(2.0, 0.01, 10)
    acc.step(2.0, 0.02, 10)
    acc.step(1.0, 0.01, 5)  # equal to the first segment but not consecutive: a new segment
    assert acc.history == [(1.0, 0.01, 151), (2.0, 0.01, 10), (2.0, 0.02, 10), (1.0, 0.01, 5)]
    assert acc.steps == 176
    merged = PrivacyAccountant("rdp")
    for _ in range(4):
        merged.step(1.0, 0.01, 25)
    assert merged.history == [(1.0, 0.01, 100)]
    assert merged.get_epsilon(1e-5) == epsilon(1.0, 0.01, 100, 1e-5, "rdp")


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_two_segments_compose(mechanism):
    q, delta = 0.01, 1e-5
    acc = PrivacyAccountant(mechanism)
    acc.step(1.0, q, 500)
    acc.step(2.0, q, 500)
    mixed = acc.get_epsilon(delta)
    low, high = epsilon(2.0, q, 1000, delta, mechanism), epsilon(1.0, q, 1000, delta, mechanism)
    assert low < mixed < high
    # Composition never costs less than either part alone.
    assert mixed > max(epsilon(1.0, q, 500, delta, mechanism), epsilon(2.0, q, 500, delta, mechanism))
    # Composition is commutative.
    swapped = PrivacyAccountant(mechanism)
    swapped.step(2.0, q, 500)
    swapped.step(1.0, q, 500)
    assert swapped.get_epsilon(delta) == pytest.approx(mixed, rel=1e-3)


def test_state_dict_round_trip_gives_identical_epsilon():
    acc = PrivacyAccountant("pld")
    acc.step(1.0, 0.01, 300)
    acc.step(1.5, 0.02, 100)
    state = acc.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain Python data
    clone = PrivacyAccountant("rdp")
    clone.load_state_dict(json.loads(json.dumps(state)))
    assert clone.mechanism == "pld" and clone.history == acc.history and clone.steps == 400
    assert clone.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    clone.step(1.5, 0.02, 1)  # continues the last segment
    assert clone.history[-1] == (1.5, 0.02, 101)
    assert acc.state_dict() == state  # the source was not aliased


def test_zero_steps_and_delta_dependence():
    for mechanism in ("pld", "rdp"):
        assert PrivacyAccountant(mechanism).get_epsilon(1e-5) == 0.0
        assert epsilon(1.0, 0.01, 0, 1e-5, mechanism) == 0.0
        assert epsilon(1.0, 0.01, 100, 1e-6, mechanism) > epsilon(1.0, 0.01, 100, 1e-5, mechanism)


def test_huge_epsilon_stays_cheap_and_is_an_upper_bound():
    # Full batch, σ = 1, 10^6 steps: exact ε ≈ 5e5; PLD would need tens of GB here.
    eps = epsilon(1.0, 1.0, 10**6, 1e-5)
    assert eps >= exact_full_batch_epsilon(1.0, 10**6, 1e-5)
    assert eps < 1.1 * exact_full_batch_epsilon(1.0, 10**6, 1e-5)


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_noise_below_the_accounted_floor_gives_inf_never_an_error_or_a_small_value(mechanism):
    """dp_accounting breaks down as σ² underflows: ZeroDivisionError at σ = 1e-300, ε = 0.0 from the
    RDP of subsampled steps at σ = 1e-155. Below the floor (where one step alone has ε > 10^11)
    the accountant answers inf, for any segment of the history."""
    for sigma in (1e-300, 1e-155, 0.99 * MIN_ACCOUNTED_NOISE_MULTIPLIER):
        for q in (1e-3, 0.5, 1.0):
            assert epsilon(sigma, q, 3, 1e-5, mechanism) == math.inf
    at_floor = epsilon(MIN_ACCOUNTED_NOISE_MULTIPLIER, 0.01, 3, 1e-5, mechanism)
    assert 1e11 < at_floor < math.inf
    acc = PrivacyAccountant(mechanism)
    acc.step(1.0, 0.01, 100)
    acc.step(1e-200, 0.01, 1)
    assert acc.get_epsilon(1e-5) == math.inf


# --- invalid inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: PrivacyAccountant("gdp"), r"mechanism must be one of \('pld', 'rdp'\), got 'gdp'"),
    (lambda: epsilon(1.0, 0.1, 10, 1e-5, mechanism="prv"), "mechanism must be one of"),
    (lambda: PrivacyAccountant().step(0.0, 0.1), r"noise_multiplier .*sigma > 0.*got 0.0"),
    (lambda: PrivacyAccountant().step(-1.0, 0.1), "noise_multiplier"),
    (lambda: PrivacyAccountant().step(float("nan"), 0.1), "noise_multiplier"),
    (lambda: PrivacyAccountant().step(float("inf"), 0.1), "noise_multiplier"),
    (lambda: PrivacyAccountant().step(1.0, 0.0), r"sample_rate must be in \(0, 1\].*got 0.0"),
    (lambda: PrivacyAccountant().step(1.0, 1.5), "sample_rate"),
    (lambda: PrivacyAccountant().step(1.0, "0.1"), "sample_rate"),
    (lambda: PrivacyAccountant().step(1.0, 0.1, -1), r"num_steps must be an integer >= 0, got -1"),
    (lambda: PrivacyAccountant().step(1.0, 0.1, 2.5), "num_steps"),
    (lambda: PrivacyAccountant().get_epsilon(0.0), r"delta must be in \(0, 1\), got 0.0"),
    (lambda: PrivacyAccountant().get_epsilon(1.0), "delta"),
    (lambda: epsilon(1.0, 0.1, -3, 1e-5), "steps must be an integer >= 0"),
    (lambda: calibrate_noise_multiplier(-1, 1e-5, 0.1, 10), "target_epsilon must be a positive"),
    (lambda: calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10), "target_epsilon"),
    (lambda: calibrate_noise_multiplier(float("inf"), 1e-5, 0.1, 10), "target_epsilon"),
    (lambda: calibrate_noise_multiplier(1.0, 2.0, 0.1, 10), "target_delta"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.0, 10), "sample_rate"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.1, 0), "steps must be >= 1"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.1, 10, mechanism="x"), "mechanism"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.1, 10, rel_tol=0), "rel_tol"),
    (lambda: calibrate_noise_multiplier(1e-9, 1e-5, 1.0, 10**6, mechanism="rdp"), "not reached"),
    (lambda: PrivacyAccountant().load_state_dict({"history": []}), "'mechanism' and 'history'"),
    (lambda: PrivacyAccountant().load_state_dict({"mechanism": "pld", "history": [[1.0, 0.1]]}),
     r"history\[0\]"),
    (lambda: PrivacyAccountant().load_state_dict({"mechanism": "pld", "history": [[1.0, 2.0, 5]]}),
     "sample_rate"),
])
def test_invalid_inputs_raise_informative_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rejected_step_leaves_the_history_untouched():
    acc = PrivacyAccountant()
    acc.step(1.0, 0.01, 10)
    with pytest.raises(ValueError):
        acc.step(1.0, 0.01, -5)
    with pytest.raises(ValueError):
        acc.load_state_dict({"mechanism": "pld", "history": [[1.0, 0.01, 5], [0.0, 0.01, 5]]})
    assert acc.history == [(1.0, 0.01, 10)] and acc.mechanism == "pld"


def test_importing_dpcompile_and_compiling_leave_dp_accounting_unloaded_until_epsilon_is_asked():
    """dp_accounting (and the scipy it imports) costs seconds to load: it stays out of `import
    dpcompile` and of a compiled private step, and loads when ε is first computed."""
    import subprocess
    import sys

    script = (
        "import sys, torch, dpcompile\n"
        "net = torch.nn.Linear(4, 2)\n"
        "model = torch.compile(net, backend='dp', options={'noise_multiplier': 1.0, 'sample_rate': 0.1,\n"
        "                                                        'expected_batch_size': 8.0})\n"
        "model(torch.randn(8, 4)).sum().backward()\n"
        "assert net.weight.grad is not None\n"
        "print('dp_accounting' in sys.modules)\n"
        "print(round(dpcompile.privacy_spent(model, delta=1e-5), 6), 'dp_accounting' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded_after_step, (eps, loaded_after_epsilon) = out.stdout.split("\n")[0], out.stdout.split("\n")[1].split()
    assert loaded_after_step == "False"
    assert loaded_after_epsilon == "True" and float(eps) > 0
