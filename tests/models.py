"""Small models covering every layer kind the passes support, and the float64 oracle."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


class MLP(nn.Module):
    def __init__(self, d_in=10, hidden=24, classes=5):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(F.relu(self.fc1(x)))))

    @staticmethod
    def batch(b):
        return torch.randn(b, 10), torch.randint(0, 5, (b,))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.head = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.gn(self.conv1(x))), 2)  # (B, 6, 4, 4)
        x = F.relu(self.conv2(F.pad(x, (1, 1, 1, 1))))
        return self.head(x.flatten(1))

    @staticmethod
    def batch(b):
        return torch.randn(b, 3, 8, 8), torch.randint(0, 4, (b,))


class Conv1dNet(nn.Module):
    """Conv1d over sequences plus an elementwise learned scale (RMSNorm-style parameter)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.gelu(self.conv(x)).transpose(1, 2)  # (B, L, 6)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return self.head(h.mean(1))

    @staticmethod
    def batch(b):
        return torch.randn(b, 4, 7), torch.randint(0, 3, (b,))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """GPT-style decoder: token + position embeddings, SDPA attention, LM head (tied or not)."""

    vocab, ctx = 40, 12

    def __init__(self, d=16, heads=2, layers=2, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(self.vocab, d), nn.Embedding(self.ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, self.vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @classmethod
    def batch(cls, b, t=8):
        return torch.randint(0, cls.vocab, (b, t)), torch.randint(0, cls.vocab, (b, t))


class BreakNet(nn.Module):
    """A model dynamo must split in two (a forced graph break)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, idx):
        h = torch.relu(self.fc1(self.emb(idx))).mean(1)
        torch._dynamo.graph_break()
        return self.fc2(h)

    @staticmethod
    def batch(b):
        return torch.randint(0, 30, (b, 5)), torch.randint(0, 3, (b,))


def sample_loss(output, target):
    """Cross-entropy of one sample (sequence outputs: mean over its tokens)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def batch_loss(output, target, reduction="mean"):
    """The training loss over the batch: mean (or sum) over samples of sample_loss."""
    per_token = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction="none")
    per_sample = per_token.view(output.shape[0], -1).mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def per_sample_grads(model, x, y):
    """{name: (B, *shape)} float64 per-sample gradients from torch.func (the oracle's source)."""
    model64 = _double_copy(model).cpu()
    params = {k: v.detach() for k, v in model64.named_parameters() if v.requires_grad}
    x, y = x.cpu(), y.cpu()

    def loss(p, xi, yi):
        return sample_loss(functional_call(model64, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    xd = x.double() if x.is_floating_point() else x
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, xd, y)


def oracle_clipped_sum(model, x, y, max_grad_norm, clipping="flat", gamma=0.01):
    """Σ_i C_i g_i in float64 from torch.func per-sample gradients, with the per-sample norms."""
    per_sample = per_sample_grads(model, x, y)
    norms = torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1)
    if clipping == "automatic":
        factors = max_grad_norm / (norms + gamma)
    else:
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: torch.einsum("b,b...->...", factors, g) for k, g in per_sample.items()}
    return clipped, norms


def _double_copy(model):
    import copy

    return copy.deepcopy(model).double()


# The oracle tests run on a GPU with DPCOMPILE_TEST_DEVICE=cuda (float32 matmuls: TF32 off there).
DEVICE = os.environ.get("DPCOMPILE_TEST_DEVICE", "cpu")


def fresh_seed() -> int:
    """A seed never used before (printed by failing tests, so a failure can be replayed)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())))


def compiled_clipped_sum(model, x, y, reduction="mean", **options):
    """p.grad after one private backward with noise off, rescaled to the clipped sum Σ C_i g_i."""
    options = {"noise_multiplier": 0.0, "loss_reduction": reduction, **options}
    model.to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    compiled = torch.compile(model, backend="dp", options=options)
    model.zero_grad(set_to_none=True)
    batch_loss(compiled(x), y, reduction).backward()
    return {k: p.grad.double().cpu() * x.shape[0] for k, p in model.named_parameters() if p.grad is not None}
