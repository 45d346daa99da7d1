"""DP-SGD, BSR, amplified banded MF and LSG at equal (ε, δ), fine-tuning MiniLM on movie reviews.

The task, data and model are those of examples/finetune_minilm.py (imported, not copied): the
stock transformers BertModel of all-MiniLM-L6-v2 with mean pooling and a linear head, its top
`--train-layers` layers trained on Rotten Tomatoes snippets split by movie. Every mechanism
gets the same ε, δ, epochs, expected batch size, optimizer, learning rate and clipping bound:

* dpsgd: Poisson sampling at q = batch/N every step, independent noise (amplified DP-SGD);
* bsr: banded square root, fixed-order cyclic batches (b = N/batch per epoch), no amplification;
* amplified: amplified banded MF, `--groups` b fixed groups, step t Poisson-samples group
  t mod b at rate q = batch·b/N, bands = b (`dpcompile.privacy.bsr.amplified_epsilon`);
* lsg: DP-SGD whose large weights release a rank-r gradient (`dpcompile.lsg`).

Per mechanism it reports the test accuracy (mean ± std over seeds), ε spent, δ, σ and the
expected error of its factorization at that ε (`dpcompile.privacy.bsr.expected_error`, prefix-sum
workload: RMSE over steps and the worst step of the noise σ·A C⁻¹ Z, per unit R; LSG's is
DP-SGD's, on fewer noised coordinates).

    python examples/compare_mechanisms.py --device cuda --seeds 3 --out results.json   # full
    python examples/compare_mechanisms.py --quick --out /tmp/quick.json                # CPU smoke run

--quick: a 1-layer, 64-wide BertModel (random weights, MiniLM's tokenizer) instead of MiniLM,
256 training reviews, 16 tokens, 1 seed, 1 epoch of batch 32, and the dp graphs run as Python
(`--no-inductor`: the same clipping and noise, no Inductor code generation): checks the harness
end to end in well under a minute on 2 CPU cores; its accuracies mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import AutoModel, BertConfig, BertModel  # noqa: E402

import dpcompile  # noqa: E402
from dpcompile.privacy import bsr  # noqa: E402
from dpcompile.tools.inspection import capture_graphs  # noqa: E402
from finetune_minilm import MiniLMClassifier, accuracy, encode, load_reviews, model_dir, split_by_movie  # noqa: E402

MECHANISMS = ("dpsgd", "bsr", "amplified", "lsg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=512, help="expected logical batch of every mechanism")
    parser.add_argument("--physical-batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--train-layers", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--train-size", type=int, default=None, help="subsample the training reviews")
    parser.add_argument("--test-size", type=int, default=None, help="subsample the test reviews")
    parser.add_argument("--bsr-bands", type=int, default=None, help="bands of BSR (default: batches per epoch)")
    parser.add_argument("--groups", type=int, default=4, help="groups b (= bands) of the amplified mechanism")
    parser.add_argument("--lsg-rank", type=int, default=8)
    parser.add_argument("--lsg-density", type=float, default=1.0)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-model", action="store_true", help="a 1-layer 64-wide BertModel (random weights)")
    parser.add_argument("--no-inductor", action="store_true",
                        help="run the dp graphs (clipping and noise passes applied) without Inductor code generation")
    parser.add_argument("--errors-only", action="store_true",
                        help="only σ and the expected errors of the planned runs (accounting, no training)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run (see the module docstring)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny_model, args.no_inductor, args.seeds, args.epochs, args.train_size, args.test_size = True, True, 1, 1, 256, 128
        args.max_length, args.batch_size, args.physical_batch, args.groups, args.lr = 16, 32, None, 2, 1e-2
    return args


def reviews(args) -> tuple[TensorDataset, tuple[torch.Tensor, ...]]:
    """Tokenized train set and (ids, mask, labels) of the test set, split by movie."""
    texts, labels, movies = load_reviews()
    train_idx, test_idx = split_by_movie(movies)
    subsample = torch.Generator().manual_seed(0)  # the same subset for every mechanism and seed
    if args.train_size:
        train_idx = train_idx[torch.randperm(len(train_idx), generator=subsample)[:args.train_size]]
    if args.test_size:
        test_idx = test_idx[torch.randperm(len(test_idx), generator=subsample)[:args.test_size]]
    ids, mask = encode([texts[i] for i in torch.cat([train_idx, test_idx]).tolist()], args.max_length)
    n = len(train_idx)
    return TensorDataset(ids[:n], mask[:n], labels[train_idx]), (ids[n:], mask[n:], labels[test_idx])


def encoder(args) -> BertModel:
    if args.tiny_model:
        config = BertConfig.from_pretrained(model_dir())
        config.update(dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                           attn_implementation=args.attn))
        return BertModel(config, add_pooling_layer=False)
    return AutoModel.from_pretrained(model_dir(), attn_implementation=args.attn, dtype=torch.float32)


def private_options(mechanism: str, args, n: int) -> dict:
    """make_private keywords of one mechanism (ε, δ, epochs and batch are shared)."""
    if mechanism == "bsr":
        return {"noise_mechanism": "bsr", "bands": args.bsr_bands or -(-n // args.batch_size)}
    if mechanism == "amplified":
        return {"noise_mechanism": "amplified_bsr", "bands": args.groups, "groups": args.groups}
    if mechanism == "lsg":
        layers = [f"bert.encoder.layer.*.{part}.weight" for part in ("intermediate.dense", "output.dense")]
        return {"lsg": {"layers": layers, "rank": args.lsg_rank, "density": args.lsg_density}}
    return {}


def train(mechanism: str, train_set: TensorDataset, args, seed: int) -> tuple[MiniLMClassifier, object, float]:
    """One private fine-tuning run; (model, its privacy state, seconds)."""
    start = time.time()
    torch._dynamo.reset()
    torch.manual_seed(seed)
    net = MiniLMClassifier(encoder(args), args.train_layers).to(args.device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model, opt, loader = dpcompile.make_private(
        net, opt, DataLoader(train_set, batch_size=args.batch_size), target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
        max_physical_batch_size=args.physical_batch, **private_options(mechanism, args, len(train_set)))
    state = dpcompile.privacy_state(net)
    planned = schedule(mechanism, args, len(train_set))["steps"]
    while state.steps < planned:
        for ids, mask, y in loader:
            F.cross_entropy(model(ids.to(args.device), mask.to(args.device)), y.to(args.device)).backward()
            opt.step()
            opt.zero_grad()
            if state.last_backward_released and state.steps >= planned:
                break
    return net, state, time.time() - start


def schedule(mechanism: str, args, n: int) -> dict:
    """What make_private sets up for N = n examples: the steps it calibrates σ for, and the
    factorization (C, groups b, Poisson rate q) of `bsr.expected_error`."""
    batches = max(1, round(n / args.batch_size))  # Poisson: 1/q steps an epoch
    if mechanism == "bsr":
        b = -(-n // args.batch_size)  # cyclic batches of ⌊N/b⌋ or ⌈N/b⌉
        bands = private_options(mechanism, args, n)["bands"]
        return {"kind": "bsr", "steps": round(args.epochs * b), "coefficients": bsr.bsr_coefficients(bands),
                "groups": b}
    if mechanism == "amplified":
        return {"kind": "amplified", "steps": round(args.epochs * batches),
                "coefficients": bsr.bsr_coefficients(args.groups), "groups": args.groups,
                "sample_rate": args.batch_size * args.groups / n}
    return {"kind": "dpsgd", "steps": round(args.epochs * batches), "sample_rate": args.batch_size / n}


def expected_error(mechanism: str, args, n: int) -> dict[str, float]:
    """σ and the expected error (rmse, max; per unit R) of a mechanism's planned run at (ε, δ)."""
    plan = dict(schedule(mechanism, args, n))
    kind, steps = plan.pop("kind"), plan.pop("steps")
    return bsr.expected_error(kind, args.epsilon, args.delta, steps, **plan) | {"steps": steps}


def compare(args) -> dict:
    train_set, test = reviews(args)
    test = tuple(t.to(args.device) for t in test)
    n = len(train_set)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(args.device),
               "command": " ".join(sys.argv), "train_reviews": n, "test_reviews": len(test[2]),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "mechanisms": {}}
    for mechanism in args.mechanisms:
        error = expected_error(mechanism, args, n)
        if args.errors_only:
            results["mechanisms"][mechanism] = {"epsilon": args.epsilon, "delta": args.delta, "sigma": error["sigma"],
                                                "steps": error["steps"], "expected_rmse": error["rmse"],
                                                "expected_max": error["max"]}
            print(row(mechanism, results["mechanisms"][mechanism]), flush=True)
            continue
        with capture_graphs(snapshots=False, skip_inductor=True) if args.no_inductor else contextlib.nullcontext():
            runs = [train(mechanism, train_set, args, seed) for seed in range(args.seeds)]
        accs = [accuracy(net, *test) for net, _, _ in runs]
        net, state, _ = runs[-1]
        results["mechanisms"][mechanism] = {
            "accuracy": accs, "accuracy_mean": statistics.mean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "epsilon": dpcompile.privacy_spent(net, args.delta), "delta": args.delta,
            "sigma": state.options.noise_multiplier, "steps": state.steps,
            "expected_rmse": error["rmse"], "expected_max": error["max"],
            "seconds_per_run": statistics.mean(s for _, _, s in runs)}
        print(row(mechanism, results["mechanisms"][mechanism]), flush=True)
    return results


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def row(mechanism: str, r: dict) -> str:
    accuracy = f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}" if "accuracy" in r else "–"
    seconds = f"{r['seconds_per_run']:.0f}" if "seconds_per_run" in r else "–"
    return (f"| {mechanism} | {accuracy} | {r['epsilon']:.3f} | {r['delta']:g} | {r['sigma']:.3f} | {r['steps']} | "
            f"{r['expected_rmse']:.2f} | {r['expected_max']:.2f} | {seconds} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print("| mechanism | test accuracy | ε spent | δ | σ | steps | expected RMSE | expected max | s/run |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    results = compare(args)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
