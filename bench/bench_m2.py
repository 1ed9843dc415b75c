"""Benchmark: m2_Test.py at the report's settings (10 test images, LiSSA r=5, t=1000, HVP batch 8,
damp 0.01, all 60,000 training points, the full 109,386-parameter MLP) in a child process:
wall time and peak memory; s_test and sweep times from its output; and, for the ratio, a
one-point-at-a-time per-sample gradient loop on a 2,000-point slice.

Targets (issue 3): <= 20 s wall, <= 1.5 GB peak memory, sweep <= 2 s.
Needs the report model: run bench/bench_train.py first (same --output_dir), or pass --train.
Usage: python bench/bench_m2.py [--output_dir DIR] [--train]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import Test, Train, common  # noqa: E402


def per_sample_loop_seconds(settings: dict, s_test: torch.Tensor, n: int = 2000) -> float:
    """The naive way: one autograd call per training point, then a dot with s_test."""
    model, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    train = common.load_train_data(settings, torch.device("cpu"), log=lambda *_: None)
    params = list(model.parameters())
    start = time.perf_counter()
    for i in range(n):
        loss = utils_if.nll_sample_loss(model(train.images[i:i + 1]), train.labels[i:i + 1]).sum()
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        _ = s_test @ g
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "bench_train"))
    parser.add_argument("--train", action="store_true", help="train the report model first")
    args = parser.parse_args()
    settings = opt.load_settings(profile="report", overrides={"output_dir": args.output_dir})
    if args.train or not os.path.isfile(common.model_file(settings, "staTest0")):
        Train.main(settings)
    Test.main(settings)
    settings_path = os.path.join(args.output_dir, "bench_m2_settings.json")
    with open(settings_path, "w") as f:
        json.dump({k: v for k, v in settings.items() if k != "settings_file"}, f)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_test", "m2_Test.py"),
                           "-opt", settings_path], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    record = opt.read_json(common.m2_file(settings), "m2_Test.py")
    info = record["meta"]["solver_info"]
    s_test = torch.randn(10, 109386)
    loop_s = per_sample_loop_seconds(settings, s_test)
    loop_full = loop_s * 30
    print("\nm2_Test.py, report settings (10 test images, r=5, t=1000, b=8, 60,000 points):")
    print(f"  wall time (child process, incl. start-up and data) {wall:6.1f} s   (target <= 20 s)")
    print(f"  peak memory (max RSS)                              {peak_gb:6.2f} GB  (target <= 1.5 GB)")
    print(f"  test gradients {info['seconds_test_grads']:.2f} s, s_test (LiSSA) "
          f"{info['seconds_s_test']:.2f} s, sweep {info['seconds_sweep']:.2f} s (target <= 2 s)")
    print(f"  one-point-at-a-time loop: {loop_s:.2f} s for 2,000 points -> {loop_full:.0f} s for "
          f"60,000; the sweep is {loop_full / info['seconds_sweep']:.0f}x faster")


if __name__ == "__main__":
    main()
