"""Privacy accounting for Poisson-subsampled DP-SGD, computed with Google's `dp_accounting`.

What is guaranteed
------------------
The accountant bounds the privacy of a sequence of DP-SGD steps. Each step

1. samples a batch by *Poisson sampling* with rate q: every record of the dataset is
   included independently with probability q (so the batch size is random);
2. clips each included record's gradient to L2 norm at most R and sums the clipped
   gradients;
3. adds Gaussian noise N(0, (sigma * R)^2 I) to the sum and releases the result.

`sigma` is the noise multiplier. Such a step is a `PoissonSampledDpEvent(q,
GaussianDpEvent(sigma))` (for q = 1 it is a plain `GaussianDpEvent(sigma)`), and a
training run is the composition of its steps; segments with different (sigma, q)
compose too. The reported epsilon makes the whole run (epsilon, delta)-DP under the
*add/remove-one* neighbouring relation (datasets differing by adding or removing one
record), which is the relation Poisson-sampling analyses are stated in. It holds only if
the training loop really performs every step counted here, including steps whose
Poisson batch happened to be empty (those must still release noise, or at least be
counted: see `dpcompile.privacy.sampling`).

Two methods are offered:

* ``"pld"`` (default): privacy loss distributions. Numerically tight; the pessimistic
  discretisation used by `dp_accounting` keeps the result an upper bound.
  For epsilon > 500 (no meaningful guarantee) the RDP value is returned instead, as the
  PLD grid would need gigabytes there.
* ``"rdp"``: Rényi DP with conversion to (epsilon, delta). Faster, always an upper
  bound, but looser than PLD (a few percent without subsampling; 10-30 % for typical
  DP-SGD settings and several-fold for small epsilon).

A run with a segment of noise multiplier below ``MIN_ACCOUNTED_NOISE_MULTIPLIER`` (1e-6)
has epsilon = inf: one such step alone has epsilon > 10^11, and dp_accounting's double
arithmetic is not trusted there (it fails or under-reports as sigma^2 underflows).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import TYPE_CHECKING, Any, Iterable

from ..options import MIN_ACCOUNTED_NOISE_MULTIPLIER

if TYPE_CHECKING:
    import dp_accounting


__all__ = ["MECHANISMS", "MIN_ACCOUNTED_NOISE_MULTIPLIER", "PrivacyAccountant", "epsilon",
           "calibrate_noise_multiplier"]

MECHANISMS = ("pld", "rdp")

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

# --- PLD discretisation -----------------------------------------------------------------
# `value_discretization_interval` (Δ) is the grid on which privacy-loss values are rounded
# (pessimistically, i.e. up). The error it causes in epsilon is roughly absolute, not
# relative, and grows with the number of self-compositions. Measured on this package's
# test grid: with Δ = 1e-3 epsilon is within 0.2 % of the converged value whenever
# epsilon >~ 0.5, but for small-epsilon runs (q = 1e-3, sigma = 1.5, 1000 steps:
# epsilon = 0.0739) Δ = 1e-3 overstates epsilon by 15 %, and for q = 1e-4, sigma = 2,
# 1e5 steps (epsilon = 0.049) by 4x. No single Δ is both fast and accurate everywhere,
# so Δ is chosen adaptively: start coarse and divide Δ by 4 until two successive values
# agree to 1 % (the error shrinks by a factor >= 4 per level, so the kept value is then
# within a few tenths of a percent of the limit). Every level's value is a valid
# (pessimistic) upper bound, so stopping early never under-reports epsilon. Runs with
# epsilon >~ 0.5 stop at Δ = 1e-3 (tens of ms); small-epsilon runs go finer, which stays
# cheap because their privacy-loss support is narrow (few grid points even at small Δ).
_PLD_FIRST_INTERVAL = 4e-3
_PLD_REFINE_FACTOR = 4.0
_PLD_MIN_INTERVAL = 1e-6
_PLD_REL_TOL = 1e-2
_PLD_ABS_TOL = 1e-6  # epsilon differences below this are noise, whatever epsilon is
# The PLD grid grows linearly with epsilon (~0.45 GB and ~3 s for epsilon ~ 900 at
# Δ = 1e-3; full-batch sigma = 1 for 1e6 steps would need tens of GB). Beyond this
# epsilon there is no meaningful guarantee left to be tight about, so "pld" returns the
# cheap RDP value there instead: still a valid upper bound, a few percent looser.
_PLD_MAX_EPSILON = 500.0

# MIN_ACCOUNTED_NOISE_MULTIPLIER (options.py, which validates against it): below it no epsilon
# is computed, `_epsilon` returns math.inf; the reason is written there.

# Bracket limits for calibration.
_MAX_NOISE_MULTIPLIER = 1e6
_MIN_NOISE_MULTIPLIER = 0.1  # below this PLD grids get very large (loss values ~ 1/sigma^2)


class PrivacyAccountant:
    """Tracks the (sigma, q, steps) history of a training run and the epsilon it has spent.

    >>> acc = PrivacyAccountant("pld")
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    >>> eps = acc.get_epsilon(delta=1e-5)

    Consecutive steps with the same (sigma, q) are merged into one segment, so the history
    stays short however many steps are recorded.
    """

    def __init__(self, mechanism: str = "pld") -> None:
        self.mechanism = _check_mechanism(mechanism)
        self.history: list[Segment] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` steps with noise multiplier sigma and Poisson rate q."""
        sigma = _check_noise_multiplier(noise_multiplier)
        q = _check_sample_rate(sample_rate)
        n = _check_steps(num_steps, "num_steps")
        if n == 0:
            return
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon such that the recorded run is (epsilon, delta)-DP (add/remove-one)."""
        delta = _check_delta(delta)
        if self.steps == 0:
            return 0.0
        return _epsilon(tuple(self.history), delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON/torch.save friendly)."""
        return {"mechanism": self.mechanism, "history": [[s, q, n] for s, q, n in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by `state_dict` (replaces mechanism and history)."""
        if not isinstance(state, dict) or "mechanism" not in state or "history" not in state:
            raise ValueError("PrivacyAccountant state must be a dict with keys 'mechanism' and 'history', "
                             f"got {state!r}")
        mechanism = _check_mechanism(state["mechanism"])
        history: list[Segment] = []
        for i, segment in enumerate(state["history"]):
            if len(segment) != 3:
                raise ValueError(f"PrivacyAccountant state: history[{i}] must be (noise_multiplier, "
                                 f"sample_rate, steps), got {segment!r}")
            sigma, q, n = segment
            history.append((_check_noise_multiplier(sigma), _check_sample_rate(q),
                            _check_steps(n, f"history[{i}] steps")))
        self.mechanism, self.history = mechanism, history

    def __repr__(self) -> str:
        return f"PrivacyAccountant(mechanism={self.mechanism!r}, history={self.history!r})"


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            mechanism: str = "pld") -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps (sigma, q) at the given delta."""
    accountant = PrivacyAccountant(mechanism)
    accountant.step(noise_multiplier, sample_rate, steps)
    return accountant.get_epsilon(delta)


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               mechanism: str = "pld", rel_tol: float = 0.01) -> float:
    """Smallest noise multiplier sigma (to within `rel_tol`, relative) with epsilon(sigma) <= target.

    A bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi) is found by doubling /
    halving from sigma = 1 and narrowed by bisection until hi - lo <= rel_tol * hi. The
    upper end is returned, so the result always satisfies epsilon(sigma) <= target_epsilon
    as computed by the same accountant. If even sigma = 0.1 meets the target, 0.1 is
    returned (safe, though possibly more noise than needed).
    """
    if not (_is_real(target_epsilon) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    delta = _check_delta(target_delta, "target_delta")
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    if n == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier (0 steps spend no privacy)")
    mechanism = _check_mechanism(mechanism)
    if not (_is_real(rel_tol) and 0 < rel_tol < 1):
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    target = float(target_epsilon)

    def eps(sigma: float) -> float:
        return _epsilon(((sigma, q, n),), delta, mechanism)

    if eps(1.0) > target:
        lo, hi = 1.0, 2.0
        while eps(hi) > target:
            if 2 * hi > _MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target_epsilon} at delta={target_delta} is not reached even with "
                    f"noise_multiplier={hi:g} (sample_rate={q}, steps={n}); raise the target or lower "
                    "the number of steps / sample rate")
            lo, hi = hi, 2 * hi
    else:
        lo, hi = 0.5, 1.0
        while eps(lo) <= target:
            if lo <= _MIN_NOISE_MULTIPLIER:
                return lo
            lo, hi = max(lo / 2, _MIN_NOISE_MULTIPLIER), lo
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# --- validation -------------------------------------------------------------------------
def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_mechanism(mechanism: Any) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"accountant mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    return mechanism


def _check_noise_multiplier(sigma: Any) -> float:
    if not (_is_real(sigma) and 0 < sigma < math.inf):
        raise ValueError(f"noise_multiplier must be a positive finite number (sigma > 0), got {sigma!r}")
    return float(sigma)


def _check_sample_rate(q: Any) -> float:
    if not (_is_real(q) and 0 < q <= 1):
        raise ValueError(f"sample_rate must be in (0, 1] (Poisson sampling probability q), got {q!r}")
    return float(q)


def _check_steps(n: Any, name: str = "steps") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    return int(n)


def _check_delta(delta: Any, name: str = "delta") -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return float(delta)


# --- dp_accounting ----------------------------------------------------------------------
# Imported where used: dp_accounting pulls in scipy (~2.7 s on a CPU host), which would
# otherwise land in `import dpcompile` and in every process's first dp compile.
def _dp_event(history: Iterable[Segment]) -> dp_accounting.DpEvent:
    import dp_accounting

    parts = []
    for sigma, q, n in history:
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        # q = 1 is the plain Gaussian mechanism; dp_accounting composes it in closed form
        # (one Gaussian with sigma / sqrt(n)) instead of n discretised self-compositions.
        step = gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        parts.append(dp_accounting.SelfComposedDpEvent(step, n))
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)


_INTEGER_RDP_ORDERS = tuple(range(2, 64)) + (128, 256, 512, 1024)


def _rdp_epsilon(event: dp_accounting.DpEvent, delta: float, orders: Iterable[float] | None = None) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(orders=None if orders is None else list(orders))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=512)
def _epsilon(history: tuple[Segment, ...], delta: float, mechanism: str) -> float:
    """Epsilon of the composed history; math.inf where no finite bound can be trusted.

    inf is returned for a segment with sigma < MIN_ACCOUNTED_NOISE_MULTIPLIER (see there),
    and whenever dp_accounting fails numerically (ZeroDivisionError, OverflowError) or gives
    NaN: inf is always a valid upper bound, a wrong finite number never is.
    """
    if any(sigma < MIN_ACCOUNTED_NOISE_MULTIPLIER for sigma, _, n in history if n > 0):
        return math.inf
    try:
        eps = _epsilon_of_event(history, delta, mechanism)
    except (ZeroDivisionError, OverflowError, FloatingPointError):
        return math.inf
    return math.inf if math.isnan(eps) else eps


def _epsilon_of_event(history: tuple[Segment, ...], delta: float, mechanism: str) -> float:
    event = _dp_event(history)
    if mechanism == "rdp":
        return _rdp_epsilon(event, delta)
    # Cheap guard first (integer orders only: a slightly looser bound, no slow series for
    # fractional orders): a huge epsilon would need a huge PLD grid.
    if _rdp_epsilon(event, delta, _INTEGER_RDP_ORDERS) > _PLD_MAX_EPSILON:
        return _epsilon_of_event(history, delta, "rdp")
    # Adaptive PLD discretisation (see the comment at _PLD_FIRST_INTERVAL). The first
    # comparison is 4e-3 vs 1e-3, so the kept value is always at Δ <= 1e-3.
    interval = _PLD_FIRST_INTERVAL
    best = _pld_epsilon(event, delta, interval)
    while True:
        interval /= _PLD_REFINE_FACTOR
        finer = _pld_epsilon(event, delta, interval)
        converged = best - finer <= max(_PLD_REL_TOL * finer, _PLD_ABS_TOL)
        best = min(best, finer)  # both are pessimistic upper bounds: keep the tighter
        if converged or not math.isfinite(finer) or interval / _PLD_REFINE_FACTOR < _PLD_MIN_INTERVAL:
            return best
