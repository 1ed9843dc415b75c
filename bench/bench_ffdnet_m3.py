"""Benchmark: Method 3 for FFDNet (utils_if.AdamReplay) against the fine-tuning run it differentiates.

Takes the model and the fine-tuning schedule of the settings (default settings/ffdnet_explain.json:
the quick-profile gray FFDNet, 40,000 patches of 32 x 32 from Train400, Adam lr 1e-4, batch 32,
625 steps;
a freshly initialised model of the same shape when FFDNet_Train has not made it, which costs the
same), runs the first --steps steps of seed 0's fine-tuning with explain.finetune, replays them
(forward with checkpoints) and walks them back for 1 target and for all of the image's targets
(the whole-image loss and one window per ffdnet.attribution.points: m3_Test's set), and prints the
seconds per step of each, the ratio replay / fine-tuning, the replay state and the peak resident
memory. The cost per step does not depend on the step, so --steps < 625 extrapolates.

Issue 20's target: the replay of one fine-tuning run for all targets <= 3 x that fine-tuning run.

Usage: python bench/bench_ffdnet_m3.py [-opt settings/ffdnet_explain.json] [--steps 40] [--threads 2]
"""
import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, explain  # noqa: E402
from ffdnet_test.model import PackedInput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/ffdnet_explain.json"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = opt.load_settings(args.opt)
    cfg = settings.ffdnet
    cpu = torch.device("cpu")
    try:
        base, source = common.load_model(settings, cpu)
    except opt.MissingFileError:
        base, source = common.new_model(settings, cpu).eval(), "a fresh model (FFDNet_Train has not run)"
    noisy, clean, sigma, _ = attribution.training_triples(settings, cpu)
    full = explain.finetune_run(cfg.explain.finetune, len(clean), seed=0)
    run = utils_if.AdamRun(full.learning_rate, full.orders[:args.steps])
    start = time.perf_counter()
    tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
    finetune_s = time.perf_counter() - start
    replay = utils_if.AdamReplay(copy.deepcopy(base).eval(), utils_if.mse_sample_loss, run, (noisy, sigma), clean)
    start = time.perf_counter()
    final = replay.forward()
    forward_s = time.perf_counter() - start
    error = utils_if.replay_error(final, tuned)
    problem = utils_if.InfluenceProblem(PackedInput(tuned).eval(), utils_if.mse_sample_loss,
                                        ["net." + n for n in replay.names])
    image = explain.targets(settings, lambda _: None)[0]["image"]
    grads, _, _ = attribution.target_grads(settings, problem, image, cfg.attribution.points, cpu)
    print(f"threads {torch.get_num_threads()}, model {source}, {replay.num_params:,} parameters, {len(clean)} patches, "
          f"{args.steps} of {full.num_steps} fine-tuning steps (batch {run.orders.shape[1]}); replay vs fine-tuning "
          f"weights: relative error {error:.2g}")
    per_step = finetune_s / args.steps
    print(f"fine-tuning {finetune_s:.1f} s ({per_step * 1e3:.0f} ms/step); replay forward {forward_s:.1f} s "
          f"({forward_s / finetune_s:.2f}x)")
    for k in sorted({1, len(grads)}):
        start = time.perf_counter()
        replay.metagradient(grads[:k])
        backward_s = time.perf_counter() - start
        total = forward_s + backward_s
        print(f"{k} target(s): backward {backward_s:.1f} s ({backward_s / args.steps * 1e3:.0f} ms/step); replay / "
              f"fine-tuning = {total / finetune_s:.2f} (target <= 3); the full run of {full.num_steps} steps: "
              f"{total / args.steps * full.num_steps / 60:.1f} min; replay state "
              f"{replay.state_floats(k) * 4 / 2**20:.0f} MB over these {args.steps} steps")
    print(f"peak resident memory {opt.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
