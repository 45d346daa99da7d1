"""Choice of the LSG subspaces and masks, outside the graph (see ``passes/lsg.py``).

Each step, every lsg weight (site matrix W, n×m) needs L (n×r, orthonormal columns),
R (r×m, orthonormal rows) and the indices of the k kept coordinates of (G Rᵀ, Lᵀ G).
They must not depend on the private data of the current step, or the Gaussian
mechanism's sensitivity argument breaks. The rules here use only:

- a seed (``subspace="random"``, ``mask="random"``): data-independent;
- the current weights (``subspace="weights"``: top-r singular subspaces by seeded
  subspace iteration) and the last parameter update (``mask="update"``: its largest
  reduced coordinates). Weights and updates are functions of earlier noisy releases and
  of the initial weights: post-processing, private as long as the initial weights are
  public (random initialisation or a public checkpoint) and nothing else writes private
  information into them.

Subspaces are recomputed every ``refresh`` steps; masks every step. Everything is keyed
by the release step, so gradient-accumulation micro-steps share one choice, and saved in
``state_dict`` so a resumed run makes the same choices.
"""
from __future__ import annotations

from typing import Any

import torch

from ..options import LSGOptions

POWER_ITERATIONS = 2


class LSGProjector:
    def __init__(self, options: LSGOptions, seed: int) -> None:
        self.options = options
        self.seed = seed
        self._subspaces: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (period, L, R)
        self._masks: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (step, index)
        self._last_weights: dict[str, torch.Tensor] = {}  # name -> W when its last mask was chosen

    def inputs(self, name: str, weight: torch.Tensor, rank: int, kept: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, R, index) of one weight at one step; `weight` is the site matrix (n×m)."""
        weight = weight.detach().float()
        left, right = self._subspace(name, weight, rank, step)
        index = self._mask(name, weight, left, right, kept, step)
        return left, right, index

    # -- subspaces -----------------------------------------------------------------------
    def _subspace(self, name: str, weight: torch.Tensor, rank: int, step: int):
        period = step // self.options.refresh
        cached = self._subspaces.get(name)
        if cached is None or cached[0] != period:
            gen = _generator(self.seed, period, f"lsg-subspace:{name}")
            if self.options.subspace == "random":
                left, right = _random_subspaces(weight.shape, rank, gen)
            else:
                left, right = _top_subspaces(weight, rank, gen)
            cached = self._subspaces[name] = (period, left.to(weight.device), right.to(weight.device))
        return cached[1], cached[2]

    # -- masks -------------------------------------------------------------------------
    def _mask(self, name: str, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, kept: int,
              step: int) -> torch.Tensor:
        cached = self._masks.get(name)
        if cached is not None and cached[0] == step:
            return cached[1]
        size = left.shape[1] * (left.shape[0] + right.shape[1])
        previous = self._last_weights.get(name)
        if kept >= size:
            index = torch.arange(size, device=weight.device)
        elif self.options.mask == "update" and previous is not None and bool((weight != previous).any()):
            update = weight - previous
            importance = torch.cat([(update @ right.mT).abs().flatten(), (left.mT @ update).abs().flatten()])
            index = importance.topk(kept).indices.sort().values
        else:  # random mask, and the first step of mask="update" (no update yet)
            gen = _generator(self.seed, step, f"lsg-mask:{name}")
            index = torch.randperm(size, generator=gen)[:kept].sort().values.to(weight.device)
        if self.options.mask == "update" and kept < size:
            self._last_weights[name] = weight.clone()
        self._masks[name] = (step, index)
        return index

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"subspaces": dict(self._subspaces), "masks": dict(self._masks),
                "last_weights": dict(self._last_weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._subspaces = dict(state.get("subspaces", {}))
        self._masks = dict(state.get("masks", {}))
        self._last_weights = dict(state.get("last_weights", {}))


def lsg_inputs(projector: LSGProjector, ctx: Any, step: int) -> dict[str, torch.Tensor]:
    """The L/R/index graph inputs of every lsg weight of one compiled graph (``ctx.plan["lsg"]``)."""
    values = {}
    for position, plan in ctx.plan["lsg"].items():
        param = ctx.params[position]
        weight = param.mT if plan.transposed else param
        left, right, index = projector.inputs(ctx.param_names[position], weight, plan.rank, plan.kept, step)
        values.update({plan.left.name: left, plan.right.name: right, plan.index.name: index})
    return values


def _generator(seed: int, counter: int, stream: str) -> torch.Generator:
    from .rng import stream_seed

    gen = torch.Generator()
    gen.manual_seed(stream_seed(seed, counter, stream))
    return gen


def _orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q.contiguous()


def _random_subspaces(shape: torch.Size, rank: int, gen: torch.Generator):
    n, m = shape
    left = _orthonormal_columns(torch.randn(n, rank, generator=gen))
    right = _orthonormal_columns(torch.randn(m, rank, generator=gen)).mT.contiguous()
    return left, right


def _top_subspaces(weight: torch.Tensor, rank: int, gen: torch.Generator):
    """Top-r left/right singular subspaces of W by subspace iteration from a seeded start
    (on W's device; the start is drawn on the CPU so every device makes the same choice)."""
    start = torch.randn(weight.shape[1], rank, generator=gen).to(weight.device)
    q = _orthonormal_columns(weight @ start)
    for _ in range(POWER_ITERATIONS):
        q = _orthonormal_columns(weight @ (weight.mT @ q))
    right = _orthonormal_columns(weight.mT @ q).mT.contiguous()
    return q, right
