"""Check a model for private training before training it, and fix what can be replaced.

``dpcompile.check(model, *example_inputs)`` lists every module the dp backend would refuse,
with the reason and the fix, in two layers:

1. a rule table over the module tree (``MODULE_RULES``: one predicate and one explanation per
   known refusal), which names every offending module at once;
2. with example inputs, one private step of a copy of the model compiled with backend "dp"
   (noise off, nothing of it reaches the model): what the passes themselves refuse (an op
   that mixes samples, a state write, an op without a rule), with module, op and source line.

``dpcompile.fix(model)`` replaces, in place, what has a drop-in private equivalent
(``FIXES``): BatchNorm by GroupNorm, InstanceNorm's running statistics off. Neither function
trains the model or changes its parameters' values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import DPCompileError

__all__ = ["Problem", "CheckReport", "check", "fix", "MODULE_RULES", "FIXES"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing the dp backend would refuse: where, why, and what to do."""

    module: str  # dotted name ("" for the model itself), or "(trial step)"
    kind: str  # class name of the module
    reason: str
    fix: str
    fixable: bool = False  # dpcompile.fix(model) replaces it


@dataclasses.dataclass
class CheckReport:
    problems: list[Problem]
    trial: str  # "passed", "skipped (no example inputs)" or the refusal of the trial step

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"dpcompile.check: no problem found (trial step: {self.trial})"
        lines = [f"dpcompile.check: {len(self.problems)} problem(s) (trial step: "
                 f"{'passed' if self.trial == 'passed' else 'refused' if self.trial.startswith('refused') else self.trial})"]
        for p in self.problems:
            where = f"{p.module} ({p.kind})" if p.module else p.kind
            tag = " [dpcompile.fix]" if p.fixable else ""
            lines.append(f"- {where}: {p.reason}. Fix: {p.fix}{tag}")
        return "\n".join(lines)

    __repr__ = __str__


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _has_full_backward_hook(m: nn.Module) -> bool:
    return bool(getattr(m, "_backward_hooks", None)) or bool(getattr(m, "_backward_pre_hooks", None))


# (predicate, reason, fix, fixable): one row per module-level refusal of the dp backend.
MODULE_RULES: list[tuple[Callable[[nn.Module], bool], str, str, bool]] = [
    (lambda m: isinstance(m, _BATCH_NORMS) and m.training,
     "BatchNorm in training mode normalises each sample with statistics of the whole batch (it mixes "
     "samples) and writes them into its running buffers",
     "replace it with nn.GroupNorm(min(32, C), C) or nn.LayerNorm, or put it in eval mode", True),
    (lambda m: isinstance(m, _INSTANCE_NORMS) and m.track_running_stats and m.training,
     "InstanceNorm with track_running_stats=True writes statistics of the batch into its running buffers",
     "track_running_stats=False", True),
    (lambda m: isinstance(m, nn.Embedding) and m.max_norm is not None,
     "Embedding(max_norm=...) renormalises its weight rows in place during forward, from the batch's tokens",
     "max_norm=None (clip the rows outside training if needed)", False),
    (_has_full_backward_hook,
     "a module with a full backward hook is run eagerly by Dynamo, outside the dp graphs, so no clip factor "
     "covers its parameters",
     "remove the hook (register_full_backward_hook); tensor hooks on parameters are fine", False),
]

# (module type, replacement builder, what it does): dpcompile.fix's table.
FIXES: list[tuple[tuple[type, ...], Callable[[nn.Module], nn.Module], str]] = []


def _group_norm(bn: nn.Module) -> nn.Module | None:
    if not bn.training:
        return None  # frozen statistics are private (no refusal): keep the model's behaviour
    channels = bn.num_features
    groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
    gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine and not isinstance(bn.weight, nn.parameter.UninitializedParameter):
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.to(device=bn.weight.device if bn.affine else None)


def _instance_norm(m: nn.Module) -> nn.Module | None:
    if not (m.track_running_stats and m.training):
        return None
    out = type(m)(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=False)
    if m.affine:
        with torch.no_grad():
            out.weight.copy_(m.weight)
            out.bias.copy_(m.bias)
    return out


FIXES += [
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _group_norm,
     "BatchNorm in training mode -> GroupNorm(largest divisor of C up to 32, C), affine copied"),
    (_INSTANCE_NORMS, _instance_norm, "InstanceNorm in training mode: track_running_stats=False"),
]


def check(model: nn.Module, *example_inputs: Any, target: torch.Tensor | None = None,
          loss_fn: Callable | None = None, options: dict | None = None) -> CheckReport:
    """Every module of `model` the dp backend would refuse, with the reason and the fix.

    With `example_inputs`, also runs one private step of a copy of the model (as
    `dpcompile.inspect_model` does: cross-entropy against random classes unless `target` /
    `loss_fn` say otherwise) and reports what the compiler passes refuse. The model itself is
    not trained and its parameters keep their values and gradients.
    """
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, nn.Module):
        raise DPCompileError(f"dpcompile.check: expected an nn.Module, got {type(model).__name__}")
    problems = [Problem(name, type(m).__name__, reason, fix_text, fixable)
                for name, m in model.named_modules()
                for applies, reason, fix_text, fixable in MODULE_RULES if applies(m)]
    trial = "skipped (no example inputs)"
    if example_inputs:
        trial = _trial_step(model, example_inputs, target, loss_fn, options)
        if trial != "passed" and not problems:
            problems.append(Problem("(trial step)", type(model).__name__, trial.removeprefix("refused: "),
                                    "see the message; dpcompile.fix(model) replaces BatchNorm and InstanceNorm"))
    return CheckReport(problems, trial)


def _trial_step(model: nn.Module, inputs: tuple, target, loss_fn, options) -> str:
    from .inspection import capture_step

    try:
        capture_step(model, inputs if len(inputs) > 1 else inputs[0], target=target, loss_fn=loss_fn,
                     options={"noise_multiplier": 0.0, **(options or {})}, snapshots=False)
    except DPCompileError as refusal:
        return f"refused: {str(refusal).splitlines()[0]}"
    finally:
        torch._dynamo.reset()
    return "passed"


def fix(model: nn.Module) -> nn.Module:
    """Replace, in place, the modules that have a private drop-in equivalent (`FIXES`); returns
    the model. Modules `check` reports as not fixable are left as they are."""
    model = getattr(model, "_orig_mod", model)
    for name, child in list(model.named_children()):
        replacement = next((build(child) for types, build, _ in FIXES if isinstance(child, types)), None)
        if replacement is not None:
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            fix(child)
    return model

