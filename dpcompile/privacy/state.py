"""Privacy state of one compiled model: noise streams, step count, accountant, and the release
protocol around its compiled backwards.

The state belongs to the module it protects (`own_module`): found from the module and from each
of its parameters. It is split in two for checkpoints: a public part (`state_dict`: steps,
accountant history, options) that resumes the accounting and may be published with the model,
and a secret part (`secret_state_dict`: the seed of every noise and sampling stream, BSR noise
history), drawn from OS entropy by default and saved apart.

Release protocol: ``p.grad`` is written only at a release, with its noise, counted once.
Between releases (accumulation micro-steps) the clipped sums stay inside the state.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from typing import Any

import torch

from .accounting import PrivacyAccountant
from ..errors import DPCompileError
from .groups import GroupTable
from .lsg import LSGProjector
from .rng import secret_seed, stream_seed
from ..options import DPOptions

STATE_ATTR = "_dpcompile_state"
GUARD_ATTR = "_dpcompile_guarded"
IN_GRAPH_ATTR = "_dpcompile_in_graph"  # an input of some dp-compiled graph: its gradient is clipped there
NAME_ATTR = "_dpcompile_name"
SECRET_OPTIONS = ("insecure_seed", "instance")  # never in the public state
# compiled module -> its state, for privacy_state(model) under FSDP2 (whose registered parameters are
# shards without STATE_ATTR). Weak and outside the module: copy.deepcopy(model) must not copy the state.
_STATE_OF_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, PrivacyState]" = weakref.WeakKeyDictionary()


class InsecureSeedWarning(UserWarning):
    """A privacy state whose noise is seeded from a known value (the insecure_seed option)."""


def batch_size_of(inputs: Any, sample_dim: int = 0) -> int | None:
    """The number of samples of a call: size `sample_dim` of its first tensor input with more
    than `sample_dim` dimensions (the backend takes the batch from the same input)."""
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > sample_dim:
            return int(leaf.shape[sample_dim])
    return None


class PrivacyState:
    """Everything one private model's releases depend on.

    Public part (`state_dict`: steps, accountant history, options; safe to publish with the
    model) and secret part (`secret_state_dict`: the seed of every noise and sampling stream, BSR
    noise history), which never enters a model or optimizer checkpoint.
    """

    cyclic_batches_verified = False  # BSR: set by make_private, whose loader draws the cyclic batches

    def __init__(self, options: DPOptions) -> None:
        self.options = options
        self.seed = secret_seed() if options.insecure_seed is None else options.insecure_seed
        if options.insecure_seed is not None:
            warnings.warn("dpcompile: insecure_seed is set: whoever knows it can regenerate and subtract the noise. "
                          "For tests and debugging only; leave it out to train privately", InsecureSeedWarning,
                          stacklevel=2)
        self.steps = 0  # noisy releases so far
        self.skipped_steps = 0  # Poisson draws with no sample: nothing released, still accounted
        self.accountant = PrivacyAccountant(options.accountant)
        self.release_next = True  # False on gradient-accumulation micro-steps
        self.last_backward_released = True
        self.last_sample_norms: torch.Tensor | None = None
        self.compiled: list[Any] = []  # CompileContext of every compiled region, for inspection
        self.multi_graph = False  # set when dynamo splits the model (graph breaks)
        self.compiled_module: Any = lambda: None  # weakref to torch.compile's wrapper (FSDP2 may shard it)
        self.refusal: DPCompileError | None = None  # the backend's last refusal (suppress_errors may hide it)
        self.no_graph_reason: str | None = None  # why no dp graph can exist (Dynamo disabled)
        self.needs_secret = False  # a resumed run whose mechanism needs its secret state back (BSR)
        self.loss_verdict_kind: str | None = None  # set by the loss tracker for the backward it starts
        self._task: int | None = None
        self._runs_in_task: list[Any] = []  # CompileContext of each compiled backward run this pass
        self._pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self._micro_sums: list[tuple[torch.Tensor, torch.Tensor]] = []  # this backward's unreleased sums
        self._run_norms: list[torch.Tensor] = []  # per-sample norms of each graph run in this backward
        self._accumulated: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(param) -> (param, clipped sum)
        self.graph_gradients: dict[int, list[tuple[torch.Tensor, int]]] = {}  # id(param) -> (grad, version)
        self._zeros: dict[tuple, torch.Tensor] = {}
        self._record: dict[str, Any] | None = None  # see checkpoint_record
        self._samples_pending = 0  # samples of the micro-steps since the last release
        self._samples_noted = False  # this backward's batch size is counted
        self.sampling_audit = _poisson_audit(options)  # plain API: do the batch sizes look Poisson-sampled?
        self.bsr = self._make_correlated_noise(options)  # None unless noise_mechanism == "bsr"
        self.lsg = LSGProjector(options.lsg, self.seed) if options.lsg is not None else None
        self.clip_group_table: GroupTable | None = None  # clip_groups: fixed at the first compile

    def __repr__(self) -> str:
        opts = self.options
        parts = [f"steps={self.steps}", f"noise_multiplier={opts.noise_multiplier:g}",
                 f"max_grad_norm={opts.max_grad_norm:g}", f"mechanism={opts.noise_mechanism!r}"]
        if opts.sample_rate is not None:
            parts.append(f"sample_rate={opts.sample_rate:g}")
        if opts.insecure_seed is not None:
            parts.append("INSECURE: noise reproducible from insecure_seed")
        delta = self.default_delta()
        if delta is not None:
            try:
                parts.append(f"epsilon={self.epsilon(delta):.4g} at delta={delta:g}")
            except DPCompileError:
                pass
        return f"PrivacyState({', '.join(parts)})"

    def track_outputs(self, outputs: Any, inputs: Any) -> Any:
        """The compiled model's outputs, wrapped so that the loss computed from them is analysed
        (`dpcompile.privacy.loss_tracking`); the batch size is that of the first batched input. Outside
        grad mode nothing can reach a backward, so outputs are returned as they are."""
        if not torch.is_grad_enabled():
            return outputs
        batch_size = batch_size_of(inputs, self.options.sample_dim)
        if batch_size is None:
            return outputs  # no batched input: no dp graph either (refused at compile time)
        from .loss_tracking import track_outputs
        return track_outputs(outputs, batch_size, self, sample_dim=self.options.sample_dim)

    @property
    def in_graph_reduction(self) -> str:
        """How the compiled backward graphs take the loss to combine samples (the option)."""
        return self.options.loss_reduction

    def loss_verdict(self, kind: str | None) -> None:
        """Called by the loss tracker around a backward it starts: the loss is a separable
        "mean" or "sum" over the samples (None: that backward is over)."""
        self.loss_verdict_kind = kind

    def check_loss_known(self, ctx: Any) -> None:
        """A dp backward runs only from a loss the tracker analysed (or one the model returned)."""
        if self.loss_verdict_kind is None:
            raise DPCompileError(
                "dpcompile: a backward reached the compiled model from a loss that dpcompile did not see being "
                "computed from the model's outputs (an output turned into a plain tensor, e.g. by "
                ".as_subclass(torch.Tensor), numpy or a custom autograd.Function, or an output without the "
                f"samples along dimension {self.options.sample_dim}), so it cannot tell whether the loss mixes "
                "samples. Nothing was released. Compute the loss with torch operations on the model's outputs, "
                "or inside the compiled model (return it from forward)")

    def default_delta(self) -> float | None:
        """δ = 1/N^1.1 when the dataset size is known (N = expected batch size / sample rate)."""
        opts = self.options
        if opts.sample_rate is None or opts.expected_batch_size is None:
            return None
        return float((opts.expected_batch_size / opts.sample_rate) ** -1.1)

    # -- noise -------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        return self.options.noise_multiplier * self.options.max_grad_norm if self.release_next else 0.0

    def noise(self, stream: str, numel: int, device: torch.device) -> torch.Tensor:
        """N(0, 1) draws for one graph at the current step: a pure function of (seed, step, stream).

        With noise_mechanism="bsr" it is the correlated w_t = (C⁻¹Z)_t of that stream instead."""
        if self.noise_std == 0.0:
            key = (numel, str(device))
            if key not in self._zeros:
                self._zeros[key] = torch.zeros(numel, device=device)
            return self._zeros[key]
        if self.bsr is not None:
            return self._bsr_noise(stream, numel, device)
        return torch.randn(numel, generator=self.generator(stream, device), device=device)

    def generator(self, stream: str, device: torch.device) -> torch.Generator:
        """The noise generator of one named stream at the current step."""
        gen = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, self.steps, stream))
        return gen

    def _deferred_noise(self, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
        """Noise for the graph-break path, one vector per parameter in a fixed order."""
        if not self.noise_std:
            return [torch.zeros(n, device=device) for n in sizes]
        if self.bsr is not None:  # one correlated stream over all of them, split
            return list(self._bsr_noise("deferred", sum(sizes), device).split(sizes))
        gen = self.generator("deferred", device)
        return [torch.randn(n, generator=gen, device=device) for n in sizes]

    # -- BSR correlated noise (dpcompile.privacy.bsr) -------------------------------------------
    @staticmethod
    def _make_correlated_noise(options: DPOptions):
        if options.noise_mechanism != "bsr":
            return None
        from .bsr import CorrelatedNoise, bsr_coefficients

        coefficients = options.bsr_coefficients or bsr_coefficients(
            options.bsr_bands, options.bsr_momentum, options.bsr_weight_decay)
        return CorrelatedNoise(coefficients)

    def _bsr_noise(self, stream: str, numel: int, device: torch.device) -> torch.Tensor:
        """w_t = (C⁻¹Z)_t of one stream at the current step; advances its buffers at most once a step."""
        def gaussian(name: str, step: int, size: int, dev: torch.device) -> torch.Tensor:
            gen = torch.Generator(device=dev)
            gen.manual_seed(stream_seed(self.seed, step, name))
            return torch.randn(size, generator=gen, device=dev)

        return self.bsr.draw(stream, numel, device, self.steps, gaussian)

    def _bsr_epsilon(self, delta: float) -> float:
        """ε of the C X + σR Z release after self.steps steps (b-min-separation, zero-out adjacency; or
        cyclic Poisson participation with bsr_sample_rate)."""
        from .bsr import amplified_epsilon, epsilon

        opts = self.options
        if opts.bsr_sample_rate is not None:  # cyclic Poisson participation: amplified banded accounting
            return amplified_epsilon(opts.noise_multiplier, self.bsr.coefficients, self.steps, delta,
                                     opts.bsr_min_separation, opts.bsr_sample_rate, opts.accountant)
        return epsilon(opts.noise_multiplier, self.bsr.coefficients, self.steps, delta,
                       opts.bsr_min_separation or 1, opts.bsr_max_participations, opts.accountant)

    # -- one release per backward pass, however many graphs it runs ------------------
    def enter_backward(self, ctx: Any) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task, self._runs_in_task, self._pending, self.graph_gradients = task, [], [], {}
            self._micro_sums, self._samples_noted, self._run_norms = [], False, []
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        self._check_releasable()
        self.check_loss_known(ctx)
        self._runs_in_task.append(ctx)

    def _check_releasable(self) -> None:
        if self.bsr is not None and not self.cyclic_batches_verified:
            raise DPCompileError(
                "dpcompile: noise_mechanism='bsr' through torch.compile: BSR's accounting assumes each example takes "
                "part at most once every bsr_min_separation steps (fixed-order cyclic batches), which the compiled "
                "model cannot see or check (a reshuffling DataLoader breaks it). Use dpcompile.make_private(..., "
                "noise_mechanism='bsr', bands=p; or noise_mechanism='amplified_bsr' for bsr_sample_rate), whose "
                "loader draws the cyclic (Poisson) batches; nothing was released")
        if self.needs_secret:
            raise DPCompileError(
                "dpcompile: this run was resumed from a public privacy state without its secret part, and "
                f"noise_mechanism={self.options.noise_mechanism!r} needs it (the BSR noise history): a fresh history "
                "would break the correlated noise of the steps already released. Load it with "
                "dpcompile.privacy_state(model).load_secret_state_dict(torch.load(secret_path)); nothing was released")

    def note_samples(self, count: int) -> None:
        """This backward's batch size (once per backward, whatever number of graphs it runs). At a
        release, the logical batch (micro-steps included) must look Poisson-sampled: checked before
        any gradient is handed back."""
        if self._samples_noted:
            return
        self._samples_noted = True
        if count == 0:
            raise DPCompileError(
                "dpcompile: a batch of 0 samples reached the private backward; an empty Poisson draw must release "
                "pure noise (dpcompile.make_private's loader does it), not a gradient of nothing. Nothing was released")
        if self.release_next and self.sampling_audit is not None and getattr(self, "data_parallel", None) is None:
            self.sampling_audit.observe(self._samples_pending + count)

    def route_gradients(self, ctx: Any, grads: list[Any]) -> list[Any]:
        """What a graph's backward hands autograd: at a release, each parameter's gradient plus
        what earlier micro-steps accumulated (checked as it reaches the parameter,
        `guard_parameters`); between releases nothing: the clipped, noise-free sums stay here
        (committed when the backward ends without a refusal) and ``p.grad`` is untouched."""
        for position, param in ctx.params.items():
            grad = grads[position]
            if not isinstance(grad, torch.Tensor):
                continue
            if not self.release_next:
                self._micro_sums.append((param, grad))
                grads[position] = None
                continue
            earlier = self._take_accumulated(param)
            if earlier is not None:
                grad = grads[position] = grad + earlier.to(grad.dtype)
            self.graph_gradients.setdefault(id(param), []).append((grad, grad._version))
        return grads

    def discard_accumulation(self) -> None:
        """Forget the clipped sums of micro-steps not yet released (a new logical batch starts)."""
        self._accumulated = {}
        self._samples_pending = 0

    @staticmethod
    def _batch_of(runs: list[Any]) -> int:
        return max((int(c.last_batch) for c in runs if getattr(c, "last_batch", None) is not None), default=0)

    @property
    def accumulating(self) -> bool:
        return len(self._accumulated) > 0

    def clip_groups_of(self, ctx: Any) -> dict[int, int]:
        """clip_groups: the group of each trainable parameter input of a graph ({} for flat clipping).
        The groups (and so K and R/√K) are those of the whole compiled model's trainable parameters,
        named as the model names them (a graph of a sub-module's frame names them relative to it)."""
        spec = self.options.clip_groups
        if spec is None:
            return {}
        module = self.compiled_module()
        root = getattr(module, "_orig_mod", module)
        model = list(root.named_parameters()) if root is not None else []
        named = {id(p): name for name, p in model}
        names = {i: named.get(id(p), ctx.param_names.get(i, f"input #{i}")) for i, p in ctx.params.items()
                 if p.requires_grad}
        if self.clip_group_table is None:
            trainable = [name for name, p in model if p.requires_grad]
            self.clip_group_table = GroupTable(trainable or names.values(), spec, self.options.max_grad_norm)
        return self.clip_group_table.ids(names)

    def defer(self, ctx: Any, sq_norms: torch.Tensor, per_sample_grads: list[torch.Tensor]) -> None:
        """A graph-break graph's share of the step; clipped once the whole backward has run."""
        self._pending.append((ctx, sq_norms, per_sample_grads))

    def _finish_backward(self) -> None:
        runs, pending, micro = self._runs_in_task, self._pending, self._micro_sums
        self._task, self._runs_in_task, self._pending, self.graph_gradients = None, [], [], {}
        self._micro_sums = []
        norms, self._run_norms = self._run_norms, []
        if len(norms) > 1:  # graphs that clip their own groups: each sample's norm over all of them
            self.last_sample_norms = torch.stack([n.float() for n in norms]).pow(2).sum(0).sqrt()
        spanning = self._groups_in_several_graphs(runs) if len(runs) > 1 else []
        if spanning != []:  # several graphs, and not each clipping whole groups of its own
            for c in runs:
                for p in c.params.values():
                    p.grad = None
            if spanning:
                raise DPCompileError(
                    f"dpcompile: clip group(s) {spanning[:5]} took part in several compiled graphs of one backward "
                    "(a graph break inside a group, or the model called twice before backward), so each graph would "
                    "clip its share of the group on its own. The gradients were discarded. Choose clip_groups so "
                    "that each group lies in one graph (e.g. 'layer', or patterns that follow the graph breaks; "
                    "TORCH_LOGS=graph_breaks shows them; a weight shared across a break needs flat clipping, which "
                    "clips after the whole backward), remove the graph break, or call the model once per backward")
            raise DPCompileError(
                "dpcompile: one backward pass ran several compiled graphs of this model that were each clipped on "
                "their own (a graph break appeared after compilation, or the model was called twice before "
                "backward). The gradients were discarded. Call the model once per backward, or re-create the "
                "compiled model so that dpcompile sees the graph break when compiling.")
        if pending:
            self._release_deferred(pending)
        for param, grad in micro:
            self._accumulate(param, grad)
        self._samples_pending = 0 if self.release_next else self._samples_pending + self._batch_of(runs)
        self.last_backward_released = self.release_next
        if self.release_next:
            self._refuse_unreleased_sums(runs)
            self.record_release()

    def _groups_in_several_graphs(self, runs: list[Any]) -> list[str] | None:
        """Several graphs ran in one backward: [] when that is sound (flat clipping deferred to the end
        of the backward, or clip groups each held by one graph), the groups found in more than one
        graph otherwise, None when these graphs clipped on their own without groups."""
        if all(c.deferred for c in runs):
            return []
        if self.clip_group_table is None:
            return None
        seen, spanning = set(), set()
        for c in runs:
            groups = set(c.clip_groups.values())
            spanning |= seen & groups
            seen |= groups
        names = {k: name for name, k in self.clip_group_table.index.items()}
        return sorted(names[k] for k in spanning)

    def _refuse_unreleased_sums(self, runs: list[Any]) -> None:
        """Micro-step sums of parameters the releasing backward did not reach would be released
        without noise (the noise comes with a parameter's graph): refuse the whole release."""
        if not self._accumulated:
            return
        names = [_name(ref()) for ref, _ in self._accumulated.values() if ref() is not None]
        if not names:
            self.discard_accumulation()
            return
        self.discard_accumulation()
        for c in runs:
            for p in c.params.values():
                p.grad = None
        raise DPCompileError(
            f"dpcompile: parameters {names[:5]} accumulated clipped gradients in accumulation micro-steps but took no "
            "part in the releasing backward, which adds each parameter's noise; the step was discarded and nothing "
            "was released. Every micro-batch of a logical batch must run the same model graph")

    def _accumulate(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        earlier = self._take_accumulated(param)
        self._accumulated[id(param)] = (weakref.ref(param), grad if earlier is None else earlier + grad)

    def _take_accumulated(self, param: torch.Tensor) -> torch.Tensor | None:
        entry = self._accumulated.pop(id(param), None)
        return entry[1] if entry is not None and entry[0]() is param else None

    def _release_deferred(self, pending) -> None:
        from ..distributed import graph_scalars
        from .per_sample import clip_weights, noise_scales, privatize, weighted_sum, zero_rows

        opts = self.options
        total = sum(sq for _, sq, _ in pending)  # flat clipping (clip groups clip inside each graph)
        weights, norms = clip_weights(total, opts.max_grad_norm, opts.loss_reduction, opts.clipping,
                                      opts.automatic_gamma)
        self.check_norms(norms)
        device = total.device
        scalars = torch.tensor(graph_scalars(self), device=device)  # data-parallel: noise on one rank only
        weights, std = noise_scales(weights, scalars)
        ordered = sorted(pending, key=lambda item: item[0].noise_key)
        noises = iter(self._deferred_noise([ps[0].numel() for _, _, grads in ordered for ps in grads], device))
        for ctx, _, per_sample_grads in ordered:
            rows_of = ctx.plan.get("deferred_zero_rows", [[]] * len(per_sample_grads))
            for position, ps, rows in zip(ctx.plan["deferred_positions"], per_sample_grads, rows_of):
                param = ctx.params[position]
                clipped = weighted_sum(weights, ps)
                grad = privatize(clipped, next(noises), 0, std).to(param.dtype)
                if rows:  # padding rows: zero in every sample's gradient, so released without noise
                    grad = zero_rows(grad, rows)
                if not self.release_next:
                    self._accumulate(param, grad)
                    continue
                earlier = self._take_accumulated(param)
                if earlier is not None:
                    grad = grad + earlier.to(grad.dtype)
                param.grad = grad if param.grad is None else param.grad + grad

    def check_norms(self, norms: torch.Tensor) -> None:
        self.last_sample_norms = norms.detach()
        self._run_norms.append(self.last_sample_norms)
        if self.options.check_finite and not bool(torch.isfinite(norms).all()):
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise DPCompileError(
                f"dpcompile: per-sample gradient norm is NaN/inf for sample(s) {bad[:10]} of this batch; "
                "no gradient was released. Check the inputs and loss of those samples (or lower the learning "
                "rate / use gradient-safe ops).")

    def record_release(self, count: int = 1) -> None:
        self.steps += count
        if self.options.sample_rate is not None and self.options.noise_multiplier > 0:
            self.accountant.step(self.options.noise_multiplier, self.options.sample_rate, count)
        self._update_checkpoint_record()

    def checkpoint_record(self) -> dict[str, Any]:
        """A live plain dict of the accounting (steps, accountant history), kept in the param group of
        every optimizer that steps this model's parameters, so that ``optimizer.state_dict()``, the
        checkpoint users already save, carries it (`dpcompile.privacy.checkpoint`)."""
        if self._record is None:
            self._record = {}
            self._update_checkpoint_record()
        return self._record

    def _update_checkpoint_record(self) -> None:
        if self._record is not None:
            self._record.update(steps=self.steps, skipped_steps=self.skipped_steps,
                                accountant=self.accountant.state_dict())

    def record_skipped(self, count: int = 1) -> None:
        """A Poisson draw with no sample: the release of pure noise is skipped, not its accounting."""
        self.skipped_steps += count
        self.record_release(count)

    # -- accounting ----------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        if self.options.noise_multiplier == 0:
            return float("inf")
        if self.bsr is not None:
            return self._bsr_epsilon(delta)
        if self.options.sample_rate is None:
            raise DPCompileError(
                "dpcompile: cannot account privacy without the sampling rate; pass "
                "options={'sample_rate': q, ...} to torch.compile or use dpcompile.make_private")
        return self.accountant.get_epsilon(delta)

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The public part: what the release history reveals anyway (steps, accountant history,
        options without the seed). Safe to publish with the model; resumes the accounting."""
        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in SECRET_OPTIONS}
        return {"format": "dpcompile-public-1", "steps": self.steps, "skipped_steps": self.skipped_steps,
                "release_next": self.release_next, "options": options,
                "accountant": self.accountant.state_dict(),
                "bsr_coefficients": list(self.bsr.coefficients) if self.bsr is not None else None,
                "lsg": self.lsg.state_dict() if self.lsg is not None else None}

    def secret_state_dict(self) -> dict[str, Any]:
        """The secret part: the seed of every noise and sampling stream and the BSR noise history.
        Whoever holds it can regenerate the noise and subtract it: store it apart from the model
        and optimizer checkpoints, readable only by the training job."""
        return {"format": "dpcompile-secret-1", "seed": self.seed,
                "bsr": self.bsr.state_dict() if self.bsr is not None else None,
                # batch sizes depend on who is in the data set: secret as well
                "sampling_audit": self.sampling_audit.state_dict() if self.sampling_audit is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the accounting from a public part (`state_dict`)."""
        if "seed" in state or state.get("format") != "dpcompile-public-1":
            raise DPCompileError(
                "dpcompile: this is not a public privacy state of this dpcompile version (a secret part, or an "
                "older checkpoint that kept the seed inside): load the public part with load_state_dict and the "
                "secret part with load_secret_state_dict")
        saved = state.get("options", {})
        for key in ("max_grad_norm", "noise_multiplier", "sample_rate"):
            if key in saved and saved[key] != getattr(self.options, key):
                raise DPCompileError(
                    f"dpcompile: checkpoint was made with {key}={saved[key]} but this model uses "
                    f"{getattr(self.options, key)}; resume with the same privacy options")
        self._check_mechanism_options(saved)
        if self.bsr is not None and tuple(state.get("bsr_coefficients") or ()) != tuple(self.bsr.coefficients):
            raise DPCompileError(
                f"dpcompile BSR: checkpoint was made with factorization coefficients {state.get('bsr_coefficients')} "
                f"but this model uses {list(self.bsr.coefficients)}; resume with the same bsr_* options")
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.release_next = bool(state.get("release_next", True))
        self.accountant.load_state_dict(state["accountant"])
        self._update_checkpoint_record()
        self.discard_accumulation()
        if self.lsg is not None and state.get("lsg") is not None:
            self.lsg.load_state_dict(state["lsg"])
        self.needs_secret = self.bsr is not None and self.steps > 0

    def load_secret_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the noise seed and BSR history saved by `secret_state_dict`."""
        if state.get("format") != "dpcompile-secret-1":
            raise DPCompileError("dpcompile: load_secret_state_dict takes what secret_state_dict returned")
        if self.bsr is not None:
            if state.get("bsr") is None:
                raise DPCompileError("dpcompile: this secret state has no BSR noise buffers; it cannot resume a "
                                     "noise_mechanism='bsr' run")
            self.bsr.load_state_dict(state["bsr"])
        self.seed = int(state["seed"])
        if self.lsg is not None:
            self.lsg.seed = self.seed
        if self.sampling_audit is not None and state.get("sampling_audit") is not None:
            self.sampling_audit.load_state_dict(state["sampling_audit"])
        self.needs_secret = False

    def _check_mechanism_options(self, saved: dict[str, Any]) -> None:
        for key in ("noise_mechanism", "bsr_min_separation", "bsr_max_participations", "bsr_sample_rate"):
            if saved.get(key, "gaussian" if key == "noise_mechanism" else None) != getattr(self.options, key):
                raise DPCompileError(
                    f"dpcompile: checkpoint was made with {key}={saved.get(key)!r} but this model uses "
                    f"{getattr(self.options, key)!r}; resume with the same privacy options")


def guard_parameters(params) -> None:
    """Fail closed when a parameter gets a gradient that is not exactly its dp graph's release.

    Checked as the gradient reaches the parameter (a tensor hook, moved in front of the hooks
    registered earlier: after all of a backward's contributions are summed, before any user hook
    transforms it and before it is accumulated into ``p.grad`` or returned by
    ``torch.autograd.grad``). Between releases dp graphs hand autograd nothing, so anything that
    arrives then is foreign; at a release, the summed gradient must be the very tensor the dp
    graph returned. Refused: calling the uncompiled module, Dynamo disabled or falling back to
    eager (recompile limit, suppressed errors, a module Dynamo skips), and code run eagerly
    outside the dp graphs that uses the parameter, alone or on top of its clipped gradient (graph
    breaks, ``torch._dynamo.disable``, full backward hooks, a loss term that reads the parameter).
    """
    for p in params:
        if p.requires_grad and not getattr(p, GUARD_ATTR, False):
            handle = p.register_hook(functools.partial(_check_incoming_gradient, weakref.ref(p)))
            _run_first(p, handle.id)
            setattr(p, GUARD_ATTR, True)


def _poisson_audit(options: DPOptions):
    from .sampling import PoissonAudit

    if options.sample_rate is None or options.expected_batch_size is None or options.noise_mechanism != "gaussian":
        return None
    return PoissonAudit(options.sample_rate, options.expected_batch_size)


def _run_first(param: torch.Tensor, hook_id: int) -> None:
    """Move a tensor hook before the ones registered earlier. Autograd runs a leaf's hooks in the
    insertion order of its ``_backward_hooks`` dict, so the entries are re-inserted in place
    (the same dict: the user's RemovableHandles keep working)."""
    hooks = getattr(param, "_backward_hooks", None)
    if not isinstance(hooks, dict) or len(hooks) < 2:
        return
    entries = list(hooks.items())
    hooks.clear()
    hooks[hook_id] = dict(entries)[hook_id]
    hooks.update((k, v) for k, v in entries if k != hook_id)


def own_module(module: torch.nn.Module, state: "PrivacyState") -> None:
    """Make `state` the privacy state of `module`: found from the module and from each of its
    parameters (the graphs' parameter sources), every trainable parameter guarded."""
    refuse_sharded_submodules(module)
    _STATE_OF_MODULE[module] = state
    for name, p in module.named_parameters():
        setattr(p, STATE_ATTR, state)
        if p.requires_grad and not hasattr(p, NAME_ATTR):
            setattr(p, NAME_ATTR, f"{type(module).__name__}.{name}")
    guard_parameters(module.parameters())


def refuse_sharded_submodules(module: torch.nn.Module) -> None:
    """At torch.compile time: refuse FSDP2 modules or DTensor parameters in `module`."""
    sharded = next((f"{name or type(module).__name__} ({type(m).__name__})" for name, m in module.named_modules()
                    if type(m).__name__.startswith("FSDP")
                    or any(type(p).__name__ == "DTensor" for p in m.parameters(recurse=False))), None)
    if sharded is not None:
        _refuse_sharded(sharded)


def refuse_sharded_blocks(module: torch.nn.Module) -> None:
    """At every training forward: refuse FSDP2 modules strictly inside the compiled `module`.

    ``fully_shard`` applied to blocks *after* torch.compile swaps in parameters that no dp graph
    or gradient guard knows, and Dynamo runs the sharded blocks eagerly: their gradients would
    reach ``p.grad`` unclipped. (The root itself may be FSDP: one-unit sharding, supported.)"""
    sharded = next((f"{name} ({type(m).__name__})" for name, m in module.named_modules()
                    if name and type(m).__name__.startswith("FSDP")), None)
    if sharded is not None:
        _refuse_sharded(sharded)


def _refuse_sharded(what: str) -> None:
    raise DPCompileError(
        f"dpcompile: {what} inside the compiled model is sharded by FSDP (fully_shard / DTensor "
        "parameters): per-block fully_shard is not supported yet (FSDP's hooks run outside the compiled "
        "graphs, so per-sample norms and clipping would miss the sharded parameters; docs/distributed.md, "
        "'Per-block sharding'). Shard the compiled model as one unit instead: "
        "fully_shard(torch.compile(model, backend='dp', options=...)), or use DDP.")


def state_of_module(module: torch.nn.Module) -> "PrivacyState | None":
    return _STATE_OF_MODULE.get(module)


def _check_incoming_gradient(param_ref: weakref.ref, grad: torch.Tensor) -> None:
    """The summed gradient reaching a parameter must be the very tensor its dp graph released this
    backward, unmodified: anything else came from outside the clipped graphs."""
    if grad is None:  # a graph that writes the gradient itself (graph breaks: PrivacyState._release_deferred)
        return
    param = param_ref()
    state = getattr(param, STATE_ATTR, None)
    if state is not None and state.no_graph_reason is not None:
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received a gradient, but {state.no_graph_reason}: no dp graph "
            "clips or noises it. The gradient was discarded. Enable Dynamo for private training.")
    if not getattr(param, IN_GRAPH_ATTR, False):
        reason = f" ({state.refusal})" if state is not None and state.refusal is not None else ""
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received a gradient from code that ran eagerly, outside the "
            "dp-compiled graphs (the module called without torch.compile, a forward under torch._dynamo.disable, a "
            "module Dynamo does not trace such as one with a full backward hook, a call Dynamo cannot trace, an "
            "eager fallback after an error" + reason + "), so no clip factor covers it; the gradient was discarded. "
            "Make that code traceable (TORCH_LOGS=graph_breaks lists the breaks) or freeze the parameter "
            "(requires_grad=False).")
    if state is None or torch._C._current_graph_task_id() != state._task:
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received a gradient from a backward pass that did not run through "
            "its dp-compiled graph, so the gradient is neither clipped nor noised; it was discarded. Call the "
            "compiled model (not the original module), and check that torch.compile did not fall back to eager "
            "(torch._dynamo recompile limit, suppressed errors: see the log).")
    released = state.graph_gradients.pop(id(param), [])
    if len(released) > 1:
        return  # several clipped graphs in one backward: refused as a whole when it ends (_finish_backward)
    if not released or grad is not released[0][0] or grad._version != released[0][1]:
        when = "" if state.release_next else " (this is an accumulation micro-step: dp graphs release nothing then)"
        raise DPCompileError(
            f"dpcompile: parameter {_name(param)} received, besides its clipped gradient, a gradient from code run "
            "outside the dp-compiled graphs (eagerly between graph breaks, under torch._dynamo.disable, or a loss "
            f"term that reads the parameter outside the compiled model){when}; that part is neither clipped nor "
            "noised, so the gradient was discarded. Keep every use of the parameter inside the compiled model (for "
            "L2 regularisation use the optimizer's weight_decay).")


def _name(param: torch.Tensor) -> str:
    return getattr(param, NAME_ATTR, None) or f"of shape {tuple(param.shape)}"


def state_of(model: torch.nn.Module) -> PrivacyState:
    for module in (model, getattr(model, "_orig_mod", None), getattr(model, "__self__", None)):  # torch.compile's wrapper or the module
        if module is not None and module in _STATE_OF_MODULE:
            return _STATE_OF_MODULE[module]
    for p in model.parameters():
        state = getattr(p, STATE_ATTR, None)
        if state is not None:
            return state
    raise DPCompileError(
        "dpcompile: this model has no privacy state yet; compile it with torch.compile(model, backend='dp', "
        "options={...}) and run at least one forward pass first. If the compiled model has already trained, "
        "torch.compile never called the dp backend for it and its gradients were neither clipped nor noised: "
        "this happens for torch.compile(DDP(model)) and for FSDP2 (fully_shard) modules, which Dynamo runs "
        "eagerly")
