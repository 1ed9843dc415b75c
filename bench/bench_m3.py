"""Benchmark: Method 3's replay (utils_if.SgdReplay) against the training run it differentiates.

Trains the report's recipe (SGD lr 0.003, momentum 0.9, wd 0.001, batch 8) on the first
--train_subset images for --epochs epochs with train_model (Train.py's trainer), then replays that
run forward (keeping checkpoints) and walks it back for --tests test images at once (one walk per
--chunk), and prints: training seconds, replay forward and backward seconds, the ratio replay /
training, milliseconds per step, and the process's peak resident memory (VmHWM) before and after
the replay. --epochs fewer than the study's: the per-step figures extrapolate to the full run (the
cost per step does not depend on the epoch). Run it alone on the machine.

Issue 19's targets: 5,000 images x 40 epochs, 100 test images: replay <= 3 x training;
60,000 x 20 (the report), 10 test images: <= 15 min, <= 2 GB.

Usage: python bench/bench_m3.py [--train_subset 5000] [--epochs 40] [--tests 100] [--threads 1]
       [--activation relu|softplus] [--full_epochs 40]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--full_epochs", type=int, default=0, help="extrapolate to this many epochs (0 = --epochs)")
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    settings = opt.load_settings()
    data = common.load_train_data(opt.with_values(settings, {"mnist": {"train_subset": args.train_subset}}),
                                  cpu, lambda *_: None)
    test = common.load_test_data(settings, cpu, lambda *_: None)
    cfg = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 8,
           "epoch": args.epochs, "activation": args.activation}
    start = time.perf_counter()
    model, _ = training.train_model(data, {**cfg, "seed": 0}, cpu, show_progress=False)
    train_s = time.perf_counter() - start
    rss_before = opt.peak_rss_mb()
    run = training.sgd_run({**cfg, "seed": 0}, len(data), cpu)
    replay = utils_if.SgdReplay(training.new_model(0, cpu, args.activation), utils_if.nll_sample_loss, run,
                                data.images, data.labels)
    start = time.perf_counter()
    final = replay.forward()
    forward_s = time.perf_counter() - start
    exact = all(torch.equal(final[n], p.detach()) for n, p in model.named_parameters())
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, replay.names)
    grads = problem.sample_grads(test.images[:args.tests], test.labels[:args.tests])
    start = time.perf_counter()
    for s in range(0, args.tests, args.chunk):
        replay.metagradient(grads[s:s + args.chunk])
    backward_s = time.perf_counter() - start
    steps, scale = run.num_steps, (args.full_epochs or args.epochs) / args.epochs
    replay_s = forward_s + backward_s
    print(f"threads {torch.get_num_threads()}, {len(data)} images x {args.epochs} epochs = {steps} steps, "
          f"{args.tests} test images ({args.chunk} per walk), {args.activation}, path {replay.info['path']}, "
          f"checkpoint every {replay.interval} steps; replay reproduces training bit for bit: {exact}")
    print(f"training {train_s:.1f} s ({train_s / steps * 1e3:.2f} ms/step); replay forward {forward_s:.1f} s "
          f"({forward_s / steps * 1e3:.2f} ms/step), backward {backward_s:.1f} s ({backward_s / steps * 1e3:.2f} "
          f"ms/step); replay / training = {replay_s / train_s:.2f}")
    if scale != 1:
        print(f"extrapolated to {args.full_epochs} epochs: training {train_s * scale:.0f} s, replay {replay_s * scale:.0f} s "
              f"= {replay_s * scale / 60:.1f} min")
    print(f"peak resident memory: {rss_before:.0f} MB after training, {opt.peak_rss_mb():.0f} MB after the replay; "
          f"replay state {(2 * len(replay.checkpoints) + replay.interval + 2 * min(args.tests, args.chunk)) * replay.num_params * 4 / 2**20:.0f} MB "
          f"(checkpoints, one segment, the adjoint)")


if __name__ == "__main__":
    main()
