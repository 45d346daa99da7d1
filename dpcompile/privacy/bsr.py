"""BSR: banded-square-root correlated noise (Kalinin & Lampert, NeurIPS 2024).

The matrix-factorization view of private training
-------------------------------------------------
Let X be the n×d matrix whose row t is the clipped gradient sum of step t (every
sample's contribution has L2 norm ≤ R). SGD with momentum β and multiplicative weight
decay α = 1 − λ (θ_t = α θ_{t−1} − η m_t, m_t = β m_{t−1} + x_t) moves the parameters by
−η (A X)_t, where A is the lower-triangular Toeplitz *workload* matrix with entries

    a_k = Σ_{i=0}^{k} α^{k−i} β^i,        generating function  a(x) = 1 / ((1 − αx)(1 − βx)).

A factorization A = B C gives the mechanism  B (C X + σR Z),  Z ~ N(0, I): the noise the
parameters see is σR·B Z. It is run by adding σR·W with W = C⁻¹Z to the gradients,
since A (X + σR C⁻¹Z) = B (C X + σR Z): the optimizer's output is post-processing of
the Gaussian release C X + σR Z. DP-SGD is C = I.

BSR takes C = the lower-triangular square root of A, banded to p diagonals. A lower-
triangular Toeplitz matrix is a power series in the shift, so sqrt(A) is Toeplitz with
generating function a(x)^{1/2} = (1 − αx)^{−1/2} (1 − βx)^{−1/2}, hence

    c_k = Σ_{i=0}^{k} α^{k−i} r_{k−i} β^i r_i,       r_j = binom(2j, j) / 4^j

(plain prefix sums, α = 1 and β = 0: c_k = r_k). All c_k are ≥ 0 and non-increasing in k
(checked where used). Banding keeps c_0..c_{p−1}; the noise of step t is then computed by
the recursion  w_t = (z_t − Σ_{j=1}^{p−1} c_j w_{t−j}) / c_0  over the last p − 1 noise
vectors (C w = z, row t), which needs (p − 1)·d floats of state.

Sensitivity (participation schema)
----------------------------------
The guarantee assumes *b-min-separation*: an example takes part in at most k steps, any
two of them at least b steps apart (the fixed-order cyclic batches of
`dpcompile.privacy.sampling.CyclicBatchSampler` with b batches per epoch: k = ⌈n/b⌉), and the
*zero-out* neighbouring relation of the matrix-factorization literature (one record's
gradient replaced by zero, so each participation moves one row of X by at most R). There is
no amplification by sampling. For a participation pattern π the change of C X has squared
norm Σ_{i,j∈π} (CᵀC)_{ij} ⟨u_i, u_j⟩ ≤ R² Σ_{i,j∈π} (CᵀC)_{ij} (all entries of CᵀC are
≥ 0). For a Toeplitz C with non-negative, non-increasing coefficients, (CᵀC)_{ij} (i ≤ j)
is non-increasing both in j (fewer terms) and in j − i, so the pattern 0, b, …, (k−1)b
maximizes every term at once:

    sens(C) = ‖ Σ_{l<k} C[:, l·b] ‖₂        (single participation, k = 1: ‖C[:, 0]‖₂).

Under replace-one adjacency every participation moves X by up to 2R: double the sensitivity.

Privacy: C X + σR Z is one Gaussian mechanism with L2 sensitivity R·sens(C), i.e. noise
multiplier σ / sens(C); ε(δ) of that mechanism is computed with dp-accounting (PLD or RDP).
After T steps only the first T rows have been released (C is lower-triangular), so ε is
that of the leading T×T block with k_T = min(k, ⌈T/b⌉): it grows as training proceeds.

Amplified banded MF (cyclic Poisson participation)
--------------------------------------------------
Choquette-Choo et al. (NeurIPS 2023, "Amplified banded matrix factorization") recover
amplification by sampling for a *banded* C: the N examples are split once, by a
data-independent random permutation, into b disjoint groups; step t uses group t mod b, each
of its examples included independently with probability q (Poisson). An example of group g
can only take part in steps g, g + b, g + 2b, …; if C has at most p ≤ b nonzero diagonals,
column t of C touches rows t..t+p−1 only, so the columns of one example's steps have
disjoint supports. Its influence on C X + σR Z then splits into at most k = ⌈T/b⌉
independent (adaptively chosen) pieces, each a Poisson-subsampled Gaussian mechanism with
rate q and L2 sensitivity R·‖C[:, t]‖₂ ≤ R·ζ, ζ = max_t ‖C[:, t]‖₂ = ‖(c_0..c_{p−1})‖₂. The
whole run is therefore (ε, δ)-DP as k self-composed PoissonSampled(q, Gaussian(σ/ζ))
steps (add/remove-one adjacency, as DP-SGD's accountant), which dp-accounting computes
(`amplified_dp_event`; dp-accounting 0.6 has no matrix-factorization event of its own).
p > b would let the columns overlap: refused. q = 1 is cyclic participation without
amplification and gives the same ε as `epsilon` above (√k·ζ is then sens(C)).

Error: the noise in the parameters is σR·B Z, B = A C⁻¹; the *expected factorization
error* reported here is sens(C)·‖B‖_F / √n (root-mean-squared over steps, per unit of the
Gaussian noise multiplier σ/sens: the quantity the BSR paper bounds), and
sens(C)·max_t ‖B_t‖₂ (the worst step).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import DPCompileError

__all__ = [
    "workload_coefficients", "central_binomial_ratios", "sqrt_coefficients", "sqrt_coefficients_exact",
    "toeplitz", "bsr_coefficients", "check_coefficients", "sensitivity", "max_participations",
    "factorization_error", "gaussian_epsilon", "calibrate_noise_multiplier", "epsilon",
    "optimize_banded_toeplitz", "CorrelatedNoise", "max_column_norm", "check_amplified", "amplified_dp_event",
    "amplified_epsilon", "calibrate_amplified_noise_multiplier", "expected_error", "MECHANISMS",
]

_MONOTONE_TOL = 1e-12  # relative slack for round-off in closed-form coefficients


# --- workload and its square root ---------------------------------------------------------
def _decay(momentum: float, weight_decay: float) -> tuple[float, float]:
    return 1.0 - float(weight_decay), float(momentum)


def workload_coefficients(n: int, momentum: float = 0.0, weight_decay: float = 0.0) -> np.ndarray:
    """First column of A: a_k = Σ_{i≤k} α^{k−i} β^i (α = 1 − weight_decay, β = momentum)."""
    alpha, beta = _decay(momentum, weight_decay)
    k = np.arange(n)
    return np.convolve(alpha ** k, beta ** k)[:n]


def central_binomial_ratios(n: int) -> np.ndarray:
    """r_j = binom(2j, j) / 4^j, the coefficients of (1 − x)^{−1/2} (stable recurrence)."""
    r = np.ones(n)
    for j in range(1, n):
        r[j] = r[j - 1] * (2 * j - 1) / (2 * j)
    return r


def sqrt_coefficients(n: int, momentum: float = 0.0, weight_decay: float = 0.0) -> np.ndarray:
    """First column of sqrt(A): c_k = Σ_i α^{k−i} r_{k−i} β^i r_i (closed form)."""
    alpha, beta = _decay(momentum, weight_decay)
    r, k = central_binomial_ratios(n), np.arange(n)
    return np.convolve(alpha ** k * r, beta ** k * r)[:n]


def sqrt_coefficients_exact(n: int, momentum: Any = 0, weight_decay: Any = 0) -> list:
    """The same coefficients as exact sympy numbers, from the series of a(x)^{1/2} (for checks)."""
    import sympy

    x = sympy.Symbol("x")
    alpha, beta = 1 - sympy.nsimplify(weight_decay), sympy.nsimplify(momentum)
    series = sympy.series(((1 - alpha * x) * (1 - beta * x)) ** sympy.Rational(-1, 2), x, 0, n).removeO()
    return [sympy.nsimplify(series.coeff(x, k)) for k in range(n)]


def toeplitz(coefficients: Sequence[float], n: int) -> np.ndarray:
    """n×n lower-triangular Toeplitz matrix with first column `coefficients` (zero-padded)."""
    c = np.zeros(n)
    m = min(n, len(coefficients))
    c[:m] = np.asarray(coefficients, dtype=float)[:m]
    t = np.arange(n)
    lag = t[:, None] - t[None, :]
    return np.where(lag >= 0, c[np.clip(lag, 0, n - 1)], 0.0)


def bsr_coefficients(bands: int, momentum: float = 0.0, weight_decay: float = 0.0) -> tuple[float, ...]:
    """c_0..c_{p−1} of the banded square root (c_0 = 1)."""
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise DPCompileError(f"dpcompile BSR: bands must be an int >= 1, got {bands!r}")
    return tuple(float(c) for c in sqrt_coefficients(bands, momentum, weight_decay))


def check_coefficients(coefficients: Sequence[float]) -> tuple[float, ...]:
    """Refuse coefficients the sensitivity formula does not cover (see the module docstring)."""
    c = tuple(float(v) for v in coefficients)
    if not c or not all(math.isfinite(v) for v in c) or c[0] <= 0:
        raise DPCompileError(f"dpcompile BSR: the factorization needs finite coefficients with c_0 > 0, got {c!r}")
    slack = _MONOTONE_TOL * c[0]
    if any(v < -slack for v in c) or any(b > a + slack for a, b in zip(c, c[1:])):
        raise DPCompileError(
            "dpcompile BSR: the sensitivity bound used here holds for non-negative, non-increasing Toeplitz "
            f"coefficients c_0 >= c_1 >= ... >= 0; got {c!r}. Use the closed-form BSR coefficients "
            "(bsr_bands / bsr_momentum / bsr_weight_decay) or optimize_banded_toeplitz.")
    return c


# --- sensitivity and accounting -----------------------------------------------------------
def max_participations(steps: int, min_separation: int = 1, cap: int | None = None) -> int:
    """Most steps one example can take part in among the first `steps`: ⌈steps/b⌉, at most `cap`."""
    k = -(-int(steps) // int(min_separation))
    return k if cap is None else min(k, int(cap))


def sensitivity(coefficients: Sequence[float], steps: int, min_separation: int = 1,
                participations: int | None = None) -> float:
    """sens(C) of the steps×steps banded Toeplitz C for b-min-separated participation.

    `participations` caps k (default ⌈steps/b⌉). Each participation may change a row of X
    by a vector of norm ≤ 1 (multiply by R for the gradient scale).
    """
    c = np.asarray(check_coefficients(coefficients))
    steps = int(steps)
    if steps < 1:
        return 0.0
    k = max_participations(steps, min_separation, participations)
    column_sum = np.zeros(steps)
    for start in range(0, k * min_separation, min_separation):
        part = c[:steps - start]
        column_sum[start:start + part.size] += part
    return float(np.linalg.norm(column_sum))


def gaussian_epsilon(noise_multiplier: float, delta: float, mechanism: str = "pld") -> float:
    """ε(δ) of one Gaussian mechanism with sensitivity 1 and noise std `noise_multiplier`."""
    from .accounting import _check_delta, _epsilon

    if noise_multiplier <= 0:
        return math.inf
    return _epsilon(((float(noise_multiplier), 1.0, 1),), _check_delta(delta), mechanism)


def epsilon(noise_multiplier: float, coefficients: Sequence[float], steps: int, delta: float,
            min_separation: int = 1, participations: int | None = None, mechanism: str = "pld") -> float:
    """ε after `steps` releases of C X + σR Z (σ = noise_multiplier)."""
    if steps <= 0:
        return 0.0
    sens = sensitivity(coefficients, steps, min_separation, participations)
    return gaussian_epsilon(noise_multiplier / sens, delta, mechanism)


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, coefficients: Sequence[float],
                               steps: int, min_separation: int = 1, participations: int | None = None,
                               mechanism: str = "pld") -> float:
    """σ with ε(σ) ≤ target over `steps` steps: σ = μ·sens(C), μ calibrated for one Gaussian."""
    from .accounting import calibrate_noise_multiplier as calibrate_gaussian

    mu = calibrate_gaussian(target_epsilon, target_delta, 1.0, 1, mechanism=mechanism)
    # A hair above μ·sens so that σ/sens does not round below the calibrated μ.
    return mu * sensitivity(coefficients, steps, min_separation, participations) * (1 + 1e-9)


# --- amplified banded MF: cyclic Poisson participation ------------------------------------
def max_column_norm(coefficients: Sequence[float], steps: int) -> float:
    """ζ = max_t ‖C[:, t]‖₂ of the steps×steps banded Toeplitz C: the first column's norm."""
    c = np.asarray(check_coefficients(coefficients))
    return float(np.linalg.norm(c[:max(1, min(c.size, int(steps)))]))


def check_amplified(coefficients: Sequence[float], groups: int, sample_rate: float) -> tuple[float, ...]:
    """Refuse settings the amplified analysis does not cover: p > b bands, q outside (0, 1]."""
    c = check_coefficients(coefficients)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise DPCompileError(f"dpcompile amplified BSR: the number of groups b must be an int >= 1, got {groups!r}")
    if len(c) > groups:
        raise DPCompileError(
            f"dpcompile amplified BSR: the factorization has {len(c)} bands but the data is split into only "
            f"{groups} groups; the amplified accounting needs bands <= groups (an example's steps are b apart, "
            "and only then do the columns of C it touches not overlap). Use bands <= groups or more groups")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise DPCompileError(f"dpcompile amplified BSR: the per-group Poisson rate q must be in (0, 1], got "
                             f"{sample_rate!r}")
    return c


def amplified_dp_event(noise_multiplier: float, coefficients: Sequence[float], steps: int, groups: int,
                       sample_rate: float):
    """The dp-accounting event of `steps` amplified banded releases: k = ⌈steps/b⌉ self-composed
    PoissonSampled(q, Gaussian(σ/ζ)) (a plain Gaussian at q = 1)."""
    from .accounting import _dp_event

    check_amplified(coefficients, groups, sample_rate)
    k = max_participations(steps, groups)
    return _dp_event([(noise_multiplier / max_column_norm(coefficients, steps), float(sample_rate), k)])


def amplified_epsilon(noise_multiplier: float, coefficients: Sequence[float], steps: int, delta: float,
                      groups: int, sample_rate: float, mechanism: str = "pld") -> float:
    """ε after `steps` releases of C X + σR Z under cyclic Poisson participation (b groups, rate q)."""
    from .accounting import _check_delta, _epsilon

    check_amplified(coefficients, groups, sample_rate)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    mu = noise_multiplier / max_column_norm(coefficients, steps)
    return _epsilon(((mu, float(sample_rate), max_participations(steps, groups)),), _check_delta(delta), mechanism)


def calibrate_amplified_noise_multiplier(target_epsilon: float, target_delta: float,
                                         coefficients: Sequence[float], steps: int, groups: int,
                                         sample_rate: float, mechanism: str = "pld") -> float:
    """σ with amplified ε(σ) ≤ target over `steps` steps: σ = μ·ζ, μ calibrated for ⌈steps/b⌉ rate-q steps."""
    from .accounting import calibrate_noise_multiplier as calibrate_gaussian

    check_amplified(coefficients, groups, sample_rate)
    mu = calibrate_gaussian(target_epsilon, target_delta, float(sample_rate), max_participations(steps, groups),
                            mechanism=mechanism)
    return mu * max_column_norm(coefficients, steps) * (1 + 1e-9)


# --- error of a factorization -------------------------------------------------------------
def _series_quotient(numerator: np.ndarray, coefficients: Sequence[float]) -> np.ndarray:
    """First column of A C⁻¹ (= series a(x)/c(x)) for Toeplitz A, C."""
    c = np.asarray(coefficients, dtype=float)
    out = np.zeros_like(numerator, dtype=float)
    for k in range(numerator.size):
        m = min(k, c.size - 1)
        out[k] = (numerator[k] - np.dot(c[1:m + 1], out[k - m:k][::-1])) / c[0]
    return out


def _noise_shape(coefficients: Sequence[float], steps: int, momentum: float,
                 weight_decay: float) -> tuple[float, float]:
    """(‖A C⁻¹‖_F/√n, max_t ‖(A C⁻¹)_t‖₂): the error per unit of noise std added to C X."""
    b = _series_quotient(workload_coefficients(steps, momentum, weight_decay), coefficients)
    frob_sq = float(np.sum((steps - np.arange(steps)) * b ** 2))  # b_k appears on n − k diagonals
    return math.sqrt(frob_sq / steps), float(np.sqrt(np.sum(b ** 2)))  # the last row is the longest


def factorization_error(coefficients: Sequence[float], steps: int, momentum: float = 0.0,
                        weight_decay: float = 0.0, min_separation: int = 1,
                        participations: int | None = None) -> dict[str, float]:
    """Expected error of A = (A C⁻¹) C per unit Gaussian noise multiplier (σ/sens = 1).

    rmse = sens(C)·‖A C⁻¹‖_F/√n and max = sens(C)·max_t ‖(A C⁻¹)_t‖₂. Multiply by σ/sens
    (the calibrated Gaussian multiplier μ) and R for the noise std the parameters see.
    """
    rmse, worst = _noise_shape(coefficients, steps, momentum, weight_decay)
    sens = sensitivity(coefficients, steps, min_separation, participations)
    return {"sensitivity": sens, "rmse": sens * rmse, "max": sens * worst}


MECHANISMS = ("dpsgd", "bsr", "amplified")


def expected_error(mechanism: str, target_epsilon: float, target_delta: float, steps: int, *,
                   coefficients: Sequence[float] = (1.0,), groups: int = 1, sample_rate: float = 1.0,
                   momentum: float = 0.0, weight_decay: float = 0.0, accountant: str = "pld") -> dict[str, float]:
    """Expected error of a mechanism at equal (ε, δ) over `steps` steps, per unit clipping bound R.

    The noise the parameters see is σR·A C⁻¹ Z for the workload A (prefix sums by default;
    SGD momentum β and decay λ otherwise); this returns σ and
    rmse = σ·‖A C⁻¹‖_F/√n (root of the mean squared error over steps) and max = σ·max_t ‖(A C⁻¹)_t‖₂
    (root of the worst step's squared error), with σ calibrated for the mechanism's accounting:

    * "dpsgd": C = I, Poisson rate `sample_rate` every step (`coefficients` ignored);
    * "bsr": banded Toeplitz C, `groups` = b-min-separation (cyclic batches), no amplification;
    * "amplified": banded Toeplitz C, b = `groups` groups, Poisson rate `sample_rate` within one.
    """
    if mechanism == "dpsgd":
        from .accounting import calibrate_noise_multiplier as calibrate_gaussian

        coefficients = (1.0,)
        sigma = calibrate_gaussian(target_epsilon, target_delta, float(sample_rate), steps, mechanism=accountant)
    elif mechanism == "bsr":
        sigma = calibrate_noise_multiplier(target_epsilon, target_delta, coefficients, steps, groups,
                                           mechanism=accountant)
    elif mechanism == "amplified":
        sigma = calibrate_amplified_noise_multiplier(target_epsilon, target_delta, coefficients, steps, groups,
                                                     sample_rate, mechanism=accountant)
    else:
        raise DPCompileError(f"dpcompile.privacy.bsr.expected_error: mechanism must be one of {MECHANISMS}, got "
                             f"{mechanism!r}")
    rmse, worst = _noise_shape(coefficients, steps, momentum, weight_decay)
    return {"sigma": sigma, "rmse": sigma * rmse, "max": sigma * worst}


def optimize_banded_toeplitz(bands: int, steps: int, momentum: float = 0.0, weight_decay: float = 0.0,
                             min_separation: int = 1, participations: int | None = None,
                             iterations: int = 100) -> tuple[float, ...]:
    """Banded Toeplitz coefficients that minimize the rmse of `factorization_error` numerically.

    Parameterized as c_0 = 1, c_j = c_{j−1}·sigmoid(θ_j), so every candidate stays
    non-negative and non-increasing (the sensitivity formula holds throughout); starts at BSR.
    """
    start = np.asarray(bsr_coefficients(bands, momentum, weight_decay))
    if bands == 1:
        return (1.0,)
    ratios = np.clip(start[1:] / start[:-1], 1e-6, 1 - 1e-6)
    theta = torch.tensor(np.log(ratios / (1 - ratios)), dtype=torch.float64, requires_grad=True)
    a = torch.tensor(workload_coefficients(steps, momentum, weight_decay), dtype=torch.float64)
    k = max_participations(steps, min_separation, participations)
    lag = torch.arange(steps)[:, None] - torch.arange(steps)[None, :]
    index = torch.where((lag >= 0) & (lag < bands), lag, torch.full_like(lag, bands))
    pattern = torch.zeros(steps, dtype=torch.float64)
    pattern[torch.arange(0, k * min_separation, min_separation)] = 1.0
    A = torch.cat([a, a.new_zeros(1)])[torch.where(lag >= 0, lag, torch.full_like(lag, steps))]

    def coefficients() -> torch.Tensor:
        return torch.cat([theta.new_ones(1), torch.cumprod(torch.sigmoid(theta), 0)])

    def objective() -> torch.Tensor:
        C = torch.cat([coefficients(), theta.new_zeros(1)])[index]
        B = torch.linalg.solve_triangular(C, A, upper=False, left=False)  # B C = A
        return torch.log((B ** 2).sum()) + torch.log(((C @ pattern) ** 2).sum())

    optimizer = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    return check_coefficients(coefficients().detach().tolist())


# --- runtime: the correlated noise stream -------------------------------------------------
class CorrelatedNoise:
    """Per-stream recursion w_t = (z_t − Σ_{j≥1} c_j w_{t−j}) / c_0 over released steps.

    Each stream (one compiled graph's flat noise vector) keeps its last p − 1 noise vectors
    and the step of the newest. Asking again at the same step returns the same vector (one
    draw per logical step); a stream that missed steps first computes the skipped w's (the
    z's are a pure function of (seed, step, stream)), so its noise stays C⁻¹Z over every
    step. A stream first seen at step s > 0 starts its recursion there: its coordinates had
    no release on this stream before s, i.e. zero rows of X, and the principal submatrix of C
    from s on is the same Toeplitz matrix, so this is the factorization itself with the
    pure-noise rows before s dropped (post-processing).
    """

    def __init__(self, coefficients: Sequence[float]) -> None:
        self.coefficients = check_coefficients(coefficients)
        self.streams: dict[str, dict[str, Any]] = {}

    def draw(self, stream: str, numel: int, device: torch.device, step: int,
             gaussian: Callable[[str, int, int, torch.device], torch.Tensor]) -> torch.Tensor:
        """w_step of `stream`; gaussian(stream, step, numel, device) gives the step's N(0, I) z."""
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = {"step": step - 1, "numel": numel, "history": []}
        if state["numel"] != numel:
            raise DPCompileError(
                f"dpcompile BSR: noise stream {stream!r} had {state['numel']} coordinates and now asks for {numel}; "
                "the correlated noise of a graph cannot change size (the set of trained parameters changed?). "
                "Keep the parameters of a compiled model fixed, or start a new run.")
        if step < state["step"]:
            raise DPCompileError(
                f"dpcompile BSR: noise stream {stream!r} is at step {state['step']} but step {step} was asked for; "
                "restore the privacy state and the buffers from the same checkpoint")
        history = state["history"] = [h.to(device) for h in state["history"]]
        while state["step"] < step:
            state["step"] += 1
            history.append(self._next(gaussian(stream, state["step"], numel, device), history))
            del history[:-max(1, len(self.coefficients) - 1)]
        return history[-1]

    def _next(self, z: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        c = self.coefficients
        w = z.clone()
        for j, previous in enumerate(reversed(history[-(len(c) - 1):] if len(c) > 1 else []), start=1):
            w.sub_(previous, alpha=c[j])
        return w.div_(c[0])

    def state_dict(self) -> dict[str, Any]:
        return {"coefficients": list(self.coefficients),
                "streams": {name: {"step": s["step"], "numel": s["numel"],
                                   "history": [h.detach().cpu().clone() for h in s["history"]]}
                            for name, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = tuple(float(c) for c in state["coefficients"])
        if saved != self.coefficients:
            raise DPCompileError(
                f"dpcompile BSR: checkpoint was made with factorization coefficients {saved} but this model uses "
                f"{self.coefficients}; resume with the same bsr_* options")
        self.streams = {name: {"step": int(s["step"]), "numel": int(s["numel"]),
                               "history": [h.clone() for h in s["history"]]}
                        for name, s in state["streams"].items()}
