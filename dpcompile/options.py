"""Options of the `dp` backend: `torch.compile(model, backend="dp", options={...})`."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
from typing import Any

from .errors import DPCompileError

# Below this noise multiplier no epsilon is computed: `privacy.accounting._epsilon` returns math.inf. A single
# Gaussian step of multiplier sigma has privacy loss N(mu, 2 mu) with mu = 1/(2 sigma^2), so
# at sigma < 1e-6 one step alone gives epsilon > 10^11 whatever delta, and Poisson
# subsampling at rate q lowers that by at most ln(1/q) <= 745 (the smallest double) -- there
# is no guarantee left to report, and inf is a valid (vacuous) upper bound. Not asking
# dp_accounting there matters: its double arithmetic breaks down at tiny sigma (sigma^2
# underflows near 1e-154: ZeroDivisionError, OverflowError, or, for the RDP of subsampled
# steps at sigma ~ 1e-155, a silently returned epsilon of 0.0).
MIN_ACCOUNTED_NOISE_MULTIPLIER = 1e-6

CLIPPING_MODES = ("flat", "automatic")
LOSS_REDUCTIONS = ("mean", "sum")
STRATEGIES = ("auto", "ghost", "instantiate")
CLIP_GROUPINGS = ("layer", "block")  # clip_groups by name structure (else a list of fnmatch patterns)
ACCOUNTANTS = ("pld", "rdp")
NOISE_MECHANISMS = ("gaussian", "bsr")
LSG_SUBSPACES = ("weights", "random")
LSG_MASKS = ("update", "random")
# Numeric options, by type: numbers.Real / numbers.Integral values (numpy scalars included) are
# converted to plain Python float / int when the options are built (DPOptions.from_dict).
FLOAT_OPTIONS = ("max_grad_norm", "noise_multiplier", "sample_rate", "expected_batch_size", "automatic_gamma",
                 "memory_budget_mb", "bsr_momentum", "bsr_weight_decay", "bsr_sample_rate")
INT_OPTIONS = ("insecure_seed", "instance", "sample_dim", "dataset_size", "bsr_bands", "bsr_min_separation", "bsr_max_participations")
# expected_batch_size vs sample_rate * dataset_size: relative tolerance of the consistency check.
DIVISOR_REL_TOL = 1e-9


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
        _to_python_numbers(value, floats=("density",), ints=("rank", "refresh"))
        opts = cls(**value)
        opts.validate()
        return opts

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            _require(ok, f"lsg: {message}")

        need(len(self.layers) > 0 and all(isinstance(p, str) for p in self.layers),
             f"layers must be name patterns, got {self.layers!r}")
        need(_is_int(self.rank) and self.rank > 0, f"rank must be a positive int, got {self.rank!r}")
        need(_is_number(self.density) and 0 < self.density <= 1, f"density must be in (0, 1], got {self.density!r}")
        need(self.subspace in LSG_SUBSPACES, f"subspace must be one of {LSG_SUBSPACES}, got {self.subspace!r}")
        need(self.mask in LSG_MASKS, f"mask must be one of {LSG_MASKS}, got {self.mask!r}")
        need(_is_int(self.refresh) and self.refresh > 0,
             f"refresh must be a positive int, got {self.refresh!r}")

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.layers)


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """Privacy and compilation settings.

    Numeric options must be finite; numpy scalars are accepted and stored as Python
    float / int (bools are refused).

    max_grad_norm: clipping bound R on each sample's whole gradient.
    noise_multiplier: σ; Gaussian noise of std σ·R is added to the clipped sum. 0: no
        noise (non-private, no ε is claimed); a positive σ below 1e-6
        (`accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER`) is refused: it gives no privacy (one
        step alone has ε > 10^11) and its ε cannot be computed reliably.
    sample_rate: Poisson sampling rate q, used by the accountant. Needs
        expected_batch_size (or dataset_size): the divisor must not be the actual batch size.
    expected_batch_size: divisor of the noisy sum (Opacus' convention), q·N under Poisson
        sampling; required with sample_rate. None (only without sample_rate, i.e. when no ε
        is claimed): the actual batch size of each step.
    dataset_size: N, the number of records sampled from; with sample_rate and no
        expected_batch_size, expected_batch_size is derived as sample_rate·N. Given all three,
        expected_batch_size must equal sample_rate·dataset_size (relative 1e-9).
    loss_reduction: how a loss computed *inside* the compiled model (returned by forward)
        combines samples: "mean" (the default of F.cross_entropy) or "sum". Used to recover
        each sample's own gradient before clipping; clipping bounds each contribution either
        way. A loss computed outside the model is analysed and its reduction inferred
        (`dpcompile.privacy.loss_tracking`): `.sum()` and `.mean()` both work whatever this says.
    sample_dim: the dimension of the inputs that holds the samples: 0 (batch-first, the
        default) or e.g. 1 for time-major ``(T, B, d)`` inputs. The first tensor argument
        gives the batch size; every other input must hold the same samples along this
        dimension or none (a tensor shared by all samples).
    clipping: "flat" (C_i = min(1, R/‖g_i‖)) or "automatic" (C_i = R/(‖g_i‖+γ), Bu et al.).
    clip_groups: None (the default): one norm over each sample's whole gradient. "layer",
        "block" or a list of fnmatch patterns of parameter names: group-wise clipping, each of
        the model's K groups clipped on its own to R/√K (so the whole gradient still to R; the
        noise and ε are unchanged). "layer": a module's own parameters; "block": one numbered
        block (``h.3``, ``layers.11``), the parameters outside any block one more group;
        patterns: the first match, unmatched names one more group (`dpcompile.privacy.groups`).
    strategy: per-layer norm strategy: "auto" (sympy cost model), "ghost" or
        "instantiate" where possible.
    memory_budget_mb: per-layer memory the cost model may spend on instantiated
        per-sample gradients; above it, ghost norms are used. The default (2048) admits a
        GPT-2 head's fp32 per-sample gradients at B·T = 8192 (1178 MiB, faster than ghost
        norms at the same peak memory on an H200) but not at B=32, T=256 (2.3 GiB).
    insecure_seed: None (the default): every noise and sampling stream is seeded from OS
        entropy, a secret kept out of every model and optimizer checkpoint. An int makes the
        noise reproducible by anyone who knows it (who can then subtract it; two runs with the
        same seed on neighbouring data cancel it): for tests and debugging only.
    accountant: "pld" or "rdp" (dp-accounting).
    check_finite: always True: a batch in which any per-sample gradient norm is NaN/inf is
        refused before anything is released (one device sync a step). False is refused: a
        non-finite sample's gradient cannot be clipped, so its batch cannot be released
        privately (it would turn the whole release into NaN).
    lsg: low-rank + sparse gradients for selected layers (a dict of ``LSGOptions``), or None.
    noise_mechanism: "gaussian" (DP-SGD: independent noise every step, Poisson accounting)
        or "bsr" (banded-square-root correlated noise, `dpcompile.privacy.bsr`: matrix-factorization
        accounting for cyclic / b-min-separated participation, no sample_rate).
    bsr_bands: p, the number of diagonals of the banded square root (noise state: p − 1
        vectors of the gradient's size).
    bsr_momentum, bsr_weight_decay: β and λ of the workload A (SGD with momentum β and
        multiplicative decay 1 − λ per step, e.g. lr·weight_decay of torch SGD); they shape
        the factorization (utility), not the privacy guarantee.
    bsr_coefficients: explicit banded Toeplitz coefficients c_0..c_{p−1} instead of the
        closed form (e.g. from `dpcompile.privacy.bsr.optimize_banded_toeplitz`); non-negative and
        non-increasing.
    bsr_min_separation: b, the fewest steps between two participations of one example
        (batches per epoch of fixed-order cyclic batches).
    bsr_max_participations: k, a promise that no example takes part in more than k steps
        (default: ⌈steps/b⌉, always true under b-min-separation).
    bsr_sample_rate: q, claims the *amplified* banded accounting (cyclic Poisson participation:
        b = bsr_min_separation disjoint groups, step t samples group t mod b with Poisson rate q;
        `dpcompile.privacy.bsr.amplified_epsilon`). Needs bands <= b; only through
        `dpcompile.make_private(noise_mechanism="amplified_bsr")`, whose loader samples that way.
    triton_kernels: on CUDA, compute each instantiated gradient's Σ_b w_b g_b + noise with
        dpcompile's Triton kernel (`dpcompile.privacy.kernels`) instead of an Inductor reduction
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
    dataset_size: int | None = None
    loss_reduction: str = "mean"
    sample_dim: int = 0
    clipping: str = "flat"
    clip_groups: str | tuple[str, ...] | None = None
    automatic_gamma: float = 0.01
    strategy: str = "auto"
    memory_budget_mb: float = 2048.0
    insecure_seed: int | None = None
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
    bsr_sample_rate: float | None = None
    triton_kernels: bool = True
    mode: str | None = None
    inductor: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "DPOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if "seed" in options:
            raise DPCompileError(
                "dp backend option 'seed' is now called insecure_seed: a known seed lets anyone regenerate the "
                "noise and subtract it. Leave it out (the noise is seeded from OS entropy), or pass "
                "insecure_seed=... for tests and debugging only")
        unknown = sorted(set(options) - known)
        if unknown:
            raise DPCompileError(
                f"unknown dp backend option(s) {unknown}; valid options are {sorted(known)}"
            )
        options["lsg"] = LSGOptions.from_value(options.get("lsg"))
        if isinstance(options.get("clip_groups"), list):
            options["clip_groups"] = tuple(options["clip_groups"])
        if isinstance(options.get("bsr_coefficients"), (list, tuple)):
            options["bsr_coefficients"] = tuple(options["bsr_coefficients"])
        if isinstance(options.get("inductor"), dict):  # a tuple of items: the options stay hashable
            options["inductor"] = tuple(sorted(options["inductor"].items()))
        _to_python_numbers(options, FLOAT_OPTIONS, INT_OPTIONS)
        if isinstance(options.get("bsr_coefficients"), tuple):
            options["bsr_coefficients"] = tuple(float(c) if _is_number(c) else c for c in options["bsr_coefficients"])
        q, n = options.get("sample_rate"), options.get("dataset_size")
        if options.get("expected_batch_size") is None and _is_number(q) and _is_int(n) and n >= 1:
            options["expected_batch_size"] = q * n  # derived: E = q·N (validated below)
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        need = _require
        need(_is_number(self.max_grad_norm) and self.max_grad_norm > 0,
             f"max_grad_norm must be a positive finite number, got {self.max_grad_norm!r}")
        need(_is_number(self.noise_multiplier) and self.noise_multiplier >= 0,
             f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        need(not 0 < self.noise_multiplier < MIN_ACCOUNTED_NOISE_MULTIPLIER,
             f"noise_multiplier={self.noise_multiplier!r} is positive but below {MIN_ACCOUNTED_NOISE_MULTIPLIER:g}: "
             "noise that small gives no privacy (one step alone has ε > 10^11 at any sample_rate, so the "
             "accountant reports ε = inf) and is comparable to the float rounding of the clipped sum. Use "
             "noise_multiplier=0 for deliberately non-private training (no ε is claimed then), or a "
             f"noise_multiplier >= {MIN_ACCOUNTED_NOISE_MULTIPLIER:g} (DP-SGD typically uses 0.5 to 2)")
        need(self.sample_rate is None or (_is_number(self.sample_rate) and 0 < self.sample_rate <= 1),
             f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        need(self.expected_batch_size is None
             or (_is_number(self.expected_batch_size) and self.expected_batch_size > 0),
             f"expected_batch_size must be a positive finite number, got {self.expected_batch_size!r}")
        need(self.dataset_size is None or (_is_int(self.dataset_size) and self.dataset_size >= 1),
             f"dataset_size must be an int >= 1 (the number of records N), got {self.dataset_size!r}")
        need(self.check_finite is True,
             f"check_finite={self.check_finite!r} is refused: a sample whose gradient norm is NaN/inf cannot be "
             "clipped, so a batch containing one cannot be released privately (its NaN would spread to every "
             "coordinate of the release, revealing that sample). dpcompile always checks and refuses such a "
             "batch before anything reaches p.grad; drop the option and fix the inputs / loss of the samples "
             "that give non-finite gradients")
        need(self.loss_reduction in LOSS_REDUCTIONS,
             f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        need(_is_int(self.sample_dim) and self.sample_dim >= 0,
             f"sample_dim must be an int >= 0 (the input dimension that holds the samples), got {self.sample_dim!r}")
        need(self.clipping in CLIPPING_MODES,
             f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        groups = self.clip_groups
        need(groups is None or groups in CLIP_GROUPINGS or (isinstance(groups, tuple) and len(groups) > 0
                                                              and all(isinstance(p, str) and p for p in groups)),
             f"clip_groups must be None (flat clipping), one of {CLIP_GROUPINGS} or a non-empty list of parameter "
             f"name patterns (fnmatch), got {groups!r}")
        need(_is_number(self.automatic_gamma) and self.automatic_gamma > 0,
             f"automatic_gamma must be a positive finite number, got {self.automatic_gamma!r}")
        need(self.strategy in STRATEGIES,
             f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(_is_number(self.memory_budget_mb) and self.memory_budget_mb >= 0,
             f"memory_budget_mb must be a finite number >= 0, got {self.memory_budget_mb!r}")
        need(self.insecure_seed is None or _is_int(self.insecure_seed),
             f"insecure_seed must be an int or None, got {self.insecure_seed!r}")
        need(isinstance(self.triton_kernels, bool), f"triton_kernels must be True or False, got {self.triton_kernels!r}")
        need(self.accountant in ACCOUNTANTS,
             f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        self._validate_noise_mechanism()
        self._validate_divisor()
        self._validate_inductor()

    def _validate_divisor(self) -> None:
        """With Poisson accounting the divisor must be the public q·N, never the actual batch size."""
        need, q, E, n = _require, self.sample_rate, self.expected_batch_size, self.dataset_size
        need(n is None or q is not None,
             f"dataset_size={n} only serves to derive expected_batch_size = sample_rate·dataset_size; it needs "
             "sample_rate (or drop dataset_size and pass expected_batch_size)")
        if q is None:
            return  # no ε is claimed: the divisor may be the actual batch size (or expected_batch_size)
        need(E is not None,
             f"sample_rate={q} is set but expected_batch_size is not: under Poisson sampling the noisy sum must "
             "be divided by the expected batch size q·N, never by the actual one (which would leak it). Pass "
             f"options={{'expected_batch_size': q*N}} (N = dataset size; or options={{'dataset_size': N}}, from "
             "which it is derived) or use dpcompile.make_private, which derives it")
        if n is not None:
            need(abs(E - q * n) <= DIVISOR_REL_TOL * q * n,
                 f"expected_batch_size={E} disagrees with sample_rate·dataset_size = {q}·{n} = {q * n}: give "
                 "expected_batch_size or dataset_size, or make them consistent")
        need(E >= q * (1 - DIVISOR_REL_TOL),
             f"expected_batch_size={E} is below sample_rate={q}: it must be q·N for a dataset of N >= 1 records")

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
             f"bsr_coefficients must be finite numbers, got {self.bsr_coefficients!r}")
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
        if self.bsr_sample_rate is not None:
            self._validate_amplified()

    def _validate_amplified(self) -> None:
        """Amplified banded MF: b groups (bsr_min_separation), Poisson rate q, bands <= b."""
        need, q, b = _require, self.bsr_sample_rate, self.bsr_min_separation
        bands = self.bsr_bands if self.bsr_bands is not None else len(self.bsr_coefficients or ())
        need(_is_number(q) and 0 < q <= 1, f"bsr_sample_rate (Poisson rate within a group) must be in (0, 1], got {q!r}")
        need(b is not None, "bsr_sample_rate (amplified banded accounting) needs bsr_min_separation=b, the number of "
             "groups of the cyclic Poisson schema")
        need(self.bsr_max_participations is None,
             "bsr_max_participations does not apply with bsr_sample_rate: the amplified accounting counts ⌈T/b⌉ "
             "Poisson-sampled participations itself")
        need(bands <= b, f"bsr_sample_rate (amplified banded accounting) needs bands <= groups: {bands} bands but "
             f"bsr_min_separation={b} groups, so the columns of C one example touches would overlap. Use at most "
             f"{b} bands or more groups")

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


def validate_make_private_args(*, max_physical_batch_size: Any = None, target_epsilon: Any = None,
                               target_delta: Any = 1e-5, epochs: Any = None, noise_multiplier: Any = None,
                               insecure_seed: Any = None) -> None:
    """`dpcompile.make_private`'s own arguments, checked before anything is calibrated or compiled.

    None means "not given" for every argument but target_delta. Raises DPCompileError naming
    the argument and its value.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise DPCompileError(f"dpcompile.make_private: {message}")

    need(max_physical_batch_size is None or (_is_int(max_physical_batch_size) and max_physical_batch_size >= 1),
         f"max_physical_batch_size must be an int >= 1 (the most samples per micro-batch) or None (each logical "
         f"batch in one piece), got {max_physical_batch_size!r}")
    need(target_epsilon is None or (_is_number(target_epsilon) and target_epsilon > 0),
         f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    need(_is_number(target_delta) and 0 < target_delta < 1,
         f"target_delta must be in (0, 1) (typically below 1/N for N records), got {target_delta!r}")
    need(epochs is None or (_is_number(epochs) and epochs > 0),
         f"epochs must be a positive finite number, got {epochs!r}")
    need(noise_multiplier is None or (_is_number(noise_multiplier) and noise_multiplier >= 0),
         f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    need(insecure_seed is None or _is_int(insecure_seed),
         f"insecure_seed must be an int or None, got {insecure_seed!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DPCompileError(f"dp backend option {message}")


def _is_number(x: Any) -> bool:
    """A finite real number (int, float, numpy scalar, ...); bools are not numbers here."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return math.isfinite(x)
    except (OverflowError, TypeError, ValueError):  # an int beyond the float range
        return False


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _to_python_numbers(values: dict[str, Any], floats: tuple[str, ...], ints: tuple[str, ...]) -> None:
    """In place: numpy (or other numbers.Real / Integral) scalars of these keys -> float / int.

    Values that are not numbers, or not finite, are left as they are, for validation to refuse
    with the option's own message."""
    for key in floats:
        if key in values and _is_number(values[key]):
            values[key] = float(values[key])
    for key in ints:
        if key in values and _is_int(values[key]):
            values[key] = int(values[key])
