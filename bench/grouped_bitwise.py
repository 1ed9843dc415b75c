"""The grouped trainer against another commit's, bit for bit: the same jobs (ReLU and softplus, logit
scale 1 and 0.3, data weights, a linear schedule; 600 real MNIST images, 3 epochs, 1 thread) trained
by this tree's ``train_group`` and by a git worktree of REV's, every parameter compared with
``torch.equal``. Issue 35 moved the grouped trainer's forward and backward into influence/mlp.py.

    python bench/grouped_bitwise.py --against 3d82b5f
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from refactor_reference import ROOT, worktree  # noqa: E402


def train_here(root: str, out: str) -> None:
    """Train the jobs with the train_group of the tree at ``root`` and save the states to ``out``."""
    sys.path.insert(0, root)
    import torch
    from mnist_test import training
    from mnist_test.datasets import load_mnist
    torch.set_num_threads(1)
    data = load_mnist(os.environ.get("TOOLKIT_DATA_DIR", os.path.join(root, "data")), train=True).subset(600)
    results = {}
    for activation in ("relu", "softplus"):
        for scale in (1.0, 0.3):
            cfg = {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32, "epoch": 3,
                   "activation": activation, "logit_scale": scale, "lr_schedule": "linear"}
            g = torch.Generator().manual_seed(1)
            jobs = [{"seed": s, "weights": (torch.rand(600, generator=g) > 0.05).float()} for s in (0, 1, 2)]
            jobs += [{"seed": 3}, {"seed": 4}]
            results[f"{activation}, logit scale {scale:g}"] = training.train_group(data, jobs, cfg, torch.device("cpu"),
                                                                                   show_progress=False)
    torch.save(results, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="3d82b5f")
    parser.add_argument("--train", nargs=2, help=argparse.SUPPRESS)  # ROOT OUT: train with that tree
    args = parser.parse_args()
    if args.train:
        train_here(*args.train)
        return 0
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        base = worktree(args.against, os.path.join(tmp, "baseline"))
        try:
            for root, name in ((base, "before.pt"), (ROOT, "now.pt")):
                subprocess.run([sys.executable, os.path.abspath(__file__), "--train", root, os.path.join(tmp, name)],
                               check=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], check=False)
        before, now = torch.load(os.path.join(tmp, "before.pt")), torch.load(os.path.join(tmp, "now.pt"))
    same = True
    for case in before:
        equal = all(torch.equal(a[n], b[n]) for a, b in zip(before[case], now[case]) for n in a)
        worst = max((a[n] - b[n]).abs().max().item() for a, b in zip(before[case], now[case]) for n in a)
        print(f"{case}: {len(before[case])} models, bitwise equal: {equal} (largest difference {worst:.3g})")
        same &= equal
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
