"""An empirical privacy audit of one private step, run on the user's own model and options.

The claim under test: one dp release with a sample present or absent is (ε, δ)-indistinguishable,
ε from the accountant for one step without sampling (the canary is always in the batch when it
is present). The audit plays the distinguishing game (in the manner of published canary
auditors: insert a canary, score each release, turn the best test's error rates into a bound):

1. a canary sample whose clipped gradient direction u is known to the auditor;
2. ``trials`` releases, alternating the batch with and without the canary (fresh noise each);
3. the score of a release is ⟨released gradient, u⟩;
4. a threshold is chosen on the first half of the trials and its true- and false-positive rates
   are measured on the second half, with Clopper-Pearson intervals at ``confidence``;
5. any (ε, δ)-DP mechanism has TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, so the measured
   rates give ε_lower = max(log((TPR⁻ − δ)/FPR⁺), log((1 − FPR⁺ − δ)/(1 − TPR⁻))).

On a correct run the bound stays below the claimed ε (with probability ≥ ``confidence``); a
mechanism that leaks (noise missing, clipping bypassed) pushes it above. A lower bound far
below the claim is expected: one canary and a few hundred trials cannot certify tightness.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import DPCompileError

__all__ = ["AuditResult", "audit"]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float  # with probability ≥ confidence, the true ε of one step is at least this
    claimed_epsilon: float  # the accountant's ε for one step at the given δ (no sampling amplification)
    delta: float
    trials: int
    confidence: float
    true_positive_rate: float  # on the held-out half, at the chosen threshold
    false_positive_rate: float

    @property
    def consistent(self) -> bool:
        """Whether the audit found nothing the claim rules out."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def __str__(self) -> str:
        verdict = "consistent with" if self.consistent else "VIOLATES"
        return (f"dpcompile.audit: ε ≥ {self.epsilon_lower_bound:.3f} at δ={self.delta:g} ({self.confidence:.0%} "
                f"confidence, {self.trials} trials, TPR {self.true_positive_rate:.3f}, FPR "
                f"{self.false_positive_rate:.3f}): {verdict} the claimed ε = {self.claimed_epsilon:.3f} of one step")


def audit(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, canary: tuple[torch.Tensor, torch.Tensor],
          *, loss_fn: Callable | None = None, options: dict | None = None, trials: int = 400,
          delta: float = 1e-5, confidence: float = 0.95) -> AuditResult:
    """Audit one private release of `model` on the batch (`inputs`, `target`) against the canary
    sample ``(x, y)`` (one sample, without a batch dim). `options` are the dp backend options
    (max_grad_norm, noise_multiplier, clipping...); `loss_fn(output, target)` defaults to
    cross-entropy. Runs on a copy: the model's parameters and privacy state are untouched."""
    if trials < 20 or trials % 2:
        raise DPCompileError("dpcompile.audit: trials must be an even number >= 20")
    if not 0 < confidence < 1 or not 0 <= delta < 1:
        raise DPCompileError("dpcompile.audit: confidence must be in (0, 1) and delta in [0, 1)")
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    opts = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, **(options or {})}
    if "sample_rate" in opts or "dataset_size" in opts:
        raise DPCompileError("dpcompile.audit: audits one release without sampling; leave out sample_rate and "
                             "dataset_size (the claim audited is the step's ε at sample rate 1)")
    opts.setdefault("expected_batch_size", float(len(inputs) + 1))  # one divisor for both worlds
    net = copy.deepcopy(getattr(model, "_orig_mod", model))
    direction = _canary_direction(net, canary, loss_fn)
    private = torch.compile(net, backend="dp", options=opts)
    x_in, y_in = torch.cat([inputs, canary[0][None]]), torch.cat([target, canary[1][None]])
    scores = {True: [], False: []}
    for t in range(trials):
        present = t % 2 == 0
        x, y = (x_in, y_in) if present else (inputs, target)
        net.zero_grad(set_to_none=True)
        loss_fn(private(x), y).backward()
        released = torch.cat([p.grad.flatten().double() for p in net.parameters() if p.requires_grad])
        scores[present].append(float(released @ direction))
    return _bound(scores, delta, confidence, _claimed_epsilon(opts, delta), trials)


def _canary_direction(net: nn.Module, canary, loss_fn) -> torch.Tensor:
    """The unit direction of the canary's own gradient (what the auditor knows about it)."""
    x, y = canary
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(net(x[None]), y[None]), params)
    g = torch.cat([q.flatten().double() for q in grads])
    if not torch.isfinite(g).all() or float(g.norm()) == 0.0:
        raise DPCompileError("dpcompile.audit: the canary's gradient is zero or not finite; pick another canary")
    return g / g.norm()


def _claimed_epsilon(opts: dict, delta: float) -> float:
    from ..privacy.accounting import PrivacyAccountant

    sigma = float(opts["noise_multiplier"])
    if sigma == 0:
        return math.inf
    accountant = PrivacyAccountant(opts.get("accountant", "pld"))
    accountant.step(sigma, 1.0)
    return accountant.get_epsilon(delta)


def _bound(scores: dict, delta: float, confidence: float, claimed: float, trials: int) -> AuditResult:
    half = trials // 4  # trials/2 per world, half of each to choose the threshold
    pos, neg = scores[True], scores[False]
    threshold = _best_threshold(pos[:half], neg[:half])
    held_pos, held_neg = pos[half:], neg[half:]
    tp, fp = sum(s > threshold for s in held_pos), sum(s > threshold for s in held_neg)
    alpha = 1 - confidence
    tpr_low = _clopper_pearson(tp, len(held_pos), alpha / 2)[0]
    fpr_high = _clopper_pearson(fp, len(held_neg), alpha / 2)[1]
    bound = max(_log_ratio(tpr_low - delta, fpr_high), _log_ratio(1 - fpr_high - delta, 1 - tpr_low), 0.0)
    return AuditResult(bound, claimed, delta, trials, confidence, tp / len(held_pos), fp / len(held_neg))


def _best_threshold(pos: list[float], neg: list[float]) -> float:
    """The cut that maximises TPR − FPR on the selection half."""
    candidates = sorted(pos + neg)
    return max(candidates, key=lambda c: sum(s > c for s in pos) / len(pos) - sum(s > c for s in neg) / len(neg))


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from scipy.stats import beta  # scipy comes with dp-accounting

    low = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return low, high


def _log_ratio(num: float, den: float) -> float:
    if num <= 0:
        return 0.0
    return math.inf if den <= 0 else math.log(num / den)
