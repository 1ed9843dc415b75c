"""How long is Method 3's replay of the denoiser's final window against the window's own training?

For a trained model with a final window (-opt, e.g. settings/ffdnet_attributable.json; trained first
when missing), times the window's training (a rerun from its saved start) and Method 3 through it
(the forward replay, checked against the trained model, then the walk back) for 1 target (the whole
image of the first test image) and for 5 targets vmapped (its whole image and the 4 pixel windows
of ffdnet.attribution.points). Medians of --repeats runs, 1 thread unless -set threads.

Usage: python3 bench/ffdnet_window_replay.py -opt settings/ffdnet_attributable.json [--repeats 3]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, explain, window  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/ffdnet_attributable.json"))
    parser.add_argument("-set", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = opt.load_settings(args.opt, assignments=args.set)
    threads = opt.apply_threads(settings)
    opt.run_stage(FFDNet_Train, [common.model_file(settings), common.window_start_file(settings)], settings)
    cfg = settings.ffdnet
    start = window.load_start(settings, torch.device("cpu"))
    noisy, clean, sigma, _ = attribution.training_triples(settings, torch.device("cpu"))
    image = attribution.image_names(settings, lambda _: None)[0]
    rows = []
    train = []
    for _ in range(args.repeats):
        with opt.Timer() as timer:
            window.rerun(start, noisy, clean, sigma, cfg, None)
        train.append(timer.seconds)
    seconds_train = statistics.median(train)
    trained, _ = common.load_model(settings, torch.device("cpu"))
    run = window.window_run(cfg, len(clean))
    for k in (1, 5):  # the first k targets of the image: its whole image, then the pixel windows
        forward, backward = [], []
        for _ in range(args.repeats):
            replay = explain.method3_replay(start, run, noisy, sigma, clean)
            _, _, seconds_forward = utils_if.forward_checked(replay, trained, cfg.method3.checkpoint_interval,
                                                             cfg.method3.replay_tolerance)
            grads, _ = window.target_gradients(settings, trained, replay.names, [image], torch.device("cpu"))
            with opt.Timer() as timer:
                replay.metagradient(grads[:k])
            forward.append(seconds_forward)
            backward.append(timer.seconds)
        total = statistics.median(forward) + statistics.median(backward)
        rows.append([k, f"{seconds_train:.1f}", f"{statistics.median(forward):.1f}",
                     f"{statistics.median(backward):.1f}", f"{total / seconds_train:.1f}x"])
    print(f"{common.run_tag(settings)}: window {window.window_run(cfg, len(clean)).num_steps} steps, {threads} thread(s), "
          f"medians of {args.repeats}")
    print(opt.markdown_table(["targets", "window training s", "replay forward s", "backward s",
                              "replay / training"], rows))


if __name__ == "__main__":
    main()
