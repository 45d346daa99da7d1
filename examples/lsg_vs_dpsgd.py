"""LSG (low-rank + sparse gradients) against full DP-SGD at equal ε, on scikit-learn's digits.

A wide MLP (64 → 512 → 512 → 10) is trained privately with dpcompile.make_private; the
LSG runs release the two large weights' gradients in a rank-r subspace (r·(n+m) instead
of n·m coordinates, further sparsified by `density`), so the Gaussian noise covers far
fewer coordinates. Same σ (same ε, δ, sampling rate and steps), same clipping bound,
learning rate and seeds for every method; test accuracy is the mean over seeds and the
step time the median over the training steps of one process.

    python examples/lsg_vs_dpsgd.py [--epsilon 1 3] [--seeds 3] [--epochs 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import dpcompile

METHODS = {
    "DP-SGD (full)": None,
    "LSG r=8, dense": {"layers": ["fc1.weight", "fc2.weight"], "rank": 8, "density": 1.0},
    "LSG r=8, density 0.5": {"layers": ["fc1.weight", "fc2.weight"], "rank": 8, "density": 0.5},
    "LSG r=8, random subspace": {"layers": ["fc1.weight", "fc2.weight"], "rank": 8, "density": 1.0,
                                 "subspace": "random", "mask": "random"},
}


class WideMLP(nn.Module):
    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def train(train_set, test_set, lsg, args, epsilon: float, seed: int):
    torch.manual_seed(seed)
    net = WideMLP()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    extra = {"lsg": lsg} if lsg else {}
    model, opt, loader = dpcompile.make_private(net, opt, loader, target_epsilon=epsilon, target_delta=1e-5,
                                                epochs=args.epochs, max_grad_norm=args.max_grad_norm,
                                                insecure_seed=seed, **extra)  # paired comparison runs
    times = []
    for _ in range(args.epochs):
        for x, y in loader:
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
    with torch.no_grad():
        x, y = test_set.tensors
        acc = float((net(x).argmax(1) == y).float().mean())
    return acc, statistics.median(times[5:]), dpcompile.privacy_spent(net, 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args()
    train_set, test_set = data()
    print(f"digits: {len(train_set)} train / {len(test_set)} test; WideMLP "
          f"{sum(p.numel() for p in WideMLP().parameters())} parameters; {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr}, R {args.max_grad_norm}, δ=1e-5, {args.seeds} seeds")
    print("| ε | method | noised coordinates | test accuracy (mean ± sd) | ms/step | ε spent |")
    print("|---|---|---|---|---|---|")
    for epsilon in args.epsilon:
        for name, lsg in METHODS.items():
            runs = [train(train_set, test_set, lsg, args, epsilon, seed) for seed in range(args.seeds)]
            accs = [r[0] for r in runs]
            torch._dynamo.reset()
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {epsilon:g} | {name} | {noised_coordinates(lsg)} | {100 * statistics.mean(accs):.1f} ± "
                  f"{100 * sd:.1f} % | {1e3 * statistics.median(r[1] for r in runs):.2f} | {runs[0][2]:.2f} |",
                  flush=True)


def noised_coordinates(lsg) -> int:
    net = WideMLP()
    total = 0
    for name, p in net.named_parameters():
        if lsg and name in lsg["layers"]:
            n, m = p.shape
            total += int(-(-lsg["density"] * lsg["rank"] * (n + m) // 1))
        else:
            total += p.numel()
    return total


if __name__ == "__main__":
    main()
