"""Re-Attention (dpcompile.nn): the formula against a direct float64 computation, its invariants
(zero or uniform variance = standard attention; the correction removes the log-normal bias),
error propagation against Monte Carlo, and exact clipping under the dp backend (float64 oracle)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile.nn import (ReAttention, ReAttentionBlock, effective_error_variance, layer_norm_variance,
                          linear_variance, reattention_sdpa, relu_moments)
from models import batch_loss, fresh_seed, oracle_clipped_sum


def direct_reattention(q, k, v, var, mask=None):
    """Element by element: logit_ij = τ Σ_c q_ic k_jc − ½ τ² Σ_c q_ic² var_jc (+ mask), softmax, Σ_j a_ij v_j.
    q, k (Tq|Tk, d), var (Tk, d) per coordinate, mask (Tq, Tk) additive or None; float64 loops."""
    tq, d = q.shape
    tau = 1.0 / math.sqrt(d)
    out = torch.zeros(tq, v.shape[1], dtype=torch.float64)
    for i in range(tq):
        logits = []
        for j in range(k.shape[0]):
            s = tau * sum(float(q[i, c] * k[j, c]) for c in range(d))
            s -= 0.5 * tau * tau * sum(float(q[i, c] ** 2 * var[j, c]) for c in range(d))
            logits.append(s + (0.0 if mask is None else float(mask[i, j])))
        top = max(logits)
        weights = [math.exp(s - top) for s in logits]
        total = sum(weights)
        for j, w in enumerate(weights):
            out[i] += (w / total) * v[j].double()
    return out


@pytest.mark.parametrize("per_coordinate", [True, False], ids=["per_coordinate", "isotropic"])
def test_formula_matches_a_direct_computation(per_coordinate):
    torch.manual_seed(fresh_seed())
    B, H, T, d = 2, 2, 5, 4
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    var = torch.rand(B, H, T, d, dtype=torch.float64) * 3 if per_coordinate else torch.rand(B, H, T, dtype=torch.float64) * 3
    pad = torch.ones(B, 1, 1, T, dtype=torch.bool)
    pad[1, ..., 3:] = False  # sample 1 has two padded positions
    got = reattention_sdpa(q, k, v, var, attn_mask=pad)
    for b in range(B):
        for h in range(H):
            full_var = var[b, h] if per_coordinate else var[b, h][:, None].expand(T, d)
            mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(~pad[b, 0].expand(T, T), float("-inf"))
            want = direct_reattention(q[b, h], k[b, h], v[b, h], full_var, mask)
            assert torch.allclose(got[b, h], want, atol=1e-12, rtol=1e-10)


def test_causal_mask_matches_a_direct_computation():
    torch.manual_seed(fresh_seed())
    q, k, v = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    var = torch.rand(4, 3, dtype=torch.float64)
    causal = torch.zeros(4, 4, dtype=torch.float64).masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))
    got = reattention_sdpa(q, k, v, var, is_causal=True)
    assert torch.allclose(got, direct_reattention(q, k, v, var, causal), atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_zero_variance_is_scaled_dot_product_attention(mask_kind):
    torch.manual_seed(fresh_seed())
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64) for _ in range(3))
    mask = {"none": None, "bool": torch.rand(2, 1, 6, 6) > 0.3, "additive": torch.randn(2, 1, 6, 6, dtype=torch.float64),
            "causal": None}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query may attend somewhere
    causal = mask_kind == "causal"
    got = reattention_sdpa(q, k, v, torch.zeros(2, 3, 6), attn_mask=mask, is_causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert torch.allclose(got, want, atol=1e-12)


def test_uniform_isotropic_variance_changes_nothing():
    """The same σ² for every key shifts each row of logits by a constant: softmax is unchanged."""
    torch.manual_seed(fresh_seed())
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(3))
    got = reattention_sdpa(q, k, v, torch.full((2, 5), 2.5, dtype=torch.float64))
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-12)


def test_correction_removes_the_lognormal_inflation():
    """Keys k_j = μ_j + √v_j ε: E[exp(corrected logit)] = exp(τ q·μ_j) (what noise-free attention
    would use), while the plain logit is inflated by exp(½ τ² Σ q² v) — attention distraction."""
    torch.manual_seed(fresh_seed())
    d, n = 4, 400_000
    q = torch.randn(d, dtype=torch.float64)
    q = 1.5 * q / q.norm()  # ‖q‖ fixed: the inflation is sizeable and the Monte Carlo error small
    mu = torch.randn(3, d, dtype=torch.float64) * 0.7
    var = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)[:, None].expand(3, d)
    keys = mu + var.sqrt() * torch.randn(n, 3, d, dtype=torch.float64)
    tau = 1 / math.sqrt(d)
    plain = tau * keys @ q                                         # (n, 3)
    corrected = plain - 0.5 * tau**2 * (q * q * var).sum(-1)
    clean = torch.exp(tau * mu @ q)
    assert torch.allclose(corrected.exp().mean(0), clean, rtol=2e-2)
    inflation = plain.exp().mean(0) / clean
    assert torch.allclose(inflation, torch.exp(0.5 * tau**2 * (q * q * var).sum(-1)), rtol=2e-2)
    assert inflation[2] > 1.2  # the high-variance key really is favoured without the correction


def test_reattention_module_with_zero_variance_is_multihead_attention():
    torch.manual_seed(fresh_seed())
    attn = ReAttention(8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    got = attn(x, torch.zeros(3, 5, dtype=torch.float64), is_causal=True)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    want, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert torch.allclose(got, want, atol=1e-12)


def test_error_propagation_matches_monte_carlo():
    torch.manual_seed(fresh_seed())
    lin = nn.Linear(5, 3).double()
    x, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    samples = lin(x + var.sqrt() * torch.randn(200_000, 5, dtype=torch.float64)).detach()
    assert torch.allclose(linear_variance(var, lin), samples.var(0), rtol=2e-2)
    assert torch.allclose(linear_variance(torch.tensor(0.3, dtype=torch.float64), lin, per_coordinate=False),
                          linear_variance(torch.full((5,), 0.3, dtype=torch.float64), lin))
    mean, v = torch.tensor([-1.0, 0.0, 0.7], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    z = torch.relu(mean + v.sqrt() * torch.randn(400_000, 3, dtype=torch.float64))
    m_out, v_out = relu_moments(mean, v)
    assert torch.allclose(m_out, z.mean(0), rtol=1e-2, atol=3e-3) and torch.allclose(v_out, z.var(0), rtol=2e-2, atol=3e-3)
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
    h = torch.randn(2, 6, dtype=torch.float64)
    want = ln.weight.detach() ** 2 * 0.1 / (h.var(-1, unbiased=False, keepdim=True) + ln.eps)
    assert torch.allclose(layer_norm_variance(h, torch.full((2,), 0.1, dtype=torch.float64), ln), want)


def test_effective_error_is_the_papers_definition():
    p = torch.tensor([0.5, 0.01, 0.0])
    got = effective_error_variance(p, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=100.0,
                                   min_frequency=1e-3)
    want = torch.tensor([(2 * 0.5 / (100 * 0.5)) ** 2, (2 * 0.5 / (100 * 0.01)) ** 2, (2 * 0.5 / (100 * 1e-3)) ** 2])
    assert torch.allclose(got, want)


def test_bad_inputs_are_refused_with_a_clear_error():
    q = torch.randn(2, 3, 4)
    with pytest.raises(dpcompile.DPCompileError, match="key_variance"):
        reattention_sdpa(q, q, q, torch.zeros(2, 5))
    with pytest.raises(dpcompile.DPCompileError, match="x_variance"):
        ReAttention(4, 2)(q, torch.zeros(2, 4))
    with pytest.raises(dpcompile.DPCompileError, match="divisible"):
        ReAttention(6, 4)
    with pytest.raises(dpcompile.DPCompileError, match="frequencies"):
        effective_error_variance(torch.tensor([-0.1]), 1.0, 1.0, 10.0)


class LongTailNet(nn.Module):
    """Token + position embeddings, a Re-Attention block fed each token's effective error, a head."""

    vocab, T = 30, 6

    def __init__(self, causal=False):
        super().__init__()
        self.emb, self.pos = nn.Embedding(self.vocab, 16), nn.Embedding(self.T, 16)
        self.blocks = nn.ModuleList([ReAttentionBlock(16, 2)])
        self.head = nn.Linear(16, 3)
        self.causal = causal
        freq = torch.rand(self.vocab) ** 4  # long-tailed
        self.register_buffer("token_variance", effective_error_variance(freq / freq.sum(), 1.0, 1.0, 32.0))

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        var = F.embedding(ids, self.token_variance[:, None]).squeeze(-1)  # (B, T): σ_eff² of each token
        pad = (ids != 0)[:, None, None, :]  # token 0 is padding: nobody attends to it
        for block in self.blocks:
            x = block(x, var, attn_mask=None if self.causal else pad, is_causal=self.causal)
        return self.head(x.mean(1))

    @classmethod
    def batch(cls, b):
        ids = torch.randint(1, cls.vocab, (b, cls.T))
        ids[0, 4:] = 0
        return ids, torch.randint(0, 3, (b,))


@pytest.mark.parametrize("causal,strategy", [(False, "auto"), (True, "ghost")], ids=["padding_mask-auto", "causal-ghost"])
def test_compiled_reattention_clips_like_the_oracle(causal, strategy):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = LongTailNet(causal)
    x, y = LongTailNet.batch(5)
    R = 0.05
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": R,
                                                           "strategy": strategy})
    batch_loss(compiled(x), y).backward()
    want, norms = oracle_clipped_sum(model, x, y, R)
    assert (norms > R).all()
    scale = max(float(w.abs().max()) for w in want.values())
    for name, p in model.named_parameters():
        ref = want[name]
        # k_proj.bias has a zero true gradient (softmax ignores a per-query constant): judge it on the global scale
        denom = max(float(ref.abs().max()), 1e-3 * scale)
        err = float((p.grad.double() * 5 - ref).abs().max()) / denom
        assert err < 1e-5, f"{name}: relative error {err:.2e} (seed {seed})"
    assert torch.allclose(dpcompile.privacy_state(model).last_sample_norms.double(), norms, rtol=1e-4)
