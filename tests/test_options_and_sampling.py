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
from dpcompile.accounting import MIN_ACCOUNTED_NOISE_MULTIPLIER, epsilon
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
    ({"seed": True}, "seed"),
    ({"noise_multiplier": "1.0"}, "noise_multiplier"),
])
def test_bools_and_strings_are_not_numbers(options, name):
    assert name in refused(options)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    opts = DPOptions.from_dict({"max_grad_norm": np.float32(0.5), "noise_multiplier": np.float64(1.1),
                                "sample_rate": np.float32(0.25), "dataset_size": np.int64(40),
                                "memory_budget_mb": np.int32(64), "seed": np.int64(7),
                                "lsg": {"rank": np.int64(2), "density": np.float32(0.5)}})
    assert opts.max_grad_norm == 0.5 and type(opts.max_grad_norm) is float
    assert opts.noise_multiplier == 1.1 and type(opts.noise_multiplier) is float
    assert opts.sample_rate == float(np.float32(0.25)) and type(opts.sample_rate) is float
    assert opts.memory_budget_mb == 64.0 and type(opts.memory_budget_mb) is float
    assert opts.seed == 7 and type(opts.seed) is int
    assert opts.dataset_size == 40 and type(opts.dataset_size) is int
    assert opts.expected_batch_size == 10.0 and type(opts.expected_batch_size) is float
    assert opts.lsg.rank == 2 and type(opts.lsg.rank) is int and type(opts.lsg.density) is float
    # equal to the options given as floats: the same compiled graphs, the same checkpoints
    assert DPOptions.from_dict({"noise_multiplier": np.float32(1.0), "seed": 3}) == \
        DPOptions.from_dict({"noise_multiplier": 1.0, "seed": 3})


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
    ({"noise_multiplier": 1.0, "seed": 1.5}, "seed"),
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
                                                      max_physical_batch_size=np.int64(4), seed=np.int64(3))
    state = dpcompile.privacy_state(net)
    assert state.options.expected_batch_size == pytest.approx(8.0) and state.options.sample_rate == 0.25
    validate_make_private_args()  # all defaults
    validate_make_private_args(max_physical_batch_size=1, target_epsilon=3.0, target_delta=1e-5, epochs=0.5,
                               noise_multiplier=0.0, seed=0)
