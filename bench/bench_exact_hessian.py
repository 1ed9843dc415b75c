"""Benchmark (issue 14, item 11): the exact solver's dense Hessian of the MLP's last layer (650
parameters) over all 60,000 training images, on the report model (trained first if missing).
Target: <= 10 s. Median of --repeats builds, with --threads torch threads.
Usage: python bench/bench_exact_hessian.py [--threads 1] [--repeats 3] [--output_dir DIR]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import Train, common  # noqa: E402


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
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model, ["main.4"]),
                                        l2_reg=settings.mnist.method2.l2_reg)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        hessian = problem.dense_hessian(train.images, train.labels)
        seconds.append(time.perf_counter() - start)
    eig = torch.linalg.eigvalsh(hessian.double())
    print(f"dense Hessian of the last layer ({problem.num_params} parameters) over {len(train)} images, "
          f"{args.threads} thread(s): median {statistics.median(seconds):.1f} s (runs {[round(s, 1) for s in seconds]}; "
          f"target <= 10 s); eigenvalues {eig[0].item():.3g} .. {eig[-1].item():.3g}")


if __name__ == "__main__":
    main()
