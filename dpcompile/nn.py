"""Re-Attention: attention corrected for the error that DP noise leaves in the keys.

Ding, Wu, Meng, Luo, Wang, Pan, "Delving into Differentially Private Transformer" (ICML 2024;
earlier "DPFormer"). DP-SGD leaves every learnt parameter with an error, and that error is
largest, relative to the signal, for rows learnt from few samples: the embedding of a token of
frequency p_t is updated by about B·p_t occurrences per step against noise of standard
deviation σR, so its *effective error* is (the paper's definition)

    σ_eff(t) = σ R / (B p_t)          (σ noise multiplier, R clip bound, B expected batch size).

Attention distraction. Let key k_j carry an error of per-coordinate variance v_j (diagonal
covariance, independent of the query). The logit s_ij = τ q_i·k_j (τ = 1/√d_head) is then
Gaussian with variance Var s_ij = τ² Σ_c q_ic² v_jc, and the softmax numerator is inflated on
average: E[exp s_ij] = exp(τ q_i·E[k_j]) · exp(½ Var s_ij). High-variance (rare, long-tail)
keys draw attention they have not earned. Re-Attention divides the inflation out:

    ReAttn(Q, K, V)_i = Σ_j softmax_j( τ q_i·k_j − ½ τ² Σ_c q_ic² v_jc + m_ij ) v_j

(m: the usual additive mask). With isotropic key variance v_jc = σ_j² this is the paper's
correction exp(C σ_j²/2), C = τ²⟨q_i, q_i⟩; with v = 0 it is exactly scaled dot-product
attention. The key variances come from error propagation by moment matching (the paper's
"Bayesian deep learning" step): a Linear layer maps per-coordinate variances v ↦ v (W∘W)ᵀ,
LayerNorm v ↦ γ² v / Var_c(x) (its statistics taken as constants), ReLU by the moments of a
rectified Gaussian. Variances are estimates, not parameters: they are computed without
gradient (the query in the correction keeps its gradient, as the logit does).

Privacy. Re-Attention changes the model, not the mechanism: the correction of sample i uses
only sample i's own queries and key variances, so per-sample gradients stay per-sample and
dpcompile clips them exactly (tests/test_reattention.py checks against the float64 oracle).
The token-frequency table behind σ_eff must not be read off the private training set without
privacy: use public frequencies (a public corpus, or a known data-generating prior), or a DP
histogram whose ε is added to the budget.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DPCompileError

__all__ = [
    "reattention_sdpa",
    "effective_error_variance",
    "linear_variance",
    "layer_norm_variance",
    "relu_moments",
    "ReAttention",
    "ReAttentionBlock",
]


def reattention_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_variance: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` (no dropout) with the Re-Attention correction.

    query (..., Tq, d), key (..., Tk, d), value (..., Tk, dv). ``key_variance`` is the error
    variance of each key: (..., Tk) for isotropic (one σ_j² per key) or (..., Tk, d) per
    coordinate, broadcastable to the key's leading dims. ``attn_mask``: boolean (True = may
    attend, as in SDPA) or additive float, broadcastable to (..., Tq, Tk).
    """
    _check_shapes(query, key, value, key_variance)
    tau = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = torch.matmul(query, key.transpose(-2, -1)) * tau
    logits = logits - 0.5 * tau * tau * _logit_variance(query, key_variance, key.dim())
    logits = _apply_masks(logits, attn_mask, is_causal)
    return torch.matmul(torch.softmax(logits, dim=-1), value)


def _logit_variance(query: torch.Tensor, key_variance: torch.Tensor, key_dim: int) -> torch.Tensor:
    """Σ_c q_ic² v_jc (before the τ² factor), shape (..., Tq, Tk)."""
    q2 = query * query
    if key_variance.dim() == key_dim:  # per-coordinate variances
        return torch.matmul(q2, key_variance.transpose(-2, -1))
    return q2.sum(-1, keepdim=True) * key_variance.unsqueeze(-2)  # isotropic: ‖q_i‖² σ_j²


def _apply_masks(logits: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    if is_causal:
        tq, tk = logits.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=logits.device).tril(diagonal=tk - tq)
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is None:
        return logits
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf"))
    return logits + attn_mask


def _check_shapes(query, key, value, key_variance) -> None:
    if query.dim() < 2 or query.dim() != key.dim() or key.dim() != value.dim():
        raise DPCompileError(f"reattention_sdpa: query, key and value need the same rank >= 2 "
                             f"(got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)})")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise DPCompileError(f"reattention_sdpa: query/key feature sizes or key/value lengths differ "
                             f"(got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)})")
    per_coordinate = key_variance.dim() == key.dim()
    if not per_coordinate and key_variance.dim() != key.dim() - 1:
        raise DPCompileError(f"reattention_sdpa: key_variance must have shape (..., Tk) or (..., Tk, d) like the "
                             f"key {tuple(key.shape)}; got {tuple(key_variance.shape)}")
    tail = key_variance.shape[-2:] if per_coordinate else key_variance.shape[-1:]
    want = key.shape[-2:] if per_coordinate else key.shape[-2:-1]
    if tuple(tail) != tuple(want):
        raise DPCompileError(f"reattention_sdpa: key_variance {tuple(key_variance.shape)} does not match the key "
                             f"{tuple(key.shape)} (one variance per key position{' and coordinate' * per_coordinate})")


def effective_error_variance(token_frequency: torch.Tensor, noise_multiplier: float, max_grad_norm: float,
                             expected_batch_size: float, min_frequency: float | None = None) -> torch.Tensor:
    """σ_eff(t)² = (σ R / (B p_t))² for each token t (the paper's effective error, squared).

    ``token_frequency`` p_t: expected occurrences of t per sample, so that B·p_t is the expected
    number of gradient contributions to t's embedding row in one batch; it must come from
    *public* data (see the module docstring). Frequencies below ``min_frequency`` (default
    1/(1000·B)) are raised to it, so unseen tokens get a large but finite variance.
    """
    p = torch.as_tensor(token_frequency, dtype=torch.float32)
    if (p < 0).any() or not torch.isfinite(p).all():
        raise DPCompileError("effective_error_variance: token frequencies must be finite and >= 0")
    if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
        raise DPCompileError("effective_error_variance: need noise_multiplier >= 0, max_grad_norm > 0 and "
                             "expected_batch_size > 0")
    floor = 1.0 / (expected_batch_size * 1000.0) if min_frequency is None else min_frequency
    sigma_eff = noise_multiplier * max_grad_norm / (expected_batch_size * p.clamp_min(floor))
    return sigma_eff * sigma_eff


def linear_variance(variance: torch.Tensor, linear: nn.Linear, per_coordinate: bool = True) -> torch.Tensor:
    """Per-coordinate variance (..., d_out) after ``linear`` (deterministic weights): v ↦ v (W∘W)ᵀ.

    ``variance``: (..., d_in) per coordinate, or with ``per_coordinate=False`` (...,) isotropic
    (one variance for all coordinates of a position).
    """
    w2 = linear.weight.detach().square()
    if per_coordinate:
        if variance.shape[-1] != linear.in_features:
            raise DPCompileError(f"linear_variance: per-coordinate variance must end in {linear.in_features} "
                                 f"features, got {tuple(variance.shape)}")
        return torch.matmul(variance, w2.t())
    return variance.unsqueeze(-1) * w2.sum(1)


def layer_norm_variance(x: torch.Tensor, variance: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """Per-coordinate variance (..., d) after LayerNorm, first order: γ² v / (Var_c(x) + eps), the
    normalisation statistics held constant. ``variance``: (..., d) or isotropic (...,)."""
    x = x.detach()
    inv = 1.0 / (x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    if variance.dim() == x.dim() - 1:
        variance = variance.unsqueeze(-1)
    gamma2 = norm.weight.detach().square() if norm.weight is not None else x.new_ones(x.shape[-1])
    return variance * inv * gamma2


def relu_moments(mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ReLU(z), z ~ N(mean, variance) (moment matching)."""
    std = variance.clamp_min(1e-12).sqrt()
    alpha = mean / std
    cdf = 0.5 * (1 + torch.erf(alpha / math.sqrt(2)))
    pdf = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2 * math.pi)
    out_mean = mean * cdf + std * pdf
    second = (mean * mean + variance) * cdf + mean * std * pdf
    return out_mean, (second - out_mean * out_mean).clamp_min(0)


class ReAttention(nn.Module):
    """Multi-head self-attention with the Re-Attention correction.

    ``forward(x, x_variance, attn_mask=None, is_causal=False)``: x (B, T, d); x_variance the
    error variance of x, (B, T) isotropic or (B, T, d) per coordinate. The key variance is
    propagated through the key projection (``linear_variance``). ``attn_mask`` as in SDPA,
    broadcastable to (B, heads, T, T). With x_variance = 0 it is standard multi-head attention.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise DPCompileError(f"ReAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, x_variance: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        if tuple(x_variance.shape) not in ((b, t), (b, t, d)):
            raise DPCompileError(f"ReAttention: x_variance must have shape {(b, t)} or {(b, t, d)}, "
                                 f"got {tuple(x_variance.shape)}")
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        per_coordinate = x_variance.dim() == 3
        key_variance = self._heads(linear_variance(x_variance.detach(), self.k_proj, per_coordinate))
        y = reattention_sdpa(q, k, v, key_variance, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        return z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)


class ReAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block with Re-Attention: x + Attn(LN(x)), then x + MLP(LN(x)).

    The error variance enters the attention through LN₁ (``layer_norm_variance``) and the key
    projection; along the residual stream it is carried unchanged (an approximation: the
    variance added by the attention and MLP outputs is not tracked).
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = ReAttention(d_model, n_heads)
        self.fc, self.fc_out = nn.Linear(d_model, mlp_ratio * d_model), nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor, x_variance: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, layer_norm_variance(x, x_variance, self.ln1), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
