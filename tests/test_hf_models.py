"""Hugging Face models built from small random configs (no download) compile unchanged and clip
exactly: GPT-2 (Conv1D, tied embeddings), BERT with a padding mask, Llama (RMSNorm, rotary, GQA), ViT."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import transformers  # noqa: E402  (in the [test] extra)

import dpcompile  # noqa: E402

V, T, B = 50, 8, 3


class Logits(torch.nn.Module):
    """model(inputs...) -> logits, the way a training loop calls an HF model."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x, mask=None):
        kwargs = {self.key: x}
        if mask is not None:
            kwargs["attention_mask"] = mask
        return self.model(**kwargs).logits


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg), "input_ids", (torch.randint(0, V, (B, T)),), torch.randint(0, V, (B, T))


def bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0  # a padded sequence
    mask[2, 3:] = 0
    return (transformers.BertForSequenceClassification(cfg), "input_ids", (torch.randint(0, V, (B, T)), mask),
            torch.randint(0, 3, (B,)))


def llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg), "input_ids", (torch.randint(0, V, (B, T)),), torch.randint(0, V, (B, T))


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(cfg), "pixel_values", (torch.randn(B, 3, 8, 8),), torch.randint(0, 3, (B,))


def sample_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def assert_clipped_like_oracle(model, rows, R):
    """p.grad == Σ_b min(1, R/‖g_b‖) g_b / B for per-sample float64 gradients `rows` (a list of
    {name: grad}); errors relative to the largest entry (some true gradients are ~0, e.g. key biases)."""
    per_sample = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    norms = torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1)
    factors = (R / (norms + 1e-6)).clamp(max=1)
    want = {k: torch.einsum("b,b...->...", factors, g) / B for k, g in per_sample.items()}
    scale = max(float(w.abs().max()) for w in want.values())
    for name, p in model.named_parameters():
        err = float((p.grad.double() - want[name]).abs().max()) / scale
        assert err < 1e-5, f"{name}: error {err:.2e} relative to the largest gradient entry"
    return norms


@pytest.mark.parametrize("build", [gpt2, bert, llama, vit], ids=["gpt2", "bert", "llama", "vit"])
def test_hf_model_clips_like_the_oracle(build):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed()))))
    hf, key, inputs, target = build()
    hf.eval()  # dropout off so the oracle sees the same function
    model = Logits(hf, key)
    R = 0.01
    compiled = torch.compile(model, backend="dp", options={"max_grad_norm": R, "noise_multiplier": 0.0})
    logits = compiled(*inputs)
    torch.stack([sample_loss(l[None], t[None]) for l, t in zip(logits, target)]).mean().backward()

    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    args64 = tuple(a.double() if a.is_floating_point() else a for a in inputs)

    def loss(p, *sample):
        *xs, y = sample
        return sample_loss(functional_call(model64, p, tuple(x[None] for x in xs)), y[None])

    # torch.func.grad one sample at a time (HF mask code has data-dependent branches vmap rejects)
    rows = [grad(loss)(params, *(a[b] for a in args64), target[b]) for b in range(B)]
    norms = assert_clipped_like_oracle(model, rows, R)
    assert (norms > R).all()
    if build is gpt2:
        assert model.model.lm_head.weight is model.model.transformer.wte.weight  # tied: one clipped gradient
    assert torch.allclose(dpcompile.privacy_state(model).last_sample_norms.double(), norms, rtol=1e-4)


class WithLoss(torch.nn.Module):
    """The HF way: model(input_ids, labels=...) returns the loss (a token mean over the batch)."""

    def __init__(self, model, key="input_ids"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x, y):
        return self.model(**{self.key: x}, labels=y).loss


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2-causal-lm", "bert-classification"])
def test_hf_in_model_loss_clips_like_the_oracle_when_every_sample_counts_the_same_tokens(build):
    """HF's labels= loss divides by the valid tokens of the whole batch; when every sequence has
    as many (causal LM: T-1 each, classification: 1 each) it is the mean of per-sequence losses."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed()))))
    hf, key, (ids, *_), target = build()
    hf.eval()
    labels = ids.clone() if build is gpt2 else target
    model = WithLoss(hf, key)
    R = 0.01
    compiled = torch.compile(model, backend="dp", options={"max_grad_norm": R, "noise_multiplier": 0.0})
    compiled(ids, labels).backward()

    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    rows = [grad(lambda p, x, y: functional_call(model64, p, (x[None], y[None])))(params, ids[b], labels[b])
            for b in range(B)]
    norms = assert_clipped_like_oracle(model, rows, R)
    assert (norms > R).all()


def test_hf_in_model_loss_with_unequal_padding_is_refused_at_run_time_with_the_fix():
    """With padding, the batch-wide token mean makes each sequence's gradient depend on the
    others' lengths, which clipping cannot bound: the step is refused, no gradient released."""
    hf, _, (ids,), _ = gpt2()
    labels = ids.clone()
    labels[0, 5:] = -100
    model = WithLoss(hf)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    with pytest.raises(Exception, match="Average each sequence's loss first"):
        compiled(ids, labels).backward()
    assert all(p.grad is None for p in model.parameters())


def test_padded_sequences_with_a_per_sequence_loss_clip_like_the_oracle():
    """The privacy unit is one sequence: ignored (-100) tokens drop out of its own mean."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed()))))
    hf, _, (ids,), _ = gpt2()
    hf.eval()
    labels = ids.clone()
    labels[0, 5:] = -100
    labels[2, 2:] = -100
    model = Logits(hf, "input_ids")

    def sequence_loss(logits, y):  # mean over this sequence's valid next-token targets
        return F.cross_entropy(logits[:-1], y[1:], ignore_index=-100)

    R = 0.01
    compiled = torch.compile(model, backend="dp", options={"max_grad_norm": R, "noise_multiplier": 0.0})
    logits = compiled(ids)
    torch.stack([sequence_loss(l, y) for l, y in zip(logits, labels)]).mean().backward()

    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    rows = [grad(lambda p, x, y: sequence_loss(functional_call(model64, p, (x[None],))[0], y))(params, ids[b], labels[b])
            for b in range(B)]
    assert_clipped_like_oracle(model, rows, R)
