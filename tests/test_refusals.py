"""Everything dpcompile cannot prove per-sample correct is refused with an actionable error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile import DPCompileError


def run_private(model, x, **options):
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, **options})
    out = compiled(x)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().pow(2).mean() for o in outs).backward()


def refusal(model, x, **options) -> str:
    with pytest.raises(Exception) as info:
        run_private(model, x, **options)
    text = str(info.value)
    assert "dpcompile" in text, text
    return text


@pytest.mark.covers("nn.BatchNorm (training; dpcompile.fix: GroupNorm)", status="refused")
def test_batchnorm_in_training_is_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    text = refusal(model, torch.randn(4, 3, 4, 4))
    assert "BatchNorm" in text and "GroupNorm" in text
    assert "1 (BatchNorm2d)" in text  # names the module
    assert "test_refusals.py" not in text or "line" in text


def test_batchnorm_in_eval_mode_is_accepted():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].eval()
    run_private(model, torch.randn(5, 3))
    assert model[0].weight.grad is not None


class BatchCentering(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0, keepdim=True)  # every sample sees the batch mean


def test_reduction_over_the_batch_feeding_samples_is_refused():
    text = refusal(BatchCentering(), torch.randn(6, 4))
    assert "aggregated over the batch" in text
    assert "h - h.mean(0, keepdim=True)" in text  # the source line


class SoftmaxOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=0)


def test_softmax_across_samples_is_refused():
    text = refusal(SoftmaxOverBatch(), torch.randn(6, 4))
    assert "F.softmax(self.fc(x), dim=0)" in text  # (decomposed into amax/sub/exp/sum over dim 0)


class CrossSampleIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h + h.flip(0)  # sample i mixed with sample B-1-i


def test_flip_across_the_batch_is_refused():
    text = refusal(CrossSampleIndex(), torch.randn(6, 4))
    assert "batch dimension" in text


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        values, _ = torch.cummax(self.fc(x), dim=1)
        return values


def test_op_without_a_rule_is_refused():
    text = refusal(UnknownOp(), torch.randn(6, 4))
    assert "cummax" in text and "no batch-dimension rule" in text


class Regularised(nn.Module):
    """Returns a penalty on its weights beside the predictions: that gradient has no sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x), self.fc.weight.pow(2).sum()


def test_sample_free_gradient_term_is_refused():
    model = Regularised()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    out, penalty = compiled(torch.randn(5, 4))
    with pytest.raises(DPCompileError) as info:
        (out.pow(2).mean() + penalty).backward()
    assert "does not come from any sample" in str(info.value) and "fc.weight" in str(info.value)
    assert model.fc.weight.grad is None


def test_a_nonlinear_function_of_a_returned_loss_is_refused_before_backward():
    """The penalty the model returns is a reduced (loss-like) value: squaring it mixes samples."""
    text = refusal(Regularised(), torch.randn(5, 4))
    assert "Tensor.pow" in text and "test_refusals.py" in text


@pytest.mark.parametrize("options, message", [
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"noise_multiplier": -0.5}, "noise_multiplier"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"loss_reduction": "avg"}, "loss_reduction"),
    ({"clipping": "per_layer"}, "clipping"),
    ({"strategy": "fast"}, "strategy"),
    ({"max_grad_nrom": 1.0}, "unknown dp backend option"),
    ({"mode": "fastest"}, "mode must be one of"),
    ({"inductor": {"combo_kernel": True}}, "unknown Inductor config name(s) ['combo_kernel']"),
    ({"inductor": ["combo_kernels"]}, "inductor must be a dict"),
    ({"noise_multiplier": float("inf")}, "noise_multiplier must be a finite number"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number"),
    ({"noise_multiplier": 1e-300}, "noise_multiplier=0 for deliberately non-private training"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a positive finite number"),
    ({"check_finite": False}, "check_finite=False is refused"),
    ({"sample_rate": 0.1}, "sample_rate=0.1 is set but expected_batch_size is not"),
    ({"sample_rate": 0.1, "dataset_size": 40, "expected_batch_size": 3.0}, "disagrees with"),
])
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(Exception) as info:
        run_private(nn.Linear(3, 2), torch.randn(4, 3), **options)
    assert message in str(info.value)


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x).sqrt()  # negative outputs -> NaN gradients


def test_non_finite_per_sample_norm_raises_and_releases_nothing():
    torch.manual_seed(0)
    model = NaNModel()
    with pytest.raises(DPCompileError, match="NaN/inf"):
        run_private(model, torch.randn(8, 3))
    assert model.fc.weight.grad is None


def test_training_the_module_behind_its_compiled_model_is_refused_before_any_gradient():
    """torch.compile(module, backend="dp") guards every trainable parameter at once: training the
    original module (no dp graph) is refused in its backward, before p.grad, and no step counts."""
    net = nn.Linear(3, 2)
    torch.compile(net, backend="dp", options={"noise_multiplier": 1.0, "sample_rate": 0.1,
                                                "expected_batch_size": 4})
    with pytest.raises(DPCompileError, match="ran eagerly, outside the dp-compiled graphs"):
        net(torch.randn(4, 3)).sum().backward()
    assert net.weight.grad is None and net.bias.grad is None
    assert dpcompile.privacy_state(net).steps == 0


def test_privacy_spent_needs_a_sample_rate():
    model = nn.Linear(3, 2)
    run_private(model, torch.randn(4, 3), noise_multiplier=1.0)
    with pytest.raises(DPCompileError, match="sample_rate"):
        dpcompile.privacy_spent(model, delta=1e-5)


class PickOwnRow(nn.Module):
    """h[arange(B), k]: every sample reads its own row (how HF builds padding masks)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x).view(x.shape[0], 3, 2)
        return h[torch.arange(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.long)]


class PickOtherRow(PickOwnRow):
    def forward(self, x):
        h = self.fc(x).view(x.shape[0], 3, 2)
        return h[torch.arange(x.shape[0]).flip(0), torch.zeros(x.shape[0], dtype=torch.long)]


def test_indexing_the_batch_with_sample_ids_is_accepted_and_exact():
    import sys, os
    sys.path.insert(0, os.path.dirname(__file__))
    from models import oracle_clipped_sum

    torch.manual_seed(0)
    model = PickOwnRow()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": 0.1})
    F.cross_entropy(compiled(x), y).backward()
    want, _ = oracle_clipped_sum(model, x, y, 0.1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double() * 5, want[name], rtol=1e-5, atol=1e-7)


def test_indexing_the_batch_with_other_rows_is_refused():
    text = refusal(PickOtherRow(), torch.randn(5, 4))
    assert "advanced indexing" in text


def test_two_calls_before_one_backward_are_refused():
    """Each call would be clipped on its own: one person's rows in both could reach 2R."""
    model = nn.Linear(3, 2)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    first, second = compiled(torch.randn(4, 3)), compiled(torch.randn(4, 3))
    with pytest.raises(DPCompileError, match="two forward passes"):
        first.pow(2).mean() + second.pow(2).mean()
    with pytest.raises(DPCompileError, match="two forward passes"):  # two losses, one backward
        torch.autograd.backward([first.pow(2).mean(), second.pow(2).mean()])
    assert model.weight.grad is None


def test_a_gradient_that_bypasses_the_compiled_graph_is_refused_not_released():
    """Calling the original module (or torch.compile falling back to eager after a recompile limit)
    would put unclipped, noiseless gradients into p.grad: refused, and the gradient discarded."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    compiled = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    compiled(torch.randn(3, 4)).sum().backward()  # private: fine
    net.zero_grad(set_to_none=True)
    with pytest.raises(Exception, match="did not run through its dp-compiled graph"):
        net(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in net.parameters())


class EagerBlock(nn.Module):
    """A parameterized submodule Dynamo does not trace: it runs eagerly between the dp graphs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    @torch._dynamo.disable
    def forward(self, x):
        return self.fc(x)


class WithEagerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(6, 8), EagerBlock(), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.mid(torch.relu(self.a(x)))))


def test_a_parameter_used_outside_the_dp_graphs_is_refused_by_name():
    """Dynamo runs a `torch._dynamo.disable` forward eagerly: its parameters' gradients would bypass
    the clip factors (and be missing from the norms). Found through the compiled module, refused
    with the parameter's name, the gradient discarded; frozen, the same model trains."""
    torch._dynamo.reset()
    net = WithEagerBlock()
    with pytest.raises(DPCompileError, match=r"WithEagerBlock\.mid\.fc\.(weight|bias).*outside the dp-compiled graphs"):
        run_private(net, torch.randn(8, 6), max_grad_norm=1e-3)
    assert net.mid.fc.weight.grad is None and net.mid.fc.bias.grad is None
    torch._dynamo.reset()
    frozen = WithEagerBlock()
    frozen.mid.requires_grad_(False)
    run_private(frozen, torch.randn(8, 6))
    assert frozen.a.weight.grad is not None and frozen.mid.fc.weight.grad is None


def test_make_private_refuses_a_parameter_used_outside_the_dp_graphs():
    """make_private attaches the privacy state to every parameter up front; being attached is not
    being clipped: the parameter must be an input of a dp graph."""
    torch._dynamo.reset()
    net = WithEagerBlock()
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, _optimizer, loader = dpcompile.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), loader,
                                                       noise_multiplier=1.0, max_grad_norm=1.0, insecure_seed=0)
    x, y = next(iter(loader))
    with pytest.raises(DPCompileError, match="outside the dp-compiled graphs"):
        F.cross_entropy(model(x), y).backward()
    assert net.mid.fc.weight.grad is None and net.mid.fc.bias.grad is None


class TiedEagerHead(nn.Module):
    """A tied embedding used in a dp graph and again, as the output head, in eager code."""

    def __init__(self, graph_break=False):
        super().__init__()
        self.emb, self.mix = nn.Embedding(7, 5), nn.Linear(5, 5)
        self.graph_break = graph_break

    @torch._dynamo.disable
    def head(self, h):
        return h @ self.emb.weight.t()

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        if self.graph_break:  # the clipped gradients are written after the backward (deferred path)
            torch._dynamo.graph_break()
            h = self.mix(h)
        return self.head(h)


@pytest.mark.parametrize("graph_break", [False, True], ids=["one_graph", "graph_break"])
def test_a_parameter_used_both_in_a_dp_graph_and_eagerly_is_refused_by_name(graph_break):
    """The eager use adds an unclipped gradient on top of the clipped one: the sum reaching the
    parameter is no longer what its dp graph returned. Refused, the step's gradient not accumulated."""
    torch._dynamo.reset()
    net = TiedEagerHead(graph_break)
    with pytest.raises(DPCompileError, match=r"TiedEagerHead\.emb\.weight received, besides its clipped gradient"):
        run_private(net, torch.randint(0, 7, (6, 3)))
    assert net.emb.weight.grad is None
    torch._dynamo.reset()


def test_a_loss_term_reading_a_parameter_outside_the_compiled_model_is_refused():
    """An L2 penalty (or a head applied outside the model) differentiates the parameter eagerly."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    compiled = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    x = torch.randn(5, 4)
    compiled(x).pow(2).mean().backward()  # private alone: accepted
    net.zero_grad(set_to_none=True)
    with pytest.raises(DPCompileError, match=r"Sequential\.0\.weight received, besides.*weight_decay"):
        (compiled(x).pow(2).mean() + 1e-3 * net[0].weight.pow(2).sum()).backward()
    assert net[0].weight.grad is None


def test_autograd_grad_through_the_uncompiled_module_is_refused():
    """torch.autograd.grad accumulates nothing into p.grad, but hands the gradient back all the same."""
    net = nn.Linear(4, 2)
    compiled = torch.compile(net, backend="dp", options={"noise_multiplier": 0.0})
    (grad_w,) = torch.autograd.grad(compiled(torch.randn(3, 4)).sum(), [net.weight])  # through the dp graph
    assert grad_w.shape == net.weight.shape
    with pytest.raises(DPCompileError, match="did not run through its dp-compiled graph"):
        torch.autograd.grad(net(torch.randn(3, 4)).sum(), [net.weight])


class TokenMeanLoss(nn.Module):
    """A sequence model that returns its own loss, averaged over all tokens of the batch."""

    def __init__(self, class_weight=None):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 11)
        self.class_weight = class_weight

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=self.class_weight)


@pytest.mark.parametrize("case, message", [
    ("loss_reduction_sum", "loss_reduction option is 'sum'"),
    ("class_weights", "class-weighted loss"),
])
def test_in_model_token_mean_is_refused_when_it_is_not_a_mean_of_per_sample_means(case, message):
    """A batch-wide token mean equals the mean of per-sample means only for equal counts, no
    class weights, and a mean loss_reduction (else clipping sees mis-scaled gradients)."""
    model = TokenMeanLoss(torch.rand(11) if case == "class_weights" else None)
    options = {"noise_multiplier": 0.0, "loss_reduction": "sum" if case == "loss_reduction_sum" else "mean"}
    compiled = torch.compile(model, backend="dp", options=options)
    ids = torch.randint(0, 11, (4, 5))
    with pytest.raises(Exception, match=message):
        compiled(ids, ids).backward()
    assert all(p.grad is None for p in model.parameters())


def test_token_count_refusal_fits_a_cuda_device_assert():
    """CUDA device-side asserts reject messages of 255+ characters (the step would fail with
    an unrelated error); the refusal keeps its fix even for a long source location."""
    from dpcompile.privacy.per_sample import token_count_message

    message = token_count_message("File model.py, line 12, in forward: " + "x" * 400)
    assert len(message) < 255
    assert message.startswith("dpcompile: File model.py, line 12") and message.endswith("then over sequences.")
