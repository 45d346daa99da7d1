"""Per-sample building blocks that the passes insert into backward graphs.

Each function is plain torch code: it appears as one named node in the rewritten
graph (readable in the inspection tools), then gets traced into aten ops and handed
to Inductor. A *layout* is the tuple ``(dim, outer, inner)`` of ``batch_dim.Batched``.
Norms are accumulated in float32 whatever the compute dtype.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.func import vmap


def batch_front(x: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """(..., outer*B*inner, ...) -> (B, ..., outer*inner, ...): one slice per sample, same rank."""
    dim, outer, inner = layout
    x = x.unflatten(dim, (outer, -1, inner)).movedim(dim + 1, 0)
    return x.flatten(dim + 1, dim + 2)


def per_sample_rows(weights: torch.Tensor, x: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """x with every element of sample b multiplied by weights[b] (the BK re-weighting)."""
    dim, outer, inner = layout
    w = weights.to(x.dtype).view(1, -1, 1).expand(outer, -1, inner).reshape(-1)
    return x * w.view([-1 if d == dim else 1 for d in range(x.dim())])


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each x[b]."""
    return x.float().pow(2).flatten(1).sum(1)


def ghost_sq_norm_linear(a: torch.Tensor, b: torch.Tensor, la: tuple, lb: tuple) -> torch.Tensor:
    """‖a_b @ b_b‖² for mm(a, b) contracting over sample rows, via T×T Gram matrices.

    a: (n, N) with samples along dim 1, b: (N, m) with samples along dim 0.
    ‖Σ_t u_t v_tᵀ‖² = Σ_{t,s} (u_t·u_s)(v_t·v_s), no (n, m) tensor per sample.
    """
    A = batch_front(a, la).float()  # (B, n, T)
    V = batch_front(b, lb).float()  # (B, T, m)
    return (torch.bmm(A.mT, A) * torch.bmm(V, V.mT)).sum((1, 2))


def ghost_sq_norm_embedding(grad: torch.Tensor, indices: torch.Tensor, lg: tuple, li: tuple,
                            padding_idx: int) -> torch.Tensor:
    """‖embedding gradient of sample b‖² = Σ_{t,s} [x_t = x_s ≠ pad] ⟨g_t, g_s⟩, no vocab-sized tensor."""
    G = batch_front(grad, lg).float()
    B = G.shape[0]
    G = G.reshape(B, -1, G.shape[-1])  # (B, T, d)
    idx = batch_front(indices, li).reshape(B, -1)  # (B, T)
    same = idx.unsqueeze(2) == idx.unsqueeze(1)
    if padding_idx >= 0:
        same = same & (idx != padding_idx).unsqueeze(2)
    return (torch.bmm(G, G.mT) * same).sum((1, 2))


def instantiate_site(target, in_dims: tuple, index, *args):
    """Per-sample values (B, *site shape) of a summation site, by vmapping the op itself."""

    def one_sample(*a):
        out = target(*a)
        return out[index] if index is not None else out

    return vmap(one_sample, in_dims=in_dims)(*args)


def total_sq_norm(*sq_norms: torch.Tensor) -> torch.Tensor:
    """Σ over layers of the per-sample squared norms: the whole-model per-sample norm²."""
    return torch.stack(sq_norms).sum(0)


def instantiate_post(post: fx.GraphModule, n_sites: int, *args):
    """Apply the sample-free ops after the sites to each sample's site values."""
    in_dims = (0,) * n_sites + (None,) * (len(args) - n_sites)
    return vmap(post, in_dims=in_dims)(*args)


def weighted_sum(weights: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """Σ_b w_b x_b (memory-rich path: no second weight-gradient GEMM)."""
    w = weights.to(per_sample.dtype)
    return torch.tensordot(w, per_sample, dims=([0], [0]))


def clip_weights(total_sq: torch.Tensor, max_grad_norm: float, scale_mode: str, clipping: str,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w_b = C_b * s for the graph's per-sample gradient pieces g_b.

    The loss seen by backward is mean_b(l_b) ("mean") or sum_b(l_b) ("sum"), so a
    sample's own gradient is s*g_b with s = B or 1. C_b is min(1, R/‖s g_b‖) ("flat")
    or R/(‖s g_b‖ + γ) ("automatic"). Returns (w, per-sample norms ‖s g_b‖).
    """
    scale = total_sq.shape[0] if scale_mode == "mean" else 1
    norms = total_sq.sqrt() * scale
    if clipping == "automatic":
        factors = max_grad_norm / (norms + gamma)
    else:
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return factors * scale, norms


def privatize(weighted: torch.Tensor, noise: torch.Tensor, offset: int, scalars: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """(clipped sum + std * z) / divisor, z = noise[offset : offset + numel].

    scalars = [noise std, expected batch size or 0 for "the actual batch size"].
    """
    std, expected = scalars[0], scalars[1]
    divisor = torch.where(expected > 0, expected, torch.ones_like(expected) * weights.shape[0])
    z = noise.narrow(0, offset, weighted.numel()).view(weighted.shape)
    return ((weighted.float() + std * z.float()) / divisor).to(weighted.dtype)
