"""Noise: right distribution and scale, exactly once per step, reproducible from the seed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from scipy import stats

import dpcompile

SIGMA, R, EBS = 1.3, 0.7, 4.0


def private_grads(model, x, y, fresh=True, **options):
    """One private step of a fresh copy of `model` (each copy owns a privacy state of its own)."""
    torch._dynamo.reset()
    model = copy.deepcopy(model) if fresh else model
    opts = {"max_grad_norm": R, "noise_multiplier": SIGMA, "expected_batch_size": EBS, "insecure_seed": 1234, **options}
    compiled = torch.compile(model, backend="dp", options=opts)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(compiled(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), dpcompile.privacy_state(model)


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 30))
    return model, torch.randn(6, 40), torch.randint(0, 30, (6,))


def test_noise_is_gaussian_with_std_sigma_r_over_batch():
    model, x, y = setup()
    clean, _ = private_grads(model, x, y, noise_multiplier=0.0)
    noisy, state = private_grads(model, x, y)
    z = ((noisy - clean) * EBS / (SIGMA * R)).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert state.steps == 1


def test_divisor_defaults_to_the_actual_batch_size():
    model, x, y = setup()
    clean, _ = private_grads(model, x, y, noise_multiplier=0.0, expected_batch_size=None)
    noisy, _ = private_grads(model, x, y, expected_batch_size=None)
    z = (noisy - clean) * x.shape[0] / (SIGMA * R)
    assert abs(float(z.std()) - 1) < 0.1


def test_same_seed_same_noise_and_new_noise_every_step():
    model, x, y = setup()
    first, _ = private_grads(model, x, y)
    again, _ = private_grads(model, x, y)
    other_seed, _ = private_grads(model, x, y, insecure_seed=99)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)


def test_each_step_draws_fresh_noise():
    model, x, y = setup()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dp", options={"max_grad_norm": R, "noise_multiplier": SIGMA, "insecure_seed": 3})
    steps = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x), y).backward()
        steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert dpcompile.privacy_state(model).steps == 2
    noise_difference = (steps[0] - steps[1]) * x.shape[0] / (SIGMA * R)  # clipped parts cancel
    assert abs(float(noise_difference.std()) - 2**0.5) < 0.15


def test_checkpoint_resume_gives_bit_identical_noise():
    """A resumed run (fresh module and compile, as in a new process) that loads the public part
    (accounting) and the secret part (noise seed) draws exactly the noise the run would have drawn."""
    model, x, y = setup()
    twin = copy.deepcopy(model)  # the same weights, never compiled: "the new process"
    opts = {"max_grad_norm": R, "noise_multiplier": SIGMA, "insecure_seed": 7, "sample_rate": 0.01, "expected_batch_size": 6}
    compiled = torch.compile(model, backend="dp", options=opts)
    grads, public, secret = [], None, None
    for step in range(4):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if step == 1:
            public = dpcompile.privacy_state(model).state_dict()
            secret = dpcompile.privacy_state(model).secret_state_dict()
    eps = dpcompile.privacy_spent(model, 1e-5)
    assert "seed" not in public and "insecure_seed" not in public["options"] and secret["seed"] == 7

    torch._dynamo.reset()
    resumed = torch.compile(twin, backend="dp", options={k: v for k, v in opts.items() if k != "insecure_seed"})
    state = dpcompile.privacy_state(twin)
    state.load_state_dict(public)
    state.load_secret_state_dict(secret)
    for step in (2, 3):
        twin.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(resumed(x), y).backward()
        assert torch.equal(torch.cat([p.grad.flatten() for p in twin.parameters()]), grads[step])
    assert dpcompile.privacy_spent(twin, 1e-5) == eps


def test_each_parameter_gets_its_own_slice_of_the_step_noise():
    """(noisy − clean)·EBS/(σR) is exactly the parameter's slice of the step's N(0, 1) vector, for
    gradients noised one by one and for small ones packed into one flat sum alike: every
    coordinate has its own draw, and the offsets (what export reports) say which."""
    from dpcompile.privacy.state import stream_seed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 300), nn.LayerNorm(300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                          nn.Linear(300, 30))
    x, y = torch.randn(6, 40), torch.randint(0, 30, (6,))
    grads = []
    for sigma in (0.0, SIGMA):
        twin = copy.deepcopy(model)  # same weights, a privacy state of its own
        private_grads(twin, x, y, fresh=False, noise_multiplier=sigma, strategy="instantiate")
        grads.append([p.grad.clone() for p in twin.parameters()])
    model = twin
    ctx = dpcompile.privacy_state(model).compiled[0]
    packed = {position for _, members in ctx.plan["packs"] for position, *_ in members}
    assert packed and set(ctx.params) - packed  # both kinds (Linear(300, 300).weight is too big to pack)
    numel = ctx.plan["noise_numel"]
    z = torch.randn(numel, generator=torch.Generator().manual_seed(stream_seed(1234, 0, ctx.noise_key)))
    slices = ctx.plan["noise_slices"]
    assert sorted(o + n for o, n in slices.values())[-1] == numel == sum(n for _, n in slices.values())
    by_param = {id(p): i for i, p in enumerate(model.parameters())}
    for position, param in ctx.params.items():
        offset, n = slices[position]
        i = by_param[id(param)]
        torch.testing.assert_close((grads[1][i] - grads[0][i]) * EBS / (SIGMA * R),
                                   z[offset:offset + n].view_as(param), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pieces", [[(0, 3), (3, 4)], [(0, 3), (5, 2)]])
def test_the_flat_noise_is_cut_into_the_inputs_the_compiled_backward_takes(pieces):
    """Each privatized gradient's noise reaches the compiled graph as its own input; tiling cuts
    and cuts with gaps alike hand each piece exactly its coordinates of the flat draw."""
    from types import SimpleNamespace

    from dpcompile.compiler.runtime import PrivateBackward

    ctx = SimpleNamespace(plan={"noise_pieces": pieces, "noise_numel": 7}, extra_outputs=[],
                          runtime_inputs={"lsg_0": (2,), "dp_noise": (7,), "dp_scalars": (2,)})
    lsg, flat, scalars = torch.zeros(2), torch.arange(7.0), torch.ones(2)
    out = PrivateBackward(None, None, ctx)._graph_inputs([lsg, flat, scalars])
    assert out[0] is lsg and out[-1] is scalars and len(out) == 2 + len(pieces)
    for (start, numel), piece in zip(pieces, out[1:-1]):
        assert torch.equal(piece, flat[start:start + numel])
        assert piece.data_ptr() == flat[start:].data_ptr()  # a view: no copy per step
