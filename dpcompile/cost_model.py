"""Symbolic cost model for per-sample norms: what each strategy adds to a non-private step.

Costs are sympy expressions in the batch size ``B`` so the inspection tools can show
them symbolically; decisions substitute the current batch size. Each strategy is
charged its *extra* work over the plain backward, in three parts:

- ``flops``: extra arithmetic;
- ``traffic``: extra bytes read and written in device memory;
- ``memory``: extra bytes alive at once (what the memory budget limits).

For a linear site with T rows per sample, n×m weight gradient and e-byte elements
(Bu et al., fastDP §3):

- ghost:       two T×T Gram matrices per sample: 2·B·T²·(n+m) FLOPs; the activations and
  output gradients are read again and one of them is re-weighted (≈ 3·B·T·(n+m)·e
  bytes) and the Grams are written and read (4·B·T²·4 bytes); the clipped sum is the
  plain weight-gradient GEMM on re-weighted rows, which costs nothing extra.
- instantiate: the per-sample gradients come from one batched GEMM with the FLOPs of the
  plain one; they are written once and read twice (norm, weighted sum): 3·B·n·m·e bytes.

Choices minimise the time estimate ``flops + MACHINE_BALANCE · traffic``.
"""
from __future__ import annotations

import dataclasses

import sympy

B = sympy.Symbol("B", positive=True, integer=True)
FLOAT32 = 4  # norms, Gram matrices and most per-sample tensors are float32
# FLOPs a GPU does in the time it moves one byte (H100/H200: ~1e15 bf16 FLOP/s over 3-5e12 B/s).
# Per-sample strategies trade GEMM FLOPs against memory passes, so this ratio decides between them.
MACHINE_BALANCE = 200


@dataclasses.dataclass
class Cost:
    flops: sympy.Expr
    memory: sympy.Expr  # elements alive at once
    element_bytes: int = FLOAT32
    traffic: sympy.Expr = sympy.Integer(0)  # bytes moved

    def at(self, batch: int) -> tuple[float, float]:
        """(FLOPs, bytes of memory) at a concrete batch size."""
        return float(self.flops.subs(B, batch)), float(self.memory.subs(B, batch)) * self.element_bytes

    def traffic_at(self, batch: int) -> float:
        return float(self.traffic.subs(B, batch))

    def time(self, batch: int) -> float:
        """Estimated time in FLOP-equivalents: compute plus memory traffic."""
        return float(self.flops.subs(B, batch)) + MACHINE_BALANCE * self.traffic_at(batch)


def linear(rows: int, n: int, m: int, element_bytes: int = FLOAT32) -> dict[str, Cost]:
    """Per-sample gradients of a linear site keep its compute dtype (bf16 under autocast)."""
    T, e = sympy.Integer(rows), element_bytes
    return {
        "ghost": Cost(2 * B * T**2 * (n + m) + B * T**2, 2 * B * T**2,
                      traffic=3 * B * T * (n + m) * e + 4 * B * T**2 * FLOAT32),
        "instantiate": Cost(3 * B * n * m, B * n * m, e, traffic=3 * B * n * m * e),
    }


def embedding(rows: int, dim: int, vocab: int) -> dict[str, Cost]:
    T = sympy.Integer(rows)
    return {
        "ghost": Cost(2 * B * T**2 * dim + B * T**2, B * T**2,
                      traffic=2 * B * T * dim * FLOAT32 + 3 * B * T**2 * FLOAT32),
        "instantiate": Cost(B * T * dim + 3 * B * vocab * dim, B * vocab * dim,
                            traffic=3 * B * vocab * dim * FLOAT32),
    }


def phantom(rows_in: int, rows_out: int, dim: int, vocab: int) -> dict[str, Cost]:
    """Tied embedding: input ghost (S²), output ghost (T² over V+d), cross term (S·T)."""
    S, T = sympy.Integer(rows_in), sympy.Integer(rows_out)
    flops = B * (2 * S**2 * dim + 2 * T**2 * (vocab + dim) + 2 * S * T * dim + S * T)
    grams = B * (S**2 + 2 * T**2 + 2 * S * T)
    return {"phantom": Cost(flops, grams, traffic=B * (S + T) * (vocab + dim) * FLOAT32 + 2 * grams * FLOAT32),
            "instantiate": Cost(2 * B * (S + T) * vocab * dim, B * vocab * dim,
                                traffic=3 * B * vocab * dim * FLOAT32)}


def lsg(rows: int, n: int, m: int, rank: int, kept: int) -> dict[str, Cost]:
    """Low-rank coordinates per sample: A(VRᵀ) and (LᵀA)V, then a gather of the kept ones."""
    T = sympy.Integer(rows)
    memory = B * (rank * (n + m) + T * rank * 2)
    return {"lsg": Cost(2 * B * T * rank * (n + m) * 2 + B * kept, memory, traffic=3 * memory * FLOAT32)}


def generic(per_sample_numel: int, rows: int) -> dict[str, Cost]:
    """Sites with no ghost form: the per-sample gradient is materialized."""
    return {"instantiate": Cost(2 * B * rows * per_sample_numel + B * per_sample_numel, B * per_sample_numel,
                                traffic=3 * B * per_sample_numel * FLOAT32)}


def choose(costs: dict[str, Cost], batch: int, strategy: str, budget_bytes: float) -> str:
    """Fastest strategy (compute + memory traffic) whose memory fits the budget (least memory if none fits)."""
    if strategy != "auto" and strategy in costs:
        return strategy
    fits = {k: c for k, c in costs.items() if c.at(batch)[1] <= budget_bytes}
    if not fits:
        return min(costs, key=lambda k: costs[k].at(batch)[1])
    return min(fits, key=lambda k: fits[k].time(batch))
