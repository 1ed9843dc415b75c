"""Benchmark: influence of every training image on many test images with the fast solvers
(issue 12: all 10,000 x 60,000 with top-k lists in <= 5 minutes).

Uses m2_Test's streaming path on the report model (trained first if missing): the factors
(written to a temporary factor file, then read back as m2_Test does), then `--test_num` test
images x all 60,000 training images in chunks of `--chunk`, top-100 lists per test image, and the
time extrapolated to all 10,000 test images. kfac_factored scores every pair in closed form
(rank one); ekfac/kfac go through (k, p) preconditioned test gradients and a sweep.
Usage: python bench/bench_all_pairs.py [--test_num 1000] [--solver kfac_factored] [--chunk 1000] [--threads 0]
"""
import argparse
import shutil
import os
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
    parser.add_argument("--test_num", type=int, default=1000)
    parser.add_argument("--solver", default="kfac_factored", choices=["kfac_factored", "ekfac", "kfac", "identity"])
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default (all cores)")
    args = parser.parse_args()
    settings = opt.load_settings(profile="report", overrides={"threads": args.threads})
    opt.apply_threads(settings) if args.threads else None
    mode = settings.mnist.method2.mode
    if not os.path.isfile(common.model_file(settings, mode)):
        Train.main(settings)
    device = torch.device("cpu")
    model, _ = common.load_model(settings, mode, device)
    train = common.load_train_data(settings, device, lambda *_: None)
    test = common.load_test_data(settings, device, lambda *_: None)
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model),
                                        l2_reg=settings.mnist.weight_decay)
    workdir = tempfile.mkdtemp()
    cfg = utils_if.solver_config(args.solver, seed=0, factor_file=os.path.join(workdir, "factors.pt"))
    start = time.perf_counter()
    if args.solver != "identity":
        utils_if.kronecker_curvature(problem, train.images, train.labels, cfg)
    factors_s = time.perf_counter() - start
    x, y = test.images[:args.test_num], test.labels[:args.test_num]
    start = time.perf_counter()
    for _, chunk in utils_if.influence_chunks(problem, x, y, train.images, train.labels, cfg, args.chunk,
                                              log=lambda _: None):
        torch.topk(chunk, 100, dim=1)
        torch.topk(chunk, 100, dim=1, largest=False)
    pairs_s = time.perf_counter() - start
    shutil.rmtree(workdir)
    per_test = pairs_s / args.test_num
    print(f"threads {torch.get_num_threads()}, solver {args.solver}: factors {factors_s:.1f} s; {args.test_num} test "
          f"x {len(train)} training images with top-100 lists in {pairs_s:.1f} s ({per_test * 1e3:.1f} ms per test "
          f"image) -> all 10,000 test images: ~{per_test * 10000 / 60:.1f} min")


if __name__ == "__main__":
    main()
