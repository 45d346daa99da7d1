"""dpcompile.audit: the empirical lower bound on ε stays below the claim on a correct run and
exceeds it when the noise is deliberately switched off."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn as nn

import dpcompile
from dpcompile.privacy.state import PrivacyState


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return net, x, y, (torch.randn(6) * 5, torch.tensor(2))


def test_a_correct_run_stays_below_the_claimed_epsilon(setup):
    net, x, y, canary = setup
    before = [p.detach().clone() for p in net.parameters()]
    result = dpcompile.audit(net, x, y, canary, options={"noise_multiplier": 4.0}, trials=200)
    assert result.consistent and result.epsilon_lower_bound < result.claimed_epsilon < 2.0, str(result)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # audited on a copy
    assert all(p.grad is None for p in net.parameters())


def test_the_bound_exceeds_the_claim_when_the_noise_is_switched_off(setup):
    net, x, y, canary = setup
    with mock.patch.object(PrivacyState, "noise_std", property(lambda self: 0.0)):  # a broken mechanism
        result = dpcompile.audit(net, x, y, canary, options={"noise_multiplier": 4.0}, trials=200)
    assert not result.consistent and result.epsilon_lower_bound > result.claimed_epsilon, str(result)
    assert result.true_positive_rate == 1.0 and result.false_positive_rate == 0.0
    assert "VIOLATES" in str(result)


def test_an_audit_of_a_sampled_claim_is_refused(setup):
    net, x, y, canary = setup
    with pytest.raises(dpcompile.DPCompileError, match="sample_rate"):
        dpcompile.audit(net, x, y, canary, options={"sample_rate": 0.01, "dataset_size": 1000})
