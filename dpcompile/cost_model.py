"""Symbolic cost model for per-sample norms: FLOPs and memory of each strategy.

Costs are sympy expressions in the batch size ``B`` so the inspection tools can show
them symbolically; decisions substitute the current batch size. For a linear site
with T rows per sample, n×m weight gradient (Bu et al., fastDP §3):

- ghost:       FLOPs 2·B·T²·(n+m) + B·T²,  memory 2·B·T² (two Gram matrices)
- instantiate: FLOPs 2·B·T·n·m,            memory B·n·m (per-sample gradients);
  the clipped sum is then Σ_b C_b G_b (B·n·m FLOPs) instead of a second GEMM.
"""
from __future__ import annotations

import dataclasses

import sympy

B = sympy.Symbol("B", positive=True, integer=True)
FLOAT32 = 4  # norms, Gram matrices and most per-sample tensors are float32


@dataclasses.dataclass
class Cost:
    flops: sympy.Expr
    memory: sympy.Expr  # elements
    element_bytes: int = FLOAT32

    def at(self, batch: int) -> tuple[float, float]:
        """(FLOPs, bytes) at a concrete batch size."""
        return float(self.flops.subs(B, batch)), float(self.memory.subs(B, batch)) * self.element_bytes


def linear(rows: int, n: int, m: int, element_bytes: int = FLOAT32) -> dict[str, Cost]:
    """Per-sample gradients of a linear site keep its compute dtype (bf16 under autocast)."""
    T = sympy.Integer(rows)
    return {
        "ghost": Cost(2 * B * T**2 * (n + m) + B * T**2, 2 * B * T**2),
        "instantiate": Cost(2 * B * T * n * m + B * n * m, B * n * m, element_bytes),
    }


def embedding(rows: int, dim: int, vocab: int) -> dict[str, Cost]:
    T = sympy.Integer(rows)
    return {
        "ghost": Cost(2 * B * T**2 * dim + B * T**2, B * T**2),
        "instantiate": Cost(B * T * dim + B * vocab * dim, B * vocab * dim),
    }


def phantom(rows_in: int, rows_out: int, dim: int, vocab: int) -> dict[str, Cost]:
    """Tied embedding: input ghost (S²), output ghost (T² over V+d), cross term (S·T)."""
    S, T = sympy.Integer(rows_in), sympy.Integer(rows_out)
    flops = B * (2 * S**2 * dim + 2 * T**2 * (vocab + dim) + 2 * S * T * dim + S * T)
    return {"phantom": Cost(flops, B * (S**2 + 2 * T**2 + 2 * S * T)),
            "instantiate": Cost(2 * B * (S + T) * vocab * dim, B * vocab * dim)}


def lsg(rows: int, n: int, m: int, rank: int, kept: int) -> dict[str, Cost]:
    """Low-rank coordinates per sample: A(VRᵀ) and (LᵀA)V, then a gather of the kept ones."""
    T = sympy.Integer(rows)
    return {"lsg": Cost(2 * B * T * rank * (n + m) * 2 + B * kept, B * (rank * (n + m) + T * rank * 2))}


def generic(per_sample_numel: int, rows: int) -> dict[str, Cost]:
    """Sites with no ghost form: the per-sample gradient is materialized."""
    return {"instantiate": Cost(2 * B * rows * per_sample_numel + B * per_sample_numel, B * per_sample_numel)}


def choose(costs: dict[str, Cost], batch: int, strategy: str, budget_bytes: float) -> str:
    """Cheapest strategy in FLOPs whose memory fits the budget (least memory if none fits)."""
    if strategy != "auto" and strategy in costs:
        return strategy
    fits = {k: c for k, c in costs.items() if c.at(batch)[1] <= budget_bytes}
    if not fits:
        return min(costs, key=lambda k: costs[k].at(batch)[1])
    return min(fits, key=lambda k: fits[k].at(batch)[0])
