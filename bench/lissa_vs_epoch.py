"""LiSSA's cost in plain training epochs: one epoch of Train.py's trainer (the report's recipe: SGD, batch
8, all 60,000 MNIST images, no gradient norms recorded) and LiSSA at the report's settings (r = 5,
t = 1,000, batch 8, damp 0.01, scale 100; all 109,386 parameters; 10 test images), in the same
process, 1 torch thread, alternated ``--repeats`` times. Prints each pair and the median ratio.

    python bench/lissa_vs_epoch.py [--repeats 5] [--root PATH]   # PATH: another tree (a git worktree)
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import torch
    torch.set_num_threads(1)
    import utils_if
    import utils_option as opt
    from mnist_test import training
    from mnist_test.datasets import load_mnist
    settings = opt.load_settings()
    mnist = settings.mnist if hasattr(settings, "mnist") else opt.typed(settings).mnist
    cpu = torch.device("cpu")
    train = load_mnist(opt.data_path(mnist.data_dir), train=True)
    test = load_mnist(opt.data_path(mnist.data_dir), train=False)
    recipe = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 8, "epoch": 1, "seed": 0}
    new_api = "seed" not in inspect.signature(training.train_model).parameters

    def epoch():
        if new_api:
            return training.train_model(train, recipe, cpu, show_progress=False)[0]
        return training.train_model(train, recipe, 0, cpu, show_progress=False)[0]

    m2 = mnist.method2
    solver_cfg = opt.solver_run(m2, 0)[1] if hasattr(opt, "solver_run") else opt.solver_settings(m2, 0)
    solver_cfg.progress = None
    model = epoch()
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model), l2_reg=m2.l2_reg)
    grads = problem.sample_grads(test.images[:10], test.labels[:10])
    pairs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        epoch()
        t1 = time.perf_counter()
        utils_if.inverse_hvp(problem, grads, train.images, train.labels, solver_cfg, show_progress=False)
        t2 = time.perf_counter()
        pairs.append((t1 - t0, t2 - t1))
        print(f"epoch {t1 - t0:.2f} s, LiSSA {t2 - t1:.2f} s, ratio {(t2 - t1) / (t1 - t0):.2f}", flush=True)
    print(f"median: epoch {statistics.median(p[0] for p in pairs):.2f} s, LiSSA {statistics.median(p[1] for p in pairs):.2f} s, "
          f"LiSSA / epoch {statistics.median(p[1] / p[0] for p in pairs):.2f} (1 thread, {args.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
