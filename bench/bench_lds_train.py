"""Benchmark: the grouped trainer on ldsTest's subset models (issue 11), alone on the machine.

Trains `--repeats` groups of `--group` models, each on `--fraction` of the first `--train_subset`
training images for `--epochs` epochs at batch 8 (the report's recipe), and prints the median
time per group, per model and per model-step, with the threads used, and the time this gives for
the default study (M subsets x seeds models) and for one full-size 5,000-image model.

Usage: python bench/bench_lds_train.py [--group 16] [--epochs 40] [--repeats 3] [--threads 0]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mnist_test.datasets import load_mnist  # noqa: E402
from mnist_test.lds import subset_mask  # noqa: E402
from mnist_test.training import train_group  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train_subset", type=int, default=5000)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--models", type=int, default=200, help="models in the study (100 subsets x 2 seeds)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    data = load_mnist(root, train=True).subset(args.train_subset)
    cfg = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 8, "epoch": args.epochs}
    times = []
    for repeat in range(args.repeats):
        jobs = [{"seed": 100 * repeat + g, "keep": subset_mask(len(data), args.fraction, 0, 100 * repeat + g).nonzero()[0].tolist()}
                for g in range(args.group)]
        start = time.perf_counter()
        train_group(data, jobs, cfg, torch.device("cpu"), show_progress=False)
        times.append(time.perf_counter() - start)
    per_group = statistics.median(times)
    n_sub = int(round(args.fraction * len(data)))
    steps = args.epochs * ((n_sub + 7) // 8)
    per_step_ms = per_group / (args.group * steps) * 1e3
    full_steps = args.epochs * ((len(data) + 7) // 8)
    print(f"threads {torch.get_num_threads()}, group {args.group}, {n_sub} images, {args.epochs} epochs "
          f"({steps} steps per model); groups timed: {', '.join(f'{t:.1f}' for t in times)} s")
    print(f"median {per_group:.1f} s per group = {per_group / args.group:.2f} s per model = "
          f"{per_step_ms:.3f} ms per model-step")
    print(f"the study's {args.models} subset models: ~{args.models * per_group / args.group / 60:.1f} min; "
          f"one {len(data)}-image model ({full_steps} steps): ~{full_steps * per_step_ms / 1e3:.2f} s in a group")


if __name__ == "__main__":
    main()
