"""Training-step time and peak memory, side by side in one process:
non-private eager, non-private torch.compile (Inductor), Opacus (hooks and ghost clipping, if
installed) and dpcompile.

    python bench/step_time.py --batch 8 --seq 1024 --dtype bf16                 # GPT-2-small-style LM
    python bench/step_time.py --model vit --batch 64 --dtype bf16               # ViT-S/16 on 224² images
    python bench/step_time.py --layers 2 --seq 128 --batch 4 --device cpu       # smoke run

The first step (compilation) is timed too, after a warm-up compile of a tiny model (so the
first mode does not pay the compiler's start-up); set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 so
that every mode compiles from scratch.

--compile-times splits each mode's first step by compiler phase; --profile-compile DIR writes a
cProfile of it; --dp-options passes JSON options (e.g. '{"triton_kernels": false}') to the dp
modes only. bench/gpu_suite.sh runs the README's row groups and the GPU tests in one go.

Prints one row per mode (ms/step, tokens/s, peak GiB, ratio to non-private compile) and
writes the table as JSON to --out if given.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-small-style: nn.Linear / LayerNorm / Embedding, SDPA attention."""

    def __init__(self, vocab=50257, ctx=1024, d=768, heads=12, layers=12, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        # positions as a (B, T) index: Opacus' per-sample hooks need the batch dim on every input
        positions = torch.arange(idx.shape[1], device=idx.device).repeat(idx.shape[0], 1)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ViT(nn.Module):
    """ViT-style image classifier: Conv2d patches, the GPT blocks without the causal mask."""

    def __init__(self, image=224, patch=16, d=384, heads=6, layers=12, classes=1000):
        super().__init__()
        self.patches = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, d))
        self.blocks = nn.ModuleList(Block(d, heads, causal=False) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))


def make_model(args):
    torch.manual_seed(0)
    if args.model == "vit":
        return ViT(d=args.width, heads=args.width // 64, layers=args.layers).to(args.device)
    return GPT(vocab=args.vocab, ctx=args.seq, d=args.width, heads=args.width // 64, layers=args.layers,
               tied=args.tied).to(args.device)


def make_batch(args):
    """(inputs, targets, items per step): token ids for the LM, 224² images for the ViT."""
    g = torch.Generator(device=args.device).manual_seed(0)
    if args.model == "vit":
        images = torch.randn(args.batch, 3, 224, 224, device=args.device, generator=g)
        return images, torch.randint(0, 1000, (args.batch,), device=args.device, generator=g), args.batch
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g)
    target = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g)
    return idx, target, args.batch * args.seq


def loss_of(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def time_steps(step, args) -> tuple[float, float, float]:
    """(ms per step, peak GiB during the timed steps, GiB allocated when they start: the model,
    its optimizer state and anything an earlier mode failed to free)."""
    for _ in range(args.warmup):
        step()
    sync(args.device)
    resident = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    ms = (time.perf_counter() - start) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return ms, peak, resident


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def runner(model, args, opt=None, criterion=loss_of):
    opt = opt or torch.optim.SGD(model.parameters() if not hasattr(model, "_orig_mod") else
                                 model._orig_mod.parameters(), lr=1e-4)
    inputs, target, _ = make_batch(args)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = criterion(model(inputs), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_eager(args):
    return runner(make_model(args), args)


def bench_compile(args):
    return runner(torch.compile(make_model(args), mode=args.compile_mode), args)


def bench_dpcompile(args, strategy, budget_mb=None):
    net = make_model(args)
    budget_mb = args.memory_budget_mb if budget_mb is None else budget_mb
    opts = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.01,
            "expected_batch_size": args.batch, "strategy": strategy, "mode": args.compile_mode}
    if budget_mb is not None:
        opts["memory_budget_mb"] = budget_mb
    opts.update(json.loads(args.dp_options or "{}"))
    model = torch.compile(net, backend="dp", options=opts)
    return runner(model, args, torch.optim.SGD(net.parameters(), lr=1e-4))


def bench_opacus(args, mode="hooks"):
    """Opacus per-sample-gradient hooks, or ghost clipping (two backwards), an optional dependency."""
    from opacus import PrivacyEngine

    net = make_model(args)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    data = torch.utils.data.TensorDataset(torch.zeros(args.batch * 4, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
    common = {"module": net, "optimizer": opt, "data_loader": loader, "noise_multiplier": 1.0,
              "max_grad_norm": 1.0, "poisson_sampling": False}
    if mode == "ghost":
        criterion = nn.CrossEntropyLoss()
        model, opt, criterion, _ = PrivacyEngine().make_private(**common, criterion=criterion, grad_sample_mode="ghost")
        def loss(logits, target):  # sequences: Opacus averages each sequence's tokens given the shape
            shape = {"shape": logits.shape} if logits.dim() == 3 else {}
            return criterion(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), **shape)

        return runner(model, args, opt, loss)
    model, opt, _ = PrivacyEngine().make_private(**common)
    return runner(model, args, opt)


def print_top_kernels(mode: str, step, args, top: int = 30) -> None:
    """Where a step's device time goes: the kernels with the most self time over 3 steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(args.device)
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if args.device == "cuda" else ["self_cpu_time_total"]
    for key in keys:  # device kernels, then the host side (Python, launches) that may starve them
        print(f"--- {mode}: top {key} over 3 steps")
        print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70), flush=True)


def print_compile_phases(mode: str) -> None:
    """This mode's first step by compiler phase (Dynamo's timers, seconds summed over graphs; the
    per-pass lines left out) and Inductor's kernel counts, then reset for the next mode."""
    from torch._dynamo import utils
    from torch._inductor import metrics

    print(f"--- {mode}: first-step compile phases (s); kernels generated {metrics.generated_kernel_count}, "
          f"IR nodes before fusion {metrics.ir_nodes_pre_fusion}")
    for name, seconds in utils.compilation_time_metrics.items():
        if not name.startswith("pass."):
            print(f"{name:60s} {sum(seconds):8.2f}")
    reset_compile_counters()


@contextlib.contextmanager
def profiled(mode: str, folder: str | None):
    """cProfile of a mode's first step, written to folder/<mode>.pstats and, as the 60 entries with the
    most cumulative time, folder/<mode>.txt (Python time roughly doubles under the profiler)."""
    if folder is None:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(os.path.join(folder, f"{mode}.pstats"))
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text).sort_stats("cumulative")
        stats.print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
        with open(os.path.join(folder, f"{mode}.txt"), "w") as f:
            f.write(text.getvalue())


def reset_compile_counters() -> None:
    """Dynamo's phase timers and Inductor's kernel counts accumulate over a process: zero them."""
    torch._dynamo.utils.compilation_time_metrics.clear()
    torch._inductor.metrics.reset()


def warm_compiler(device: str, dp: bool) -> None:
    """Compile a tiny forward + backward first, with Inductor and (for dp modes) the dp backend:
    one-time start-up (imports, compile workers, first traces, lookup tables) would otherwise
    land in the first mode's first-step time, so the first-step column compares per-model work."""
    backends = [{}] + ([{"backend": "dp", "options": {"max_grad_norm": 1.0, "noise_multiplier": 1.0,
                                                      "sample_rate": 0.01, "expected_batch_size": 2}}]
                                                      if dp else [])
    for kwargs in backends:
        layer = nn.Linear(8, 8).to(device)
        torch.compile(layer, **kwargs)(torch.randn(4, 8, device=device)).sum().backward()
        sync(device)
        torch._dynamo.reset()
    reset_compile_counters()


def cudagraph_skips() -> dict:
    """Graphs Inductor ran without CUDA graphs (--compile-mode reduce-overhead; TORCH_LOGS=perf_hints says why)."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    counters.clear()
    return {"cudagraph_skips": skips} if skips else {}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=["gpt", "vit"], default="gpt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-budget-mb", type=float, default=None, help="dp-auto's budget (default: the backend's)")
    p.add_argument("--modes", default="eager,compile,dp-auto,dp-ghost,dp-instantiate,opacus-hooks")
    p.add_argument("--dp-options", help='JSON merged into every dp mode\'s options, e.g. \'{"inductor": {...}}\'')
    p.add_argument("--out")
    p.add_argument("--profile", action="store_true", help="print the top kernels of each mode (torch.profiler)")
    p.add_argument("--compile-times", action="store_true",
                   help="print each compiled mode's first-step time by compiler phase (Dynamo's timers)")
    p.add_argument("--profile-compile", metavar="DIR",
                   help="cProfile each mode's first step into DIR/<mode>.pstats and DIR/<mode>.txt")
    p.add_argument("--compile-mode", default=None,
                   help='torch.compile mode of the compiled modes, e.g. "reduce-overhead" (CUDA graphs)')
    p.add_argument("--combo-kernels", action="store_true",
                   help="Inductor's horizontal fusion of independent kernels, for every compiled mode")
    args = p.parse_args()
    torch._inductor.config.combo_kernels = args.combo_kernels
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    builders = {
        "eager": lambda: bench_eager(args),
        "compile": lambda: bench_compile(args),
        "dp-auto": lambda: bench_dpcompile(args, "auto"),
        "dp-ghost": lambda: bench_dpcompile(args, "ghost"),
        "dp-instantiate": lambda: bench_dpcompile(args, "instantiate"),
        "dp-lean": lambda: bench_dpcompile(args, "auto", budget_mb=0.0),
        "dp-rich": lambda: bench_dpcompile(args, "auto", budget_mb=4096.0),
        "opacus-hooks": lambda: bench_opacus(args),
        "opacus-ghost": lambda: bench_opacus(args, "ghost"),
    }
    items = make_batch(args)[2]
    warm_compiler(args.device, dp=any(m.startswith("dp") for m in args.modes.split(",")))
    rows = []
    for mode in args.modes.split(","):
        step = None  # the last mode's model, gradients and graphs: freed before this one's peak is taken
        torch._dynamo.reset()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        try:
            with profiled(mode, args.profile_compile):
                t0 = time.perf_counter()
                step = builders[mode]()
                step()  # compile
                sync(args.device)
                compile_s = time.perf_counter() - t0
            if args.compile_times:
                print_compile_phases(mode)
            ms, peak, resident = time_steps(step, args)
            if args.profile:
                print_top_kernels(mode, step, args)
            rows.append({"mode": mode, "ms": ms, "items_per_s": items / ms * 1e3,
                         "peak_gib": peak, "resident_gib": resident, "first_step_s": compile_s, **cudagraph_skips()})
        except Exception as e:  # report and continue: one failing engine must not hide the others
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["ms"] for r in rows if r.get("mode") == "compile" and "ms" in r), None)
    base_first = next((r["first_step_s"] for r in rows if r.get("mode") == "compile" and "ms" in r), None)
    shape = "224² images" if args.model == "vit" else f"T={args.seq} V={args.vocab} tied={args.tied}"
    print(f"\n{args.model} {args.device} {args.dtype} B={args.batch} {shape} layers={args.layers} d={args.width}")
    unit = "img/s" if args.model == "vit" else "tok/s"
    print(f"{'mode':16s} {'ms/step':>9s} {unit:>10s} {'peak GiB':>9s} {'vs compile':>10s} {'1st step s':>10s} "
          f"{'1st vs compile':>14s}")
    for r in rows:
        if "ms" in r:
            ratio = f"{base / r['ms']:.2f}" if base else "-"
            first = f"{r['first_step_s'] / base_first:.2f}" if base_first else "-"
            print(f"{r['mode']:16s} {r['ms']:9.1f} {r['items_per_s']:10.0f} {r['peak_gib']:9.2f} {ratio:>10s} "
                  f"{r['first_step_s']:10.1f} {first:>14s}")
        else:
            print(f"{r['mode']:16s} {r['error']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
