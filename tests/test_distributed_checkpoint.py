"""FSDP2 with torch.distributed.checkpoint (DCP): the public privacy state goes into the DCP checkpoint
next to the model and optimizer, the secret part into a file of its own, and a run resumed from both
in fresh objects ends where the uninterrupted run ends: parameters, steps and ε (2 gloo processes)."""
from __future__ import annotations

import datetime
import os
import stat

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from ranks import run_ranks

WORLD, PER_RANK, STEPS, DELTA = 2, 4, 4, 1e-5
OPTIONS = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "sample_rate": 0.125, "dataset_size": 64}


def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * WORLD * PER_RANK, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    size = WORLD * PER_RANK
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(STEPS)]


def sharded(init_seed: int):
    """fully_shard(torch.compile(...)) of a fresh network, its optimizer and its privacy state."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(init_seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    model = fully_shard(torch.compile(net, backend="dp", options=OPTIONS))
    return net, model, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9), dpcompile.privacy_state(net)


def train(model, opt, steps, rank):
    for x, y in steps:
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        torch._dynamo.mark_dynamic(x, 0)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def app_state(net, opt, state):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, opt)
    return {"model": model_sd, "optim": optim_sd, "privacy": state}  # PrivacyState is a DCP Stateful


def full(net):
    return [p.full_tensor().detach().clone() for p in net.parameters()]


def worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        steps = batches()
        checkpoint, secret = os.path.join(out_dir, "dcp"), os.path.join(out_dir, "secret.pt")
        net, model, opt, state = sharded(init_seed=0)
        train(model, opt, steps[:2], rank)
        dcp.save(app_state(net, opt, state), checkpoint_id=checkpoint)
        if rank == 0:  # the secret part (the noise seed, agreed by the ranks) apart, owner-only
            with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                torch.save(state.secret_state_dict(), f)
        dist.barrier()
        train(model, opt, steps[2:], rank)
        uninterrupted = {"params": full(net), "steps": state.steps, "epsilon": dpcompile.privacy_spent(net, DELTA),
                         "seed": state.seed}

        torch._dynamo.reset()
        net, model, opt, state = sharded(init_seed=1)  # other weights, a fresh seed: all must come back
        fresh_seed = state.seed
        restored = app_state(net, opt, state)
        dcp.load(restored, checkpoint_id=checkpoint)
        set_state_dict(net, opt, model_state_dict=restored["model"], optim_state_dict=restored["optim"])
        state.load_secret_state_dict(torch.load(secret, weights_only=False))
        at_resume = {"steps": state.steps, "epsilon": dpcompile.privacy_spent(net, DELTA)}
        train(model, opt, steps[2:], rank)
        resumed = {"params": full(net), "steps": state.steps, "epsilon": dpcompile.privacy_spent(net, DELTA),
                   "seed": state.seed, "fresh_seed": fresh_seed, "at_resume": at_resume,
                   "secret_mode": stat.S_IMODE(os.stat(secret).st_mode),
                   "dcp_keys": sorted(dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata)}

        torch._dynamo.reset()  # once more without the secret part: the ranks' fresh seeds disagree
        net, model, opt, state = sharded(init_seed=2)
        restored = app_state(net, opt, state)
        dcp.load(restored, checkpoint_id=checkpoint)
        set_state_dict(net, opt, model_state_dict=restored["model"], optim_state_dict=restored["optim"])
        try:
            train(model, opt, steps[2:3], rank)
            refusal = None
        except dpcompile.DPCompileError as e:
            refusal = str(e)
        resumed["without_secret"] = {"refusal": refusal, "steps": state.steps,
                                     "grads": [p.grad is None for p in net.parameters()]}
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_distributed_checkpoint_resumes_the_private_run_exactly(tmp_path):
    results = run_ranks(worker, (str(tmp_path / "store"), str(tmp_path)), WORLD, tmp_path)
    for r in results:
        a, b = r["uninterrupted"], r["resumed"]
        assert b["at_resume"]["steps"] == 2 and 0 < b["at_resume"]["epsilon"] < a["epsilon"]
        assert b["steps"] == a["steps"] == STEPS and b["epsilon"] == a["epsilon"]
        assert b["seed"] == a["seed"] != b["fresh_seed"]  # the secret part restored the noise streams
        for got, want in zip(b["params"], a["params"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert b["secret_mode"] == 0o600
        privacy_keys = [k for k in b["dcp_keys"] if k.startswith("privacy.")]
        assert "privacy.steps" in privacy_keys and not any("seed" in k for k in b["dcp_keys"])  # public part only
    assert results[0]["uninterrupted"]["params"][0].equal(results[1]["uninterrupted"]["params"][0])
    for r in results:  # resumed without the secret part: refused on every rank, nothing released or counted
        without = r["resumed"]["without_secret"]
        assert without["refusal"] and "same checkpoint" in without["refusal"]
        assert without["steps"] == 2 and all(without["grads"])
