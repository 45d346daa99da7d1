"""Data-parallel DP training over ``torch.distributed``: local clipping, one noise draw per step.

Algebra. W ranks share one logical batch B = B_0 ∪ … ∪ B_(W-1) (disjoint). Rank r's compiled
backward clips its own samples and releases

    g_r = (S_r + a_r · σR · z) / d,        S_r = Σ_{i ∈ B_r} C_i g_i,

where z is the step's noise vector from the privacy state (N(0, I), or BSR's (C⁻¹Z)_t: the
scaling below applies to whatever vector the state returns), a_r = 1 on the *noise rank*
(rank 0 of the data-parallel group) and 0 elsewhere, and d is the divisor fed at run time.
With D = ``expected_batch_size`` (the *global* expected batch size q·N):

* reduction "sum" (``make_private``: dpcompile all-reduces the gradients itself in
  ``DPOptimizer.step``), d = D:          Σ_r g_r       = (Σ_r S_r + σR z) / D;
* reduction "mean" (DDP or FSDP2 averages over the group), d = D / W:
                                        (1/W) Σ_r g_r = (Σ_r S_r + σR z) / D.

Either way the result is the single-process release on the union batch: the clipped sum of all
samples plus exactly one N(0, σ²R²) draw, over the global divisor. Micro-batches accumulate the
same way (a = 0 on every micro-step but the last), so gradient accumulation stays exact.

Why noise on one rank instead of the same z scaled by 1/W on every rank: the latter needs
bit-identical draws everywhere, and a seed or step mismatch would silently shrink the noise
(W independent draws of std σR/W sum to std σR/√W: a privacy breach). With one noise rank, what
must hold is that exactly one rank has group rank 0 (checked when the group is attached) and that
the reduction weighs every rank equally (make_private: its own all-reduce; DDP: checked at every
forward: all parameters synchronized, averaging communication hooks only, no Join, no no_sync()
on the releasing backward). Unconfigured ranks (no DDP, no make_private) each add the full noise,
which errs on the side of more noise. Seeds are still
made identical (broadcast from rank 0 at set-up and verified): all ranks then keep bit-identical
privacy states (steps, accountant, BSR buffers: every rank draws z and scales it by 0), any
rank's checkpoint can resume the run, and ``make_private``'s Poisson sampler, which must draw the
same batch on every rank (otherwise a record could be used by two ranks: sensitivity 2R), is
seeded from it.

Poisson sampling (``make_private``): every rank draws the same global mask (i.i.d. Bernoulli(q)
over all N records, from the shared seed) and keeps every W-th index of the sorted global batch
(rank r takes positions r, r+W, …). The union is exactly the single-process batch, so accounting
is that of global Poisson sampling at rate q, and every rank knows every rank's share without
communicating: rank 0 holds a sample whenever the batch is non-empty (so the noise is added by a
real backward), an empty global draw is a pure-noise step computed identically on every rank, and
a rank whose share is empty joins the step's all-reduce with zero gradients. Each step also
all-reduces (step count, digest of the global batch) and fails if ranks disagree.

Accounting happens on every rank from identical histories: ``privacy_spent`` gives the same ε on
all ranks (report it from rank 0).

Supported patterns:
* ``make_private(...)`` after ``init_process_group`` (it detects the group): no DDP wrapper, one
  bucketed all-reduce per logical step in ``DPOptimizer.step``.
* ``DDP(torch.compile(model, backend="dp", options=...))`` with
  ``torch._dynamo.config.optimize_ddp = False``: dpcompile attaches to DDP's process group at the
  first forward and scales the noise/divisor as above. Dynamo's DDPOptimizer (the default
  ``optimize_ddp``) splits the graph at bucket boundaries, which would clip each piece on its own:
  it is refused. ``torch.compile(DDP(model), backend="dp")`` is not supported: Dynamo skips
  DDP's forward and, for a top-level ``torch.nn`` container, may never call the dp backend at
  all (no clipping, no noise, and nothing dpcompile can detect); wrap the compiled model instead.
* ``fully_shard(torch.compile(model, backend="dp", options=...))`` (FSDP2, the compiled model as
  one unit): FSDP's hooks all-gather around the compiled forward and its reduce-scatter averages,
  so it is DDP's "mean" algebra over the shard group (`_check_fsdp`). ``fully_shard`` on modules
  inside the compiled model (per-block sharding) is refused, whether applied before torch.compile
  or after it: Dynamo runs them eagerly, outside the dp graphs (docs/distributed.md, "Per-block
  sharding", for the planned design and its memory, `sharding_memory`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..errors import DPCompileError

NOISE_RANK = 0  # group rank that adds the step's noise
ATTR = "data_parallel"  # attribute of PrivacyState holding the DataParallel below
BUCKET_BYTES = 32 << 20
# Settings that may differ between ranks: everything else of DPOptions must agree.
RANK_LOCAL_OPTIONS = ("insecure_seed", "instance")
# DDP communication hooks known to average over the group with equal weights.
AVERAGING_HOOKS = ("allreduce_hook", "fp16_compress_hook", "bf16_compress_hook")


@dataclasses.dataclass
class DataParallel:
    """How one privacy state takes part in data-parallel training."""

    group: Any  # the process group (None: the default group)
    rank: int  # rank within the group
    world_size: int
    reduction: str  # "sum": DPOptimizer all-reduces; "mean": DDP or FSDP averages
    wrapper: str = ""  # "DDP" or "FSDP" for reduction "mean": what must wrap every training forward
    batch_digest: int = 0  # of the current global batch (make_private's loader), checked each step
    synced_step: int = -1  # privacy step whose gradients were last summed (a second optimizer.step() skips it)

    @property
    def adds_noise(self) -> bool:
        return self.rank == NOISE_RANK


def data_parallel_of(state: Any) -> DataParallel | None:
    return getattr(state, ATTR, None)


def is_distributed(group: Any = None) -> bool:
    """A process group with more than one rank is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# ----------------------------------------------------------------------------- the algebra

def graph_scalars(state: Any) -> list[float]:
    """``dp_scalars`` of a compiled backward: [noise std, divisor or 0 for the actual batch size]."""
    std, divisor = state.noise_std, state.options.expected_batch_size or 0.0
    dp = data_parallel_of(state)
    if dp is not None:
        if not dp.adds_noise:
            std = 0.0
        if dp.reduction == "mean":
            divisor = divisor / dp.world_size
    return [std, divisor]


# ----------------------------------------------------------------------------- set-up

def attach(state: Any, group: Any, reduction: str) -> DataParallel:
    """Join `group` (collective: every rank calls it once): verify settings, adopt rank 0's seed.

    reduction: "sum" when the caller sums the released gradients over the group (make_private,
    or a custom loop calling `synchronize_gradients`), "mean" when DDP averages them."""
    if reduction not in ("sum", "mean"):
        raise DPCompileError(f"dpcompile: reduction must be 'sum' or 'mean', got {reduction!r}")
    opts = state.options
    if opts.expected_batch_size is None:
        raise DPCompileError(
            "dpcompile: data-parallel training needs options={'expected_batch_size': D} with D the expected "
            "batch size of the whole step across all ranks (q·N); dividing by each rank's actual batch size "
            "would weight ranks unequally and break the noise calibration")
    mine = {"rank": dist.get_rank(group), "seed": state.seed, "steps": state.steps,
            "settings": _shared_settings(opts)}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    _check_agreement(everyone)
    if state.seed != everyone[NOISE_RANK]["seed"]:
        _adopt_seed(state, everyone[NOISE_RANK]["seed"])
    dp = DataParallel(group=group, rank=mine["rank"], world_size=len(everyone), reduction=reduction)
    setattr(state, ATTR, dp)
    return dp


def _shared_settings(opts: Any) -> dict[str, Any]:
    settings = dataclasses.asdict(opts)
    for key in RANK_LOCAL_OPTIONS:
        settings.pop(key, None)
    return settings


def _check_agreement(everyone: list[dict[str, Any]]) -> None:
    ranks = [e["rank"] for e in everyone]
    if sorted(ranks) != list(range(len(everyone))):  # exactly one rank 0: exactly one noise rank
        raise DPCompileError(f"dpcompile: inconsistent ranks in the data-parallel group: {ranks}")
    root = everyone[NOISE_RANK]
    for other in everyone:
        differ = sorted(k for k in root["settings"] if root["settings"][k] != other["settings"].get(k))
        if differ:
            raise DPCompileError(
                f"dpcompile: rank {other['rank']} has other privacy options than rank 0: "
                + ", ".join(f"{k}={other['settings'].get(k)!r} vs {root['settings'][k]!r}" for k in differ)
                + "; every rank must compile the model with the same options")
        if other["steps"] != root["steps"]:
            raise DPCompileError(
                f"dpcompile: rank {other['rank']} is at privacy step {other['steps']} but rank 0 at {root['steps']}; "
                "start every rank from the same state (or the same checkpoint)")
        if other["seed"] != root["seed"] and root["steps"] > 0:
            raise DPCompileError(
                f"dpcompile: rank {other['rank']} has noise seed {other['seed']} but rank 0 {root['seed']} after "
                f"{root['steps']} steps; resume every rank from the same checkpoint")


def _adopt_seed(state: Any, seed: int) -> None:
    state.seed = seed
    if getattr(state, "lsg", None) is not None:  # its random subspaces/masks must agree as well
        state.lsg.seed = seed


def check_in_sync(state: Any) -> None:
    """Re-verify (collective) that all ranks hold the same privacy state, e.g. after loading a checkpoint."""
    dp = data_parallel_of(state)
    if dp is None:
        return
    mine = {"rank": dp.rank, "seed": state.seed, "steps": state.steps, "settings": _shared_settings(state.options)}
    everyone: list[Any] = [None] * dp.world_size
    dist.all_gather_object(everyone, mine, group=dp.group)
    _check_agreement(everyone)
    if any(e["seed"] != everyone[NOISE_RANK]["seed"] for e in everyone):
        raise DPCompileError("dpcompile: ranks hold different noise seeds; load the same checkpoint on every rank")


# ----------------------------------------------------------------------------- make_private

def make_private_group(module: torch.nn.Module, data_parallel: bool | None) -> Any | None:
    """The default process group if make_private should train data-parallel, else None."""
    if data_parallel is False:
        return None
    wrapped = _wrapper_name(module)
    if wrapped:
        raise DPCompileError(
            f"dpcompile.make_private: the module is wrapped in {wrapped}; pass the plain module. With "
            "torch.distributed initialized, make_private trains data-parallel itself (local clipping, noise once, "
            "one gradient all-reduce per step); FSDP is not supported")
    if not is_distributed():
        if data_parallel:
            raise DPCompileError("dpcompile.make_private(data_parallel=True): no torch.distributed process group "
                                 "with more than one rank is initialized")
        return None
    return dist.group.WORLD


def _wrapper_name(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if type(module).__name__.startswith("FSDP") or any(
            type(p).__name__ == "DTensor" for p in module.parameters()):
        return "FSDP / DTensor parameters"
    return None


def setup_make_private(state: Any, module: torch.nn.Module, group: Any) -> None:
    """Attach in "sum" mode and give every rank rank 0's parameters and buffers."""
    attach(state, group, "sum")
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, group=group, group_src=NOISE_RANK)


def check_cyclic_batches(state: Any, num_samples: int, num_batches: int) -> None:
    """BSR's cyclic batches: every rank must hold a sample of every batch (keeps all BSR states equal)."""
    dp = data_parallel_of(state)
    if dp is not None and num_samples // num_batches < dp.world_size:
        raise DPCompileError(
            f"dpcompile.make_private(noise_mechanism='bsr'): the smallest cyclic batch has "
            f"{num_samples // num_batches} samples, fewer than the {dp.world_size} ranks; use larger batches")


def local_share(state: Any, indices: list[int]) -> list[int]:
    """This rank's part of a global logical batch (all of it when not data-parallel)."""
    dp = data_parallel_of(state)
    if dp is None or dp.reduction != "sum":
        return indices
    dp.batch_digest = hash(tuple(indices))  # ints hash the same in every process
    return indices[dp.rank::dp.world_size]


def synchronize_gradients(state: Any, params: Iterable[torch.Tensor]) -> None:
    """Sum the released gradients of all ranks (make_private's "sum" mode); a no-op otherwise."""
    dp = data_parallel_of(state)
    if dp is None or dp.reduction != "sum" or dp.synced_step == state.steps:
        return
    grads = []
    for p in params:
        if p.grad is None:  # a parameter this rank's samples did not reach: contributes zero
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    _check_same_step(dp, state, grads[0].device)
    _all_reduce_sum(grads, dp.group)
    dp.synced_step = state.steps


def _check_same_step(dp: DataParallel, state: Any, device: torch.device) -> None:
    """All ranks at the same privacy step with the same global batch (min = max, one all-reduce)."""
    values = torch.tensor([state.steps, dp.batch_digest], dtype=torch.int64, device=device)
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=dp.group)
    if not torch.equal(both[:2], -both[2:]):
        raise DPCompileError(
            f"dpcompile: data-parallel ranks are out of step (step count / global batch differ: max "
            f"{both[:2].tolist()}, min {(-both[2:]).tolist()}); every rank must iterate the same make_private "
            "loader from the same state and call optimizer.step() once per logical batch")


def _all_reduce_sum(tensors: list[torch.Tensor], group: Any) -> None:
    """In-place SUM over the group, flattened into buckets of about BUCKET_BYTES."""
    pending = []
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for t in tensors:
        lists = buckets.setdefault((t.device, t.dtype), [[]])
        if lists[-1] and sum(x.numel() * x.element_size() for x in lists[-1]) >= BUCKET_BYTES:
            lists.append([])
        lists[-1].append(t)
    return [b for lists in buckets.values() for b in lists if b]


# ----------------------------------------------------------------------------- DDP

def _active_ddp() -> Any:
    if not dist.is_available():
        return None
    return torch.nn.parallel.DistributedDataParallel._get_active_ddp_module()


def check_compile(state: Any) -> None:
    """At compile time under DDP: refuse Dynamo's DDPOptimizer (it splits the graph at bucket
    boundaries) and models that make_private already synchronizes."""
    if _active_ddp() is None:
        return
    from torch._dynamo.utils import get_optimize_ddp_mode

    _refuse_make_private_in_ddp(data_parallel_of(state))
    if get_optimize_ddp_mode() == "ddp_optimizer":
        raise DPCompileError(
            "dpcompile: torch.compile runs under DistributedDataParallel with Dynamo's DDPOptimizer "
            "(torch._dynamo.config.optimize_ddp=True, the default), which splits the model into one graph per "
            "gradient bucket; each piece would be clipped on its own. Set torch._dynamo.config.optimize_ddp = "
            "False before the first forward, and wrap the compiled model: DDP(torch.compile(model, backend='dp', "
            "options=...))")


def check_forward(state: Any, ctx: Any) -> None:
    """At every compiled training forward: attach to an enclosing DDP or FSDP2, or refuse a wrong
    combination."""
    fsdp = _fsdp_param_group(state.compiled_module())
    if fsdp is not None:
        return _check_fsdp(fsdp, state, ctx)
    ddp = _active_ddp()
    dp = data_parallel_of(state)
    if ddp is None:
        if dp is not None and dp.reduction == "mean":
            raise DPCompileError(
                f"dpcompile: this model trains under {dp.wrapper} (noise is added on rank 0 only and the gradients "
                f"are averaged over the ranks), but this forward ran outside the {dp.wrapper} wrapper: its gradients would not "
                "be synchronized (and, off rank 0, would carry no noise). Call the wrapped model (use "
                "torch.no_grad() for evaluation)")
        return
    if dp is None:
        dp = attach(state, ddp.process_group, "mean")
        dp.wrapper = "DDP"
    _refuse_make_private_in_ddp(dp)
    if dp.group is not ddp.process_group:
        raise DPCompileError("dpcompile: this model was attached to another DistributedDataParallel process group")
    _check_ddp_usage(ddp, state, ctx)


def _refuse_make_private_in_ddp(dp: DataParallel | None) -> None:
    if dp is not None and dp.reduction == "sum":
        raise DPCompileError(
            "dpcompile: this model comes from make_private, which already synchronizes gradients across ranks "
            "(one all-reduce per step in its optimizer); do not wrap it in DistributedDataParallel")


def _refuse_graph_breaks(state: Any, ctx: Any, wrapper: str) -> None:
    if ctx.deferred or state.multi_graph:
        raise DPCompileError(
            "dpcompile: the model has graph breaks; their per-sample clipping runs after the whole backward, "
            f"after {wrapper} has already reduced the gradients. Remove the graph breaks (TORCH_LOGS=graph_breaks) or "
            "use dpcompile.make_private, which synchronizes after clipping")


def _check_ddp_usage(ddp: Any, state: Any, ctx: Any) -> None:
    _refuse_graph_breaks(state, ctx, "DDP")
    synced = getattr(ddp, "_dpcompile_param_ids", None)
    if synced is None:
        synced = {id(p) for p in getattr(ddp, "_module_parameters", ddp.module.parameters())}
        ddp._dpcompile_param_ids = synced
    missing = [ctx.param_names.get(i, "?") for i, p in ctx.params.items() if id(p) not in synced]
    if missing:
        raise DPCompileError(
            f"dpcompile: parameters {missing[:5]} are not synchronized by the enclosing DistributedDataParallel "
            "(ignored or not part of its module); their gradients would stay local and, off rank 0, noise-free")
    join = getattr(ddp, "_join_config", None)
    if join is not None and join.enable:
        raise DPCompileError(
            "dpcompile: DDP's Join context (uneven inputs) is not supported: a joined rank 0 would stop adding the "
            "noise. Give every rank the same number of steps")
    hooks = [getattr(h, "__name__", repr(h)) for h, _ in getattr(ddp, "_comm_hooks", [])]
    unknown = [h for h in hooks if h not in AVERAGING_HOOKS]
    if unknown:
        raise DPCompileError(
            f"dpcompile: DDP communication hook(s) {unknown} are not known to average the gradients of all ranks "
            f"with equal weights (which the noise-on-rank-0 algebra needs); supported: {list(AVERAGING_HOOKS)}")
    if state.release_next and not ddp.require_backward_grad_sync:
        raise DPCompileError(
            "dpcompile: a releasing backward (the step's noise) runs under DDP.no_sync(): its gradient would not be "
            "synchronized. Use no_sync() only for accumulation micro-steps (privacy_state(model).release_next = "
            "False) and synchronize the last one")


# ----------------------------------------------------------------------------- FSDP2

def _fsdp_param_group(module: Any) -> Any:
    """FSDP2's parameter group when `fully_shard` wraps the compiled model itself, else None.

    Only that pattern, `fully_shard(torch.compile(model, backend="dp"))`, is supported: FSDP's
    hooks then run around the compiled forward, which sees the all-gathered parameters, and the
    reduce-scatter averages the released gradients like DDP. (An FSDP module *inside* the
    compiled model makes Dynamo run its forward eagerly, outside any dp graph.)"""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if not isinstance(module, FSDPModule):
        return None
    group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
    if group is None or not all(hasattr(group, a) for a in ("mesh_info", "reduce_grads", "fsdp_params")):
        raise DPCompileError(
            "dpcompile: the compiled model is wrapped by FSDP2 (fully_shard), but this torch version's FSDP "
            "internals are not the ones dpcompile checks (mesh, gradient sync, managed parameters); refusing "
            "rather than guessing how the gradients are reduced")
    return group


def _check_fsdp(fsdp: Any, state: Any, ctx: Any) -> None:
    """fully_shard(compiled model): each rank clips its samples, rank 0 adds the noise, and
    FSDP's reduce-scatter averages the gradients over the shard group (reduction "mean")."""
    mesh = fsdp.mesh_info
    if type(mesh).__name__ != "FSDPMeshInfo":
        raise DPCompileError(
            f"dpcompile: FSDP2 with {type(mesh).__name__} (replicated or hybrid sharding) is not supported: the "
            "noise-on-rank-0 algebra is checked for one 1-D shard group. Use fully_shard over a 1-D mesh")
    if getattr(fsdp, "gradient_divide_factor", None) is not None or getattr(fsdp, "_all_reduce_hook", None):
        raise DPCompileError(
            "dpcompile: a custom FSDP gradient divide factor or all-reduce hook is set; the noise-on-rank-0 "
            "algebra needs FSDP's default average over the ranks")
    dp = data_parallel_of(state)
    if dp is None:
        dp = attach(state, mesh.shard_process_group, "mean")
        dp.wrapper = "FSDP"
    _refuse_make_private_in_ddp(dp)
    if dp.wrapper != "FSDP" or dp.group is not mesh.shard_process_group:
        raise DPCompileError("dpcompile: this model was attached to another data-parallel wrapper or process group")
    _refuse_graph_breaks(state, ctx, "FSDP")
    managed = {id(p.unsharded_param) for p in fsdp.fsdp_params}
    missing = [ctx.param_names.get(i, "?") for i, p in ctx.params.items() if id(p) not in managed]
    if missing:
        raise DPCompileError(
            f"dpcompile: parameters {missing[:5]} are not managed by the enclosing fully_shard (ignored_params?); "
            "their gradients would stay local and, off rank 0, noise-free")
    if state.release_next and not fsdp.reduce_grads:
        raise DPCompileError(
            "dpcompile: a releasing backward (the step's noise) runs with FSDP's gradient sync off "
            "(set_requires_gradient_sync(False)): its gradient would not be reduced. Turn sync off only for "
            "accumulation micro-steps (privacy_state(model).release_next = False) and back on for the last one")


# ----------------------------------------------------------------------------- memory per rank

def shard_bytes(shapes: Iterable[torch.Size], world_size: int, element_size: int = 4) -> int:
    """Bytes of the largest FSDP2 shard (rank 0's) of parameters with these shapes.

    FSDP2 splits each parameter along dim 0 into chunks of ceil(d0 / W) rows (the last ranks
    get fewer, or none)."""
    total = 0
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        total += -(-rows // world_size) * (torch.Size(shape).numel() // max(rows, 1))
    return total * element_size


def sharding_memory(units: list[list[torch.Size]], world_size: int, element_size: int = 4,
                    optimizer_states: int = 2, hold_block_grads: bool = False) -> dict[str, int]:
    """Parameter, gradient and optimizer bytes on the busiest rank, by FSDP2 unit layout.

    units: the trainable parameter shapes of each ``fully_shard`` unit (one-unit sharding: a
    single unit with all of them). At rest every rank holds its shards of parameters, gradients
    and `optimizer_states` optimizer tensors per parameter (2: Adam). During the forward and
    backward FSDP2 all-gathers one unit at a time and prefetches the next: the two largest units
    are unsharded at once. A unit's gradient is unsharded from its backward to its
    reduce-scatter; `hold_block_grads` keeps every unit's until the last one is reduced (what
    flat clipping needs if clipped gradients wait for the global per-sample norms)."""
    sharded = sum(shard_bytes(u, world_size, element_size) for u in units)
    full = sorted((sum(torch.Size(s).numel() for s in u) * element_size for u in units), reverse=True)
    grads_in_flight = sum(full) if hold_block_grads else full[0]
    return {"params_at_rest": sharded, "grads_at_rest": sharded, "optimizer": optimizer_states * sharded,
            "peak_params": sharded + sum(full[:2]), "peak_grads": sharded + grads_in_flight}
