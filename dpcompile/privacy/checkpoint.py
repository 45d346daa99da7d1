"""The accounting travels with the optimizer checkpoint users already save.

A plain-API run resumed in a new process from ``model.state_dict()`` and
``optimizer.state_dict()`` would restart its privacy step count at 0 and under-report ε. So
every optimizer that steps a private model's parameters carries the model's public accounting
(`PrivacyState.checkpoint_record`: steps, accountant history; no seed) in its first param
group, under ``RECORD_KEY``: torch optimizers keep unknown param-group entries through
``state_dict``/``load_state_dict`` (plain Python values: ``torch.load(weights_only=True)``
reads them). Before each ``optimizer.step()`` (a global step pre-hook) dpcompile compares that
record with the model's state and refuses a resume that did not restore the privacy state.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..errors import DPCompileError

RECORD_KEY = "dpcompile_privacy"
_seen: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list]" = weakref.WeakKeyDictionary()
_installed = False


def install() -> None:
    global _installed
    if not _installed:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_before_step)
        _installed = True


def _states_of(optimizer: torch.optim.Optimizer) -> list:
    from .state import STATE_ATTR

    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = getattr(p, STATE_ATTR, None)
            if state is not None:
                found[id(state)] = state
    return list(found.values())


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _seen:
        return
    states = _states_of(optimizer)
    if len(states) == 1:
        _check_resume(optimizer, states[0])
        optimizer.param_groups[0][RECORD_KEY] = states[0].checkpoint_record()
    _seen[optimizer] = states


def _check_resume(optimizer: torch.optim.Optimizer, state: Any) -> None:
    saved = optimizer.param_groups[0].get(RECORD_KEY)
    if isinstance(saved, dict) and saved.get("steps", 0) + saved.get("skipped_steps", 0) > 0:
        if state.steps + state.skipped_steps < saved["steps"] + saved.get("skipped_steps", 0):
            raise DPCompileError(
                f"dpcompile: this optimizer was restored from a checkpoint of a private run at step {saved['steps']}, "
                f"but the model's privacy state is at step {state.steps}: its accounting was not restored and ε would "
                "be under-reported. Before training, load the public privacy state saved with the run: "
                "dpcompile.privacy_state(model).load_state_dict(public) (and load_secret_state_dict(secret) for "
                "BSR); the optimizer step was not taken")
        return
    trained = [p for g in optimizer.param_groups for p in g["params"] if optimizer.state.get(p)]
    if trained and state.steps <= 1:
        raise DPCompileError(
            "dpcompile: this optimizer holds state from earlier training (momentum or step counts restored from a "
            "checkpoint) but no dpcompile privacy record: a resumed private run whose accounting was lost, or a "
            "checkpoint of an older dpcompile. Restore the privacy state (dpcompile.privacy_state(model)."
            "load_state_dict(public)), or start the private run with a fresh optimizer; the step was not taken")
