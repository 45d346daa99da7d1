"""Degenerate options, the Poisson divisor, make_private's arguments and the Poisson audit: each
path dpcompile cannot prove private is refused with an actionable DPCompileError, while ordinary
settings (numpy scalars, q = 1, tiny expected batches, true Poisson loaders) keep working."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
import dpcompile.engine as engine
from dpcompile import DPCompileError
from dpcompile.privacy.accounting import MIN_ACCOUNTED_NOISE_MULTIPLIER, epsilon
from dpcompile.privacy.sampling import (PoissonAudit, PoissonBatchSampler, _largest_size_probability,
                                        _log_repeat_bound, _repeat_threshold)
from dpcompile.options import DPOptions, validate_make_private_args

INF, NAN = float("inf"), float("nan")
POISSON = {"sample_rate": 0.01, "expected_batch_size": 2.56}


def refused(options) -> str:
    with pytest.raises(DPCompileError) as info:
        DPOptions.from_dict(options)
    return str(info.value)


# --- A. degenerate numbers -------------------------------------------------------------------
@pytest.mark.parametrize("options, name", [
    ({"noise_multiplier": INF}, "noise_multiplier"),
    ({"noise_multiplier": NAN}, "noise_multiplier"),
    ({"noise_multiplier": -INF}, "noise_multiplier"),
    ({"max_grad_norm": INF}, "max_grad_norm"),
    ({"max_grad_norm": NAN}, "max_grad_norm"),
    ({"max_grad_norm": 10 ** 400}, "max_grad_norm"),  # an int beyond the float range
    ({"expected_batch_size": INF}, "expected_batch_size"),
    ({"sample_rate": NAN, "expected_batch_size": 1.0}, "sample_rate"),
    ({"automatic_gamma": INF, "clipping": "automatic"}, "automatic_gamma"),
    ({"automatic_gamma": NAN}, "automatic_gamma"),
    ({"memory_budget_mb": INF}, "memory_budget_mb"),
    ({"memory_budget_mb": NAN}, "memory_budget_mb"),
    ({"lsg": {"density": NAN}}, "density"),
    ({"noise_mechanism": "bsr", "bsr_bands": 2, "bsr_min_separation": 4, "bsr_momentum": NAN}, "bsr_momentum"),
    ({"noise_mechanism": "bsr", "bsr_coefficients": [1.0, INF], "bsr_min_separation": 4}, "bsr_coefficients"),
])
def test_non_finite_numbers_are_refused(options, name):
    text = refused(options)
    assert name in text and ("finite" in text or "must be in" in text), text  # "in (0, 1]" excludes nan/inf


@pytest.mark.parametrize("options, name", [
    ({"max_grad_norm": True}, "max_grad_norm"),
    ({"noise_multiplier": False}, "noise_multiplier"),
    ({"insecure_seed": True}, "insecure_seed"),
    ({"seed": 3}, "now called insecure_seed"),
    ({"noise_multiplier": "1.0"}, "noise_multiplier"),
])
def test_bools_and_strings_are_not_numbers(options, name):
    assert name in refused(options)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    opts = DPOptions.from_dict({"max_grad_norm": np.float32(0.5), "noise_multiplier": np.float64(1.1),
                                "sample_rate": np.float32(0.25), "dataset_size": np.int64(40),
                                "memory_budget_mb": np.int32(64), "insecure_seed": np.int64(7),
                                "lsg": {"rank": np.int64(2), "density": np.float32(0.5)}})
    assert opts.max_grad_norm == 0.5 and type(opts.max_grad_norm) is float
    assert opts.noise_multiplier == 1.1 and type(opts.noise_multiplier) is float
    assert opts.sample_rate == float(np.float32(0.25)) and type(opts.sample_rate) is float
    assert opts.memory_budget_mb == 64.0 and type(opts.memory_budget_mb) is float
    assert opts.insecure_seed == 7 and type(opts.insecure_seed) is int
    assert opts.dataset_size == 40 and type(opts.dataset_size) is int
    assert opts.expected_batch_size == 10.0 and type(opts.expected_batch_size) is float
    assert opts.lsg.rank == 2 and type(opts.lsg.rank) is int and type(opts.lsg.density) is float
    # equal to the options given as floats: the same compiled graphs, the same checkpoints
    assert DPOptions.from_dict({"noise_multiplier": np.float32(1.0), "insecure_seed": 3}) == \
        DPOptions.from_dict({"noise_multiplier": 1.0, "insecure_seed": 3})


def test_tiny_positive_noise_multiplier_is_refused_and_zero_or_the_floor_are_not():
    text = refused({"noise_multiplier": 1e-300})
    assert "noise_multiplier=1e-300" in text and "noise_multiplier=0" in text and "ε = inf" in text
    assert "noise_multiplier" in refused({"noise_multiplier": 0.5 * MIN_ACCOUNTED_NOISE_MULTIPLIER})
    DPOptions.from_dict({"noise_multiplier": 0.0})  # non-private, no ε claimed
    DPOptions.from_dict({"noise_multiplier": MIN_ACCOUNTED_NOISE_MULTIPLIER, **POISSON})


@pytest.mark.parametrize("sigma", [1e-300, 1e-200, 1e-155, 1e-7])
@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_epsilon_of_a_tiny_noise_multiplier_is_inf_not_an_error_or_zero(sigma, mechanism):
    # dp_accounting raised ZeroDivisionError at 1e-300 and returned ε = 0.0 (rdp) at 1e-155
    for q in (0.01, 1.0):
        assert epsilon(sigma, q, 10, 1e-5, mechanism) == math.inf


def test_check_finite_false_is_refused_and_true_is_the_default():
    text = refused({"check_finite": False})
    assert "check_finite=False" in text and "NaN" in text and "always" in text
    assert DPOptions.from_dict({}).check_finite is True


# --- B. the divisor ---------------------------------------------------------------------------
def test_sample_rate_without_expected_batch_size_is_refused():
    text = refused({"sample_rate": 0.01})
    assert "sample_rate=0.01 is set but expected_batch_size is not" in text
    assert "never by the actual one" in text and "make_private" in text and "'expected_batch_size': q*N" in text


def test_divisor_settings_that_stay_allowed():
    assert DPOptions.from_dict({}).expected_batch_size is None  # no accounting: actual batch size
    assert DPOptions.from_dict({"expected_batch_size": 32}).expected_batch_size == 32.0
    opts = DPOptions.from_dict({"sample_rate": 0.01, "expected_batch_size": 256})
    assert (opts.sample_rate, opts.expected_batch_size, opts.dataset_size) == (0.01, 256.0, None)


def test_dataset_size_derives_the_expected_batch_size():
    opts = DPOptions.from_dict({"sample_rate": 0.004, "dataset_size": 60000})
    assert opts.expected_batch_size == pytest.approx(240.0, rel=1e-12)
    same = DPOptions.from_dict({"sample_rate": 0.004, "dataset_size": 60000, "expected_batch_size": 240.0})
    assert same.expected_batch_size == 240.0
    DPOptions.from_dict({"sample_rate": 0.004, "dataset_size": 60000, "expected_batch_size": 240.0 * (1 + 1e-11)})


@pytest.mark.parametrize("options, message", [
    ({"sample_rate": 0.004, "dataset_size": 60000, "expected_batch_size": 256.0}, "disagrees with"),
    ({"sample_rate": 0.004, "dataset_size": 60000, "expected_batch_size": 240.0 * (1 + 1e-7)}, "disagrees with"),
    ({"dataset_size": 100}, "needs sample_rate"),
    ({"dataset_size": 100, "expected_batch_size": 10.0}, "needs sample_rate"),
    ({"sample_rate": 0.1, "dataset_size": 0}, "dataset_size must be an int >= 1"),
    ({"sample_rate": 0.1, "dataset_size": 2.5}, "dataset_size must be an int >= 1"),
    ({"sample_rate": 0.5, "expected_batch_size": 0.25}, "below sample_rate"),
])
def test_inconsistent_divisor_settings_are_refused(options, message):
    assert message in refused(options)


def test_bsr_with_sample_rate_still_gets_the_bsr_message():
    text = refused({"noise_mechanism": "bsr", "bsr_bands": 4, "bsr_min_separation": 3, "sample_rate": 0.1})
    assert "noise_mechanism='bsr'" in text and "Poisson" in text


# --- C. make_private's arguments ------------------------------------------------------------
def tiny_setup():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    return net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(data, batch_size=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_multiplier": 1.0, "max_physical_batch_size": 0}, "max_physical_batch_size must be an int >= 1"),
    ({"noise_multiplier": 1.0, "max_physical_batch_size": -1}, "max_physical_batch_size must be an int >= 1"),
    ({"noise_multiplier": 1.0, "max_physical_batch_size": 2.5}, "max_physical_batch_size"),
    ({"noise_multiplier": 1.0, "max_physical_batch_size": True}, "max_physical_batch_size"),
    ({"target_epsilon": 1.0, "epochs": 1, "target_delta": 0.0}, "target_delta must be in (0, 1)"),
    ({"target_epsilon": 1.0, "epochs": 1, "target_delta": 1.0}, "target_delta"),
    ({"target_epsilon": 0.0, "epochs": 1}, "target_epsilon must be a positive finite number"),
    ({"target_epsilon": INF, "epochs": 1}, "target_epsilon"),
    ({"target_epsilon": NAN, "epochs": 1}, "target_epsilon"),
    ({"target_epsilon": 1.0, "epochs": 0}, "epochs must be a positive finite number"),
    ({"target_epsilon": 1.0, "epochs": -2}, "epochs"),
    ({"target_epsilon": 1.0, "epochs": INF}, "epochs"),
    ({"noise_multiplier": INF}, "noise_multiplier must be a finite number"),
    ({"noise_multiplier": NAN}, "noise_multiplier"),
    ({"noise_multiplier": 1.0, "insecure_seed": 1.5}, "insecure_seed"),
    ({"noise_multiplier": 1.0, "max_physical_batch_size": 0, "noise_mechanism": "bsr", "bands": 2},
     "max_physical_batch_size"),
])
def test_make_private_refuses_bad_arguments_before_anything_is_set_up(kwargs, message, monkeypatch):
    def must_not_run(*args, **kw):
        raise AssertionError("make_private went past its argument checks")

    monkeypatch.setattr(engine, "register_state", must_not_run)
    monkeypatch.setattr(engine, "calibrate_noise_multiplier", must_not_run)
    monkeypatch.setattr(torch, "compile", must_not_run)
    net, opt, loader = tiny_setup()
    with pytest.raises(DPCompileError, match="make_private") as info:
        dpcompile.make_private(net, opt, loader, **kwargs)
    assert message in str(info.value)
    assert all(p.grad is None for p in net.parameters())


def test_make_private_keeps_accepting_ordinary_arguments():
    net, opt, loader = tiny_setup()
    model, dp_opt, dp_loader = dpcompile.make_private(net, opt, loader, noise_multiplier=np.float64(1.0),
                                                      max_physical_batch_size=np.int64(4), insecure_seed=np.int64(3))
    state = dpcompile.privacy_state(net)
    assert state.options.expected_batch_size == pytest.approx(8.0) and state.options.sample_rate == 0.25
    validate_make_private_args()  # all defaults
    validate_make_private_args(max_physical_batch_size=1, target_epsilon=3.0, target_delta=1e-5, epochs=0.5,
                               noise_multiplier=0.0, insecure_seed=0)


# --- D. the Poisson audit ---------------------------------------------------------------------
def observe_all(audit, sizes) -> int | None:
    """Feed sizes; the 1-based index of the size that was refused, None if none was."""
    for i, b in enumerate(sizes, 1):
        try:
            audit.observe(b)
        except DPCompileError:
            return i
    return None


def loader_sizes(n, batch_size, steps, shuffle=False, drop_last=False):
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    out = []
    while len(out) < steps:
        out += [len(b) for b in loader.batch_sampler]  # the batches' indices, without collating them
    return out[:steps]


@pytest.mark.parametrize("n, q, skip_empty", [
    (1000, 0.01, False),  # E = 10
    (2000, 0.05, False),  # E = 100
    (200, 0.5, False),
    (50, 1.0, False),  # q = 1: the full batch every step is exactly Poisson sampling
    (1000, 0.001, True),  # E = 1, empty draws skipped (poisson_loader)
    (1000, 0.001, False),
    (400, 0.0005, True),  # E = 0.2: mostly single-sample batches
    (10, 0.99, False),  # E(1-q) ~ 0.1: nearly constant sizes
    (3, 0.4, False),
])
def test_true_poisson_streams_are_never_refused(n, q, skip_empty):
    generator = torch.Generator().manual_seed(n + int(1e6 * q))
    audit = PoissonAudit(q, q * n)
    sampler = PoissonBatchSampler(n, q, steps=1500, generator=generator)
    sizes = [len(b) for b in sampler if len(b) or not skip_empty]
    assert observe_all(audit, sizes) is None
    assert audit.seen == len(sizes)


@pytest.mark.parametrize("n, batch_size, shuffle, drop_last, within", [
    (60000, 256, True, True, 8),  # the fixed batches: refused in the first block
    (60000, 256, False, False, 8),
    (1000, 16, False, False, 8),
    (100, 30, False, False, 32),  # 30, 30, 30, 10 per epoch: the remainder hides a while
    (100, 64, True, False, 64),  # 64, 36: two sizes alternate
    (1000, 4, True, True, 48),  # E = 4
    (1000, 1, False, False, 64),  # E = 1
])
def test_fixed_size_loaders_are_refused_quickly(n, batch_size, shuffle, drop_last, within):
    audit = PoissonAudit(batch_size / n, float(batch_size))  # make_private's q = batch_size / N
    at = observe_all(audit, loader_sizes(n, batch_size, 5000, shuffle, drop_last))
    assert at is not None and at <= within, at
    with pytest.raises(DPCompileError) as info:  # sticky
        audit.observe(batch_size)
    text = str(info.value)
    assert "does not look Poisson-sampled" in text and "poisson_loader" in text and "make_private" in text
    assert "PoissonBatchSampler" in text


def test_the_first_block_is_eight_sizes_for_moderate_expected_batches():
    for q, e in ((0.004, 240.0), (0.01, 16.0), (0.1, 12.0)):
        audit = PoissonAudit(q, e)
        assert audit.max_probability <= 0.127 and audit.threshold(0) is not None and audit.threshold(0) <= 8
        assert observe_all(audit, [int(e)] * 8) == audit.threshold(0)


def test_full_batch_every_step_with_q_one_is_never_refused():
    audit = PoissonAudit(1.0, 50.0)
    assert audit.max_probability == 1.0 and observe_all(audit, [50] * 5000) is None
    with pytest.raises(DPCompileError, match="larger than the dataset"):
        audit.observe(51)


def test_a_batch_larger_than_the_dataset_is_refused_at_once():
    audit = PoissonAudit(0.01, 10.0)  # N = 1000
    audit.observe(1000)
    with pytest.raises(DPCompileError, match=r"1001 samples is larger than the dataset, N = .* = 1000"):
        audit.observe(1001)


def test_invalid_audit_arguments():
    for args, message in (((0.0, 1.0), "sample_rate"), ((0.1, INF), "expected_batch_size"),
                          ((0.5, 0.1), "N >= 1"), ((0.1, True), "expected_batch_size")):
        with pytest.raises(ValueError, match=message):
            PoissonAudit(*args)
    audit = PoissonAudit(0.1, 10.0)
    with pytest.raises(ValueError):
        audit.observe(-1)
    with pytest.raises(TypeError):
        audit.observe(2.5)
    audit.observe(np.int64(10))  # any integer type
    audit.observe(torch.tensor(9))


def test_state_dict_round_trip_resumes_the_same_test():
    sizes = loader_sizes(100, 30, 200)
    whole = observe_all(PoissonAudit(0.3, 30.0), sizes)
    first = PoissonAudit(0.3, 30.0)
    assert observe_all(first, sizes[:13]) is None
    state = first.state_dict()
    assert set(state) == {"sample_rate", "expected_batch_size", "alpha", "seen", "block", "block_seen", "counts",
                          "failure"}
    resumed = PoissonAudit(0.3, 30.0)
    resumed.load_state_dict(state)
    assert 13 + observe_all(resumed, sizes[13:]) == whole
    refused_state = resumed.state_dict()
    again = PoissonAudit(0.3, 30.0)
    again.load_state_dict(refused_state)  # a refusal survives a checkpoint
    with pytest.raises(DPCompileError, match="Poisson"):
        again.observe(30)
    with pytest.raises(DPCompileError, match="saved for"):
        PoissonAudit(0.2, 30.0).load_state_dict(state)
    with pytest.raises(ValueError):
        PoissonAudit(0.3, 30.0).load_state_dict({"seen": 3})


# --- the statistical bound, checked by simulation ---------------------------------------------
@pytest.mark.parametrize("n, q", [(20, 0.1), (50, 0.3), (1000, 0.002), (5, 0.9)])
def test_largest_size_probability_bounds_the_frequencies(n, q):
    rng = np.random.default_rng(n)
    p_star = _largest_size_probability(q, float(n), PoissonAudit._P_SLACK)
    draws = rng.binomial(n, q, size=200_000)
    freq = np.bincount(draws) / draws.size
    nonempty = draws[draws > 0]
    freq_nonempty = np.bincount(nonempty) / nonempty.size
    for f, size in ((freq.max(), draws.size), (freq_nonempty.max(), nonempty.size)):
        assert f <= p_star + 4 * math.sqrt(p_star * (1 - p_star) / size)
    exact = max(math.comb(n, b) * q ** b * (1 - q) ** (n - b) for b in range(n + 1))
    exact_nonempty = max(math.comb(n, b) * q ** b * (1 - q) ** (n - b) for b in range(1, n + 1)) / (1 - (1 - q) ** n)
    assert max(exact, exact_nonempty) <= p_star <= max(exact, exact_nonempty) * (1 + 2 * PoissonAudit._P_SLACK)


@pytest.mark.parametrize("n_records, q, block, m", [(200, 0.2, 8, 3), (200, 0.2, 8, 4), (100, 0.3, 8, 3),
                                                    (100, 0.3, 8, 4), (400, 0.5, 16, 4)])
def test_repeat_bound_holds_by_simulation(n_records, q, block, m):
    """P(some size occurs >= m times among `block` draws) <= C(block, m)·p*^(m-1)."""
    rng = np.random.default_rng(m + block)
    trials = 40_000
    draws = np.sort(rng.binomial(n_records, q, size=(trials, block)), axis=1)
    equal = draws[:, 1:] == draws[:, :-1]  # a size occurs >= m times <=> m-1 consecutive equal neighbours
    repeated = np.zeros(trials, dtype=bool)
    for i in range(block - m + 1):
        repeated |= equal[:, i:i + m - 1].all(axis=1)
    empirical = float(repeated.mean())
    bound = math.exp(_log_repeat_bound(block, m, _largest_size_probability(q, n_records, PoissonAudit._P_SLACK)))
    assert bound < 0.5  # a bound worth checking
    assert empirical <= bound + 3 * math.sqrt(bound * (1 - bound) / trials), (empirical, bound)


def test_repeat_threshold_is_the_smallest_count_meeting_the_level():
    for n, p, level in ((8, 0.1, 5e-7), (16, 0.3, 1e-7), (1024, 0.97, 1e-9), (32, 0.0001, 1e-6)):
        m = _repeat_threshold(n, p, level)
        assert m is not None and _log_repeat_bound(n, m, p) <= math.log(level)
        assert all(_log_repeat_bound(n, k, p) > math.log(level) for k in range(1, m))
    assert _repeat_threshold(8, 0.6, 5e-7) is None and _repeat_threshold(10 ** 6, 1.0, 0.5) is None


def test_whole_run_false_refusal_rate_is_below_alpha_by_simulation():
    """With alpha relaxed to 0.05 (thresholds low enough for refusals to happen), true Poisson
    streams of 512 sizes are refused in at most about 5 % of runs."""
    rng = np.random.default_rng(0)
    alpha, runs, refusals = 0.05, 1500, 0
    for n_records, q in ((12, 0.25), (40, 0.05)):
        streams = rng.binomial(n_records, q, size=(runs, 512))
        for sizes in streams:
            refusals += observe_all(PoissonAudit(q, q * n_records, alpha=alpha), sizes.tolist()) is not None
    total = 2 * runs
    assert refusals / total <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / total), refusals / total
