"""Private training demo: a small CNN on scikit-learn's handwritten digits (shipped inside the
package, no download), with dpcompile.make_private, then the ε spent and the test accuracy
next to the same model trained without privacy.

    python examples/train_digits.py [--epsilon 3] [--epochs 15]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import dpcompile

try:  # a progress bar when tqdm is installed (it comes with transformers)
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None


def epoch_bar(epochs: int, desc: str):
    """range(epochs), shown as a progress bar on stderr when tqdm is installed."""
    return tqdm(range(epochs), desc=desc, file=sys.stderr, leave=False) if tqdm else range(epochs)


def log_epoch(bar, epoch: int, net: nn.Module, delta: float) -> None:
    """ε spent after each epoch, on stderr (stdout keeps the summary)."""
    eps = dpcompile.privacy_spent(net, delta)
    line = f"epoch {epoch + 1}: eps = {eps:.3f} after {dpcompile.privacy_state(net).steps} steps"
    if tqdm is None:
        print(line, file=sys.stderr)
        return
    bar.set_postfix(eps=f"{eps:.3f}")
    tqdm.write(line, file=sys.stderr)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 16)  # BatchNorm would mix samples: dpcompile refuses it
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 32)
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


def data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def accuracy(model, dataset) -> float:
    with torch.no_grad():
        x, y = dataset.tensors
        return float((model(x).argmax(1) == y).float().mean())


def train(train_set, epochs, lr, batch_size, private: dict | None):
    torch.manual_seed(0)
    net = DigitsCNN()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    model = net
    if private is not None:
        model, opt, loader = dpcompile.make_private(net, opt, loader, **private)
    bar = epoch_bar(epochs, "private" if private is not None else "non-private")
    for epoch in bar:
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        if private is not None:
            log_epoch(bar, epoch, net, private["target_delta"])
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args()
    train_set, test_set = data()

    start = time.time()
    private = dict(target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
                   max_grad_norm=args.max_grad_norm)
    net = train(train_set, args.epochs, lr=0.5, batch_size=args.batch_size, private=private)
    state = dpcompile.privacy_state(net)
    private_seconds = time.time() - start
    eps = dpcompile.privacy_spent(net, args.delta)

    baseline = train(train_set, args.epochs, lr=0.05, batch_size=args.batch_size, private=None)

    print(f"digits: {len(train_set)} train / {len(test_set)} test images, {args.epochs} epochs, "
          f"expected batch {args.batch_size}, clip R={args.max_grad_norm}")
    print(f"noise multiplier sigma = {state.options.noise_multiplier:.3f} (calibrated for eps={args.epsilon})")
    print(f"private steps = {state.steps}, compiled regions = {len(state.compiled)}, {private_seconds:.1f}s")
    print(f"privacy spent: eps = {eps:.3f} at delta = {args.delta:g} (PLD accountant, Poisson sampling)")
    print(f"test accuracy: private {accuracy(net, test_set):.3f} | non-private {accuracy(baseline, test_set):.3f}")
    assert eps <= args.epsilon + 1e-9


if __name__ == "__main__":
    main()
