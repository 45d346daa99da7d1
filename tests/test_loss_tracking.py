"""dpcompile.privacy.loss_tracking: how a loss computed outside the compiled model combines the samples.

Outputs of small eager models are wrapped with track_outputs and a fake owner
records the verdicts; no torch.compile is needed here.
"""
import io
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpcompile.errors import DPCompileError
from dpcompile.privacy.loss_tracking import Batched, Mixed, Reduced, SampleTensor, sample_state, track_outputs

B, D, C = 6, 5, 4
HERE = os.path.basename(__file__) + ":"


class Owner:
    """Records the verdicts, and the order of events when given a shared log."""

    def __init__(self, in_graph_reduction="mean", log=None):
        self.in_graph_reduction = in_graph_reduction
        self.verdicts = []
        self.log = log if log is not None else []

    def loss_verdict(self, kind):
        if kind is None:  # the backward it announced is over
            self.log.append(("verdict over", None))
            return
        self.verdicts.append(kind)
        self.log.append(("verdict", kind))


@pytest.fixture
def owner():
    return Owner()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


def outputs(model, x, owner):
    return track_outputs(model(x), x.shape[0], owner)


def backward_verdict(loss, owner):
    loss.backward()
    assert len(owner.verdicts) == 1
    return owner.verdicts[0]


def refused(fn, *words):
    """fn() raises DPCompileError naming each of `words` and a line of this file."""
    with pytest.raises(DPCompileError) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    assert HERE in msg, msg
    assert "reduction='none'" in msg, msg
    return msg


# ----------------------------------------------------------------------------- accepted

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_reduction_is_the_verdict(model, data, owner, reduction):
    x, y = data
    loss = F.cross_entropy(outputs(model, x, owner), y, reduction=reduction)
    assert sample_state(loss) == Reduced(reduction)
    assert backward_verdict(loss, owner) == reduction


def test_reduction_none_then_mean_or_sum(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    per = F.cross_entropy(out, y, reduction="none")
    assert sample_state(per) == Batched(0)
    assert sample_state(per.mean()) == Reduced("mean")
    assert sample_state(per.sum()) == Reduced("sum")
    assert backward_verdict(per.sum(), owner) == "sum"


def test_gradients_are_those_of_the_plain_loss(model, data, owner):
    x, y = data
    F.cross_entropy(outputs(model, x, owner), y).backward()
    tracked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for a, p in zip(tracked, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_float_pow_mean(model, data, owner):
    x, _ = data
    out = outputs(model, x, owner)
    assert backward_verdict(out.float().pow(2).mean(), owner) == "mean"


def test_python_sum_over_several_outputs(data, owner):
    x, _ = data

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, 3), nn.Linear(D, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    outs = track_outputs(Two()(x), B, owner)
    assert all(isinstance(o, SampleTensor) for o in outs)
    loss = sum(o.float().pow(2).mean() for o in outs)  # 0 + tensor + tensor
    assert sample_state(loss) == Reduced("mean")
    assert backward_verdict(loss, owner) == "mean"


def test_dict_outputs_and_untracked_leaves(data, owner):
    x, _ = data
    outs = track_outputs({"logits": torch.randn(B, C, requires_grad=True), "other": torch.randn(3, 2),
                          "n": 7, "metric": torch.tensor(0.5)}, B, owner)
    assert sample_state(outs["logits"]) == Batched(0)
    assert type(outs["other"]) is torch.Tensor and type(outs["metric"]) is torch.Tensor and outs["n"] == 7


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_and_elementwise_losses(model, data, owner, reduction):
    x, y = data
    out = outputs(model, x, owner)
    target = torch.randn(B, C)
    probs = torch.rand(B, C)
    for loss in (F.mse_loss(out, target, reduction=reduction), F.l1_loss(out, target, reduction=reduction),
                 F.smooth_l1_loss(out, target, reduction=reduction), F.huber_loss(out, target, reduction=reduction),
                 F.binary_cross_entropy_with_logits(out, probs, reduction=reduction),
                 F.binary_cross_entropy(out.sigmoid(), probs, reduction=reduction),
                 F.soft_margin_loss(out, probs.round() * 2 - 1, reduction=reduction),
                 F.nll_loss(out.log_softmax(1), y, reduction=reduction),
                 F.cosine_embedding_loss(out, target, torch.ones(B), reduction=reduction)):
        assert sample_state(loss) == Reduced(reduction)
    assert sample_state(F.mse_loss(out, target, reduction="none")) == Batched(0)
    assert backward_verdict(F.mse_loss(out, target, reduction=reduction), owner) == reduction


def test_kl_div_batchmean_is_a_mean(model, data, owner):
    x, _ = data
    out = outputs(model, x, owner)
    teacher = torch.softmax(torch.randn(B, C), 1)
    assert sample_state(F.kl_div(out.log_softmax(1), teacher, reduction="batchmean")) == Reduced("mean")
    assert sample_state(F.kl_div(out.log_softmax(1), teacher, reduction="sum")) == Reduced("sum")


def test_bce_weight_with_mean_is_a_plain_mean(model, data, owner):
    # BCE's weight rescales each element and 'mean' still divides by the element count.
    x, _ = data
    out = outputs(model, x, owner)
    loss = F.binary_cross_entropy_with_logits(out, torch.rand(B, C), weight=torch.rand(B, 1) + 0.5)
    assert backward_verdict(loss, owner) == "mean"


def test_per_sample_weights(model, data, owner):
    x, y = data
    w = torch.rand(B)
    loss = (w * F.cross_entropy(outputs(model, x, owner), y, reduction="none")).mean()
    assert backward_verdict(loss, owner) == "mean"


def lm_outputs(owner, T=7, V=11):
    torch.manual_seed(2)
    emb = nn.Embedding(V, 8)
    head = nn.Linear(8, V)
    tokens = torch.randint(0, V, (B, T))
    return track_outputs(head(emb(tokens)), B, owner), tokens, V


def test_language_model_token_mean(owner):
    logits, tokens, V = lm_outputs(owner)
    flat = logits.view(-1, V)
    assert sample_state(flat) == Batched(0, flat=tokens.shape[1])
    loss = F.cross_entropy(flat, tokens.view(-1))
    assert sample_state(loss) == Reduced("mean")
    assert backward_verdict(loss, owner) == "mean"


def test_shifted_language_model_loss(owner):
    logits, tokens, V = lm_outputs(owner)
    shifted = logits[:, :-1].contiguous()
    loss = F.cross_entropy(shifted.reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert backward_verdict(loss, owner) == "mean"


def test_per_sequence_token_mean_with_ignored_tokens(owner):
    logits, tokens, V = lm_outputs(owner)
    y = tokens.clone()
    y[:, -2:] = -100
    y[0, :3] = -100
    mask = y != -100
    per_seq = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100).sum(1) / mask.sum(1)
    assert sample_state(per_seq) == Batched(0)
    assert backward_verdict(per_seq.mean(), owner) == "mean"


def test_weighted_sum_of_losses(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    loss1 = F.cross_entropy(out, y)
    loss2 = out.pow(2).mean()
    total = loss1 + 0.5 * loss2 - loss2 / 4
    assert sample_state(total) == Reduced("mean")
    assert backward_verdict(total, owner) == "mean"


def test_in_place_accumulation_of_losses(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    loss = F.cross_entropy(out, y)
    loss += 0.1 * out.pow(2).mean()
    assert backward_verdict(loss, owner) == "mean"


def test_sum_divided_by_the_batch_size_is_a_mean(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    per = F.cross_entropy(out, y, reduction="none")
    assert sample_state(per.sum() / x.shape[0]) == Reduced("mean")
    assert sample_state(per.sum() / len(out)) == Reduced("mean")
    assert sample_state(per.sum() * (1 / B)) == Reduced("mean")
    assert sample_state(per.sum() / 3.0) == Reduced("sum")  # a constant, not the batch size
    assert backward_verdict(per.sum() / x.shape[0], owner) == "mean"


def test_regulariser_on_parameters_may_be_added(model, data, owner):
    x, y = data
    loss = F.cross_entropy(outputs(model, x, owner), y)
    loss = loss + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())
    assert backward_verdict(loss, owner) == "mean"


def test_metrics_and_conversions_work(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    acc = (out.argmax(1) == y).float().mean()
    assert 0.0 <= acc.item() <= 1.0 and not acc.requires_grad
    assert out.detach().cpu().numpy().shape == (B, C)
    assert len(out.tolist()) == B and len(out) == B and out.shape == (B, C)
    loss = F.cross_entropy(out, y)
    assert isinstance(loss.item(), float) and isinstance(float(loss.detach()), float)
    assert f"{loss:.3f}" == f"{loss.item():.3f}"
    with torch.no_grad():
        spread = out.softmax(0).max()  # a cross-batch statistic, fine for a metric
        top = out.sort(0).values[-1]
    assert isinstance(sample_state(spread), Mixed) and not spread.requires_grad and top.shape == (C,)
    print(out, loss, spread)
    assert backward_verdict(loss, owner) == "mean"


def test_repr_is_that_of_a_plain_tensor(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    loss = F.cross_entropy(out, y)
    assert repr(loss) == repr(loss.as_subclass(torch.Tensor)).replace("AliasBackward0", "NllLossBackward0")
    assert repr(out.detach()).startswith("tensor(") and str(loss).startswith("tensor(")


def test_torch_save_writes_a_plain_tensor(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    buf = io.BytesIO()
    torch.save({"out": out.detach(), "loss": F.cross_entropy(out, y).detach()}, buf)
    buf.seek(0)
    back = torch.load(buf)
    assert type(back["out"]) is torch.Tensor
    torch.testing.assert_close(back["out"], out.detach().as_subclass(torch.Tensor))


def test_casts_and_copies_keep_tracking(model, data, owner):
    x, _ = data
    out = outputs(model, x, owner)
    for t in (out.to(torch.float64), out.double(), out.float(), out.to("cpu"), out.contiguous(), out.clone(),
              out.half().float()):
        assert sample_state(t) == Batched(0), t
    assert sample_state(out.detach()) == Batched(0) and not out.detach().requires_grad


def test_views_and_slices_that_keep_the_samples(owner):
    logits, tokens, V = lm_outputs(owner)
    for t, dim in ((logits[:, -1], 0), (logits[..., :3], 0), (logits[:, None], 0), (logits.transpose(0, 1), 1),
                   (logits.permute(2, 0, 1), 1), (logits.unsqueeze(0), 1), (logits.flatten(1), 0),
                   (logits.mT, 0), (logits.movedim(0, -1), 2), (logits.narrow(1, 0, 2), 0),
                   (logits.select(2, 0), 0), (logits.expand(2, -1, -1, -1), 1), (logits.chunk(2, dim=2)[1], 0)):
        assert sample_state(t) == Batched(dim), t.shape
    assert sample_state(logits.reshape(B, -1)) == Batched(0)
    assert sample_state(logits.reshape(-1)) == Batched(0, flat=tokens.shape[1] * V)


def test_per_sample_indexing_and_gather(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    logp = out.log_softmax(1)
    picked = logp[torch.arange(B), y]
    assert sample_state(picked) == Batched(0)
    torch.testing.assert_close(picked, logp.gather(1, y[:, None]).squeeze(1))
    assert backward_verdict(-picked.mean(), owner) == "mean"


def test_in_graph_loss_gets_the_owner_reduction(data):
    x, _ = data
    owner = Owner(in_graph_reduction="sum")
    w = torch.randn(D, requires_grad=True)
    loss, logits = track_outputs(((x @ w).sum(), x * w), B, owner)
    assert sample_state(loss) == Reduced("sum") and sample_state(logits) == Batched(0)
    assert backward_verdict(loss + 0.1 * logits.pow(2).sum(), owner) == "sum"


def test_huggingface_model_output(data, owner):
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    x, y = data
    w = torch.randn(D, C, requires_grad=True)
    logits = x @ w
    raw = modeling_outputs.SequenceClassifierOutput(loss=F.cross_entropy(logits, y), logits=logits)
    out = track_outputs(raw, B, owner)
    assert type(out) is type(raw)
    assert sample_state(out.loss) == Reduced("mean") and sample_state(out["logits"]) == Batched(0)
    assert backward_verdict(out.loss, owner) == "mean"


def test_autograd_backward_and_grad_deliver_the_verdict(model, data):
    x, y = data
    owner = Owner()
    torch.autograd.backward(F.cross_entropy(outputs(model, x, owner), y, reduction="sum"))
    assert owner.verdicts == ["sum"]
    grads = torch.autograd.grad(F.cross_entropy(outputs(model, x, owner), y), list(model.parameters()))
    assert owner.verdicts == ["sum", "mean"] and grads[0].shape == model[0].weight.shape


def test_verdict_comes_before_the_gradients(model, data):
    x, y = data
    log = []
    owner = Owner(log=log)
    raw = model(x)
    raw.register_hook(lambda g: log.append(("output grad", tuple(g.shape))))
    out = track_outputs(raw, B, owner)
    F.cross_entropy(out, y).backward()
    assert log == [("verdict", "mean"), ("output grad", (B, C)), ("verdict over", None)]


def test_untracked_computations_are_untouched(owner):
    a = torch.randn(3, 3)
    assert type(a @ a) is torch.Tensor and type(a.softmax(0)) is torch.Tensor
    assert type(F.cross_entropy(a, torch.tensor([0, 1, 2]))) is torch.Tensor


# ----------------------------------------------------------------------------- refused

def test_centred_predictions_are_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    refused(lambda: F.cross_entropy(out - out.mean(0), y), "Tensor.sub", "statistic of the whole batch")
    refused(lambda: ((out - out.detach().mean(0)) ** 2).mean(), "Tensor.sub")  # a detached statistic too
    assert owner.verdicts == []


def test_in_batch_contrastive_loss_is_refused(data, owner):
    x, _ = data
    enc_a, enc_b = nn.Linear(D, 3), nn.Linear(D, 3)
    a, b = track_outputs((enc_a(x), enc_b(x)), B, owner)
    msg = refused(lambda: F.cross_entropy(a @ b.T / 0.1, torch.arange(B)), "Tensor.matmul")
    assert "every other sample" in msg
    refused(lambda: torch.einsum("id,jd->ij", a, b), "torch.einsum")


def test_softmax_over_the_batch_is_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    refused(lambda: F.nll_loss(out.softmax(0).log(), y), "Tensor.softmax", "sample dim")
    refused(lambda: F.log_softmax(out, dim=0), "F.log_softmax")
    refused(lambda: out.cumsum(0), "Tensor.cumsum")


def test_ignore_index_hit_with_mean_is_refused(owner):
    logits, tokens, V = lm_outputs(owner)
    y = tokens.clone()
    y[0, -1] = -100
    msg = refused(lambda: F.cross_entropy(logits.view(-1, V), y.view(-1)), "F.cross_entropy", "ignore_index=-100")
    assert "mask.sum(1)" in msg  # the per-sequence formula is offered
    y[0, -1] = 3
    y[1, 0] = 5
    refused(lambda: F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=5), "ignore_index=5")
    F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="sum", ignore_index=5)  # sum is per-sample


def test_class_weights_with_mean_are_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    refused(lambda: F.cross_entropy(out, y, weight=torch.rand(C)), "F.cross_entropy", "weight")
    refused(lambda: F.mse_loss(out, torch.randn(B, C), weight=torch.rand(B, C)), "F.mse_loss", "sum of the weights")
    ok = F.cross_entropy(out, y, weight=torch.rand(C), reduction="none").mean()
    assert sample_state(ok) == Reduced("mean")


def test_mean_plus_sum_is_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    refused(lambda: F.cross_entropy(out, y) + out.pow(2).sum(), "Tensor.add", "ambiguous")


def test_targets_of_another_number_of_samples_are_refused(owner):
    logits, tokens, V = lm_outputs(owner)
    time_major = tokens.T.reshape(-1)[: B * tokens.shape[1] - 1]
    refused(lambda: F.cross_entropy(logits.view(-1, V), time_major), "F.cross_entropy", "do not line up")
    out = track_outputs(torch.randn(B, 1, requires_grad=True), B, owner)
    refused(lambda: F.mse_loss(out, torch.randn(B)), "F.mse_loss", "do not line up")
    refused(lambda: ((out - torch.randn(B)) ** 2).mean(), "Tensor.sub", "paired with every")


def test_non_scalar_backward_is_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    per = F.cross_entropy(out, y, reduction="none")
    refused(lambda: per.backward(torch.ones(B)), "Tensor.backward", "per-sample")
    refused(lambda: out.mean(0).backward(torch.ones(C)), "Tensor.backward", "non-scalar")
    refused(lambda: torch.autograd.backward(per, torch.ones(B)), "torch.autograd.backward")
    assert owner.verdicts == []


def test_indexing_some_samples_is_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    refused(lambda: out[1:], "Tensor.__getitem__", "slices")
    refused(lambda: out[y > 1], "Tensor.__getitem__", "mask")
    refused(lambda: out[torch.randperm(B)], "Tensor.__getitem__")
    refused(lambda: out[0].pow(2).sum().backward(), "Tensor.backward", "only some")


@pytest.mark.parametrize("per_sample_loop", [
    lambda out, y: torch.stack([F.cross_entropy(o[None], t[None]) for o, t in zip(out, y)]).mean(),
    lambda out, y: sum(F.cross_entropy(out[i:i + 1], y[i:i + 1]) for i in range(len(y))) / len(y),
    lambda out, y: torch.cat([out[i][None].log_softmax(1)[:, y[i]] for i in range(len(y))]).neg().mean(),
    lambda out, y: sum(F.cross_entropy(out.select(0, i)[None], y[i][None]) for i in range(len(y))) * (1 / len(y)),
], ids=["stack", "python-sum", "cat", "select"])
def test_a_loop_over_the_samples_is_a_separable_mean(model, data, owner, per_sample_loop):
    """Iterating over the samples gives each one's own value; all of them stacked in order or
    summed rebuild the batch (same verdict and gradient as the batched loss)."""
    x, y = data
    loss = per_sample_loop(outputs(model, x, owner), y)
    assert sample_state(loss) == Reduced("mean")
    assert backward_verdict(loss, owner) == "mean"
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for g, want in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("mixing", [
    lambda out: torch.stack([o for o in out][::-1]).pow(2).mean(),  # rows no longer line up with samples
    lambda out: torch.stack([out[0] - out[1]] * B).pow(2).mean(),
    lambda out: (out[0] * out[1]).sum(),
    lambda out: sum(o.sum() for o in out[:-1]) + out[0].sum(),  # sample 0 twice, the last never
    lambda out: torch.stack([o - out.mean(0) for o in out]).pow(2).mean(),
], ids=["reversed", "difference", "product", "counted-twice", "centred"])
def test_combining_different_samples_from_a_loop_is_refused(model, data, owner, mixing):
    x, _ = data
    with pytest.raises(DPCompileError):
        mixing(outputs(model, x, owner)).backward()
    assert owner.verdicts == [] and all(p.grad is None for p in model.parameters())


def test_concatenating_along_the_sample_dim_is_refused(data, owner):
    x, _ = data
    enc = nn.Linear(D, 3)
    z1, z2 = track_outputs((enc(x), enc(x + 0.1)), B, owner)
    refused(lambda: torch.cat([z1, torch.randn(2, 3)]), "torch.cat", "sample dim")
    refused(lambda: torch.cat([z1, z2], dim=0), "torch.cat")  # two views of each sample on one axis
    assert sample_state(torch.cat([z1, z2], dim=1)) == Batched(0)


def test_op_without_a_rule_is_refused(model, data, owner):
    x, _ = data
    out = outputs(model, x, owner)
    refused(lambda: torch.cdist(out, torch.randn(2, C)), "torch.cdist", "no rule")
    with torch.no_grad():
        assert isinstance(sample_state(torch.cdist(out, torch.randn(2, C))), Mixed)  # fine for a metric


def test_nonlinear_function_of_a_reduced_loss_is_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    loss = F.cross_entropy(out, y)
    refused(lambda: loss.log(), "Tensor.log", "nonlinear")
    refused(lambda: loss * loss, "Tensor.mul")
    refused(lambda: 1 / loss, "Tensor.__rdiv__")


def test_division_by_a_count_of_the_batch_is_refused(owner):
    logits, tokens, V = lm_outputs(owner)
    y = tokens.clone()
    y[0, 2:] = -100
    per_tok = F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="none")
    mask = y.view(-1) != -100
    refused(lambda: per_tok.sum() / mask.sum(), "Tensor.div", "Python number")


def test_two_owners_combined_are_refused(data):
    x, y = data
    o1, o2 = Owner(), Owner()
    a = track_outputs(nn.Linear(D, C)(x), B, o1)
    b = track_outputs(nn.Linear(D, C)(x), B, o2)
    refused(lambda: F.cross_entropy(a, y) + F.cross_entropy(b, y), "Tensor.add", "two different private models")
    # a detached output of another model is a per-sample constant (distillation target): fine
    assert sample_state(F.kl_div(a.log_softmax(1), b.detach().softmax(1), reduction="batchmean")) == Reduced("mean")


def test_parameters_used_outside_the_model_are_refused(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    head = nn.Linear(C, C)
    refused(lambda: F.cross_entropy(head(out), y), "F.linear", "requires grad")


def test_in_place_change_through_a_detached_alias_is_refused(model, data, owner):
    x, _ = data
    raw = model(x)
    out = track_outputs(raw, B, owner)
    refused(lambda: out.detach().sub_(1.0), "Tensor.sub_", ".detach()")
    refused(lambda: out.data.sub_(out.data.mean(0)), "Tensor.sub_", ".detach() or .data")
    plain = raw.detach()  # an alias the tracking does not see...
    plain -= plain.mean(0)
    refused(lambda: out.pow(2).mean(), "Tensor.pow", "modified in place")  # ...but its change is seen at the next use


# ----------------------------------------------------------------------------- more accepted forms

def test_grad_scaler_keeps_the_reduction(model, data, owner):
    x, y = data
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = F.cross_entropy(outputs(model, x, owner), y, reduction="sum")
    scaled = scaler.scale(loss)
    assert sample_state(scaled) == Reduced("sum")
    assert backward_verdict(scaled, owner) == "sum"
    refused(lambda: loss * torch.tensor(4.0), "Tensor.mul", "Python number")  # the same factor, by hand


def test_per_sample_similarities_are_accepted(data, owner):
    x, _ = data
    enc_a, enc_b = nn.Linear(D, 3), nn.Linear(D, 3)
    a, b = track_outputs((enc_a(x), enc_b(x)), B, owner)
    za, zb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    assert sample_state(za) == Batched(0)
    positive = (za * zb).sum(1)
    torch.testing.assert_close(positive, F.cosine_similarity(a, b))
    assert sample_state(torch.einsum("bd,bd->b", za, zb)) == Batched(0)
    assert sample_state(torch.bmm(za[:, None], zb[:, :, None])) == Batched(0)
    assert backward_verdict((1 - positive).mean(), owner) == "mean"
    refused(lambda: F.normalize(a, dim=0), "F.normalize", "sample dim")


def test_evaluation_loss_without_grad_is_not_refused(owner):
    logits, tokens, V = lm_outputs(owner)
    y = tokens.clone()
    y[0, -1] = -100
    with torch.no_grad():
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1))  # divides by the valid tokens: fine for a metric
    assert isinstance(sample_state(loss), Mixed) and isinstance(loss.item(), float)
    refused(lambda: logits.sum() * loss, "Tensor.mul", "mixes the samples")  # but it cannot join a loss


def test_gradients_with_respect_to_the_outputs(model, data, owner):
    x, y = data
    out = outputs(model, x, owner)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), out)
    assert owner.verdicts == ["sum"] and type(g) is torch.Tensor and g.shape == (B, C)


def test_every_name_in_the_rule_table_resolves():
    from dpcompile.privacy import loss_tracking

    unresolved = [n for _, names in loss_tracking._RULE_SPEC for n in names.split() if not loss_tracking._resolve(n)]
    assert unresolved == []


def test_untracked_outputs_cannot_join_a_loss(data, owner):
    x, y = data
    w = torch.randn(D, C, requires_grad=True)
    logits = x @ w
    time_major = (x @ w).T  # (C, B): no batch on dim 0, left untracked
    out, aux = track_outputs((logits, time_major), B, owner)
    assert type(aux) is torch.Tensor
    loss = F.cross_entropy(out, y)
    refused(lambda: loss + aux.pow(2).mean(), "Tensor.add", "not a tracked output")
    refused(lambda: torch.autograd.backward([loss, aux.sum()]), "torch.autograd.backward", "untracked value")
    assert owner.verdicts == []
