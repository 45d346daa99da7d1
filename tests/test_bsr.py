"""BSR correlated noise: coefficients, recursion, noise statistics, sensitivity, accounting,
the compiled runtime (clipping + C⁻¹Z noise), checkpoint kill/resume, refusals."""
from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
import scipy.linalg
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile import DPCompileError
from dpcompile.privacy import bsr
from dpcompile.privacy.sampling import CyclicBatchSampler, poisson_loader
from dpcompile.options import DPOptions
from dpcompile.privacy.state import PrivacyState, stream_seed
from models import MLP, BreakNet, batch_loss, oracle_clipped_sum

WORKLOADS = [(0.0, 0.0), (0.9, 0.0), (0.5, 0.1), (0.3, 0.3)]  # (momentum β, weight decay λ)


# --- coefficients -----------------------------------------------------------------------
def test_prefix_sum_coefficients_are_central_binomials():
    c = bsr.sqrt_coefficients(30)
    assert np.allclose(c, [math.comb(2 * k, k) / 4**k for k in range(30)], rtol=1e-13, atol=0)


@pytest.mark.parametrize("momentum, weight_decay", [("0", "0"), ("9/10", "0"), ("1/2", "1/10"), ("1/3", "2/3")])
def test_closed_form_matches_the_exact_series(momentum, weight_decay):
    exact = bsr.sqrt_coefficients_exact(12, sympy.Rational(momentum), sympy.Rational(weight_decay))
    closed = bsr.sqrt_coefficients(12, float(sympy.Rational(momentum)), float(sympy.Rational(weight_decay)))
    assert np.allclose(closed, [float(v) for v in exact], rtol=1e-12, atol=0)


@pytest.mark.parametrize("momentum, weight_decay", WORKLOADS)
def test_square_root_squares_to_the_workload_and_matches_sqrtm(momentum, weight_decay):
    n = 24
    A = bsr.toeplitz(bsr.workload_coefficients(n, momentum, weight_decay), n)
    C = bsr.toeplitz(bsr.sqrt_coefficients(n, momentum, weight_decay), n)
    assert np.allclose(C @ C, A, rtol=0, atol=1e-12)
    assert np.allclose(scipy.linalg.sqrtm(A).real, C, rtol=0, atol=1e-9)


@pytest.mark.parametrize("momentum, weight_decay", WORKLOADS)
def test_workload_is_what_sgd_with_momentum_and_decay_does_to_the_gradients(momentum, weight_decay):
    n, rng = 15, np.random.default_rng(0)
    x = rng.normal(size=n)
    theta, m, trajectory = 0.0, 0.0, []
    for t in range(n):  # m_t = β m_{t-1} + x_t ; θ_t = (1 − λ) θ_{t-1} − m_t
        m = momentum * m + x[t]
        theta = (1 - weight_decay) * theta - m
        trajectory.append(theta)
    A = bsr.toeplitz(bsr.workload_coefficients(n, momentum, weight_decay), n)
    assert np.allclose(trajectory, -A @ x, rtol=1e-12, atol=1e-12)


def test_banding_keeps_the_first_p_coefficients():
    full = bsr.sqrt_coefficients(40, 0.9, 0.01)
    banded = bsr.bsr_coefficients(5, 0.9, 0.01)
    assert np.allclose(banded, full[:5], rtol=1e-15)
    C = bsr.toeplitz(banded, 10)
    assert np.all(np.tril(C, -5) == 0) and np.all(np.diag(C, -4) == banded[4])
    assert all(a >= b >= 0 for a, b in zip(banded, banded[1:]))  # what the sensitivity proof needs


# --- the noise recursion ------------------------------------------------------------------
def run_stream(coefficients, z, start=0):
    noise = bsr.CorrelatedNoise(coefficients)
    draws = [noise.draw("s", z.shape[1], torch.device("cpu"), t, lambda _s, step, _n, _d: z[step].clone())
             for t in range(start, z.shape[0])]
    return torch.stack(draws)


@pytest.mark.parametrize("bands", [1, 2, 5, 20])
def test_recursion_solves_c_w_equals_z(bands):
    z = torch.randn(20, 300, generator=torch.Generator().manual_seed(0))
    coefficients = bsr.bsr_coefficients(bands, 0.9, 0.0)
    w = run_stream(coefficients, z)
    want = np.linalg.solve(bsr.toeplitz(coefficients, 20), z.double().numpy())
    assert np.allclose(w.double().numpy(), want, rtol=0, atol=2e-5 * np.abs(want).max())
    if bands == 1:
        assert torch.equal(w, z)  # p = 1, c_0 = 1: exactly DP-SGD's noise


def bsr_state(bands=4, momentum=0.0, seed=3, **options):
    opts = {"noise_mechanism": "bsr", "bsr_bands": bands, "bsr_momentum": momentum, "bsr_min_separation": 5,
            "noise_multiplier": 1.0, "insecure_seed": seed, **options}
    return PrivacyState(DPOptions.from_dict(opts))


def runtime_noise(state, steps, numel, stream="s"):
    out = []
    for _ in range(steps):
        out.append(state.noise(stream, numel, torch.device("cpu")).clone())
        state.record_release()
    return torch.stack(out)


def test_runtime_noise_covariance_is_c_inverse_c_inverse_transpose():
    """Each coordinate's T-vector of noise is one draw of C⁻¹z: compare its covariance entrywise."""
    T, m = 10, 40000
    state = bsr_state(bands=4, momentum=0.9)
    W = runtime_noise(state, T, m).double().numpy()
    C_inv = np.linalg.inv(bsr.toeplitz(state.bsr.coefficients, T))
    want = C_inv @ C_inv.T
    got = W @ W.T / m
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / m)  # std error of each entry
    assert np.abs((got - want) / se).max() < 5.0
    assert np.abs((np.eye(T) - want) / se).max() > 50  # independent noise would fail: the test has power
    white = bsr.toeplitz(state.bsr.coefficients, T) @ W  # C w = z: i.i.d. N(0, 1) again
    assert stats.kstest(white.ravel()[::7], "norm").pvalue > 1e-4
    assert abs(np.corrcoef(white[3], white[4])[0, 1]) < 5 / math.sqrt(m)


def test_noise_advances_once_per_release_and_skips_micro_steps():
    reference = runtime_noise(bsr_state(), 4, 50)
    state = bsr_state()
    cpu = torch.device("cpu")
    got = []
    for t in range(4):
        state.release_next = False  # a gradient-accumulation micro-step: zeros, buffers untouched
        assert torch.count_nonzero(state.noise("s", 50, cpu)) == 0
        state.release_next = True
        first = state.noise("s", 50, cpu)
        assert torch.equal(state.noise("s", 50, cpu), first)  # asked twice at one step: same vector
        got.append(first.clone())
        state.record_release()
    assert torch.equal(torch.stack(got), reference)


def test_a_stream_that_skips_steps_catches_up_deterministically():
    reference = runtime_noise(bsr_state(), 6, 30)
    state = bsr_state()
    runtime_noise(state, 2, 30)
    state.record_release(3)  # steps 2..4 released without this stream (another graph ran)
    assert torch.equal(state.noise("s", 30, torch.device("cpu")), reference[5])


# --- sensitivity and accounting -----------------------------------------------------------
def brute_force_sensitivity(coefficients, n, b, k):
    """max over every b-separated pattern of ≤ k steps of ‖C Σ_{i∈π} e_i‖ (CᵀC ≥ 0: aligned rows worst)."""
    G = bsr.toeplitz(coefficients, n).T @ bsr.toeplitz(coefficients, n)
    assert (G >= 0).all()
    best = 0.0
    for size in range(1, k + 1):
        for pattern in itertools.combinations(range(n), size):
            if all(j - i >= b for i, j in zip(pattern, pattern[1:])):
                best = max(best, G[np.ix_(pattern, pattern)].sum())
    return math.sqrt(best)


@pytest.mark.parametrize("bands", [1, 3, 10])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sensitivity_matches_brute_force_over_participation_patterns(bands, momentum):
    n = 10
    coefficients = bsr.bsr_coefficients(bands, momentum, 0.05)
    for b, k in [(1, 1), (1, 3), (2, 2), (3, 4), (4, 3), (10, 2)]:
        want = brute_force_sensitivity(coefficients, n, b, k)
        assert bsr.sensitivity(coefficients, n, b, k) == pytest.approx(want, rel=1e-12)
    # default k = ⌈n/b⌉: every pattern the cyclic schema can produce
    assert bsr.sensitivity(coefficients, n, 3) == pytest.approx(brute_force_sensitivity(coefficients, n, 3, 4))


def test_cyclic_sampler_participation_is_b_separated():
    sampler = CyclicBatchSampler(23, 5, torch.Generator().manual_seed(0))
    steps = {}
    for t in range(17):
        for i in sampler.batch(t):
            steps.setdefault(i, []).append(t)
    assert sorted(steps) == list(range(23))  # a partition: everyone takes part
    assert all(b - a == 5 for s in steps.values() for a, b in zip(s, s[1:]))
    assert max(len(s) for s in steps.values()) == bsr.max_participations(17, 5)
    assert sorted(len(b) for b in sampler.batches) == [4, 4, 5, 5, 5]


def test_non_monotone_coefficients_are_refused():
    with pytest.raises(DPCompileError, match="non-increasing"):
        bsr.sensitivity([1.0, 0.2, 0.5], 6, 2)
    with pytest.raises(DPCompileError, match="non-increasing"):
        bsr_state(bands=None, bsr_coefficients=[1.0, -0.1])


@pytest.mark.parametrize("k", [1, 4])
def test_dpsgd_special_case_matches_dp_accounting(k):
    """C = I (one band) without sampling: k participations = k composed Gaussian mechanisms."""
    sigma, delta, b = 2.0, 1e-5, 3
    steps = (k - 1) * b + 1
    assert bsr.sensitivity((1.0,), steps, b) == pytest.approx(math.sqrt(k))
    got = bsr.epsilon(sigma, (1.0,), steps, delta, b)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), k)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
    assert got == pytest.approx(pld, rel=0.01) and got < rdp
    # tight for the Gaussian mechanism (Balle & Wang): δ(ε) at the reported ε is just below δ
    mu = math.sqrt(k) / sigma

    def exact_delta(eps):
        return stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu)

    assert exact_delta(got) <= delta < exact_delta(0.98 * got)


def test_calibration_reaches_the_target_and_epsilon_grows_with_participations():
    coefficients = bsr.bsr_coefficients(6, 0.9)
    sigma = bsr.calibrate_noise_multiplier(3.0, 1e-5, coefficients, 60, 12)
    assert 2.9 < bsr.epsilon(sigma, coefficients, 60, 1e-5, 12) <= 3.0
    eps = [bsr.epsilon(sigma, coefficients, t, 1e-5, 12) for t in (1, 12, 13, 30, 60)]
    assert eps[0] < eps[1] < eps[2] < eps[3] < eps[4]


def test_factorization_error_matches_dense_linear_algebra():
    n, b, coefficients = 40, 8, bsr.bsr_coefficients(6, 0.9)
    A = bsr.toeplitz(bsr.workload_coefficients(n, 0.9), n)
    B = A @ np.linalg.inv(bsr.toeplitz(coefficients, n))
    sens = bsr.sensitivity(coefficients, n, b)
    err = bsr.factorization_error(coefficients, n, 0.9, 0.0, b)
    assert err["rmse"] == pytest.approx(sens * np.linalg.norm(B) / math.sqrt(n), rel=1e-10)
    assert err["max"] == pytest.approx(sens * np.linalg.norm(B, axis=1).max(), rel=1e-10)
    dpsgd = bsr.factorization_error((1.0,), n, 0.9, 0.0, b)
    assert err["rmse"] < 0.6 * dpsgd["rmse"]  # correlated noise cancels in the prefix sums


def test_optimized_banded_toeplitz_is_valid_and_no_worse_than_bsr():
    args = dict(steps=48, momentum=0.9, min_separation=8)
    optimized = bsr.optimize_banded_toeplitz(4, iterations=30, **args)
    assert all(a >= b >= 0 for a, b in zip(optimized, optimized[1:]))
    base = bsr.factorization_error(bsr.bsr_coefficients(4, 0.9), **args)["rmse"]
    assert bsr.factorization_error(optimized, **args)["rmse"] <= base * (1 + 1e-9)


# --- the compiled runtime -----------------------------------------------------------------
SIGMA, R, EBS = 1.7, 0.05, 4.0


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def expected_noise(state, numel, steps, stream):
    """w_0..w_{steps-1} from an independent float64 solve of C W = Z, Z drawn from the seed."""
    Z = np.stack([torch.randn(numel, generator=torch.Generator().manual_seed(
        stream_seed(state.seed, t, stream))).double().numpy() for t in range(steps)])
    return np.linalg.solve(bsr.toeplitz(state.bsr.coefficients, steps), Z)


def ordered_by_graph(model, ctx, vector):
    """A flat vector in model.parameters() order from the graph's noise layout."""
    by_name = {ctx.param_names[pos]: vector[off:off + n] for pos, (off, n) in ctx.plan["noise_slices"].items()}
    return np.concatenate([by_name[name] for name, _ in model.named_parameters()])


def test_compiled_bsr_clips_like_the_oracle_and_adds_c_inverse_noise():
    torch.manual_seed(0)
    model = MLP()
    x, y = MLP.batch(6)
    opts = {"noise_mechanism": "bsr", "bsr_bands": 3, "bsr_momentum": 0.9, "bsr_min_separation": 2,
            "max_grad_norm": R, "noise_multiplier": SIGMA, "expected_batch_size": EBS, "insecure_seed": 11}
    compiled = torch.compile(model, backend="dp", options=opts)
    dpcompile.privacy_state(model).cyclic_batches_verified = True  # the test vouches for the schema
    clipped, norms = oracle_clipped_sum(model, x, y, R)
    assert (norms > R).all()
    clean = torch.cat([clipped[name].flatten() for name, _ in model.named_parameters()]) / EBS
    got = []
    for _ in range(4):  # same weights (no optimizer step): the clipped part is the same every step
        model.zero_grad(set_to_none=True)
        batch_loss(compiled(x), y).backward()
        got.append(flat_grads(model))
    state = dpcompile.privacy_state(model)
    ctx = state.compiled[-1]
    W = expected_noise(state, ctx.plan["noise_numel"], 4, ctx.noise_key)
    for t in range(4):
        want = clean.numpy() + SIGMA * R * ordered_by_graph(model, ctx, W[t]) / EBS
        assert np.abs(got[t].numpy() - want).max() < 1e-5 * np.abs(want).max()
    assert state.steps == 4
    sens = brute_force_sensitivity(state.bsr.coefficients, 4, 2, 2)
    want_eps = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dp_accounting.GaussianDpEvent(SIGMA / sens)).get_epsilon(1e-5)
    assert dpcompile.privacy_spent(model, 1e-5) == pytest.approx(want_eps, rel=0.01)


def test_graph_break_path_uses_the_same_correlated_noise():
    torch.manual_seed(1)
    model = BreakNet()
    x, y = BreakNet.batch(5)
    opts = {"noise_mechanism": "bsr", "bsr_bands": 2, "bsr_max_participations": 1,
            "max_grad_norm": R, "noise_multiplier": SIGMA, "expected_batch_size": EBS, "insecure_seed": 5}
    compiled = torch.compile(model, backend="dp", options=opts)
    dpcompile.privacy_state(model).cyclic_batches_verified = True  # the test vouches for the schema
    clipped, _ = oracle_clipped_sum(model, x, y, R)
    got = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        batch_loss(compiled(x), y).backward()
        got.append({n: p.grad.double() * EBS - clipped[n] for n, p in model.named_parameters()})
    state = dpcompile.privacy_state(model)
    assert all(ctx.deferred for ctx in state.compiled) and state.steps == 3
    names = [ctx.param_names[pos] for ctx in sorted(state.compiled, key=lambda c: c.noise_key)
             for pos in ctx.plan["deferred_positions"]]
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    W = expected_noise(state, sum(sizes), 3, "deferred")
    for t in range(3):
        want = np.split(SIGMA * R * W[t], np.cumsum(sizes)[:-1])
        for name, w in zip(names, want):
            assert np.abs(got[t][name].flatten().numpy() - w).max() < 1e-5 * np.abs(w).max()


# --- make_private: cyclic loader, accumulation, checkpoint kill/resume ----------------------
def dataset(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    return TensorDataset(X, (X @ torch.randn(8, 3, generator=g)).argmax(1))


def private_run(seed=4, physical=None, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    options = dict(target_epsilon=3.0, epochs=3, max_grad_norm=1.0, insecure_seed=seed, noise_mechanism="bsr", bands=4,
                   max_physical_batch_size=physical, **kwargs)
    return (net, *dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=12), **options))


def train(net, model, opt, loader, stop_at=None):
    """Train until the privacy state reaches `stop_at` steps (None: one pass); params after every release."""
    trajectory = []
    state = dpcompile.privacy_state(net)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if state.last_backward_released:
            trajectory.append([p.detach().clone() for p in net.parameters()])
            if state.steps == stop_at:
                break
    return trajectory


def test_make_private_bsr_calibrates_and_accounts_the_cyclic_schema():
    net, model, opt, loader = private_run()
    state = dpcompile.privacy_state(net)
    assert state.options.bsr_min_separation == 5 and state.options.bsr_momentum == 0.9
    assert state.options.sample_rate is None and len(loader) == 5
    for _ in range(3):
        train(net, model, opt, loader)
    assert state.steps == 15
    eps = dpcompile.privacy_spent(net, 1e-5)
    assert 2.9 < eps <= 3.0
    sens = bsr.sensitivity(state.bsr.coefficients, 15, 5)
    assert eps == bsr.gaussian_epsilon(state.options.noise_multiplier / sens, 1e-5)


def test_micro_batches_release_the_same_gradients():
    results = []
    for physical in (None, 5):
        torch._dynamo.reset()
        net, model, opt, loader = private_run(physical=physical)
        results.append(train(net, model, opt, loader))
    assert len(results[0]) == len(results[1]) == 5
    for a, b in zip(*results):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    net, model, opt, loader = private_run()
    uninterrupted = []
    for _ in range(3):
        uninterrupted += train(net, model, opt, loader)
    eps = dpcompile.privacy_spent(net, 1e-5)

    torch._dynamo.reset()
    net, model, opt, loader = private_run()
    train(net, model, opt, loader)
    train(net, model, opt, loader, stop_at=7)  # killed mid-epoch 2 (5 batches an epoch)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    secret = dpcompile.privacy_state(net).secret_state_dict()  # seed and noise history: saved apart
    torch.save(secret, tmp_path / "secret.pt")
    assert "seed" not in repr(opt.state_dict()["privacy"])
    del net, model, opt, loader  # "killed"
    torch._dynamo.reset()

    net, model, opt, loader = private_run(seed=999)  # a new process: another seed until the checkpoint loads
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    net.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    with pytest.raises(dpcompile.DPCompileError, match="secret part"):  # the noise history is still missing
        train(net, model, opt, loader)
    assert all(p.grad is None for p in net.parameters())
    dpcompile.privacy_state(net).load_secret_state_dict(torch.load(tmp_path / "secret.pt", weights_only=False))
    assert len(loader) == 3  # the rest of epoch 2
    resumed = train(net, model, opt, loader) + train(net, model, opt, loader)
    assert len(resumed) == 8
    for a, b in zip(uninterrupted[7:], resumed):
        assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    assert dpcompile.privacy_spent(net, 1e-5) == eps


# --- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"noise_mechanism": "bsr", "bsr_bands": 4, "bsr_min_separation": 3, "sample_rate": 0.1}, "Poisson"),
    ({"noise_mechanism": "bsr", "bsr_bands": 4}, "participation schema"),
    ({"noise_mechanism": "bsr", "bsr_min_separation": 3}, "exactly one of bsr_bands"),
    ({"bsr_bands": 4}, "only apply with noise_mechanism='bsr'"),
    ({"noise_mechanism": "bsr", "bsr_bands": 4, "bsr_min_separation": 3, "bsr_momentum": 1.0}, "bsr_momentum"),
    ({"noise_mechanism": "laplace"}, "noise_mechanism must be one of"),
])
def test_invalid_bsr_options_are_refused(options, message):
    with pytest.raises(DPCompileError, match=message):
        DPOptions.from_dict(options)


def test_plain_api_bsr_is_refused_before_any_release():
    """torch.compile cannot see whether the batches are cyclic: BSR goes through make_private."""
    model = MLP()
    x, y = MLP.batch(6)
    opts = {"noise_mechanism": "bsr", "bsr_bands": 3, "bsr_min_separation": 2, "max_grad_norm": R,
            "noise_multiplier": SIGMA, "expected_batch_size": EBS}
    with pytest.raises(dpcompile.DPCompileError, match="make_private"):
        batch_loss(torch.compile(model, backend="dp", options=opts)(x), y).backward()
    assert all(p.grad is None for p in model.parameters()) and dpcompile.privacy_state(model).steps == 0


def test_make_private_refuses_poisson_loaders_and_missing_bands():
    net = nn.Linear(8, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(DPCompileError, match="Poisson"):
        dpcompile.make_private(net, opt, poisson_loader(DataLoader(dataset(), batch_size=12)), noise_multiplier=1.0,
                               noise_mechanism="bsr", bands=4)
    with pytest.raises(DPCompileError, match="bands=p"):
        dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=12), noise_multiplier=1.0,
                               noise_mechanism="bsr")
    with pytest.raises(DPCompileError, match="set from the data loader"):
        dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=12), noise_multiplier=1.0,
                               noise_mechanism="bsr", bands=4, bsr_min_separation=1)


def test_loader_refuses_a_batch_without_release():
    net, model, opt, loader = private_run()
    batches = iter(loader)
    next(batches)  # no backward: the step was not released
    with pytest.raises(DPCompileError, match="expected step 1"):
        next(batches)


def test_resume_with_other_factorization_or_shape_is_refused():
    state = bsr_state(bands=4)
    runtime_noise(state, 2, 10)
    saved = state.state_dict()
    with pytest.raises(DPCompileError, match="coefficients"):
        bsr_state(bands=5).load_state_dict(saved)
    with pytest.raises(DPCompileError, match="bsr_min_separation"):
        bsr_state(bands=4, bsr_min_separation=6).load_state_dict(saved)
    with pytest.raises(DPCompileError, match="cannot change size"):
        state.noise("s", 11, torch.device("cpu"))
