"""Data-parallel DP training on 2 CPU processes (gloo) equals single-process training on the union batch.

Noise is ON and seeds are fixed, so "equal" checks the whole algebra of `dpcompile.distributed`:
each rank's clipping, the noise added exactly once (twice or never would not match), the
divisor, accumulation, the shared Poisson batches split over ranks, and the accounting.
With DPCOMPILE_TEST_DEVICE=cuda (two GPUs) the ranks run on cuda:0 and cuda:1 over NCCL.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from ranks import run_ranks
from dpcompile import DPCompileError

WORLD = 2
DELTA = 1e-5
CUDA = os.environ.get("DPCOMPILE_TEST_DEVICE", "cpu") == "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
# make_private: q = 8/64, then two draws at a negligible rate (empty: pure-noise steps). The seed
# fixes the Poisson batch sizes (8, 6, 6, 6, 10, 11, 10, 11): with micro-batches of at most 3
# samples on the ranks, none of one sample (a one-sample micro-batch would cost each rank a second
# compile; test_clipping_oracle covers batches of one).
MP_SEED, MP_STEPS, MP_PHYSICAL = 253, 8, 3
# DDP(torch.compile(...)): 4 steps of 4 samples per rank, the last one accumulated in two halves,
# with BSR correlated noise (the data-parallel scaling applies to whatever noise vector the state draws).
DDP_OPTIONS = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "expected_batch_size": 8.0,
               "noise_mechanism": "bsr", "bsr_bands": 3, "bsr_min_separation": 8}
DDP_STEPS, PER_RANK = 4, 4


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return TensorDataset(x, (x @ torch.randn(6, 3, generator=g)).argmax(1))


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def on_device(t: torch.Tensor) -> torch.Tensor:
    moved = t.to(device())
    if moved is not t and t.shape[0] > 1:  # keep make_private's dynamic batch dim
        torch._dynamo.mark_dynamic(moved, 0)
    return moved


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(device())


def snapshot(net: nn.Module) -> list[torch.Tensor]:
    """The parameters, whole (FSDP2 shards are gathered)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone() for p in net.parameters()]


# ----------------------------------------------------------------------------- the runs

def make_private_run(seed: int | None, physical: int | None) -> dict:
    net = network()
    model, opt, loader = dpcompile.make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.5), DataLoader(dataset(), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=0.5, insecure_seed=seed, max_physical_batch_size=physical)
    state = dpcompile.privacy_state(net)
    micro_batches = own_releases = 0  # own_releases: steps whose releasing backward ran on this rank
    for sample_rate, steps in ((loader.sample_rate, MP_STEPS), (1e-9, 2)):
        loader.sampler.sample_rate, loader.sampler.steps = sample_rate, steps
        for x, y in loader:
            F.cross_entropy(model(on_device(x)), on_device(y)).backward()
            micro_batches += 1
            own_releases += state.last_backward_released
            opt.step()
            opt.zero_grad()
    return {"params": snapshot(net), "epsilon": dpcompile.privacy_spent(net, DELTA), "steps": state.steps,
            "skipped": state.skipped_steps, "empty_shares": state.steps - state.skipped_steps - own_releases,
            "accumulated": micro_batches - own_releases, "seed": state.seed}


def rank_0_takes_the_first_batch(rank: int) -> None:
    """Step 0 gives rank 0 the whole draw and rank 1 nothing, as a draw with fewer samples than ranks
    would: rank 1 must join that step's all-reduce with zeros."""
    from dpcompile import engine

    split = engine.local_share

    def share(state, indices):
        mine = split(state, indices)
        return (list(indices) if rank == 0 else []) if state.steps == 0 else mine

    engine.local_share = share


def ddp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = (t.to(device()) for t in dataset().tensors)
    size = WORLD * PER_RANK
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(DDP_STEPS)]


def compiled_run(model, net, opt, share, no_sync=lambda: _null()) -> list[torch.Tensor]:
    """DDP_STEPS steps; the last accumulates two micro-batches (the first adds no noise)."""
    state = None
    for step, (x, y) in enumerate(ddp_batches()):
        x, y = share(x), share(y)
        torch._dynamo.mark_dynamic(x, 0)  # one compile for the 4- and 2-sample batches
        if step == DDP_STEPS - 1:
            half = len(x) // 2
            state.release_next = False
            with no_sync():
                F.cross_entropy(model(x[:half]), y[:half]).backward()
            state.release_next = True
            x, y = x[half:], y[half:]
        F.cross_entropy(model(x), y).backward()
        state = dpcompile.privacy_state(net)
        opt.step()
        opt.zero_grad()
    return snapshot(net)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ddp_run(rank: int) -> dict:
    torch._dynamo.config.optimize_ddp = False
    net = network()
    options = dict(DDP_OPTIONS, insecure_seed=3 if rank == 0 else 1234)  # rank 1's seed is replaced by rank 0's
    model = DDP(torch.compile(net, backend="dp", options=options))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    params = compiled_run(model, net, opt, lambda t: t[rank * PER_RANK:(rank + 1) * PER_RANK], model.no_sync)
    state = dpcompile.privacy_state(net)
    return {"params": params, "epsilon": dpcompile.privacy_spent(net, DELTA), "steps": state.steps,
            "seed": state.seed, "bsr": bsr_buffers(state), "model": model}


def fsdp_run(rank: int) -> dict:
    """fully_shard(torch.compile(...)): FSDP2 all-gathers around the compiled forward and averages
    the released gradients with a reduce-scatter, like DDP (noise on rank 0 only)."""
    from torch.distributed.fsdp import fully_shard

    net = network()
    options = dict(DDP_OPTIONS, insecure_seed=3 if rank == 0 else 1234)
    model = fully_shard(torch.compile(net, backend="dp", options=options))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)  # FSDP2's DTensor shards
    params = compiled_run(model, net, opt, lambda t: t[rank * PER_RANK:(rank + 1) * PER_RANK],
                          lambda: fsdp_no_sync(model))
    state = dpcompile.privacy_state(net)
    return {"params": params, "epsilon": dpcompile.privacy_spent(net, DELTA), "steps": state.steps,
            "seed": state.seed, "bsr": bsr_buffers(state), "model": model, "sharded": type(net[0].weight).__name__}


@contextlib.contextmanager
def fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def bsr_buffers(state) -> list[torch.Tensor]:
    return [h for stream in state.bsr.state_dict()["streams"].values() for h in stream["history"]]


# ----------------------------------------------------------------------------- the workers

def vouch_for_cyclic_batches() -> None:
    """These runs feed fixed cyclic batches themselves, so they vouch for BSR's min-separation,
    which torch.compile cannot see (plain-API BSR is refused otherwise)."""
    from dpcompile.privacy.state import PrivacyState

    PrivacyState.cyclic_batches_verified = True


@pytest.fixture(autouse=True)
def _cyclic_batches_vouched():
    from dpcompile.privacy.state import PrivacyState

    vouch_for_cyclic_batches()
    yield
    PrivacyState.cyclic_batches_verified = False


def worker(rank: int, store: str, out_dir: str) -> None:
    vouch_for_cyclic_batches()
    torch.set_num_threads(1)
    if CUDA:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        rank_0_takes_the_first_batch(rank)
        result = {"make_private": make_private_run(MP_SEED if rank == 0 else None, MP_PHYSICAL)}
        torch._dynamo.reset()
        ddp = ddp_run(rank)
        result["refusals"] = refusals(rank, ddp.pop("model"))
        result["ddp"] = ddp
        torch._dynamo.reset()
        fsdp = fsdp_run(rank)
        result["fsdp_refusals"] = fsdp_refusals(fsdp.pop("model"))
        result["fsdp"] = fsdp
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def refusals(rank: int, ddp_model) -> dict:
    """Wrong combinations fail on every rank with a dpcompile error (before any collective that could hang)."""
    x, y = ddp_batches()[0]
    x, y = x[:PER_RANK], y[:PER_RANK]
    messages = {}

    def expect(name, fn):
        with pytest.raises(Exception) as info:
            fn()
        assert "dpcompile" in str(info.value), str(info.value)
        messages[name] = str(info.value)

    expect("outside_ddp", lambda: ddp_model.module(x))  # the compiled model, not its DDP wrapper
    state = dpcompile.privacy_state(ddp_model.module)
    with ddp_model.no_sync():  # a releasing backward that DDP would not synchronize
        expect("no_sync_release", lambda: ddp_model(x))
    state.release_next = True

    torch._dynamo.config.optimize_ddp = True  # Dynamo's DDPOptimizer: one graph per bucket
    split = DDP(torch.compile(network(), backend="dp", options=dict(DDP_OPTIONS, insecure_seed=1)))
    expect("ddp_optimizer", lambda: split(x))
    torch._dynamo.config.optimize_ddp = False

    ddp_refusals(x, expect)

    net = network()
    model, opt, _ = dpcompile.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                           DataLoader(dataset(), batch_size=8), noise_multiplier=1.0, insecure_seed=1)
    expect("make_private_in_ddp", lambda: DDP(model)(x))
    expect("make_private_of_ddp", lambda: dpcompile.make_private(
        DDP(network()), opt, DataLoader(dataset(), batch_size=8), noise_multiplier=1.0))
    return messages


def fsdp_refusals(fsdp_model) -> dict:
    """FSDP2 settings the noise-on-rank-0 algebra cannot serve."""
    from torch.distributed.fsdp import fully_shard

    x, y = ddp_batches()[0]
    x = x[:PER_RANK]
    messages = {}

    def expect(name, fn):
        with pytest.raises(Exception) as info:
            fn()
        assert "dpcompile" in str(info.value), str(info.value)
        messages[name] = str(info.value)

    with fsdp_no_sync(fsdp_model):  # a releasing backward that FSDP would not reduce
        expect("no_sync_release", lambda: fsdp_model(x))
    torch._dynamo.reset()
    expect("no_expected_batch_size", lambda: fully_shard(torch.compile(
        network(), backend="dp", options={"noise_multiplier": 1.0, "insecure_seed": 1}))(x))
    torch._dynamo.reset()
    sharded = fully_shard(torch.compile(network(), backend="dp", options=dict(DDP_OPTIONS, insecure_seed=1)))
    sharded.set_gradient_divide_factor(1.0)  # a sum over the ranks, not the average
    expect("divide_factor", lambda: sharded(x))
    return messages


class BrokenNet(nn.Module):
    """Two graphs: their clipping would run after DDP has averaged the gradients."""

    def __init__(self):
        super().__init__()
        self.first, self.second = network()[:2], network()[2]

    def forward(self, x):
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def ddp_refusals(x, expect) -> None:
    """DDP settings the noise-on-rank-0 algebra cannot serve; each on a fresh DDP(compiled model)."""
    from torch.distributed.algorithms.join import Join

    def wrapped(net=None, ignore=(), **changes):
        torch._dynamo.reset()  # a fresh compile each time (Sequential.forward would hit the recompile limit)
        options = {k: v for k, v in dict(DDP_OPTIONS, insecure_seed=1, **changes).items() if v is not None}
        compiled = torch.compile(net or network(), backend="dp", options=options)
        DDP._set_params_and_buffers_to_ignore_for_model(compiled, list(ignore))  # names as DDP sees them
        return DDP(compiled)

    expect("no_expected_batch_size", lambda: wrapped(expected_batch_size=None)(x))
    other = 0.5 if dist.get_rank() == 0 else 0.25  # ranks must agree on every option but the seed
    expect("options_differ", lambda: wrapped(max_grad_norm=other)(x))
    expect("graph_breaks", lambda: wrapped(BrokenNet().to(device()))(x))
    expect("ignored_parameter", lambda: wrapped(ignore=["_orig_mod.0.weight"])(x))
    hooked = wrapped()
    hooked.register_comm_hook(None, rank_0_only_hook)
    expect("comm_hook", lambda: hooked(x))
    joining = wrapped()

    def under_join():
        with Join([joining]):
            joining(x)

    expect("join", under_join)


def rank_0_only_hook(state, bucket):
    """A communication hook that does not average: rank 0's gradients everywhere."""
    tensor = bucket.buffer()
    return dist.broadcast(tensor, 0, async_op=True).get_future().then(lambda fut: fut.value()[0])


def spawn(tmp_path) -> list[dict]:
    return run_ranks(worker, (str(tmp_path / "store"), str(tmp_path)), WORLD, tmp_path)


# ----------------------------------------------------------------------------- the test

@pytest.mark.skipif(CUDA and torch.cuda.device_count() < WORLD, reason="needs two GPUs")
def test_two_ranks_equal_one_process_on_the_union_batch(tmp_path):
    single = make_private_run(MP_SEED, None)  # whole logical batches, one backward each
    torch._dynamo.reset()
    net = network()
    reference = compiled_run(torch.compile(net, backend="dp", options=dict(DDP_OPTIONS, insecure_seed=3)), net,
                             torch.optim.SGD(net.parameters(), lr=0.5), lambda t: t)
    ddp_epsilon = dpcompile.privacy_spent(net, DELTA)
    ddp_buffers = bsr_buffers(dpcompile.privacy_state(net))
    results = spawn(tmp_path)

    # make_private: every case came up, and both ranks end where the single process does
    assert single["skipped"] == 2 and single["accumulated"] == 0  # empty global draws: pure-noise steps
    assert [r["make_private"]["empty_shares"] for r in results] == [0, 1]
    assert all(r["make_private"]["accumulated"] > 0 for r in results)  # several micro-batches per step
    for r in results:
        got = r["make_private"]
        assert got["seed"] == MP_SEED  # rank 1 passed seed=None and adopted rank 0's
        assert got["steps"] == single["steps"] == MP_STEPS + 2 and got["skipped"] == single["skipped"]
        assert got["epsilon"] == single["epsilon"]
        for a, b in zip(got["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # DDP(torch.compile(model, backend="dp")): likewise. The noise (σR/D = 0.06 per coordinate and
    # step) dwarfs the tolerance: noise added on both ranks, or on none, could not match. Every rank
    # keeps the single process's BSR buffers (rank 1 draws the noise too, and scales it by 0).
    assert len(ddp_buffers) == 2
    for r in results:
        got = r["ddp"]
        assert got["seed"] == 3 and got["steps"] == DDP_STEPS
        assert got["epsilon"] == ddp_epsilon
        assert all(torch.equal(a, b) for a, b in zip(got["bsr"], ddp_buffers, strict=True))
        for a, b in zip(got["params"], reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # fully_shard(torch.compile(model, backend="dp")): the same single-process result as DDP
    for r in results:
        got = r["fsdp"]
        assert got["sharded"] == "DTensor"  # the parameters really were FSDP2 shards
        assert got["seed"] == 3 and got["steps"] == DDP_STEPS
        assert got["epsilon"] == ddp_epsilon
        assert all(torch.equal(a, b) for a, b in zip(got["bsr"], ddp_buffers, strict=True))
        for a, b in zip(got["params"], reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fsdp_messages = results[0]["fsdp_refusals"]
    assert "gradient sync off" in fsdp_messages["no_sync_release"]
    assert "expected_batch_size" in fsdp_messages["no_expected_batch_size"]
    assert "divide factor" in fsdp_messages["divide_factor"]
    assert results[1]["fsdp_refusals"].keys() == fsdp_messages.keys()

    messages = results[0]["refusals"]
    assert "outside the DDP wrapper" in messages["outside_ddp"]
    assert "no_sync" in messages["no_sync_release"]
    assert "optimize_ddp = False" in messages["ddp_optimizer"]
    assert "do not wrap it in DistributedDataParallel" in messages["make_private_in_ddp"]
    assert "pass the plain module" in messages["make_private_of_ddp"]
    assert "expected_batch_size" in messages["no_expected_batch_size"]
    assert "max_grad_norm" in messages["options_differ"]
    assert "graph breaks" in messages["graph_breaks"]
    assert "0.weight" in messages["ignored_parameter"] and "not synchronized" in messages["ignored_parameter"]
    assert "rank_0_only_hook" in messages["comm_hook"]
    assert "Join" in messages["join"]
    assert results[1]["refusals"].keys() == messages.keys()


def test_make_private_data_parallel_needs_a_process_group():
    net = network()
    with pytest.raises(DPCompileError, match="no torch.distributed process group"):
        dpcompile.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(dataset(), batch_size=8),
                               noise_multiplier=1.0, data_parallel=True)


def test_a_compiled_module_holding_fsdp_shards_is_refused():
    """An FSDP2 module *inside* the compiled model: its hooks run outside the compiled graphs and its
    parameters are DTensor shards, so per-sample norms would miss them. The dp backend refuses any
    module it compiles that holds one, at torch.compile time, naming it and pointing to fully_shard(torch.compile(...))
    (run in a one-rank gloo group of its own process).

    End to end, Dynamo (torch 2.13) often compiles no graph at all for a forward that enters an
    FSDP2 module (its hooks are under torch._dynamo.disable), so the backend never runs: README
    says that path is undetectable."""
    import subprocess
    import sys

    script = (
        "import os, torch, torch.distributed as dist, torch.nn as nn\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from dpcompile import DPCompileError\n"
        "import dpcompile.compiler.backend\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "torch.compile(net, backend='dp', options={'noise_multiplier': 0.0})  # plain: accepted\n"
        "net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "fully_shard(net[2])\n"
        "try:\n"
        "    torch.compile(net, backend='dp', options={'noise_multiplier': 0.0})  # refused at compile time\n"
        "    print('accepted')\n"
        "except DPCompileError as e:\n"
        "    print(e)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "PORT": str(29700 + os.getpid() % 200)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 (FSDPLinear) inside the compiled model is sharded by FSDP" in out.stdout, out.stdout
    assert "fully_shard(torch.compile(model" in out.stdout, out.stdout
