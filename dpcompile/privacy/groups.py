"""Group-wise clipping: which parameters share a clipping threshold, and the thresholds.

With ``clip_groups`` set, each sample's gradient is cut into K groups of parameters and
group k is clipped to R_k = R/√K on its own: ‖clipped g_i‖² = Σ_k ‖clipped g_i,k‖² ≤ K·R²/K
= R², so one sample still moves the sum by at most R and the noise σR and the accounting
stay those of flat clipping. What a group is:

- ``"layer"``: the parameter name without its last part (``h.0.attn.c_attn.weight`` and
  ``.bias`` share ``h.0.attn.c_attn``; the root module's own parameters share ``<root>``);
- ``"block"``: the name up to and including its first all-digit part (``h.0``, ``layers.11``:
  one transformer block; every parameter outside a numbered block forms one more group);
- a list of fnmatch patterns: the first pattern a name matches is its group, names that
  match none form one more group.

K counts every group of the model's trainable parameters (not only those one graph sees),
fixed at the first compile: a later graph with a parameter of another group would raise the
sensitivity above R and is refused (`GroupTable.ids`).
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable

from ..errors import DPCompileError

OUTSIDE = "<other parameters>"  # the group of names in no numbered block / matching no pattern
ROOT = "<root>"  # "layer": the parameters of the root module itself


def group_key(name: str, spec: str | tuple[str, ...]) -> str:
    """The group of parameter `name` under the clip_groups option `spec`."""
    parts = name.split(".")
    if spec == "layer":
        return ".".join(parts[:-1]) or ROOT
    if spec == "block":
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        return OUTSIDE if digit is None else ".".join(parts[:digit + 1])
    return next((pattern for pattern in spec if fnmatch.fnmatchcase(name, pattern)), OUTSIDE)


class GroupTable:
    """The groups of one model, numbered in parameter order, and their common threshold."""

    def __init__(self, names: Iterable[str], spec: str | tuple[str, ...], max_grad_norm: float) -> None:
        self.spec = spec
        self.index: dict[str, int] = {}
        for name in names:
            self.index.setdefault(group_key(name, spec), len(self.index))
        self.threshold = max_grad_norm / math.sqrt(max(1, len(self.index)))  # R_k = R/√K: Σ_k R_k² = R²

    def __len__(self) -> int:
        return len(self.index)

    def ids(self, names: dict[int, str]) -> dict[int, int]:
        """Group id of each graph input (position -> name); refuses names of groups not in the table."""
        out = {}
        for position, name in names.items():
            key = group_key(name, self.spec)
            if key not in self.index:
                raise DPCompileError(
                    f"dpcompile: parameter {name!r} falls in clip group {key!r}, which was not among the {len(self)} "
                    f"groups fixed when the model was first compiled ({sorted(self.index)[:6]}...): its threshold "
                    "would raise the sensitivity above max_grad_norm. Compile the whole model that is trained "
                    "(every trainable parameter visible to torch.compile), or choose clip_groups patterns that put "
                    "this parameter in an existing group")
            out[position] = self.index[key]
        return out
