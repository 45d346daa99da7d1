"""Model state written from batch data is refused (it would sit in state_dict() outside the
guarantee); state written from constants, from the weights or from itself keeps working."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile import DPCompileError


class Tracked(nn.Module):
    """A linear layer plus a buffer that `update(self, x)` writes in forward."""

    def __init__(self, update, buffer=None):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("avg", torch.zeros(4) if buffer is None else buffer)
        self.update = update

    def forward(self, x):
        self.update(self, x)
        return self.fc(x)


def _ema(m, x):
    m.avg.mul_(0.9).add_(0.1 * x.mean(0))


def _copy(m, x):
    m.avg.copy_(x.mean(0))


def _assign(m, x):
    m.avg = 0.9 * m.avg + 0.1 * x.mean(0)


def _count(m, x):
    m.avg += x.shape[0]


def _steps(m, x):
    m.avg += 1


def _fill(m, x):
    m.avg.fill_(3.0)


def _from_weights(m, x):
    with torch.no_grad():
        m.avg.copy_(m.fc.weight.norm(dim=0))


def step(model, x, dynamic=None, **options):
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, **options}, dynamic=dynamic)
    out = compiled(x)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().pow(2).mean() for o in outs).backward()
    return compiled


def refused(model, x, buffer: str, dynamic=None) -> str:
    """The step fails with a DPCompileError; nothing was computed, written or counted."""
    before = {name: b.clone() for name, b in model.named_buffers()}
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0}, dynamic=dynamic)
    with pytest.raises(Exception) as info:
        compiled(x).float().pow(2).mean().backward()
    text = str(info.value)
    assert isinstance(info.value, DPCompileError) or "DPCompileError" in text, text
    assert "dpcompile" in text and "batch data" in text, text
    assert f"`{buffer}`" in text, text  # names the written state
    assert all(p.grad is None for p in model.parameters())
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    try:
        state = dpcompile.privacy_state(compiled)
    except Exception:  # no state attached yet: nothing was released either
        state = None
    assert state is None or state.steps == 0
    return text


def test_ema_of_the_batch_mean_by_mul_add_is_refused():
    text = refused(Tracked(_ema), torch.randn(3, 4), "avg")
    assert "buffer `avg`" in text and "samples' data" in text
    assert "m.avg.mul_(0.9).add_(0.1 * x.mean(0))" in text  # the source line
    assert "state_dict()" in text and "keep batch statistics out of module state" in text
    assert "torch.no_grad()" in text  # ... is not a way out


def test_copy_of_a_batch_statistic_is_refused():
    text = refused(Tracked(_copy), torch.randn(3, 4), "avg")
    assert "m.avg.copy_(x.mean(0))" in text


def test_attribute_assignment_of_a_buffer_is_refused():
    text = refused(Tracked(_assign), torch.randn(3, 4), "avg")
    assert "m.avg = 0.9 * m.avg + 0.1 * x.mean(0)" in text


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        self.seen.copy_(x.detach().amax(0))
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stats = Inner()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.stats(x))


def test_a_submodule_buffer_is_named_with_its_module():
    text = refused(Outer(), torch.randn(3, 4), "stats.seen")
    assert "stats (Inner)" in text
    assert "self.seen.copy_(x.detach().amax(0))" in text


class PlainAttribute(nn.Module):
    """Tensor attributes are not in state_dict(), but they are on the model object."""

    def __init__(self, assign: bool):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.cache = torch.zeros(4)
        self.assign = assign

    def forward(self, x):
        out = self.fc(x)  # x is used first: dynamo orders the graph inputs by first use, and the backend
        if self.assign:   # takes the first tensor input with a leading dim as the batch
            self.cache = x.mean(0)
        else:
            self.cache.copy_(x.mean(0))
        return out


@pytest.mark.parametrize("assign", [False, True])
def test_a_plain_tensor_attribute_written_from_the_batch_is_refused(assign):
    model = PlainAttribute(assign)
    text = refused(model, torch.randn(3, 4), "cache")
    assert "attribute `cache`" in text
    assert torch.equal(model.cache, torch.zeros(4))


class Registers(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.how = how

    def forward(self, x):
        out = self.fc(x)
        if self.how == "register_buffer":
            self.register_buffer("seen", x.mean(0))
        elif self.how == "input":
            self.last = x  # the batch itself, kept on the model
        elif self.how == "parameter":
            with torch.no_grad():
                self.fc.bias.add_(x.mean())
        return out


@pytest.mark.parametrize("how, name", [("register_buffer", "seen"), ("input", "last"), ("parameter", "fc.bias")])
def test_other_ways_of_keeping_batch_data_on_the_model_are_refused(how, name):
    model = Registers(how)
    bias = model.fc.bias.detach().clone()
    refused(model, torch.randn(3, 4), name)
    assert not hasattr(model, "seen") and not hasattr(model, "last")
    assert torch.equal(model.fc.bias.detach(), bias)


def test_storing_the_symbolic_batch_size_as_a_number_is_refused():
    class KeepsSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            self.n = x.shape[0]
            return self.fc(x)

    model = KeepsSize()
    text = refused(model, torch.randn(3, 4), "n", dynamic=True)
    assert "batch size" in text and not hasattr(model, "n")


def test_a_sequence_length_kept_on_the_model_is_accepted():
    class KeepsLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1, 2)

        def forward(self, x):
            self.t = x.shape[1]  # symbolic too, but not the batch size
            return self.fc(x.sum(1, keepdim=True))

    model = KeepsLength()
    x = torch.randn(3, 5)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    _trains(model, x)
    assert model.t == 5


def test_inference_graphs_are_checked_for_state_writes():
    """A forward under torch.no_grad() compiles without a backward (AOT's inference graph),
    outside FORWARD_PIPELINE: its writes of model state from batch data are refused too, while
    sample-mixing ops are fine there (nothing of it is released as a gradient)."""
    model = Tracked(_copy)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    with pytest.raises(Exception, match="buffer `avg`"):
        with torch.no_grad():
            compiled(torch.randn(3, 4))
    assert torch.equal(model.avg, torch.zeros(4))
    torch._dynamo.reset()
    eval_model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Softmax(0)).eval()  # mixes samples: fine here
    with torch.no_grad():
        torch.compile(eval_model, backend="dp", options={"noise_multiplier": 0.0})(torch.randn(3, 4))


def test_adding_the_batch_size_is_refused():
    x = torch.randn(3, 4)
    torch._dynamo.mark_dynamic(x, 0)
    model = Tracked(_count)
    text = refused(model, x, "avg")
    assert "batch size" in text and "Poisson" in text
    assert "m.avg += x.shape[0]" in text


def test_adding_the_batch_size_is_refused_once_the_batch_size_is_symbolic():
    text = refused(Tracked(_count), torch.randn(3, 4), "avg", dynamic=True)
    assert "batch size" in text


@pytest.mark.xfail(strict=True, reason="a static batch size is a plain constant in the graph: x.shape[0] "
                                       "and a literal 3 look alike to the forward pass")
def test_adding_a_static_batch_size_is_refused():
    refused(Tracked(_count), torch.randn(3, 4), "avg", dynamic=False)


@pytest.mark.covers("nn.Embedding (max_norm)", status="refused")
def test_embedding_max_norm_is_refused_with_its_hint():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(20, 2))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # every row is over the norm: a renorm would change the rows looked up
    before = model[0].weight.detach().clone()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    with pytest.raises(Exception) as info:
        compiled(torch.randint(0, 10, (3, 5))).float().pow(2).mean().backward()
    text = str(info.value)
    assert "parameter `0.weight`" in text and "0 (Embedding)" in text
    assert "max_norm renormalises the rows this batch looked up, which reveals them" in text
    assert "drop max_norm or" in text.replace(",", "") and "after each optimizer step" in text
    assert torch.equal(model[0].weight.detach(), before)
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_in_training_keeps_its_own_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(Exception) as info:
        step(model, torch.randn(5, 4))
    text = str(info.value)
    assert "BatchNorm" in text and "GroupNorm" in text and "1 (BatchNorm1d)" in text
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- accepted writes

def _trains(model, x, **kw):
    step(model, x, **kw)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_step_counter_buffer_is_accepted(dynamic):
    model = Tracked(_steps, buffer=torch.zeros((), dtype=torch.long))
    _trains(model, torch.randn(3, 4), dynamic=dynamic)
    assert model.avg.item() == 1


def test_a_buffer_set_from_a_constant_is_accepted():
    model = Tracked(_fill)
    _trains(model, torch.randn(3, 4))
    assert torch.equal(model.avg, torch.full((4,), 3.0))


def test_a_buffer_written_from_the_weights_is_accepted():
    model = Tracked(_from_weights)
    _trains(model, torch.randn(3, 4))
    assert torch.allclose(model.avg, model.fc.weight.detach().norm(dim=0))


def test_assigning_a_buffer_from_the_weights_is_accepted():
    def assign_from_weights(m, x):
        m.avg = m.fc.weight.detach().sum(0)

    model = Tracked(assign_from_weights)
    _trains(model, torch.randn(3, 4))
    assert torch.allclose(model.avg, model.fc.weight.detach().sum(0))


def test_batchnorm_in_eval_mode_is_accepted_and_its_statistics_stay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].eval()
    _trains(model, torch.randn(5, 4))
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert model[1].num_batches_tracked.item() == 0


def test_embedding_without_max_norm_is_accepted():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    _trains(model, torch.randint(0, 10, (3, 5)))
