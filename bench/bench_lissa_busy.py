"""Benchmark (issue 14, item 1): LiSSA at the report's settings (10 test images, r = 5, t = 1000,
HVP batch 8, damp 0.01, scale 100, the full 109,386-parameter MLP), alone and beside one busy
torch process, for the batched step (all r x k products in one vmapped forward-over-reverse
call) and the former one (a double backward per repeat).

The busy neighbour is another python process multiplying 1,000 x 1,000 matrices with torch's
default thread count (what a second script of this project, or a notebook, does). Medians of
--repeats runs of the s_test stage; the thread count of this process is --threads (the
project's default setting is 1).
Targets: batched, alone <= 8 s; beside the busy process <= 3x its time alone.
Usage: python bench/bench_lissa_busy.py [--threads 1] [--repeats 3] [--output_dir DIR]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import Train, common  # noqa: E402

BUSY = "import torch\na = torch.randn(1000, 1000)\nwhile True:\n    a @ a\n"


def lissa_seconds(problem, grads, train, cfg, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        utils_if.lissa(problem, grads, train.images, train.labels, cfg, show_progress=False)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "bench_train"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = opt.load_settings(profile="report", overrides={"output_dir": args.output_dir})
    if not os.path.isfile(common.model_file(settings, "staTest0")):
        Train.main(settings)
    model, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    train = common.load_train_data(settings, torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    m2 = common.mnist_cfg(settings)["method2"]
    cfg = opt.solver_settings(m2, 0)
    cfg.progress = None
    grads_problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model),
                                              l2_reg=m2["l2_reg"])
    grads = grads_problem.sample_grads(test.images[:10], test.labels[:10])
    results = {}
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            if busy:
                time.sleep(2)  # let it start
            for batched in (True, False):
                problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                                    utils_if.select_parameters(model), l2_reg=m2["l2_reg"],
                                                    batched_hvp=batched)
                if not batched:  # the former step: hvp_per_batch's loop, one double backward per repeat
                    problem.batched_hvp = True
                    problem.hvp_per_batch = lambda xs, ys, v, out=None, p=problem: torch.stack(
                        [p.hvp(xs[r], ys[r], v[r]) for r in range(len(xs))], out=out)
                results[(batched, busy)] = lissa_seconds(problem, grads, train, cfg, args.repeats)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(f"LiSSA, report settings (10 test images, r={cfg.repeats}, t={cfg.recursion_depth}, "
          f"b={cfg.hvp_batch_size}), {args.threads} thread(s), median of {args.repeats}:")
    for batched in (True, False):
        alone = statistics.median(results[(batched, False)])
        busy = statistics.median(results[(batched, True)])
        print(f"  {'batched (vmap)' if batched else 'former (loop) '}: alone {alone:6.1f} s, beside a busy process "
              f"{busy:6.1f} s ({busy / alone:.1f}x)   runs {[round(s, 1) for s in results[(batched, False)]]} / "
              f"{[round(s, 1) for s in results[(batched, True)]]}")
    print("targets: batched alone <= 8 s; beside the busy process <= 3x alone")


if __name__ == "__main__":
    main()
