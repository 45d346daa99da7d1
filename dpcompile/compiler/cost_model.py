"""Symbolic cost model for per-sample norms: what each strategy adds to a non-private step.

Costs are sympy expressions in the batch size ``B`` (and, for dynamic sequence lengths, in
the shape symbols of the rows per sample T) so the inspection tools can show them
symbolically; decisions substitute the example sizes, and ``plan_range`` says over which
values of a length a plan stays good enough (passes/symbolic.py guards that range). Each
strategy is charged its *extra* work over the plain backward, in three parts:

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

    def at(self, batch: int, sizes: dict | None = None) -> tuple[float, float]:
        """(FLOPs, bytes of memory) at a concrete batch size (and values of the shape symbols)."""
        return _value(self.flops, batch, sizes), _value(self.memory, batch, sizes) * self.element_bytes

    def traffic_at(self, batch: int, sizes: dict | None = None) -> float:
        return _value(self.traffic, batch, sizes)

    def time(self, batch: int, sizes: dict | None = None) -> float:
        """Estimated time in FLOP-equivalents: compute plus memory traffic."""
        return _value(self.flops, batch, sizes) + MACHINE_BALANCE * self.traffic_at(batch, sizes)


def _value(expr: sympy.Expr, batch: int, sizes: dict | None) -> float:
    return float(sympy.sympify(expr).xreplace({B: batch, **(sizes or {})}))


def linear(rows, n: int, m: int, element_bytes: int = FLOAT32) -> dict[str, Cost]:
    """Per-sample gradients of a linear site keep its compute dtype (bf16 under autocast).
    `rows` (per sample) is an int or a sympy expression of shape symbols, as in all below."""
    T, e = sympy.sympify(rows), element_bytes
    return {
        "ghost": Cost(2 * B * T**2 * (n + m) + B * T**2, 2 * B * T**2,
                      traffic=3 * B * T * (n + m) * e + 4 * B * T**2 * FLOAT32),
        "instantiate": Cost(3 * B * n * m, B * n * m, e, traffic=3 * B * n * m * e),
    }


def embedding(rows, dim: int, vocab: int) -> dict[str, Cost]:
    T = sympy.sympify(rows)
    return {
        "ghost": Cost(2 * B * T**2 * dim + B * T**2, B * T**2,
                      traffic=2 * B * T * dim * FLOAT32 + 3 * B * T**2 * FLOAT32),
        "instantiate": Cost(B * T * dim + 3 * B * vocab * dim, B * vocab * dim,
                            traffic=3 * B * vocab * dim * FLOAT32),
    }


def phantom(rows_in, rows_out, dim: int, vocab: int) -> dict[str, Cost]:
    """Tied embedding: input ghost (S²), output ghost (T² over V+d), cross term (S·T)."""
    S, T = sympy.sympify(rows_in), sympy.sympify(rows_out)
    flops = B * (2 * S**2 * dim + 2 * T**2 * (vocab + dim) + 2 * S * T * dim + S * T)
    grams = B * (S**2 + 2 * T**2 + 2 * S * T)
    return {"phantom": Cost(flops, grams, traffic=B * (S + T) * (vocab + dim) * FLOAT32 + 2 * grams * FLOAT32),
            "instantiate": Cost(2 * B * (S + T) * vocab * dim, B * vocab * dim,
                                traffic=3 * B * vocab * dim * FLOAT32)}


def lsg(rows, n: int, m: int, rank: int, kept: int) -> dict[str, Cost]:
    """Low-rank coordinates per sample: A(VRᵀ) and (LᵀA)V, then a gather of the kept ones."""
    T = sympy.sympify(rows)
    memory = B * (rank * (n + m) + T * rank * 2)
    return {"lsg": Cost(2 * B * T * rank * (n + m) * 2 + B * kept, memory, traffic=3 * memory * FLOAT32)}


def generic(per_sample_numel: int, rows) -> dict[str, Cost]:
    """Sites with no ghost form: the per-sample gradient is materialized."""
    rows = sympy.sympify(rows)
    return {"instantiate": Cost(2 * B * rows * per_sample_numel + B * per_sample_numel, B * per_sample_numel,
                                traffic=3 * B * per_sample_numel * FLOAT32)}


def choose(costs: dict[str, Cost], batch: int, strategy: str, budget_bytes: float,
           sizes: dict | None = None) -> str:
    """Fastest strategy (compute + memory traffic) whose memory fits the budget (least memory if none fits)."""
    if strategy != "auto" and strategy in costs:
        return strategy
    fits = {k: c for k, c in costs.items() if c.at(batch, sizes)[1] <= budget_bytes}
    if not fits:
        return min(costs, key=lambda k: costs[k].at(batch, sizes)[1])
    return min(fits, key=lambda k: fits[k].time(batch, sizes))


# A plan chosen at one sequence length is kept over the lengths where its estimated time is within
# this fraction of the best plan's there. Without slack every layer shape's switch point ends a
# plan: GPT-2-small's shapes (B = 8, bf16) over T = 8..1024 need 4 plans (recompiles) exactly, 2
# with this slack; a recompile costs far more than the few percent a closer plan would save.
PLAN_SLACK = 0.25


def plan_range(layers: list[tuple[dict[str, Cost], str, str]], batch: int, budget_bytes: float, sizes: dict,
               symbol: sympy.Symbol, lowest: int = 1, highest: int | None = None,
               slack: float = PLAN_SLACK) -> tuple[int | None, int | None]:
    """(lo, hi): the values of `symbol` around its example value ``sizes[symbol]`` (others held
    at `sizes`) over which the plan ``[(costs, strategy asked, strategy chosen), ...]`` stays
    acceptable: every chosen strategy that is not the best one still fits the memory budget,
    and the plan's total time is within `slack` of the best plan's. None: acceptable up to
    that end of [lowest, highest].

    Each layer's costs are polynomials of degree ≤ 2 in the rows per sample whose pairwise
    differences change sign at most once for rows ≥ 1 (ghost norms grow as rows²,
    instantiation at most as rows): moving away from the example, a layer's excess over its
    best strategy only grows. So the range is taken to end, on each side, at the first value
    that is not acceptable (a galloping search: O(log) evaluations). Where acceptability
    came back further on, the range is only narrower than it could be: strategies differ in
    speed and memory, never in the gradients released."""
    groups: dict = {}  # layers with equal costs and choices (a transformer's blocks) count once
    for costs, wanted, chosen in layers:
        key = (tuple((k, str(c.flops), str(c.memory), str(c.traffic)) for k, c in costs.items()), wanted, chosen)
        groups.setdefault(key, [costs, wanted, chosen, 0])[3] += 1

    def acceptable(value: int) -> bool:
        at = {**sizes, symbol: value}
        kept = best = 0.0
        for costs, wanted, chosen, count in groups.values():
            optimal = choose(costs, batch, wanted, budget_bytes, at)
            if optimal != chosen and costs[chosen].at(batch, at)[1] > budget_bytes:
                return False
            kept += count * costs[chosen].time(batch, at)
            best += count * costs[optimal].time(batch, at)
        return kept <= (1 + slack) * best

    start = sizes[symbol]
    hi = _last_same(acceptable, start, +1, highest if highest is not None else _FAR)
    lo = _last_same(acceptable, start, -1, lowest)
    return (None if lo == lowest else lo), (None if hi in (highest, _FAR) else hi)


_FAR = 1 << 40  # acceptable up to here counts as "no upper end": more rows per sample than any device holds


def _last_same(same, start: int, direction: int, end: int) -> int:
    """The last value from `start` towards `end` (inclusive) before `same` first fails
    (`same(start)` holds)."""
    good, step = start, 1
    while good != end:  # gallop: the first failing value lies in (good, good + step]
        probe = good + direction * step
        probe = min(probe, end) if direction > 0 else max(probe, end)
        if not same(probe):
            bad = probe
            while abs(bad - good) > 1:  # bisect
                mid = (good + bad) // 2
                good, bad = (mid, bad) if same(mid) else (good, mid)
            return good
        good, step = probe, step * 2
    return good
