"""How linear is expTest's fine-tuning run in the data weights? The measured reason behind Method 3's
predicted-vs-measured agreement on FFDNet.

Method 3 (m3_Test) is the exact derivative at w = 1; expTest removes k patches at once (w = 0). This
script takes the study's files (settings/ffdnet_explain.json after expTest), one seed's control run,
and for a set of k patches (the top k of m3_window for a point, and k random ones) scales their
weights to 1 - alpha for alpha in --alphas, fine-tunes with explain.finetune (the study's code), and
prints, per point, the measured change of the window loss against the first-order prediction
alpha * sum(influence) / n. Where measured / predicted stays 1 as alpha grows, the run is linear in
the weights and Method 3 predicts removals; where it is 1 only for small alpha, the derivative is
right and the removal is too large a step; where it is off even for small alpha, the derivative is
lost in float32 rounding (the run's own noise floor, printed as the change of a run made with
alpha = 0, i.e. the control again).

Usage: python bench/ffdnet_m3_linearity.py [-opt settings/ffdnet_explain.json] [--k 500] [--seed 0]
       [--point 0] [--alphas 0.001 0.01 0.1 1]
"""
import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, explain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/ffdnet_explain.json"))
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--point", type=int, default=0, help="which target builds the top-k list")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = opt.load_settings(args.opt)
    cfg = settings.ffdnet
    cpu = torch.device("cpu")
    targets = explain.targets(settings, lambda _: None)
    base, _ = common.load_model(settings, cpu)
    noisy, clean, sigma, _ = attribution.training_triples(settings, cpu)
    n = len(clean)
    influence = explain.method3_influence(settings, targets, n)
    tests = attribution.model_order_pairs(settings, list(dict.fromkeys(t["image"] for t in targets)))
    window, sigma01 = cfg.method2.window, cfg.test.noise_level_img / 255.0
    ft = cfg.explain.finetune

    def window_losses(weights):
        run = explain.finetune_run(ft, n, args.seed, weights)
        model = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
        return explain.evaluate(model, tests, targets, window, sigma01)["window_loss"]

    control = window_losses(None)
    owner = targets[args.point]["label"]
    sets = {f"top {args.k} of m3_window for {owner}": np.argsort(-influence[(args.seed, owner)], kind="stable")[:args.k],
            f"{args.k} random": explain.random_patches(n, args.k, args.seed, 0)}
    print(f"threads {torch.get_num_threads()}, {n} patches, seed {args.seed}; change of each window loss when the "
          f"chosen patches' weights go from 1 to 1 - alpha: measured / predicted (predicted = alpha * sum(influence) / n)")
    for name, chosen in sets.items():
        print(f"\n{name}")
        print("| alpha | " + " | ".join(f"{t['label']}: measured, ratio" for t in targets) + " |")
        print("|---|" + "---|" * len(targets))
        for alpha in args.alphas:
            weights = torch.ones(n)
            weights[torch.as_tensor(chosen, dtype=torch.long)] = 1 - alpha
            moved = window_losses(weights)
            cells = []
            for t in targets:
                predicted = alpha * influence[(args.seed, t["label"])][chosen].sum() / n
                measured = moved[t["label"]] - control[t["label"]]
                cells.append(f"{measured:.3g}, {measured / predicted:.3g}" if predicted else f"{measured:.3g}, –")
            print(f"| {alpha:g} | " + " | ".join(cells) + " |")
    again = window_losses(None)
    print(f"\nnoise floor (the control made twice): "
          f"{max(abs(again[t['label']] - control[t['label']]) for t in targets):.3g}")


if __name__ == "__main__":
    main()
