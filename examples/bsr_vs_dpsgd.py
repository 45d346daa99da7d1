"""DP-SGD (Poisson sampling, amplified) vs BSR correlated noise (cyclic batches) at equal (ε, δ).

Same task and model as examples/train_digits.py (scikit-learn digits, small GroupNorm CNN,
SGD with momentum 0.9). For each ε it reports

* the noise multiplier σ each method needs, and for BSR the sensitivity sens(C) of its
  factorization under the cyclic schema (b batches per epoch, k = epochs participations);
* the expected error of the factorization: the RMS over steps of the noise std that the
  momentum-SGD trajectory sees, σ·‖A C⁻¹‖_F/√n per unit R (A: momentum workload; C = I for
  DP-SGD), and its worst step σ·max_t‖(A C⁻¹)_t‖;
* the test accuracy (mean ± std over seeds) after training.

The comparison is not between equals in every respect: DP-SGD here gets privacy
amplification by Poisson sampling (its accountant), BSR in dpcompile does not (its
guarantee needs only b-min-separation and the number of participations). "BSR p=1" is
cyclic DP-SGD without amplification, to show what the correlation itself buys.

    python examples/bsr_vs_dpsgd.py [--epsilons 2 8] [--seeds 2] [--bands 1 4 12] [--optimized]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dpcompile
from dpcompile.privacy import bsr
from train_digits import DigitsCNN, accuracy, data


def train(train_set, method: dict, epsilon: float, args, seed: int):
    torch._dynamo.reset()  # each run compiles afresh (and stays under dynamo's recompile limit)
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(train_set, batch_size=args.batch_size)
    private = dict(target_epsilon=epsilon, target_delta=args.delta, epochs=args.epochs,
                   max_grad_norm=args.max_grad_norm, insecure_seed=seed,  # paired runs: a comparison, not a release
                   **method["options"])
    model, opt, loader = dpcompile.make_private(net, opt, loader, **private)
    state = dpcompile.privacy_state(net)
    planned = args.epochs * len(loader)
    while state.steps < planned:
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return net, state


def noise_error(state, steps: int, momentum: float, min_separation: int) -> tuple[float, float, float]:
    """(sens, rmse, max) of the run's factorization, in units of R (σ included)."""
    coefficients = state.bsr.coefficients if state.bsr is not None else (1.0,)
    err = bsr.factorization_error(coefficients, steps, momentum, 0.0, min_separation)
    scale = state.options.noise_multiplier / err["sensitivity"]  # σ / sens: the Gaussian multiplier μ
    return err["sensitivity"], scale * err["rmse"], scale * err["max"]


def methods(args, train_size: int) -> list[dict]:
    out = [{"name": "DP-SGD (Poisson, amplified)", "options": {}}]
    for p in args.bands:
        out.append({"name": f"BSR p={p} (cyclic)", "options": {"noise_mechanism": "bsr", "bands": p}})
    if args.optimized:
        b = -(-train_size // args.batch_size)
        p = max(args.bands)
        coefficients = bsr.optimize_banded_toeplitz(p, args.epochs * b, args.momentum, 0.0, b)
        out.append({"name": f"optimized banded Toeplitz p={p}",
                    "options": {"noise_mechanism": "bsr", "bsr_coefficients": list(coefficients)}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bands", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--optimized", action="store_true", help="also a numerically optimized banded Toeplitz C")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    train_set, test_set = data()
    n = len(train_set)
    print(f"digits: {n} train / {len(test_set)} test, {args.epochs} epochs, batch {args.batch_size}, "
          f"SGD lr={args.lr} momentum={args.momentum}, R={args.max_grad_norm}, delta={args.delta:g}, "
          f"{args.seeds} seed(s); {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU x{torch.get_num_threads()}")
    rows, compared = [], methods(args, n)
    for epsilon in args.epsilons:
        for method in compared:
            accs, start = [], time.time()
            for seed in range(args.seeds):
                net, state = train(train_set, method, epsilon, args, seed)
                accs.append(accuracy(net, test_set))
            eps = dpcompile.privacy_spent(net, args.delta)
            if state.bsr is None:
                b = max(1, round(n / args.batch_size))
                sens, rmse, worst = noise_error(state, state.steps, args.momentum, b)
                sens_text = "– (amplified)"
            else:
                sens, rmse, worst = noise_error(state, state.steps, args.momentum, state.options.bsr_min_separation)
                sens_text = f"{sens:.2f}"
            mean = statistics.mean(accs)
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(f"| {epsilon:g} | {method['name']} | {state.options.noise_multiplier:.2f} | {sens_text} | "
                        f"{rmse:.1f} | {worst:.1f} | {mean:.3f} ± {spread:.3f} | {eps:.3f} | "
                        f"{(time.time() - start) / args.seeds:.0f} |")
            print(rows[-1], flush=True)
    print("\n| ε | method | σ | sens(C) | noise RMSE | noise max | test acc | ε spent | s/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
