"""make_private: calibration, Poisson batches without recompiles, accumulation, empty draws."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.privacy.accounting import epsilon


def task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    Y = (X @ torch.randn(8, 3, generator=g)).argmax(1)
    return TensorDataset(X, Y)


def make(batch_size=32, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loader = DataLoader(task(), batch_size=batch_size)
    return (net, *dpcompile.make_private(net, opt, loader, **kwargs))


def test_trains_to_target_epsilon_with_poisson_batches_and_one_dynamic_compile():
    net, model, opt, loader = make(target_epsilon=4.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0, insecure_seed=1)
    sizes = []
    for _ in range(3):
        for x, y in loader:
            sizes.append(len(x))
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    state = dpcompile.privacy_state(net)
    assert len(set(sizes)) > 3  # Poisson: variable batch sizes
    assert sum(ctx.batch_size.is_Symbol for ctx in state.compiled) == 1  # ...one symbolic-batch compile
    assert len(state.compiled) <= 2  # (+1 only if a batch of one sample came: dynamo specializes size 1)
    eps = dpcompile.privacy_spent(net, 1e-5)
    assert eps <= 4.0
    assert eps == pytest.approx(epsilon(state.options.noise_multiplier, 32 / 256, state.steps, 1e-5), rel=1e-9)
    assert state.steps == 3 * len(loader)
    acc = (net(loader.dataset.tensors[0]).argmax(1) == loader.dataset.tensors[1]).float().mean()
    assert acc > 0.6  # learns despite the noise (3 classes: chance is ~0.33)


def test_accumulated_micro_batches_equal_one_logical_batch():
    """Splitting a logical batch changes nothing: clipped sums add up, noise is drawn once."""
    results = []
    for physical in (None, 5):
        net, model, opt, loader = make(noise_multiplier=1.0, max_grad_norm=0.5, insecure_seed=11,
                                       max_physical_batch_size=physical)
        torch._dynamo.reset()
        batches = iter(loader)
        micro = 0
        while True:
            x, y = next(batches)
            F.cross_entropy(model(x), y).backward()
            micro += 1
            if dpcompile.privacy_state(net).last_backward_released:
                break
        results.append([p.grad.clone() for p in net.parameters()])
        assert dpcompile.privacy_state(net).steps == 1
        if physical:
            assert micro > 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_waits_for_the_end_of_the_logical_batch():
    net, model, opt, loader = make(noise_multiplier=1.0, insecure_seed=3, max_physical_batch_size=4)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    state = dpcompile.privacy_state(net)
    assert not state.last_backward_released
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # the micro-batch's clipped, noise-free sum is kept inside the privacy state, never in p.grad
    assert all(p.grad is None for p in net.parameters())
    assert state.accumulating and state.steps == 0


def test_empty_poisson_draw_releases_a_noise_only_step():
    net, model, opt, loader = make(batch_size=1, noise_multiplier=1.0, insecure_seed=5)
    loader.sampler.sample_rate = 1e-9  # every draw empty
    loader.sampler.steps = 3
    before = [p.detach().clone() for p in net.parameters()]
    assert list(loader) == []
    state = dpcompile.privacy_state(net)
    assert state.steps == 3 and state.skipped_steps == 3
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_needs_exactly_one_of_epsilon_or_sigma():
    with pytest.raises(dpcompile.DPCompileError, match="exactly one"):
        make()
    with pytest.raises(dpcompile.DPCompileError, match="epochs"):
        make(target_epsilon=1.0)


def test_two_private_models_with_equal_options_keep_their_own_privacy_state():
    """Two instances of one class with equal options (the very same options dict, even) each get
    their own privacy state: it belongs to the module, not to the options."""
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        model, opt, loader = dpcompile.make_private(net, opt, DataLoader(data, batch_size=16),
                                                    noise_multiplier=1.0, max_grad_norm=1.0, insecure_seed=3)
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        states.append(dpcompile.privacy_state(net))
    assert states[0] is not states[1]
    assert states[0].steps == states[1].steps == len(loader)

    options = {"noise_multiplier": 0.0}
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    for net in (first, second, first):
        torch.compile(net, backend="dp", options=options)(torch.randn(3, 4)).sum().backward()
    assert dpcompile.privacy_state(first) is not dpcompile.privacy_state(second)
    assert (dpcompile.privacy_state(first).steps, dpcompile.privacy_state(second).steps) == (2, 1)
