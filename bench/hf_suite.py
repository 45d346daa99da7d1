"""Hugging Face training steps, side by side: non-private eager, non-private torch.compile
(Inductor), dpcompile (backend="dp") and Opacus ghost clipping (if installed), one process per
workload. Models are built from transformers configs with random weights: nothing is downloaded.

    python3 bench/hf_suite.py --out bench_out/hf                          # every workload, full size
    python3 bench/hf_suite.py --workloads gpt2-1024,bert-base --out DIR   # some of them
    python3 bench/hf_suite.py --tiny --workloads gpt2-256,vit-base --out DIR   # CPU smoke run, ~1 min each

Each workload runs in a child process under --timeout seconds, so a hang, a crash or an out-of-
memory error costs that workload only; the modes it had finished are kept. A mode that fails
(Opacus missing or refusing a layer, the dp backend refusing a model) becomes a row with its error.

The loss is computed outside the model, one value per sample (a causal LM: the mean of its
next-token losses; seq2seq: of its target tokens; classifiers: its cross-entropy), then averaged
over the batch: the per-sample form that dpcompile (and Opacus ghost clipping) clip.

Prints ms/step, tokens/s (samples/s for classifiers), peak GiB over the timed steps, the first
step's seconds (compilation included) and each mode's ratios to non-private compile: throughput
(compile ms / mode ms), peak memory and first step (mode / compile). Writes DIR/hf_suite.json,
one object per row, with the device, versions, date and command line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import print_compile_phases, sync, time_steps, warm_compiler  # noqa: E402  (bench/ is no package)

MODES = ("eager", "compile", "dp", "opacus-ghost")
# Also run on request (--modes): group-wise clipping, per transformer block / per layer (clip_groups).
GROUP_MODES = {"dp-block": "block", "dp-layer": "layer"}
DP_MODES = ("dp", *GROUP_MODES)  # the modes that compile with backend="dp"
# Every row has every key; metrics are None where a mode failed (or, on CPU, for memory).
FIELDS = ("workload", "mode", "model", "shape", "batch", "unit", "params_m", "trainable_m", "dtype", "ms",
          "items_per_s", "peak_gib", "resident_gib", "first_step_s", "throughput_vs_compile", "memory_vs_compile",
          "first_step_vs_compile", "private_steps", "error", "device", "torch", "transformers", "date", "command")
# --tiny: every workload's shapes shrunk to this (where it has the key), with its config shrunk too.
TINY_SHAPES = {"batch": 2, "seq": 32, "src": 32, "tgt": 16, "image": 32}


@dataclasses.dataclass
class Case:
    """One workload, built fresh for each mode: model(*inputs) -> logits; loss(logits, target) -> (B,)."""
    model: nn.Module
    inputs: tuple
    target: torch.Tensor
    loss: Callable
    items: int  # tokens (or samples) per step
    unit: str


class Logits(nn.Module):
    """model(*inputs) -> logits, the HF call with keyword inputs: compiled and Opacus-wrapped alike."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *inputs):
        return self.model(**dict(zip(self.keys, inputs))).logits


def causal_lm_loss(logits, ids):
    """Each sequence's mean next-token loss."""
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return per_token.view(ids.shape[0], -1).mean(1)


def seq2seq_loss(logits, labels):
    """Each sequence's mean loss over its target tokens (decoder inputs are already shifted)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return per_token.view(labels.shape[0], -1).mean(1)


def classification_loss(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def _ids(vocab, *shape, seed=0):  # on the host: build() runs under torch.device(args.device)
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed), device="cpu")


def causal_lm(model, vocab, batch, seq):
    ids = _ids(vocab, batch, seq)
    return Case(Logits(model, ("input_ids",)), (ids,), ids, causal_lm_loss, batch * seq, "tok/s")


def gpt2(tiny, batch, seq):
    import transformers

    size = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=seq, bos_token_id=0, eos_token_id=0) if tiny else \
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=max(1024, seq))  # 124M, tied
    return causal_lm(transformers.GPT2LMHeadModel(transformers.GPT2Config(**size)), size["vocab_size"], batch, seq)


LLAMA_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  intermediate_size=2048)
TINYLLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632)


def llama_model(shape, tiny, seq):
    import transformers

    if tiny:  # keep grouped-query attention where the full model has it
        gqa = shape["num_key_value_heads"] < shape["num_attention_heads"]
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                     intermediate_size=128)
    vocab = 256 if tiny else 32000
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=max(2048, seq), **shape)
    return transformers.LlamaForCausalLM(cfg), vocab


def llama_125m(tiny, batch, seq):
    return causal_lm(*llama_model(LLAMA_125M, tiny, seq), batch, seq)


def llama_1b(tiny, batch, seq):
    return causal_lm(*llama_model(TINYLLAMA_1B, tiny, seq), batch, seq)


def llama_125m_lora(tiny, batch, seq):
    import peft  # optional: a missing peft is every mode's error row

    model, vocab = llama_model(LLAMA_125M, tiny, seq)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return causal_lm(peft.get_peft_model(model, lora), vocab, batch, seq)


def bert(tiny, batch, seq):
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=256,
                max_position_embeddings=seq) if tiny else {}  # BertConfig's defaults are BERT-base
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **size))
    ids = _ids(model.config.vocab_size, batch, seq)
    return Case(Logits(model, ("input_ids",)), (ids,), _ids(2, batch, seed=1), classification_loss, batch, "samples/s")


def vit(tiny, batch, image):
    import transformers

    size = dict(patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) \
        if tiny else {}  # ViTConfig's defaults are ViT-B/16
    model = transformers.ViTForImageClassification(transformers.ViTConfig(image_size=image, num_labels=1000, **size))
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0), device="cpu")
    return Case(Logits(model, ("pixel_values",)), (pixels,), _ids(1000, batch, seed=1), classification_loss, batch,
                "samples/s")


def t5(tiny, batch, src, tgt):
    import transformers

    size = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256) if tiny else {}  # t5-small
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**size))
    vocab = model.config.vocab_size
    inputs = (_ids(vocab, batch, src), _ids(vocab, batch, tgt, seed=1))
    return Case(Logits(model, ("input_ids", "decoder_input_ids")), inputs, _ids(vocab, batch, tgt, seed=2),
                seq2seq_loss, batch * (src + tgt), "tok/s")


# name: (builder, full-size shapes): the workloads of issue 23.
WORKLOADS = {
    "gpt2-1024": (gpt2, dict(batch=8, seq=1024)),
    "llama-125m": (llama_125m, dict(batch=8, seq=1024)),
    "llama-125m-lora": (llama_125m_lora, dict(batch=8, seq=1024)),
    "llama-1b": (llama_1b, dict(batch=4, seq=2048)),
    "gpt2-256": (gpt2, dict(batch=32, seq=256)),
    "bert-base": (bert, dict(batch=64, seq=128)),
    "vit-base": (vit, dict(batch=64, image=224)),
    "t5-small": (t5, dict(batch=16, src=256, tgt=64)),
}


def shapes_of(name: str, tiny: bool) -> dict:
    shapes = WORKLOADS[name][1]
    return {k: TINY_SHAPES[k] for k in shapes} if tiny else dict(shapes)


def build(name: str, args) -> Case:
    """A fresh case on args.device (random init there: a 1B model's init on the host takes long)."""
    torch.manual_seed(0)
    with torch.device(args.device):
        case = WORKLOADS[name][0](args.tiny, **shapes_of(name, args.tiny))
    case.model.train()
    case.inputs = tuple(x.to(args.device) for x in case.inputs)
    case.target = case.target.to(args.device)
    return case


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model, loss, opt, case: Case, args):
    """One training step: forward, per-sample loss outside the model, backward, AdamW."""
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            value = loss(model(*case.inputs), case.target)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_mean(case: Case):
    return lambda logits, target: case.loss(logits, target).mean()


def mode_eager(case, args):
    return case.model, make_step(case.model, batch_mean(case), adamw(case.model), case, args)


def mode_compile(case, args):
    compiled = torch.compile(case.model, mode=args.compile_mode)
    return case.model, make_step(compiled, batch_mean(case), adamw(case.model), case, args)


def dp_options(args) -> dict:
    batch = shapes_of(args.child, args.tiny)["batch"]
    # No sample_rate: the timed batches have a fixed size, which dpcompile's Poisson audit refuses
    # under a claimed sample rate (no ε is claimed here; the step's work is the same).
    opts = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": batch}
    if args.compile_mode:  # torch.compile refuses mode= next to options=: the dp backend takes it as an option
        opts["mode"] = args.compile_mode
    return {**opts, **json.loads(args.dp_options or "{}")}


def mode_dp(case, args, clip_groups=None):
    options = {**dp_options(args), **({"clip_groups": clip_groups} if clip_groups else {})}
    model = torch.compile(case.model, backend="dp", options=options)
    return model, make_step(model, batch_mean(case), adamw(case.model), case, args)


class PerSampleCriterion(nn.Module):
    """Opacus ghost clipping reads the loss with reduction 'none': then one loss per sample."""

    def __init__(self, per_sample: Callable):
        super().__init__()
        self.per_sample, self.reduction = per_sample, "mean"

    def forward(self, logits, target):
        losses = self.per_sample(logits, target)
        return losses if self.reduction == "none" else losses.mean()


def mode_opacus_ghost(case, args):
    """Opacus ghost clipping (two backwards); an optional dependency, so imported here."""
    from opacus import PrivacyEngine

    batch = case.target.shape[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch * 4)), batch_size=batch)
    model, opt, criterion, _ = PrivacyEngine().make_private(
        module=case.model, optimizer=adamw(case.model), data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, criterion=PerSampleCriterion(case.loss), grad_sample_mode="ghost")
    return model, make_step(model, criterion, opt, case, args)


def adamw(model):
    return torch.optim.AdamW(trainable(model), lr=1e-5)


BUILDERS = {"eager": mode_eager, "compile": mode_compile, "dp": mode_dp, "opacus-ghost": mode_opacus_ghost,
            **{mode: functools.partial(mode_dp, clip_groups=groups) for mode, groups in GROUP_MODES.items()}}


def finite(x):
    """NaN (no CUDA memory counters on CPU) as JSON null."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def run_mode(name: str, mode: str, args) -> dict:
    row = {"mode": mode}
    try:
        case = build(name, args)
        row.update(unit=case.unit, params_m=sum(p.numel() for p in case.model.parameters()) / 1e6,
                   trainable_m=sum(p.numel() for p in trainable(case.model)) / 1e6)
        model, step = BUILDERS[mode](case, args)
        t0 = time.perf_counter()
        step()  # compiles, for the compiled modes
        sync(args.device)
        row["first_step_s"] = time.perf_counter() - t0
        if args.compile_times and mode in ("compile", *DP_MODES):
            print_compile_phases(mode)
        ms, peak, resident = time_steps(step, args)
        row.update(ms=ms, items_per_s=case.items / ms * 1e3, peak_gib=finite(peak), resident_gib=finite(resident))
        if mode in DP_MODES:  # proof that the dp graphs ran: noisy releases counted by the privacy state
            import dpcompile

            row["private_steps"] = dpcompile.privacy_state(model).steps
    except Exception as e:  # one failing mode (a refusal, a missing package, OOM) must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    return row


def run_child(args) -> None:
    """This process's one workload: every mode in turn, each row appended to --rows as it ends."""
    import transformers

    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # a smoke run on shared cores: oversubscribed OpenMP made tiny steps ~10x slower
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = args.child
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
    meta = {**workload_meta(name, args), "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__}
    modes = args.modes.split(",")
    if {"compile", *DP_MODES} & set(modes):  # compiler start-up out of the first mode's first step
        warm_compiler(args.device, dp=bool(set(DP_MODES) & set(modes)))
    for mode in modes:
        torch._dynamo.reset()  # the last mode's graphs, model and optimizer state freed before this one
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {**meta, "date": now(), **run_mode(name, mode, args)}
        with open(args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def workload_meta(name: str, args) -> dict:
    shapes = shapes_of(name, args.tiny)
    return {"workload": name, "model": WORKLOADS[name][0].__name__, "batch": shapes["batch"], "dtype": args.dtype,
            "shape": " ".join(f"{k}={v}" for k, v in shapes.items() if k != "batch")}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_workload(name: str, args, out: Path) -> list[dict]:
    """The workload in a child process (its own session, so a timeout ends its compile workers too)."""
    rows_file, log = out / f"{name}.jsonl", out / f"{name}.log"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--rows", str(rows_file), *child_flags(args)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
            failure = None if rc == 0 else f"process exited with rc {rc}: {last_line(log)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            failure = f"timeout after {args.timeout:g} s (workload process killed)"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {r["mode"] for r in rows}
    rows += [{**workload_meta(name, args), "mode": m, "error": failure, "date": now()}
             for m in args.modes.split(",") if m not in done]
    return rows


def child_flags(args) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--modes", args.modes]
    flags += ["--tiny"] if args.tiny else []
    flags += ["--compile-times"] if args.compile_times else []
    flags += ["--compile-mode", args.compile_mode] if args.compile_mode else []
    return flags + (["--dp-options", args.dp_options] if args.dp_options else [])


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def add_ratios(rows: list[dict]) -> None:
    """Each row's throughput, peak memory and first step relative to the same workload's compile row."""
    base = {r["workload"]: r for r in rows if r["mode"] == "compile" and r.get("ms")}
    for r in rows:
        b = base.get(r["workload"])
        if b is None or not r.get("ms"):
            continue
        r["throughput_vs_compile"] = b["ms"] / r["ms"]
        r["first_step_vs_compile"] = r["first_step_s"] / b["first_step_s"]
        if r.get("peak_gib") and b.get("peak_gib"):
            r["memory_vs_compile"] = r["peak_gib"] / b["peak_gib"]


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':16s} {'mode':13s} {'ms/step':>9s} {'items/s':>10s} {'unit':9s} {'peak GiB':>8s} "
          f"{'1st s':>7s} {'thr/comp':>8s} {'mem/comp':>8s} {'1st/comp':>8s}")
    for r in rows:
        if r.get("error"):
            print(f"{r['workload']:16s} {r['mode']:13s} {r['error'][:200]}")
            continue
        print(f"{r['workload']:16s} {r['mode']:13s} {r['ms']:9.1f} {r['items_per_s']:10.0f} {r['unit']:9s} "
              f"{fmt(r['peak_gib'], '8.2f')} {r['first_step_s']:7.1f} {fmt(r['throughput_vs_compile'], '8.2f')} "
              f"{fmt(r['memory_vs_compile'], '8.2f')} {fmt(r['first_step_vs_compile'], '8.2f')}")


def run_suite(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    raw = []
    for name in args.workloads.split(","):
        t0 = time.perf_counter()
        raw += run_workload(name, args, out)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows = finish(raw, args, command)
        (out / "hf_suite.json").write_text(json.dumps(rows, indent=1))  # after each: an outer timeout keeps these
    print_table(rows)


def finish(raw: list[dict], args, command: str) -> list[dict]:
    """Rows with every field, the command line and the ratios to compile."""
    # rows of a killed process: the host as its siblings saw it (the parent leaves CUDA uninitialised)
    host = next(({k: r[k] for k in ("device", "torch", "transformers")} for r in raw if r.get("device")),
                {"device": args.device, "torch": torch.__version__})
    rows = [{**dict.fromkeys(FIELDS), **host, **r, "command": command} for r in raw]
    add_ratios(rows)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(BUILDERS)}")
    p.add_argument("--out", default="bench_out/hf", help="folder for hf_suite.json and each workload's log")
    p.add_argument("--tiny", action="store_true", help="2 layers, small width, short sequences, B=2: a CPU smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=240, help="seconds for each workload's process")
    p.add_argument("--dp-options", help="JSON merged into the dp mode's options")
    p.add_argument("--compile-mode", help='torch.compile mode of both compiled modes, e.g. "reduce-overhead" (CUDA graphs)')
    p.add_argument("--compile-times", action="store_true",
                   help="log each compiled mode's first step by compiler phase (in DIR/<workload>.log)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run this one workload in this process
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS) or set(args.modes.split(",")) - set(BUILDERS)
    if unknown:
        p.error(f"unknown workload or mode: {', '.join(sorted(unknown))}")
    run_child(args) if args.child else run_suite(args)


if __name__ == "__main__":
    main()
