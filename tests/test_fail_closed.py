"""The privacy boundary: every path around the dp graphs is refused before p.grad and before a
step is counted, or gives the float64 oracle's result. One test (at least) per class of leak."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile import DPCompileError

R = 1.5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(b: int = 6):
    torch.manual_seed(1)
    return torch.randn(b, 4) * torch.linspace(0.05, 4.0, b)[:, None], torch.randint(0, 3, (b,))


def oracle(model: nn.Module, x, y, max_grad_norm: float = R, per_sample_input=lambda xi: xi[None]) -> list:
    """Σ_i clip(∇ℓ_i) / B in float64 from torch.func per-sample gradients (ℓ_i = cross-entropy of
    sample i, whose input x[i] the model takes as `per_sample_input(x[i])`)."""
    from torch.func import functional_call, grad, vmap

    ref = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(ref, p, (per_sample_input(xi),)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any(), "want some samples clipped and some not"
    return [(factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / x.shape[0] for g in per.values()]


def grads_of(model: nn.Module) -> list:
    return [p.grad for p in model.parameters()]


def assert_nothing_released(net: nn.Module) -> None:
    assert all(p.grad is None for p in net.parameters())
    assert dpcompile.privacy_state(net).steps == 0


OPTIONS = {"noise_multiplier": 0.0, "max_grad_norm": R}


# -- 1. parameters no dp graph handles --------------------------------------------------------

def test_dynamo_disabled_is_refused_before_any_gradient(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    net = mlp()
    model = torch.compile(net, backend="dp", options=dict(OPTIONS))
    x, y = batch()
    with pytest.raises(DPCompileError, match="Dynamo is disabled"):
        F.cross_entropy(model(x), y).backward()
    assert_nothing_released(net)


def test_a_forward_dynamo_skips_is_refused_by_parameter_name():
    class Skipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        @torch._dynamo.disable
        def forward(self, x):
            return self.fc(x)

    net = Skipped()
    x, y = batch()
    with pytest.raises(DPCompileError, match=r"Skipped\.fc\.(weight|bias).*outside the dp-compiled graphs"):
        F.cross_entropy(torch.compile(net, backend="dp", options=dict(OPTIONS))(x), y).backward()
    assert_nothing_released(net)


def test_a_full_backward_hook_makes_dynamo_run_eagerly_and_is_refused():
    net = mlp()
    net[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x, y = batch()
    with pytest.raises(DPCompileError, match="outside the dp-compiled graphs"):
        F.cross_entropy(torch.compile(net, backend="dp", options=dict(OPTIONS))(x), y).backward()
    assert_nothing_released(net)


def test_a_refusal_suppressed_into_an_eager_fallback_is_raised_anyway():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = batch()
    with torch._dynamo.config.patch(suppress_errors=True), pytest.raises(DPCompileError, match="BatchNorm"):
        F.cross_entropy(torch.compile(net, backend="dp", options=dict(OPTIONS))(x), y).backward()
    assert_nothing_released(net)


def test_a_tensor_hook_registered_before_compile_sees_the_clipped_gradient():
    net = mlp()
    seen = []
    net[0].weight.register_hook(lambda g: seen.append(g.clone()) or g * 2)
    x, y = batch()
    expected = oracle(net, x, y)
    F.cross_entropy(torch.compile(net, backend="dp", options=dict(OPTIONS))(x), y).backward()
    torch.testing.assert_close(seen[0].double(), expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net[0].weight.grad.double(), 2 * expected[0], rtol=1e-4, atol=1e-6)
    for got, want in zip(grads_of(net)[1:], expected[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# -- 2. the loss ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction, option", [("sum", "mean"), ("mean", "sum"), ("sum", "sum")])
def test_a_loss_outside_the_model_has_its_reduction_inferred(reduction, option):
    """The graphs are compiled for the loss_reduction option; a loss outside the model that reduces
    otherwise gives the same (oracle) release: the reduction is inferred, not trusted."""
    net = mlp()
    model = torch.compile(net, backend="dp", options={**OPTIONS, "loss_reduction": option})
    x, y = batch()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    for got, want in zip(grads_of(net), oracle(net, x, y)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def _centred(out, y):
    return F.cross_entropy(out - out.mean(0), y)


def _info_nce(out, y):
    z = F.normalize(out, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z)))


def _token_mean_over_the_batch(out, y):
    y = y.clone()
    y[0] = -100  # ignored: the mean divides by the batch's count of the other samples
    return F.cross_entropy(out, y, ignore_index=-100)


def _batch_softmax(out, y):
    return -(out.softmax(0)[torch.arange(len(y)), y]).log().mean()


@pytest.mark.parametrize("loss_fn", [_centred, _info_nce, _token_mean_over_the_batch, _batch_softmax])
def test_a_loss_that_mixes_samples_is_refused_before_backward(loss_fn):
    net = mlp()
    model = torch.compile(net, backend="dp", options=OPTIONS)
    x, y = batch()
    with pytest.raises(DPCompileError, match="test_fail_closed.py"):  # names the user's line
        loss_fn(model(x), y).backward()
    assert_nothing_released(net)


def test_a_separable_loss_with_per_sample_weights_and_a_token_mean_per_sequence_is_exact():
    """Per-sample weights and a mean over each sequence's own valid tokens keep samples apart."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 7, 4) * torch.linspace(0.1, 5, 5)[:, None, None], torch.randint(0, 3, (5, 7))
    y[1, 3:] = -100
    w = torch.rand(5) + 0.5
    ref = copy.deepcopy(net).double()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi, yi, wi):
        tok = F.cross_entropy(functional_call(ref, p, (xi,)), yi, reduction="none")
        return wi * tok.sum() / (yi != -100).sum()

    per = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x.double(), y, w.double())
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    bound = float(norms.median())  # some samples clipped, some not
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)

    model = torch.compile(net, backend="dp", options={**OPTIONS, "max_grad_norm": bound})
    out = model(x)
    per_token = F.cross_entropy(out.transpose(1, 2), y, reduction="none")
    per_seq = per_token.sum(1) / (y != -100).sum(1)
    (w * per_seq).mean().backward()
    for got, g in zip(grads_of(net), per.values()):
        want = (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / 5
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_a_loss_computed_where_dpcompile_cannot_see_it_is_refused():
    """An output turned into a plain tensor hides the loss: the dp backward refuses to run."""
    net = mlp()
    model = torch.compile(net, backend="dp", options=OPTIONS)
    x, y = batch()
    hidden = model(x).as_subclass(torch.Tensor)
    with pytest.raises(DPCompileError, match="did not see being computed"):
        F.cross_entropy(hidden - hidden.mean(0), y).backward()
    assert_nothing_released(net)


# -- 3. the sample dimension -------------------------------------------------------------------

class TimeMajor(nn.Module):
    """(T, B, d) inputs: the samples lie along dimension 1."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(0))  # (B, 3)


@pytest.mark.covers("time-major (T, B, d) inputs", options={"sample_dim": 1})
def test_time_major_inputs_clip_per_sample_with_the_sample_dim_option():
    torch.manual_seed(0)
    net = TimeMajor()
    model = torch.compile(net, backend="dp", options={**OPTIONS, "sample_dim": 1})
    T, B = 5, 6
    x = torch.randn(T, B, 4) * torch.linspace(0.05, 6.0, B)[None, :, None]
    y = torch.randint(0, 3, (B,))
    F.cross_entropy(model(x), y).backward()
    want = oracle(net, x.transpose(0, 1).contiguous(), y, per_sample_input=lambda xi: xi[:, None])
    for got, w in zip(grads_of(net), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-6)


def test_time_major_inputs_without_the_option_are_refused():
    """Taken batch-first, the time steps would be the samples (sensitivity ~ T·R): refused."""
    net = TimeMajor()
    model = torch.compile(net, backend="dp", options=OPTIONS)
    with pytest.raises(DPCompileError):
        F.cross_entropy(model(torch.randn(5, 6, 4)), torch.randint(0, 3, (6,))).backward()
    assert_nothing_released(net)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z).mean(0)


def test_inputs_that_disagree_on_the_sample_dimension_are_refused():
    """x is batch-first (6, 4), z time-major (5, 6, 4): which dimension holds z's samples?"""
    net = TwoInputs()
    model = torch.compile(net, backend="dp", options=OPTIONS)
    with pytest.raises(DPCompileError, match="cannot prove which dimension"):
        model(torch.randn(6, 4), torch.randn(5, 6, 4)).sum().backward()
    assert_nothing_released(net)


# -- 5. the release protocol ---------------------------------------------------------------

def test_micro_steps_leave_p_grad_untouched_and_the_release_equals_the_whole_batch():
    net = mlp()
    x, y = batch(6)
    expected = oracle(net, x, y)
    model = torch.compile(net, backend="dp", options=dict(OPTIONS, expected_batch_size=6))
    state = dpcompile.privacy_state(net)
    state.release_next = False
    F.cross_entropy(model(x[:3]), y[:3], reduction="sum").div(3).backward()
    assert all(p.grad is None for p in net.parameters()) and state.steps == 0  # nothing readable
    state.release_next = True
    F.cross_entropy(model(x[3:]), y[3:], reduction="sum").div(3).backward()
    assert state.steps == 1
    for got, want in zip(grads_of(net), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_accumulation_flag_left_off_never_releases():
    net = mlp()
    model = torch.compile(net, backend="dp", options=dict(OPTIONS))
    dpcompile.privacy_state(net).release_next = False
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert_nothing_released(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_second_backward_through_the_same_forward_is_refused():
    net = mlp()
    model = torch.compile(net, backend="dp", options=dict(OPTIONS))
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    released = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(DPCompileError, match="second backward"):
        loss.backward()
    assert dpcompile.privacy_state(net).steps == 1
    assert all(torch.equal(a, p.grad) for a, p in zip(released, net.parameters()))
    F.cross_entropy(model(x), y).backward()  # a new forward is fine
    assert dpcompile.privacy_state(net).steps == 2


def test_make_private_loader_abandoned_mid_batch_does_not_leak_into_the_next_release():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt, loader = dpcompile.make_private(net, opt, DataLoader(data, batch_size=32), noise_multiplier=1.0,
                                                max_physical_batch_size=4)
    state = dpcompile.privacy_state(net)
    for x, y in loader:  # the first micro-batch of the first logical batch, then abandon
        F.cross_entropy(model(x), y).backward()
        break
    assert state.accumulating and state.steps == 0
    iter(loader).__next__()  # a new pass starts a new logical batch
    assert not state.accumulating


# -- 7. randomness and checkpoints -----------------------------------------------------------

def test_the_noise_seed_is_secret_drawn_from_os_entropy_and_kept_out_of_checkpoints():
    seeds = set()
    for _ in range(3):
        net = mlp()
        torch.compile(net, backend="dp", options=dict(OPTIONS))
        state = dpcompile.privacy_state(net)
        seeds.add(state.seed)
        public = state.state_dict()
        assert "seed" not in public and "seed" not in public["options"]
        assert state.secret_state_dict()["seed"] == state.seed
    assert len(seeds) == 3
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert str(state.seed) not in repr(net.state_dict()) + repr(opt.state_dict()) + repr(state)


def test_reproducible_noise_needs_the_loudly_named_opt_in():
    """`seed` is refused by name; insecure_seed warns, shows in the repr and reproduces the noise."""
    with pytest.raises(DPCompileError, match="now called insecure_seed"):
        torch.compile(mlp(), backend="dp", options={**OPTIONS, "seed": 3})
    with pytest.raises(DPCompileError, match="now called insecure_seed"):
        dpcompile.make_private(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1),
                               torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch(8)), batch_size=4),
                               noise_multiplier=1.0, seed=3)
    releases = []
    for _ in range(2):
        net = mlp()
        with pytest.warns(dpcompile.privacy.state.InsecureSeedWarning):
            model = torch.compile(net, backend="dp", options={**OPTIONS, "noise_multiplier": 1.0, "insecure_seed": 3})
        assert "INSECURE" in repr(dpcompile.privacy_state(net))
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        releases.append(torch.cat([g.flatten() for g in grads_of(net)]))
    assert torch.equal(releases[0], releases[1])


def test_a_public_state_cannot_be_loaded_as_a_secret_one_or_vice_versa():
    net = mlp()
    torch.compile(net, backend="dp", options=dict(OPTIONS))
    state = dpcompile.privacy_state(net)
    with pytest.raises(DPCompileError):
        state.load_state_dict(state.secret_state_dict())
    with pytest.raises(DPCompileError):
        state.load_secret_state_dict(state.state_dict())


# -- 10. one privacy state per model ------------------------------------------------------------

def test_two_models_compiled_with_one_options_dict_keep_their_own_state():
    options = dict(OPTIONS)
    a, b = mlp(), mlp()
    x, y = batch()
    for net in (a, b, a, a):
        F.cross_entropy(torch.compile(net, backend="dp", options=options)(x), y).backward()
    assert dpcompile.privacy_state(a) is not dpcompile.privacy_state(b)
    assert (dpcompile.privacy_state(a).steps, dpcompile.privacy_state(b).steps) == (3, 1)


def test_recompiling_a_trained_model_with_other_privacy_options_is_refused():
    net = mlp()
    x, y = batch()
    F.cross_entropy(torch.compile(net, backend="dp", options=dict(OPTIONS))(x), y).backward()
    with pytest.raises(DPCompileError, match="already released 1 private steps"):
        torch.compile(net, backend="dp", options=dict(OPTIONS, max_grad_norm=2.0))


def test_a_deep_copy_of_a_compiled_private_model_does_not_train_under_the_original_state():
    net = mlp()
    model = torch.compile(net, backend="dp", options=dict(OPTIONS))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    with pytest.raises(DPCompileError):
        F.cross_entropy(twin(x), y).backward()
    assert all(p.grad is None for p in twin._orig_mod.parameters())
    assert dpcompile.privacy_state(net).steps == 1


# -- 11. catchable errors ----------------------------------------------------------------

def test_a_refusal_is_a_dpcompile_error_not_a_backend_compiler_failure():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = batch()
    try:
        torch.compile(net, backend="dp", options=dict(OPTIONS))(x)
    except DPCompileError as error:
        first = str(error).splitlines()[0]
        assert "BatchNorm" in first and "1 (BatchNorm1d)" in first and "GroupNorm" in first
        assert not isinstance(error, torch._dynamo.exc.BackendCompilerFailed)
    else:
        pytest.fail("BatchNorm in training was not refused")


def test_invalid_options_are_refused_at_torch_compile_time():
    with pytest.raises(DPCompileError, match="max_grad_norm"):
        torch.compile(mlp(), backend="dp", options={"max_grad_norm": -1.0})


# -- 8. resume -------------------------------------------------------------------------

def test_a_plain_api_resume_must_restore_the_accounting_the_optimizer_checkpoint_carries(tmp_path):
    options = dict(OPTIONS, noise_multiplier=1.0, sample_rate=0.1, dataset_size=60)
    net = mlp()
    model = torch.compile(net, backend="dp", options=dict(options))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    eps = dpcompile.privacy_spent(net, 1e-5)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                "privacy": dpcompile.privacy_state(net).state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain values only
    assert checkpoint["optimizer"]["param_groups"][0]["dpcompile_privacy"]["steps"] == 3

    def resume():
        torch._dynamo.reset()
        fresh = mlp()
        fresh.load_state_dict(checkpoint["model"])
        model = torch.compile(fresh, backend="dp", options=dict(options))
        opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        opt.load_state_dict(checkpoint["optimizer"])
        return fresh, model, opt

    fresh, model, opt = resume()  # forgets the privacy state: the step is refused
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(DPCompileError, match="accounting was not restored"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))

    fresh, model, opt = resume()
    dpcompile.privacy_state(fresh).load_state_dict(checkpoint["privacy"])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert dpcompile.privacy_state(fresh).steps == 4 and dpcompile.privacy_spent(fresh, 1e-5) > eps


# -- 1 (compiled functions) ----------------------------------------------------------------------

class HalfEager(nn.Module):
    """`tail` runs eagerly (Dynamo skips it): its parameters are in no dp graph."""

    def __init__(self):
        super().__init__()
        self.head, self.tail = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self._tail(torch.tanh(self.head(x)))

    @torch._dynamo.disable
    def _tail(self, h):
        return self.tail(h)


def test_a_compiled_function_refuses_parameters_its_graphs_did_not_take():
    net = HalfEager()

    def step(model, x, y):
        return F.cross_entropy(model(x), y)

    x, y = batch()
    with pytest.raises(DPCompileError, match="tail.weight|ran eagerly"):
        torch.compile(step, backend="dp", options=OPTIONS)(net, x, y).backward()
    assert_nothing_released(net)


def test_a_compiled_function_with_dynamo_disabled_is_refused(monkeypatch):
    net = mlp()
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")

    def step(x, y):  # names the model through its closure
        return F.cross_entropy(net(x), y)

    x, y = batch()
    with pytest.raises(DPCompileError, match="Dynamo is disabled"):
        torch.compile(step, backend="dp", options=OPTIONS)(x, y).backward()
    assert all(p.grad is None for p in net.parameters())
