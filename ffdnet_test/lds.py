"""The denoiser's single-model ground truth (ffdnet_test/ldsTest.py): what removing patches from the
training's final window does to every target, and how well each method's scores rank it.

For each drop fraction f and subset k, a random f of the patches the window reaches is weighted 0
and the window is rerun from its saved start (same order, same noise; :func:`window.rerun`). The
targets are each test image's whole-image MSE and the squared error of the (2w+1)^2 window around
each ffdnet.attribution.points. A method's prediction of subset S's change at target t is

    predicted_t(S) = sum_{i in S} influence_t[i] / n      (positive influence = the patch helped),

and its LDS at t is the Spearman correlation over the subsets of one fraction between the
predicted and the measured change (Park et al. 2023; the single-model setting of MAGIC), with a
percentile bootstrap interval over the subsets.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

import utils_if
import utils_option as opt
from ffdnet_test import common, explain, window


def target_labels(images: list[str], points: list[list[int]]) -> list[str]:
    """The targets of the study, in order: per image its whole-image loss, then its pixel windows."""
    return [label for image in images for label in
            [f"{image} whole"] + [f"{image} {explain.point_label(p)}" for p in points]]


def study_folder(settings: opt.Settings) -> str:
    """One folder per (trained model, window, test noise, pixel window, points, subset seed): every
    rerun there is comparable with every other (more fractions or subsets later add files)."""
    cfg = settings.ffdnet
    key = {"model": common.run_tag(settings), "window": opt.as_dict(cfg.window), "test": opt.as_dict(cfg.test),
           "pixel_window": cfg.method2.window, "points": cfg.attribution.points, "seed": cfg.lds.seed}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return opt.output_folder(settings, "lds", "ffdnet", f"{common.run_tag(settings)}_{digest}")


def plan(settings: opt.Settings, n_train: int, folder: str) -> list[dict]:
    """The control (nothing removed) and, per fraction, num_subsets random subsets of the patches the
    window reaches; each subset is drawn from (lds.seed, fraction, k) alone, so more subsets later
    keep the ones done. Each job is its own file (resumable, shared across torchrun processes)."""
    cfg = settings.ffdnet
    reached = window.patches_reached(cfg, n_train)
    jobs = [{"name": "control", "fraction": 0.0, "k": -1, "removed": torch.zeros(0, dtype=torch.long)}]
    for fraction in cfg.lds.drop_fractions:
        size = max(1, int(round(fraction * len(reached))))
        for k in range(cfg.lds.num_subsets):
            generator = torch.Generator().manual_seed(cfg.lds.seed * 1_000_003 + int(round(fraction * 1e6)) * 1009 + k)
            removed = reached[torch.randperm(len(reached), generator=generator)[:size]].sort().values
            jobs.append({"name": f"f{fraction:g}_s{k}", "fraction": fraction, "k": k, "removed": removed})
    for job in jobs:
        job["path"] = os.path.join(folder, f"{job['name']}.json")
    return jobs


def run_job(job: dict, start, data: tuple, tests: dict, target_list: list[dict], settings: opt.Settings) -> dict:
    """Rerun the window without the job's patches and measure every target."""
    cfg = settings.ffdnet
    with opt.Timer() as timer:
        model = window.rerun(start, *data, cfg, job["removed"])
        outcome = explain.evaluate(model, tests, target_list, cfg.method2.window, cfg.test.noise_level_img / 255.0)
    return {"name": job["name"], "fraction": job["fraction"], "k": job["k"], "removed": job["removed"].tolist(),
            "losses": losses_by_label(outcome), "seconds": round(timer.seconds, 3)}


def losses_by_label(outcome: dict) -> dict[str, float]:
    """explain.evaluate's outcome as {target label: loss} in :func:`target_labels`' names."""
    return {**{f"{image} whole": value for image, value in outcome["mse"].items()}, **outcome["window_loss"]}


def predicted_changes(influence: np.ndarray, removed: list[list[int]], n_train: int) -> np.ndarray:
    """(subsets,) first-order change of one target when each subset is removed: sum of the removed
    patches' influence / n."""
    return np.array([influence[np.asarray(r, dtype=np.int64)].sum() / n_train for r in removed])


def spearman_interval(predicted: np.ndarray, measured: np.ndarray, draws: int, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Spearman over the subsets and its 95% percentile bootstrap interval (resampling subsets)."""
    value = float(utils_if.spearman_columns(predicted[:, None], measured[:, None])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(predicted), size=(draws, len(predicted))).T  # (m, draws)
    boot = utils_if.spearman_columns(predicted[idx], measured[idx])
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return value, float("nan"), float("nan")
    return value, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def score(predictions: dict[str, dict[str, np.ndarray]], records: list[dict], labels: list[str], n_train: int,
          draws: int) -> list[dict]:
    """One row per (method, fraction, target) with the LDS and its interval, and per (method, fraction)
    the mean over the pixel windows and the smallest of them. ``predictions`` = {method: {label:
    influence (n,)}} (a method may leave targets out: Method 1 has no whole-image score)."""
    control = next(r for r in records if r["name"] == "control")["losses"]
    rows = []
    for fraction in sorted({r["fraction"] for r in records if r["k"] >= 0}):
        runs = sorted((r for r in records if r["fraction"] == fraction and r["k"] >= 0), key=lambda r: r["k"])
        for method, table in predictions.items():
            values = []
            for label in labels:
                if label not in table:
                    continue
                measured = np.array([r["losses"][label] - control[label] for r in runs])
                predicted = predicted_changes(table[label], [r["removed"] for r in runs], n_train)
                lds, low, high = spearman_interval(predicted, measured, draws)
                kind = "whole image" if label.endswith(" whole") else "pixel window"
                rows.append({"method": method, "fraction": fraction, "target": label, "kind": kind, "lds": lds,
                             "low": low, "high": high, "subsets": len(runs)})
                values.append(rows[-1])
            for kind in ("pixel window", "whole image"):
                mine = [r["lds"] for r in values if r["kind"] == kind]
                if mine:
                    rows.append({"method": method, "fraction": fraction, "target": f"{kind}s (mean)", "kind": kind,
                                 "lds": float(np.mean(mine)), "min": float(np.min(mine)), "targets": len(mine),
                                 "subsets": len(runs)})
    return rows
