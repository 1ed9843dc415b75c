"""Benchmark (issue 14, item 1): LiSSA at the report's settings (10 test images, r = 5, t = 1000,
HVP batch 8, damp 0.01, scale 100, the full 109,386-parameter MLP), alone and beside one busy
torch process, with 1 torch thread (the project's default `threads: 1`) and with 2.

The busy neighbour is another python process multiplying 1,000 x 1,000 matrices with torch's
default thread count (what a second script of this project, or a notebook, does). Medians of
--repeats runs of the s_test stage.
Targets: alone <= 8 s; beside the busy process <= 3x the time alone.
Usage: python bench/bench_lissa_busy.py [--repeats 3] [--output_dir DIR]
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "bench_train"))
    args = parser.parse_args()
    settings = opt.load_settings(profile="report", overrides={"output_dir": args.output_dir})
    if not os.path.isfile(common.model_file(settings, "staTest0")):
        Train.main(settings)
    model, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    train = common.load_train_data(settings, torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    m2 = settings.mnist.method2
    _, cfg = opt.solver_run(m2, 0)
    cfg.progress = None
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model),
                                        l2_reg=m2.l2_reg)
    grads = problem.sample_grads(test.images[:10], test.labels[:10])
    results = {}
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            if busy:
                time.sleep(2)  # let it start
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[(threads, busy)] = lissa_seconds(problem, grads, train, cfg, args.repeats)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(f"LiSSA s_test, report settings (10 test images, r={cfg.repeats}, t={cfg.recursion_depth}, "
          f"b={cfg.hvp_batch_size}), median of {args.repeats}:")
    for threads in (1, 2):
        alone = statistics.median(results[(threads, False)])
        busy = statistics.median(results[(threads, True)])
        print(f"  {threads} thread(s): alone {alone:6.1f} s, beside a busy process {busy:6.1f} s ({busy / alone:.1f}x)"
              f"   runs {[round(s, 1) for s in results[(threads, False)]]} / {[round(s, 1) for s in results[(threads, True)]]}")
    print("targets: alone <= 8 s; beside the busy process <= 3x alone")


if __name__ == "__main__":
    main()
