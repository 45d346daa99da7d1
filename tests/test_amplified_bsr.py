"""Amplified banded matrix factorization (cyclic Poisson participation): accounting against dp-accounting,
an independent numpy RDP and a direct Monte Carlo of the banded mechanism; the cyclic Poisson
sampler; the compiled runtime's C⁻¹Z noise through make_private; expected errors; refusals."""
from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from scipy.special import gammaln, logsumexp
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile import DPCompileError
from dpcompile.privacy import bsr
from dpcompile.privacy.sampling import CyclicPoissonBatchSampler, poisson_loader
from dpcompile.engine import CyclicDPDataLoader
from dpcompile.tools.inspection import format_privacy, report_of
from dpcompile.options import DPOptions
from models import MLP, batch_loss, oracle_clipped_sum
from test_bsr import expected_noise, ordered_by_graph

INTEGER_ORDERS = list(range(2, 65))


def pld_epsilon(event, delta=1e-5):
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)


# --- accounting ---------------------------------------------------------------------------
@pytest.mark.parametrize("bands, groups, q, steps", [(1, 1, 0.05, 30), (4, 4, 0.2, 40), (3, 5, 0.5, 23)])
def test_accounting_is_k_poisson_gaussians_at_the_column_norm(bands, groups, q, steps):
    c = bsr.bsr_coefficients(bands, 0.9)
    sigma = 2.5
    k = math.ceil(steps / groups)
    zeta = math.sqrt(sum(v * v for v in c))
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma / zeta)), k)
    assert bsr.amplified_epsilon(sigma, c, steps, 1e-5, groups, q) == pytest.approx(pld_epsilon(event), rel=0.01)
    got = bsr.amplified_dp_event(sigma, c, steps, groups, q)
    step = got.event if groups != steps else got
    assert got.count == k and step.sampling_probability == q
    assert step.event.noise_multiplier == pytest.approx(sigma / zeta, rel=1e-12)


def numpy_subsampled_gaussian_rdp(q: float, mu: float, orders: list[int]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian (rate q, multiplier mu) at integer orders a:
    log(Σ_i binom(a, i) (1−q)^(a−i) q^i exp((i² − i) / (2 mu²))) / (a − 1)."""
    out = []
    for a in orders:
        i = np.arange(a + 1)
        log_terms = (gammaln(a + 1) - gammaln(i + 1) - gammaln(a - i + 1) + (a - i) * math.log1p(-q)
                     + i * math.log(q) + (i * i - i) / (2 * mu * mu))
        out.append(logsumexp(log_terms) / (a - 1))
    return np.array(out)


def numpy_rdp_to_epsilon(rdp: np.ndarray, orders: list[int], delta: float) -> float:
    """ε = min_a rdp_a + log(1 − 1/a) − log(δ a)/(a − 1) (the conversion dp-accounting uses)."""
    a = np.array(orders, dtype=float)
    return float(np.min(rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)))


@pytest.mark.parametrize("q, sigma, steps, groups", [(0.1, 3.0, 60, 4), (0.3, 5.0, 21, 7)])
def test_rdp_matches_an_independent_numpy_computation(q, sigma, steps, groups):
    c = bsr.bsr_coefficients(groups)
    mu = sigma / np.linalg.norm(c)
    k = math.ceil(steps / groups)
    direct = numpy_rdp_to_epsilon(k * numpy_subsampled_gaussian_rdp(q, mu, INTEGER_ORDERS), INTEGER_ORDERS, 1e-5)
    accountant = dp_accounting.rdp.RdpAccountant(orders=INTEGER_ORDERS)
    accountant.compose(bsr.amplified_dp_event(sigma, c, steps, groups, q))
    assert accountant.get_epsilon(1e-5) == pytest.approx(direct, rel=1e-9)
    rdp = bsr.amplified_epsilon(sigma, c, steps, 1e-5, groups, q, mechanism="rdp")  # more orders: as tight or tighter
    assert direct * 0.9 < rdp <= direct * (1 + 1e-9)
    assert bsr.amplified_epsilon(sigma, c, steps, 1e-5, groups, q) <= rdp  # PLD is tighter than RDP


def monte_carlo_delta(C: np.ndarray, steps_of_example: list[int], q: float, sigma: float, eps: float,
                      n: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """δ(ε) of the full T-dimensional release C X + σZ for one example (unit gradient) that joins each
    of its steps with probability q, against the dataset without it; both directions, Monte Carlo.

    Privacy loss of y: log Σ_S P(S) exp((⟨y, v_S⟩ − ‖v_S‖²/2)/σ²), v_S = Σ_{t∈S} C[:, t], over the
    subsets S of the example's steps. Returns (δ, its standard error) of the worse direction."""
    T = C.shape[0]
    cols = [C[:, t] for t in steps_of_example]
    subsets = [s for r in range(len(cols) + 1) for s in itertools.combinations(range(len(cols)), r)]
    V = np.array([sum((cols[i] for i in s), np.zeros(T)) for s in subsets])
    weights = np.array([q ** len(s) * (1 - q) ** (len(cols) - len(s)) for s in subsets])
    rng = np.random.default_rng(seed)

    def loss(y):
        return logsumexp((y @ V.T - 0.5 * (V ** 2).sum(1)) / sigma ** 2, axis=1, b=weights)

    with_example = sigma * rng.standard_normal((n, T)) + V[rng.choice(len(subsets), size=n, p=weights)]
    without = sigma * rng.standard_normal((n, T))
    remove = np.maximum(0.0, 1 - np.exp(eps - loss(with_example)))
    add = np.maximum(0.0, 1 - np.exp(eps + loss(without)))
    worse = max((remove, add), key=np.mean)
    return float(worse.mean()), float(worse.std() / math.sqrt(n))


def test_direct_monte_carlo_of_the_banded_mechanism_matches_the_accounting():
    """T = 4 steps, b = 2 groups, p = 2 bands: an example of group 0 joins steps 0 and 2 (rate q)."""
    c, q, sigma, eps = bsr.bsr_coefficients(2), 0.5, 1.0, 0.5
    delta, se = monte_carlo_delta(bsr.toeplitz(c, 4), [0, 2], q, sigma, eps)
    claimed = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        bsr.amplified_dp_event(sigma, c, 4, 2, q)).get_delta(eps)
    assert abs(delta - claimed) < 5 * se + 2e-3 * claimed
    # group 1 (steps 1, 3; the last column is cut short) is no worse than the accounted worst case
    assert monte_carlo_delta(bsr.toeplitz(c, 4), [1, 3], q, sigma, eps)[0] < claimed


def test_overlapping_columns_break_the_amplified_bound_and_are_refused():
    """p = 3 bands over b = 2 groups: an example's columns overlap, and its true δ exceeds what the
    amplified formula would claim (which is why check_amplified refuses p > b)."""
    c, q, sigma, eps = bsr.bsr_coefficients(3), 0.5, 1.0, 0.5
    delta, se = monte_carlo_delta(bsr.toeplitz(c, 6), [0, 2, 4], q, sigma, eps)
    naive = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma / np.linalg.norm(c))), 3)
    would_claim = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(naive).get_delta(eps)
    assert delta > would_claim + 20 * se
    with pytest.raises(DPCompileError, match="bands <= groups"):
        bsr.amplified_epsilon(sigma, c, 6, 1e-5, 2, q)


@pytest.mark.parametrize("bands, groups, steps", [(1, 3, 9), (3, 3, 12), (2, 5, 17)])
def test_rate_one_is_cyclic_bsr_without_amplification(bands, groups, steps):
    c = bsr.bsr_coefficients(bands, 0.5)
    assert bsr.amplified_epsilon(2.0, c, steps, 1e-5, groups, 1.0) == pytest.approx(
        bsr.epsilon(2.0, c, steps, 1e-5, groups), rel=1e-6)


def test_calibration_reaches_the_target_and_amplification_lowers_sigma():
    c = bsr.bsr_coefficients(4)
    sigma = bsr.calibrate_amplified_noise_multiplier(3.0, 1e-5, c, 80, 4, 0.25)
    assert 0.95 * 3.0 < bsr.amplified_epsilon(sigma, c, 80, 1e-5, 4, 0.25) <= 3.0
    assert sigma < bsr.calibrate_amplified_noise_multiplier(3.0, 1e-5, c, 80, 4, 1.0)


# --- expected error -------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_expected_error_matches_dense_linear_algebra_and_independent_sigmas(momentum):
    n, b, eps, delta = 24, 4, 4.0, 1e-5
    A = bsr.toeplitz(bsr.workload_coefficients(n, momentum), n)
    c = bsr.bsr_coefficients(b, momentum)
    cases = {"dpsgd": (dict(sample_rate=1 / 6), (1.0,)), "bsr": (dict(coefficients=c, groups=b), c),
             "amplified": (dict(coefficients=c, groups=b, sample_rate=0.5), c)}
    for mechanism, (kwargs, coefficients) in cases.items():
        err = bsr.expected_error(mechanism, eps, delta, n, momentum=momentum, **kwargs)
        B = A @ np.linalg.inv(bsr.toeplitz(coefficients, n))
        assert err["rmse"] == pytest.approx(err["sigma"] * np.linalg.norm(B) / math.sqrt(n), rel=1e-9)
        assert err["max"] == pytest.approx(err["sigma"] * np.linalg.norm(B, axis=1).max(), rel=1e-9)
        if mechanism == "dpsgd":
            event = dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(1 / 6, dp_accounting.GaussianDpEvent(err["sigma"])), n)
        elif mechanism == "bsr":
            C = bsr.toeplitz(c, n)
            column_sum = C[:, 0::b].sum(1)  # pattern 0, b, 2b, ... (worst for non-negative monotone C)
            event = dp_accounting.GaussianDpEvent(err["sigma"] / np.linalg.norm(column_sum))
        else:
            zeta = np.linalg.norm(bsr.toeplitz(c, n), axis=0).max()
            event = dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(err["sigma"] / zeta)), n // b)
        assert 0.95 * eps < pld_epsilon(event, delta) <= eps * 1.002  # the σ it reports is the calibrated one
    same = bsr.expected_error("amplified", eps, delta, n, coefficients=c, groups=b, sample_rate=1.0)
    assert same["rmse"] == pytest.approx(bsr.expected_error("bsr", eps, delta, n, coefficients=c, groups=b)["rmse"],
                                         rel=0.02)
    with pytest.raises(DPCompileError, match="mechanism must be one of"):
        bsr.expected_error("laplace", eps, delta, n)


# --- the cyclic Poisson sampler -------------------------------------------------------------
def test_cyclic_poisson_sampler_draws_group_t_mod_b_at_rate_q():
    n, b, q, steps = 103, 4, 0.3, 400
    sampler = CyclicPoissonBatchSampler(n, b, q, seed=7)
    assert sorted(i for g in sampler.groups for i in g) == list(range(n))  # disjoint groups covering all
    counts = np.zeros(n)
    last_step = {}
    for t in range(steps):
        batch = sampler.batch(t)
        assert set(batch) <= set(sampler.groups[t % b]) and batch == sorted(batch)
        for i in batch:
            assert t - last_step.get(i, -b) >= b  # at most once every b steps
            last_step[i] = t
            counts[i] += 1
    draws = steps // b
    assert stats.binomtest(int(counts.sum()), draws * n, q).pvalue > 1e-4  # rate q within the group
    assert stats.chisquare(counts, np.full(n, counts.mean())).pvalue > 1e-4  # every example alike
    assert sampler.batch(13) == CyclicPoissonBatchSampler(n, b, q, seed=7).batch(13)  # pure function of (seed, t)
    assert sampler.batch(13) != sampler.batch(17) and sampler.groups != CyclicPoissonBatchSampler(n, b, q, 8).groups


# --- make_private: the compiled runtime ------------------------------------------------------
def dataset(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    return TensorDataset(X, (X @ torch.randn(8, 3, generator=g)).argmax(1))


def amplified_run(net, epsilon=3.0, epochs=2, seed=4, batch_size=9, **kwargs):
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # fixed weights: the clipped part is easy to recompute
    options = dict(target_epsilon=epsilon, epochs=epochs, max_grad_norm=0.5, insecure_seed=seed,
                   noise_mechanism="amplified_bsr", bands=3, **kwargs)
    return dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=batch_size), **options)


def test_make_private_releases_clipped_sum_plus_c_inverse_noise_and_accounts_amplified():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 3))
    model, opt, loader = amplified_run(net)
    state = dpcompile.privacy_state(net)
    opts = state.options
    assert (opts.bsr_min_separation, opts.bsr_sample_rate, opts.expected_batch_size) == (3, 0.3, 9.0)
    assert len(loader) == 10 and opts.sample_rate is None
    R, sigma, E = opts.max_grad_norm, opts.noise_multiplier, opts.expected_batch_size
    data = dataset()
    noise = []
    for epoch in range(2):
        for x, y in loader:
            batch = loader.sampler.batch(state.steps)
            assert torch.equal(x, data.tensors[0][batch])  # the loader yields the cyclic Poisson draw of this step
            F.cross_entropy(model(x), y).backward()
            clipped, _ = oracle_clipped_sum(net, x, y, R)
            noise.append(np.concatenate([(p.grad.double() * E - clipped[name]).flatten().numpy()
                                         for name, p in net.named_parameters()]))
            opt.step()
            opt.zero_grad()
    T = state.steps
    assert T == 20
    ctx = state.compiled[-1]
    W = np.stack([ordered_by_graph(net, ctx, w) for w in expected_noise(state, ctx.plan["noise_numel"], T,
                                                                        ctx.noise_key)])
    got = np.stack(noise) / (sigma * R)
    assert np.abs(got - W).max() < 1e-4 * np.abs(W).max()  # exactly C⁻¹Z, scaled by σR, divided by E
    C = bsr.toeplitz(state.bsr.coefficients, T)
    want = np.linalg.inv(C) @ np.linalg.inv(C).T
    m = got.shape[1]
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want ** 2) / m)
    assert np.abs((got @ got.T / m - want) / se).max() < 5.0  # empirical covariance over the coordinates
    assert np.abs((np.eye(T) - want) / se).max() > 20  # independent noise would fail it
    zeta = np.linalg.norm(state.bsr.coefficients)
    eps = dpcompile.privacy_spent(net, 1e-5)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(sigma / zeta)), math.ceil(T / 3))
    assert 2.9 < eps <= 3.0 and eps == pytest.approx(pld_epsilon(event), rel=0.01)
    summary = report_of(net).privacy_summary()
    assert summary["bsr_sample_rate"] == 0.3 and "cyclic Poisson groups" in format_privacy(summary)


# --- refusals -----------------------------------------------------------------------------------
BASE = {"noise_mechanism": "bsr", "bsr_bands": 3, "bsr_min_separation": 4, "bsr_sample_rate": 0.2}


@pytest.mark.parametrize("change, message", [
    ({"bsr_bands": 5}, "bands <= groups"),
    ({"bsr_min_separation": None, "bsr_max_participations": 1}, "needs bsr_min_separation"),
    ({"bsr_max_participations": 2}, "does not apply with bsr_sample_rate"),
    ({"bsr_sample_rate": 1.5}, r"must be in \(0, 1\]"),
    ({"noise_mechanism": "gaussian", "bsr_bands": None, "bsr_min_separation": None}, "only apply with"),
    ({"sample_rate": 0.2}, "Poisson"),
])
def test_inconsistent_amplified_options_are_refused(change, message):
    options = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(DPCompileError, match=message):
        DPOptions.from_dict(options)


def test_plain_api_cannot_claim_the_amplified_accounting():
    model = MLP()
    x, y = MLP.batch(6)
    opts = {**BASE, "noise_multiplier": 1.0, "expected_batch_size": 6.0}
    with pytest.raises(DPCompileError, match="amplified_bsr"):
        batch_loss(torch.compile(model, backend="dp", options=opts)(x), y).backward()
    assert all(p.grad is None for p in model.parameters()) and dpcompile.privacy_state(model).steps == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(bands=4, groups=2), "bands <= groups"),
    (dict(groups=20), "exceeds the N = 90"),
    (dict(bsr_sample_rate=0.1), "set from the data loader"),
])
def test_make_private_refuses_inconsistent_amplified_settings(kwargs, message):
    net = nn.Linear(8, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    options = dict(noise_multiplier=1.0, noise_mechanism="amplified_bsr", bands=3) | kwargs
    with pytest.raises(DPCompileError, match=message):
        dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=9), **options)


def test_make_private_refuses_other_loaders_and_groups_without_amplification():
    net = nn.Linear(8, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(DPCompileError, match="samples Poisson batches itself"):
        dpcompile.make_private(net, opt, poisson_loader(DataLoader(dataset(), batch_size=9)), noise_multiplier=1.0,
                               noise_mechanism="amplified_bsr", bands=3)
    with pytest.raises(DPCompileError, match="groups only applies"):
        dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=9), noise_multiplier=1.0,
                               noise_mechanism="bsr", bands=3, groups=3)
    net = nn.Linear(8, 3)
    model, opt, loader = amplified_run(net)
    cyclic = CyclicDPDataLoader(DataLoader(dataset(), batch_size=9), 10, None, dpcompile.privacy_state(net))
    with pytest.raises(DPCompileError, match="accounts bsr_min_separation=3, bsr_sample_rate=0.3"):
        next(iter(cyclic))  # fixed cyclic batches under a state that claims the amplified accounting


def test_an_empty_draw_is_refused_before_anything_is_released():
    net = nn.Linear(8, 3)
    model, opt, loader = amplified_run(net, epsilon=8.0, batch_size=1, groups=3)  # q = 1/30: empty draws are common
    state = dpcompile.privacy_state(net)
    with pytest.raises(DPCompileError, match="is empty"):
        for _ in range(5):
            for x, y in loader:
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    refused_at = state.steps
    assert loader.sampler.batch(refused_at) == [] and all(p.grad is None for p in net.parameters())
    assert dpcompile.privacy_spent(net, 1e-5) == bsr.amplified_epsilon(
        state.options.noise_multiplier, state.bsr.coefficients, refused_at, 1e-5, 3, state.options.bsr_sample_rate)


def test_killed_and_resumed_run_draws_the_same_batches_and_noise(tmp_path):
    def run(seed):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        return (net, *dpcompile.make_private(net, opt, DataLoader(dataset(), batch_size=9), target_epsilon=3.0,
                                             epochs=2, insecure_seed=seed, noise_mechanism="amplified_bsr", bands=3))

    def train(net, model, opt, loader, stop_at=None):
        state, trajectory = dpcompile.privacy_state(net), []
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            trajectory.append([p.detach().clone() for p in net.parameters()])
            if state.steps == stop_at:
                break
        return trajectory

    net, model, opt, loader = run(4)
    uninterrupted = train(net, model, opt, loader) + train(net, model, opt, loader)
    eps = dpcompile.privacy_spent(net, 1e-5)
    torch._dynamo.reset()
    net, model, opt, loader = run(4)
    train(net, model, opt, loader, stop_at=7)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                "secret": dpcompile.privacy_state(net).secret_state_dict()}, tmp_path / "ckpt.pt")
    del net, model, opt, loader
    torch._dynamo.reset()
    net, model, opt, loader = run(999)  # another seed until the checkpoint loads
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    net.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    dpcompile.privacy_state(net).load_secret_state_dict(checkpoint["secret"])
    assert len(loader) == 3  # the rest of epoch 1 (10 steps an epoch)
    resumed = train(net, model, opt, loader) + train(net, model, opt, loader)
    assert len(uninterrupted) == 20 and len(resumed) == 13
    for a, b in zip(uninterrupted[7:], resumed):
        assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    assert dpcompile.privacy_spent(net, 1e-5) == eps
