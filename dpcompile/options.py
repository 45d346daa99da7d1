"""Options of the `dp` backend: `torch.compile(model, backend="dp", options={...})`."""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from .errors import DPCompileError

CLIPPING_MODES = ("flat", "automatic")
LOSS_REDUCTIONS = ("mean", "sum")
STRATEGIES = ("auto", "ghost", "instantiate")
ACCOUNTANTS = ("pld", "rdp")
NOISE_MECHANISMS = ("gaussian", "bsr")
LSG_SUBSPACES = ("weights", "random")
LSG_MASKS = ("update", "random")


@dataclasses.dataclass(frozen=True)
class LSGOptions:
    """Low-rank + sparse gradients (the ``lsg`` pass) for selected Linear weights.

    layers: fnmatch patterns of parameter names (e.g. ``"blocks.*.mlp.*.weight"``).
    rank: r of the factors L (n×r) and R (r×m); the reduced gradient is (G Rᵀ, Lᵀ G).
    density: fraction of the r·(n+m) reduced coordinates kept (and noised) each step.
    subspace: "weights" (top-r singular subspaces of the current weights: post-processing
        of earlier releases) or "random" (data-independent).
    mask: "update" (the largest coordinates of the last parameter update: post-processing)
        or "random" (data-independent).
    refresh: steps between subspace recomputations.
    """

    layers: tuple[str, ...] = ("*",)
    rank: int = 8
    density: float = 1.0
    subspace: str = "weights"
    mask: str = "update"
    refresh: int = 1

    @classmethod
    def from_value(cls, value: Any) -> "LSGOptions | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise DPCompileError(f"dp backend option lsg must be a dict of LSG settings, got {value!r}")
        value = dict(value)
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DPCompileError(f"unknown lsg option(s) {unknown}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        if isinstance(value.get("layers"), str):
            value["layers"] = (value["layers"],)
        if "layers" in value:
            value["layers"] = tuple(value["layers"])
        opts = cls(**value)
        opts.validate()
        return opts

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            _require(ok, f"lsg: {message}")

        need(len(self.layers) > 0 and all(isinstance(p, str) for p in self.layers),
             f"layers must be name patterns, got {self.layers!r}")
        need(isinstance(self.rank, int) and self.rank > 0, f"rank must be a positive int, got {self.rank!r}")
        need(_is_number(self.density) and 0 < self.density <= 1, f"density must be in (0, 1], got {self.density!r}")
        need(self.subspace in LSG_SUBSPACES, f"subspace must be one of {LSG_SUBSPACES}, got {self.subspace!r}")
        need(self.mask in LSG_MASKS, f"mask must be one of {LSG_MASKS}, got {self.mask!r}")
        need(isinstance(self.refresh, int) and self.refresh > 0,
             f"refresh must be a positive int, got {self.refresh!r}")

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.layers)


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """Privacy and compilation settings.

    max_grad_norm: clipping bound R on each sample's whole gradient.
    noise_multiplier: σ; Gaussian noise of std σ·R is added to the clipped sum.
    sample_rate: Poisson sampling rate q, used only by the accountant.
    expected_batch_size: divisor of the noisy sum (Opacus' convention). None: the
        actual batch size of each step.
    loss_reduction: how the loss seen by backward combines samples: "mean" (the
        default of F.cross_entropy) or "sum". Used to recover each sample's own
        gradient before clipping; clipping bounds each contribution either way.
    clipping: "flat" (C_i = min(1, R/‖g_i‖)) or "automatic" (C_i = R/(‖g_i‖+γ), Bu et al.).
    strategy: per-layer norm strategy: "auto" (sympy cost model), "ghost" or
        "instantiate" where possible.
    memory_budget_mb: per-layer memory the cost model may spend on instantiated
        per-sample gradients; above it, ghost norms are used. The default (2048) admits a
        GPT-2 head's fp32 per-sample gradients at B·T = 8192 (1178 MiB, faster than ghost
        norms at the same peak memory on an H200) but not at B=32, T=256 (2.3 GiB).
    seed: seed of the noise stream; None draws one from the OS (recorded in state_dict).
    accountant: "pld" or "rdp" (dp-accounting).
    check_finite: raise if any per-sample gradient norm is NaN/inf (one device sync a step).
    lsg: low-rank + sparse gradients for selected layers (a dict of ``LSGOptions``), or None.
    noise_mechanism: "gaussian" (DP-SGD: independent noise every step, Poisson accounting)
        or "bsr" (banded-square-root correlated noise, `dpcompile.bsr`: matrix-factorization
        accounting for cyclic / b-min-separated participation, no sample_rate).
    bsr_bands: p, the number of diagonals of the banded square root (noise state: p − 1
        vectors of the gradient's size).
    bsr_momentum, bsr_weight_decay: β and λ of the workload A (SGD with momentum β and
        multiplicative decay 1 − λ per step, e.g. lr·weight_decay of torch SGD); they shape
        the factorization (utility), not the privacy guarantee.
    bsr_coefficients: explicit banded Toeplitz coefficients c_0..c_{p−1} instead of the
        closed form (e.g. from `dpcompile.bsr.optimize_banded_toeplitz`); non-negative and
        non-increasing.
    bsr_min_separation: b, the fewest steps between two participations of one example
        (batches per epoch of fixed-order cyclic batches).
    bsr_max_participations: k, a promise that no example takes part in more than k steps
        (default: ⌈steps/b⌉, always true under b-min-separation).
    triton_kernels: on CUDA, compute each instantiated gradient's Σ_b w_b g_b + noise with
        dpcompile's Triton kernel (`dpcompile.kernels`) instead of an Inductor reduction
        (False: the reduction; for comparisons).
    mode: a torch.compile mode for Inductor ("reduce-overhead": CUDA graphs, "max-autotune", ...);
        torch.compile refuses mode= together with options=, so the dp backend takes it here.
    inductor: Inductor config patches for the compiled graphs, e.g. {"combo_kernels": True};
        applied after those of `mode`.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    loss_reduction: str = "mean"
    clipping: str = "flat"
    automatic_gamma: float = 0.01
    strategy: str = "auto"
    memory_budget_mb: float = 2048.0
    seed: int | None = None
    accountant: str = "pld"
    check_finite: bool = True
    lsg: LSGOptions | None = None
    instance: int | None = None
    noise_mechanism: str = "gaussian"
    bsr_bands: int | None = None
    bsr_momentum: float = 0.0
    bsr_weight_decay: float = 0.0
    bsr_coefficients: tuple[float, ...] | None = None
    bsr_min_separation: int | None = None
    bsr_max_participations: int | None = None
    triton_kernels: bool = True
    mode: str | None = None
    inductor: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "DPOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DPCompileError(
                f"unknown dp backend option(s) {unknown}; valid options are {sorted(known)}"
            )
        options["lsg"] = LSGOptions.from_value(options.get("lsg"))
        if isinstance(options.get("bsr_coefficients"), (list, tuple)):
            options["bsr_coefficients"] = tuple(options["bsr_coefficients"])
        if isinstance(options.get("inductor"), dict):  # a tuple of items: the options stay hashable
            options["inductor"] = tuple(sorted(options["inductor"].items()))
        if options.get("seed") is None:
            options["seed"] = int.from_bytes(os.urandom(8), "little") >> 1
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        need = _require
        need(_is_number(self.max_grad_norm) and self.max_grad_norm > 0,
             f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}")
        need(_is_number(self.noise_multiplier) and self.noise_multiplier >= 0,
             f"noise_multiplier must be a number >= 0, got {self.noise_multiplier!r}")
        need(self.sample_rate is None or (_is_number(self.sample_rate) and 0 < self.sample_rate <= 1),
             f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        need(self.expected_batch_size is None
             or (_is_number(self.expected_batch_size) and self.expected_batch_size > 0),
             f"expected_batch_size must be a positive number, got {self.expected_batch_size!r}")
        need(self.loss_reduction in LOSS_REDUCTIONS,
             f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        need(self.clipping in CLIPPING_MODES,
             f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        need(_is_number(self.automatic_gamma) and self.automatic_gamma > 0,
             f"automatic_gamma must be a positive number, got {self.automatic_gamma!r}")
        need(self.strategy in STRATEGIES,
             f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(_is_number(self.memory_budget_mb) and self.memory_budget_mb >= 0,
             f"memory_budget_mb must be a number >= 0, got {self.memory_budget_mb!r}")
        need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        need(isinstance(self.triton_kernels, bool), f"triton_kernels must be True or False, got {self.triton_kernels!r}")
        need(self.accountant in ACCOUNTANTS,
             f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        self._validate_noise_mechanism()
        self._validate_inductor()

    def _validate_noise_mechanism(self) -> None:
        """BSR settings: only with noise_mechanism="bsr", and with a participation schema it can account."""
        need = _require

        def positive_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        need(self.noise_mechanism in NOISE_MECHANISMS,
             f"noise_mechanism must be one of {NOISE_MECHANISMS}, got {self.noise_mechanism!r}")
        bsr_set = [f.name for f in dataclasses.fields(self)
                   if f.name.startswith("bsr_") and getattr(self, f.name) != f.default]
        if self.noise_mechanism != "bsr":
            need(not bsr_set, f"{bsr_set} only apply with noise_mechanism='bsr'")
            return
        need(self.sample_rate is None,
             "sample_rate (Poisson sampling) cannot be combined with noise_mechanism='bsr': BSR's accounting "
             "assumes fixed-order cyclic batches (b-min-separation) and has no amplification by sampling. Drop "
             "sample_rate and give bsr_min_separation (batches per epoch), or use noise_mechanism='gaussian'")
        need((self.bsr_bands is None) != (self.bsr_coefficients is None),
             "noise_mechanism='bsr' needs exactly one of bsr_bands=p (closed-form banded square root) or "
             f"bsr_coefficients=[c_0, ..., c_(p-1)]; got bsr_bands={self.bsr_bands!r}, "
             f"bsr_coefficients={self.bsr_coefficients!r}")
        need(self.bsr_bands is None or positive_int(self.bsr_bands),
             f"bsr_bands must be an int >= 1, got {self.bsr_bands!r}")
        need(self.bsr_coefficients is None or all(_is_number(c) for c in self.bsr_coefficients),
             f"bsr_coefficients must be numbers, got {self.bsr_coefficients!r}")
        need(_is_number(self.bsr_momentum) and 0 <= self.bsr_momentum < 1,
             f"bsr_momentum must be in [0, 1), got {self.bsr_momentum!r}")
        need(_is_number(self.bsr_weight_decay) and 0 <= self.bsr_weight_decay < 1,
             f"bsr_weight_decay (per-step multiplicative decay λ, θ <- (1-λ)θ) must be in [0, 1), "
             f"got {self.bsr_weight_decay!r}")
        need(self.bsr_min_separation is not None or self.bsr_max_participations is not None,
             "noise_mechanism='bsr' needs the participation schema for its accounting: bsr_min_separation=b "
             "(each example at most once every b steps, e.g. b cyclic batches per epoch) and/or "
             "bsr_max_participations=k (k=1: each example used in one step at most)")
        for name in ("bsr_min_separation", "bsr_max_participations"):
            value = getattr(self, name)
            need(value is None or positive_int(value), f"{name} must be an int >= 1, got {value!r}")

    def _validate_inductor(self) -> None:
        from torch._inductor import config, list_mode_options

        modes = tuple(list_mode_options())  # this torch's modes
        _require(self.mode is None or self.mode in modes, f"mode must be one of {modes}, got {self.mode!r}")
        _require(isinstance(self.inductor, tuple) and all(isinstance(k, str) for k, _ in self.inductor),
                 f"inductor must be a dict of Inductor config names to values, got {self.inductor!r}")
        unknown = sorted(k for k, _ in self.inductor if k not in config._config)
        _require(not unknown, f"inductor: unknown Inductor config name(s) {unknown} (see torch._inductor.config)")

    def inductor_patches(self, default_mode: str | None = None) -> dict[str, Any]:
        """Inductor config patches: those of `mode` (else of torch.compile's mode= keyword, which
        arrives only without options), then the explicit `inductor` ones."""
        from torch._inductor import list_mode_options

        mode = self.mode or default_mode
        return {**(list_mode_options(mode) if mode else {}), **dict(self.inductor)}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DPCompileError(f"dp backend option {message}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
