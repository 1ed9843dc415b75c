"""Benchmark: Train.py at the report's settings (20 epochs, batch 8, all 60,000 images) in each
gradient mode: test accuracy, wall time, and the gradient-norm JSON write and read times.

Targets (issue 2): accuracy >= 97%, training <= 120 s, JSON write and read <= 30 s each.
Usage: python bench/bench_train.py [--epochs 20] [--modes batch per_sample]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import Train, common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["batch", "per_sample"])
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "bench_train"))
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        settings = opt.load_settings(profile="report", overrides={
            "output_dir": args.output_dir, "mnist": {"epoch": args.epochs,
                                                     "method1": {"grad_mode": mode}}})
        result = Train.main(settings)
        start = time.perf_counter()
        arrays, _meta = common.load_grad_norms(settings)
        read_s = time.perf_counter() - start
        size_mb = os.path.getsize(result["grad_norm"]) / 1e6
        rows.append((mode, result["test_accuracy"], result["train_seconds"],
                     result["write_seconds"], read_s, size_mb))
    print(f"\n{'mode':<11} {'accuracy':>8} {'train s':>8} {'write s':>8} {'read s':>7} {'MB':>6}")
    for mode, acc, train_s, write_s, read_s, size_mb in rows:
        print(f"{mode:<11} {acc:>8.4f} {train_s:>8.1f} {write_s:>8.1f} {read_s:>7.1f} {size_mb:>6.0f}")


if __name__ == "__main__":
    main()
