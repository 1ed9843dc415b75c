"""EK-FAC factors of the denoiser fitted on a subsample of its training patches (ffdnet.method2.fit_points):
how much faster, and how close the pixel-window scores stay to the factors fitted on every patch.

Trains (or reuses) FFDNet with the settings (default: settings/shared.json, the quick profile, the
first --patches Train400 patches, --epochs epochs), then for each --fits value fits EK-FAC's factors
and eigenvalues on that many patches drawn at random (0 = all) and scores every patch for the
targets of ffdnet.attribution (each test image's whole-image loss and its point windows). Prints, per
fit, the seconds of the fit, the speed-up over the full fit, and against the full fit's scores the
Spearman correlation over the patches and the top-100 overlap of the helpful list, per target.

    python3 bench/ffdnet_factor_fit.py [-opt settings/shared.json] [--patches 3000] [--epochs 2] [--seed 1]
                                       [--fits 0,1500,600,300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings", "shared.json"))
    parser.add_argument("--patches", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fits", default="0,1500,600,300")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="ffdnet.seed: the base model (its init, order and noise)")
    args = parser.parse_args()
    settings = opt.load_settings(args.opt, "quick", overrides={"threads": args.threads, "ffdnet": {
        "seed": args.seed, "max_patches": args.patches, "epoch": args.epochs, "lr_decay_epochs": [],
        "method2": {"solver": "ekfac", "max_train_points": 0}}})
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    opt.run_stage(FFDNet_Train, [common.model_file(settings)], settings, print)
    model, path = common.load_model(settings, cpu)
    x, y, _ = attribution.training_points(settings, cpu)
    grads, labels = [], []
    base_cfg = opt.solver_run(settings.ffdnet.method2, settings.ffdnet.seed)[1]
    base_cfg.progress = None
    problem = attribution.influence_problem(settings, model, base_cfg)
    base_cfg.factor_file = ""  # fitted afresh for every subsample, never read from a file
    for image in attribution.image_names(settings):
        rows, found, _ = attribution.target_grads(settings, problem, image, settings.ffdnet.attribution.points, cpu)
        grads.append(rows)
        labels += [f"{image} {label}" for label, _ in found]
    grads = torch.cat(grads)
    solver = utils_if.solver_for("ekfac")
    print(f"{path}: {len(x)} patches, {problem.num_params} parameters, {len(labels)} targets, {args.threads} threads")
    results = {}
    for fit in [int(f) for f in args.fits.split(",")]:
        cfg = solver.Settings(**{**{f.name: getattr(base_cfg, f.name) for f in solver.Settings.setting_fields()},
                                 "fit_points": fit}, solver="ekfac", seed=base_cfg.seed)
        start = time.perf_counter()
        curvature = solver.curvature(problem, x, y, cfg)
        seconds = time.perf_counter() - start
        scores = utils_if.influence_sweep(problem, curvature.inverse_hvp(grads), x, y, cfg.chunk_size,
                                          show_progress=False)
        results[fit] = (seconds, scores)
        print(f"fit_points {fit or len(x)}: factors in {seconds:.1f} s", flush=True)
    full_seconds, full = results[0]
    print("\n| fit_points | factors (s) | speed-up | Spearman vs all, min / median | top-100 overlap, min / median |")
    print("|---|---|---|---|---|")
    for fit, (seconds, scores) in results.items():
        rho = utils_if.spearman_columns(scores.T.numpy(), full.T.numpy())
        overlap = [utils_if.top_k_overlap(utils_if.top_indices(scores[t], 100, True),
                                          utils_if.top_indices(full[t], 100, True), 100) / 100 for t in range(len(labels))]
        print(f"| {fit or len(x)} | {seconds:.1f} | {full_seconds / seconds:.1f}x | {min(rho):.3f} / "
              f"{statistics.median(rho):.3f} | {min(overlap):.2f} / {statistics.median(overlap):.2f} |")
        if fit:
            print("  per target: " + ", ".join(f"{label} {r:.3f}/{o:.2f}" for label, r, o in zip(labels, rho, overlap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
