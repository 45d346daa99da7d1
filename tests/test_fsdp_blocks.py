"""Per-block FSDP2 (`fully_shard` on each transformer block, then the root) with the dp backend.

Per-block sharding is not supported yet (docs/distributed.md, "Per-block sharding"): each layout
must fail closed on every rank, before any gradient reaches ``p.grad`` and before a step is
counted, on 2 and 4 gloo processes. The same runs measure the FSDP2 shards each rank really
holds and compare them with `dpcompile.distributed.sharding_memory`, which the docs' memory
table comes from.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import dpcompile
from ranks import run_ranks
from dpcompile.distributed import shard_bytes, sharding_memory
from dpcompile.privacy.state import state_of_module

OPTIONS = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0}
transformers = pytest.importorskip("transformers")


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama_lora() -> torch.nn.Module:
    """A tiny Llama with PEFT LoRA adapters on q and v (None without peft)."""
    try:
        import peft
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return peft.get_peft_model(transformers.LlamaForCausalLM(config),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers)


def shard_per_block(model: torch.nn.Module, root: torch.nn.Module, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)


def unit_shapes(model: torch.nn.Module) -> list[list[torch.Size]]:
    """Parameter shapes per FSDP unit (each block, then the root's remaining ones), before sharding."""
    in_blocks = [[p.shape for p in b.parameters()] for b in blocks(model)]
    ids = {id(p) for b in blocks(model) for p in b.parameters()}
    return in_blocks + [[p.shape for p in model.parameters() if id(p) not in ids]]


def attempt(name: str, make, compile_first: bool, bf16: bool = False) -> dict:
    """Shard per block before or after torch.compile, then try one training step."""
    torch._dynamo.reset()
    model = make()
    shapes = unit_shapes(model)
    result = {"case": name}
    try:
        if compile_first:
            compiled = torch.compile(model, backend="dp", options=OPTIONS)
            shard_per_block(model, compiled, bf16)
        else:
            shard_per_block(model, model, bf16)
            compiled = torch.compile(model, backend="dp", options=OPTIONS)
        ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(dist.get_rank()))
        compiled(input_ids=ids, labels=ids).loss.backward()
        result["error"] = None
    except dpcompile.DPCompileError as e:
        result["error"] = str(e)
    result["grads"] = sum(p.grad is not None for p in model.parameters())
    state = state_of_module(model)
    result["steps"] = None if state is None else state.steps
    local = [p.to_local() for p in model.parameters() if type(p).__name__ == "DTensor"]
    result["local_bytes"] = sum(t.numel() * t.element_size() for t in local)
    result["total_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["shapes"] = shapes
    return result


def worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = [attempt("gpt2, sharded then compiled", gpt2, compile_first=False),
                   attempt("gpt2, compiled then sharded", gpt2, compile_first=True)]
        if llama_lora() is not None:
            results.append(attempt("llama lora bf16, compiled then sharded", llama_lora, True, bf16=True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world: int) -> list[list[dict]]:
    return run_ranks(worker, (world, str(tmp_path / "store"), str(tmp_path)), world, tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_per_block_fully_shard_fails_closed_on_every_rank(tmp_path, world):
    results = spawn(tmp_path, world)
    expected = 3 if llama_lora() is not None else 2
    for rank, cases in enumerate(results):
        assert len(cases) == expected
        for case in cases:
            assert case["error"] is not None, case["case"]
            assert "per-block fully_shard is not supported" in case["error"], case["error"]
            assert "fully_shard(torch.compile(model" in case["error"]
            assert case["grads"] == 0, case["case"]  # nothing reached p.grad
            assert case["steps"] in (None, 0), case["case"]  # no step counted
            # the shards FSDP2 really holds: the simulation's rank-0 bytes, and all ranks add up to the model
            assert case["local_bytes"] <= shard_bytes([s for u in case["shapes"] for s in u], world)
            if rank == 0:
                assert case["local_bytes"] == shard_bytes([s for u in case["shapes"] for s in u], world)
    for i in range(expected):
        assert sum(r[i]["local_bytes"] for r in results) == results[0][i]["total_bytes"]


def test_sharding_memory_per_block_against_one_unit():
    """Per-block units cut the peak of unsharded parameters to two blocks; holding every block's
    gradient until the global norms are known (flat clipping by keeping gradients) gives back the
    gradient saving, which the one-unit layout never had."""
    shapes = unit_shapes(gpt2())
    one_unit = sharding_memory([[s for u in shapes for s in u]], 4)
    per_block = sharding_memory(shapes, 4)
    held = sharding_memory(shapes, 4, hold_block_grads=True)
    total = sum(torch.Size(s).numel() for u in shapes for s in u) * 4
    assert one_unit["params_at_rest"] == per_block["params_at_rest"] == sum(shard_bytes(u, 4) for u in shapes)
    assert one_unit["peak_params"] == one_unit["params_at_rest"] + total
    assert per_block["peak_params"] < one_unit["peak_params"]
    assert per_block["peak_grads"] < held["peak_grads"] == one_unit["peak_grads"]
    assert one_unit["optimizer"] == 2 * one_unit["params_at_rest"]


@pytest.mark.parametrize("how", ["compiled = torch.compile(net, backend='dp', options=OPTIONS)",
                                 "net.compile(backend='dp', options=OPTIONS); compiled = net"])
def test_blocks_sharded_after_compiling_a_plain_container_are_refused(how):
    """torch.compile or nn.Module.compile of an nn.Sequential, then fully_shard per block and on
    the root (a one-rank gloo group in a process of its own): refused at the training forward,
    nothing in p.grad. Dynamo compiles no graph for this forward, so no dp backend check runs:
    before the forward check the sharded blocks released unclipped gradients."""
    import subprocess
    import sys

    script = (
        "import os, torch, torch.distributed as dist, torch.nn as nn\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from dpcompile import DPCompileError\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        f"OPTIONS = {OPTIONS!r}\n"
        "net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        f"{how}\n"
        "fully_shard(net[0]); fully_shard(net[2]); fully_shard(compiled)\n"
        "try:\n"
        "    compiled(torch.randn(4, 4)).sum().backward()\n"
        "    print('accepted')\n"
        "except DPCompileError as e:\n"
        "    print(e)\n"
        "print('grads', sum(p.grad is not None for p in net.parameters()))\n"
        "with torch.no_grad():\n"
        "    print('evaluation', tuple(compiled(torch.randn(4, 4)).shape))  # no gradient: allowed\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "PORT": str(29500 + (os.getpid() + len(how)) % 200)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 (FSDPLinear) inside the compiled model is sharded by FSDP" in out.stdout, out.stdout
    assert "per-block fully_shard is not supported" in out.stdout
    assert "grads 0" in out.stdout and "evaluation (4, 2)" in out.stdout, out.stdout
