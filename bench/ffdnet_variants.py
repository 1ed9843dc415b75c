"""Can the denoiser's fine-tuning be attributed? Method 3 per optimiser variant, scored by removals.

For each fine-tuning variant (Adam as expTest runs it; Adam with epsilon inside the square root;
SGD with momentum) of one base FFDNet (FFDNet_Train.py with the settings below, trained first if its
file is missing), on the first --patches training patches:
  lowers     the fine-tuning lowers the window losses of the 4 targets (ffdnet.attribution.points of
             the first test image, the squared error of the ffdnet.method2.window window): mean before /
             after
  S_hat      metasmoothness of the fine-tuning in its data weights (explain.metasmoothness: the check
             m3_Test runs, 1 + 2 x ffdnet.method3.smoothness_directions fine-tunings), with its interval
  Method 3   the replay's dF_t/dw_i (explain.method3_replay) for the 4 window losses
  removals   for each target, its top-k helpful patches by Method 3 (the removals Method 3 says raise
             its window loss most) and k random ones, for k in --ks, weighted 0 in the same run (same
             order): measured change of the target's window loss against the prediction
             -sum_{i removed} dF_t/dw_i. Pearson over all removal runs of the variant and per target, and measured /
             predicted for the top-k at the largest k per target (goal: Pearson >= 0.9 and every
             ratio within 2x, for a variant that still lowers the window losses)
  small step the top --ks[0] of each target weighted 1 - --alpha instead of 0: measured / predicted
             there says whether the derivative itself is right (about 1) and the full removal is too
             large a step for a first-order prediction, or whether it is off even for a small step
Prints a Markdown table; writes results/bench/ffdnet_variants_*.json (one row per variant, resumable).

Usage: python bench/ffdnet_variants.py [-opt settings/shared.json] [--patches 2000] [--train_epochs 3]
       [--ft_epochs 1] [--ks 25 50 100 200] [--variants adam,adam_er1e-6,sgd] [--alpha 0.05] [--threads 2]
       [--seed 1]  (the base model: measure a finding on two seeds before writing it)
"""
import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, explain  # noqa: E402
from ffdnet_test.model import PackedInput  # noqa: E402
from options.blocks import Finetune  # noqa: E402

# variant -> the fine-tuning's settings beside --ft_epochs and batch 32 (Adam: expTest's learning rate)
VARIANTS = {
    "adam": {"learning_rate": 1e-4},
    "adam_er1e-6": {"learning_rate": 1e-4, "eps_root": 1e-6},
    "adam_er1e-4": {"learning_rate": 1e-4, "eps_root": 1e-4},
    "sgd": {"learning_rate": 0.02, "optimizer": "sgd", "momentum": 0.9},
    "sgd_lr0.005": {"learning_rate": 0.005, "optimizer": "sgd", "momentum": 0.9},
}


def window_losses(model, tests, targets, window, sigma01) -> np.ndarray:
    result = explain.evaluate(model, tests, targets, window, sigma01)["window_loss"]
    return np.array([result[t["label"]] for t in targets])


def study(name: str, ft: Finetune, settings: dict, base, data, tests, targets, args) -> dict:
    cfg = settings.ffdnet
    noisy, clean, sigma = data
    n, window, sigma01 = len(clean), cfg.method2.window, cfg.test.noise_level_img / 255.0
    run = explain.finetune_run(ft, n, 0)
    with opt.Timer() as ft_timer:
        tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
    before, after = window_losses(base, tests, targets, window, sigma01), window_losses(tuned, tests, targets, window, sigma01)
    with opt.Timer() as check_timer:
        smooth = explain.metasmoothness(base, noisy, clean, sigma, ft, cfg.method3)
    replay = explain.method3_replay(base, run, noisy, sigma, clean)
    with opt.Timer() as replay_timer:
        _, error, _ = utils_if.forward_checked(replay, tuned, 0, 1e-4)
        problem = utils_if.InfluenceProblem(PackedInput(tuned).eval(), utils_if.mse_sample_loss,
                                            ["net." + name for name in replay.names])
        grads, _, _ = attribution.target_grads(settings, problem, targets[0]["image"], [t["point"] for t in targets],
                                               torch.device("cpu"))
        metagradient = replay.metagradient(grads[1:]).numpy()        # (4, n): dF_t/dw_i, the window losses
    rows, small = [], []
    for t, target in enumerate(targets):
        helpful = np.argsort(metagradient[t])                          # most negative dF/dw: removal raises F
        for k in args.ks:
            for kind, removed in (("top", helpful[:k]), ("random", explain.random_patches(n, k, 0, t))):
                moved = explain.finetune_run(ft, n, 0, explain.removal_weights(n, removed))
                model = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, moved)
                measured = float(window_losses(model, tests, [target], window, sigma01)[0] - after[t])
                rows.append({"target": target["label"], "k": k, "kind": kind, "measured": measured,
                             "predicted": float(-metagradient[t, removed].sum())})
        weights = torch.ones(n)
        weights[torch.as_tensor(helpful[:args.ks[0]].copy())] = 1.0 - args.alpha
        model = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, explain.finetune_run(ft, n, 0, weights))
        small.append(float(window_losses(model, tests, [target], window, sigma01)[0] - after[t])
                     / float(-args.alpha * metagradient[t, helpful[:args.ks[0]]].sum()))
    measured, predicted = np.array([r["measured"] for r in rows]), np.array([r["predicted"] for r in rows])
    per_target = [float(np.corrcoef([r["measured"] for r in rows if r["target"] == t["label"]],
                                    [r["predicted"] for r in rows if r["target"] == t["label"]])[0, 1]) for t in targets]
    largest = [r for r in rows if r["kind"] == "top" and r["k"] == max(args.ks)]
    return {"variant": name, "finetune": vars(ft), "steps": run.num_steps, "window_loss_before": before.tolist(),
            "window_loss_after": after.tolist(), "lowers": bool(after.mean() < before.mean()),
            "s_hat": smooth["s_hat"], "s_hat_interval": smooth["s_hat_interval"], "s_hat_each": smooth["s_hat_each"],
            "replay_relative_error": error, "pearson": float(np.corrcoef(measured, predicted)[0, 1]),
            "pearson_per_target": per_target,
            "ratio_at_largest_k": [r["measured"] / r["predicted"] for r in largest],
            "ratio_small_step": small, "removals": rows,
            "seconds_finetune": round(ft_timer.seconds, 2), "seconds_check": round(check_timer.seconds, 2),
            "seconds_replay": round(replay_timer.seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/shared.json"))
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--train_epochs", type=int, default=3)
    parser.add_argument("--ft_epochs", type=float, default=1.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--variants", default="adam,adam_er1e-6,sgd")
    parser.add_argument("--alpha", type=float, default=0.05, help="the small step: weights 1 - alpha")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="ffdnet.seed of the base model (its init, order, noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = opt.load_settings(args.opt, profile="quick", assignments=[
        f"ffdnet.max_patches={args.patches}", f"ffdnet.epoch={args.train_epochs}", "ffdnet.lr_decay_epochs=[]",
        f"ffdnet.seed={args.seed}"])
    opt.run_stage(FFDNet_Train, [common.model_file(settings)], settings)
    base, model_path = common.load_model(settings, torch.device("cpu"))
    noisy, clean, sigma, _ = attribution.training_triples(settings, torch.device("cpu"))
    targets = explain.targets(settings, lambda _: None)[:4]
    tests = attribution.model_order_pairs(settings, list(dict.fromkeys(t["image"] for t in targets)))
    path = opt.output_path(settings, "bench", f"ffdnet_variants_p{args.patches}e{args.train_epochs}"
                                              f"ft{args.ft_epochs:g}_k{'-'.join(map(str, args.ks))}_a{args.alpha:g}"
                                              f"_s{args.seed}_h{utils_if.SMOOTHNESS_STEP:g}.json")
    done = {r["variant"]: r for r in (opt.read_json(path, "bench/ffdnet_variants.py")["results"]
                                      if os.path.isfile(path) else [])}
    for name in args.variants.split(","):
        if name not in done:
            ft = Finetune(epochs=args.ft_epochs, batch_size=32, **VARIANTS[name])
            done[name] = study(name, ft, settings, base, (noisy, clean, sigma), tests, targets, args)
            opt.write_json(path, {"args": vars(args), "model": model_path, "results": list(done.values())})
        print(json.dumps({k: v for k, v in done[name].items() if k != "removals"}), flush=True)
    print(f"\n{model_path}: {len(clean)} patches; fine-tuning {args.ft_epochs:g} epoch(s), batch 32; "
          f"removals k = {args.ks} per target (top by Method 3, random); {torch.get_num_threads()} thread(s)")
    print("| variant | window loss before -> after | S_hat [95% CI] | Pearson (predicted, measured), pooled | per target "
          "| measured / predicted, "
          f"top {max(args.ks)} per target | the same, top {args.ks[0]} weighted {1 - args.alpha:g} | "
          "fine-tune / check / replay (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        r = done[name]
        print(f"| {name} | {np.mean(r['window_loss_before']):.3g} -> {np.mean(r['window_loss_after']):.3g} | "
              f"{r['s_hat']:.3f} [{r['s_hat_interval'][0]:.3f}, {r['s_hat_interval'][1]:.3f}] | {r['pearson']:.3f} | "
              f"{', '.join(f'{x:.2f}' for x in r['pearson_per_target'])} | "
              f"{', '.join(f'{x:.2f}' for x in r['ratio_at_largest_k'])} | "
              f"{', '.join(f'{x:.2f}' for x in r['ratio_small_step'])} | "
              f"{r['seconds_finetune']:.0f} / {r['seconds_check']:.0f} / {r['seconds_replay']:.0f} |")


if __name__ == "__main__":
    main()
