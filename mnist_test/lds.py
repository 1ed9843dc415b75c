"""Ground truth for attributions on the MNIST MLP: the pieces of ldsTest.py that are not math.

- the subsets (seeded, one generator per subset index, so that more subsets later reuse the ones
  done) and the seeds of their models;
- the leave-one-out plan (which training points are removed, and the seeds);
- training a group of such models and storing only what the metric needs (each test image's loss
  and margin), one small JSON per model, so that a run resumes and splits across processes;
- the attributions of every method, from the files the existing scripts write;
- the tables and figures of the report (scores per method, the drop-fraction curve).

Two settings (``lds.setting``). "algorithm": each subset model is trained from scratch on a random
subset with its own seed (what the training algorithm does on average: influence functions' question).
"single_model": each subset model is the base run itself (same seed, same init, same order) with the
dropped points weighted 0 (what this one trained network would have become: the report's question).

The metric itself (LDS, Spearman, bootstrap) is math and lives in utils_if.py.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

import utils_if
import utils_option as opt
from mnist_test import common, training
from mnist_test.model import mnist_model
from options.blocks import Lds


# ---- settings of the study ---------------------------------------------------------------------
def recipe(settings: opt.Settings) -> opt.Recipe:
    """The training recipe of every model of the study: the mnist block's, on lds.train_subset images
    for lds.epoch epochs (each model its own seed); the window acts only on the single-model removals
    (the algorithm setting's models train from scratch on their subsets)."""
    lds = settings.mnist.lds
    recipe = opt.Recipe.of(settings.mnist).replace(epoch=lds.epoch, train_subset=lds.train_subset)
    return recipe if lds.setting == "single_model" else recipe.replace(window=0)


def test_ids(settings: opt.Settings) -> list[int]:
    ids = settings.mnist.lds.test_ids
    return list(range(ids)) if isinstance(ids, int) else list(ids)


def study_tag(settings: opt.Settings) -> str:
    """Readable parts plus a short hash of everything that changes the retrained models' outputs."""
    lds = settings.mnist.lds
    key = {"recipe": recipe(settings).study_key(settings.mnist.lds.setting == "single_model"), "train_subset": lds.train_subset, "test_ids": test_ids(settings),
           "fraction": lds.subset_fraction, "seed": lds.seed,
           **({"threads": settings.threads} if settings.threads != 1 else {})}  # 1 keeps its old tags
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"n{lds.train_subset}e{lds.epoch}f{lds.subset_fraction:g}_{digest}"


def report_tag(settings: opt.Settings) -> str:
    """The report's files: the study, the setting, and a short hash of what changes the table but not
    the retrained models (methods, ensemble seeds, LOO plan, drop fractions, M, test counts), so that
    two tables made with other choices never overwrite each other."""
    lds, written = settings.mnist.lds, opt.as_dict(settings.mnist.lds)  # hashed as the settings file holds it
    keys = ("setting", "methods", "ensemble_seeds", "loo", "drop_fractions", "num_subsets", "seeds_per_subset",
            "solver_test_num", "method3_test_num", "lissa_deep", "cg_damps", "cg_max_iter", "ekfac_damp_factors",
            "kfac_factored_damp_factors", "bootstrap")
    digest = hashlib.sha1(json.dumps({k: written[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:6]
    return f"{study_tag(settings)}{'_single' if lds.setting == 'single_model' else ''}_r{digest}"


def study_folder(settings: opt.Settings, *parts: str) -> str:
    return opt.output_folder(settings, "lds", study_tag(settings), *parts)


def subset_mask(n_train: int, fraction: float, seed: int, index: int) -> np.ndarray:
    """Subset ``index`` as a boolean mask: round(fraction * n) distinct points, drawn from a
    generator seeded by (seed, index) alone, so that subset m is the same however many are drawn."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    chosen = torch.randperm(n_train, generator=generator)[:int(round(fraction * n_train))]
    mask = np.zeros(n_train, dtype=bool)
    mask[chosen.numpy()] = True
    return mask


def drop_mask(n_train: int, drop: float, seed: int, index: int) -> np.ndarray:
    """Single-model subset ``index`` at drop fraction ``drop``: True = kept (weight 1), False =
    dropped (weight 0); its own generator per (seed, drop, index)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 500_000_000 + int(round(drop * 1e4)) * 10_007 + index)
    mask = np.ones(n_train, dtype=bool)
    mask[torch.randperm(n_train, generator=generator)[:int(round(drop * n_train))].numpy()] = False
    return mask


def subset_model_seed(seed: int, index: int, replicate: int) -> int:
    return 1_000 + seed * 1_000_003 + index * 16 + replicate


def loo_model_seed(seed: int, replicate: int) -> int:
    return 900_000 + seed * 1_000_003 + replicate


# ---- the retrained models: train a group, store each model's outputs -----------------------------
@torch.no_grad()
def outputs_of(state: dict, x_test: torch.Tensor, y_test: torch.Tensor, activation: str = "relu",
               logit_scale: float = 1.0) -> dict:
    """Loss and margin (correct-class logit minus the best other; log-probabilities give the
    same difference) of each test image under one model."""
    model = mnist_model(activation, logit_scale).to(x_test.device)
    model.load_state_dict(state)
    model.eval()
    logp = model(x_test)
    loss = -logp.gather(1, y_test[:, None]).squeeze(1)
    others = logp.clone()
    others.scatter_(1, y_test[:, None], -torch.inf)
    margin = -loss - others.max(1).values
    return {"loss": loss.tolist(), "margin": margin.tolist()}


def train_and_store(jobs: list[dict], train, x_test, y_test, recipe: opt.Recipe, group_size: int,
                    keep_weights: bool, device, desc: str) -> None:
    """Train the jobs (each {"seed", "keep", "path", "record"}) in groups of equal size and write
    each model's test outputs (and, on request, its weights) atomically to its own JSON file."""
    jobs = sorted(jobs, key=lambda j: len(j["keep"]))
    groups: list[list[dict]] = []
    for job in jobs:
        if groups and len(groups[-1]) < group_size and len(groups[-1][0]["keep"]) == len(job["keep"]):
            groups[-1].append(job)
        else:
            groups.append([job])
    for number, group in enumerate(opt.progress(groups, desc=desc, unit="group")):
        states = training.train_group(train, [{"seed": j["seed"], "keep": j["keep"], "weights": j.get("weights")}
                                              for j in group], recipe, device, show_progress=False)
        for job, state in zip(group, states):
            record = {**job["record"], "seed": job["seed"],
                      **outputs_of({k: v.to(device) for k, v in state.items()}, x_test, y_test,
                                   recipe.activation, recipe.logit_scale)}
            if keep_weights:
                opt.save_torch(job["path"][:-len(".json")] + ".pth", {"model": state, "job": job["record"]})
            opt.write_json(job["path"], record)


def single_model_loss_changes(data, recipe: "opt.Recipe | dict", masks: np.ndarray, x_test: torch.Tensor,
                              y_test: torch.Tensor, base_loss: np.ndarray, device, group_size: int = 16) -> np.ndarray:
    """(M, T): each test loss of the run of ``recipe`` retrained with the points of ``masks[m]`` False
    weighted 0 (in its window), minus ``base_loss`` (T,): the measured single-model counterfactuals,
    trained ``group_size`` at a time (without files, for the benches)."""
    recipe = opt.Recipe.of(recipe)
    states = []
    for s in range(0, len(masks), group_size):
        states += training.train_group(data, [{"seed": recipe.seed, "weights": torch.as_tensor(m, dtype=torch.float32)}
                                              for m in masks[s:s + group_size]], recipe, device, show_progress=False)
    return np.array([outputs_of(state, x_test, y_test, recipe.activation, recipe.logit_scale)["loss"]
                     for state in states]) - base_loss


def read_outputs(paths: list[str]) -> dict[str, np.ndarray]:
    """{"loss": (len(paths), T), "margin": (len(paths), T)} from the models' JSON files."""
    records = [opt.read_json(p, "mnist_test/ldsTest.py") for p in paths]
    return {key: np.array([r[key] for r in records]) for key in ("loss", "margin")}


# ---- the attributions ------------------------------------------------------------------------------
def model_settings(settings: opt.Settings, index: int, ids: list[int], grad_mode: str = "batch",
                   method2: dict | None = None) -> dict:
    """Settings of the study's base model number ``index`` (seed lds.ensemble_seeds[index]),
    trained on the first lds.train_subset images for lds.epoch epochs, as the scripts see them.
    Method 1 per_sample norms get their own model name (Train.py writes one model per mode)."""
    lds = settings.mnist.lds
    mode = f"lds{index}" + ("ps" if grad_mode == "per_sample" else "")
    mnist = {"seed": lds.ensemble_seeds[index], "epoch": lds.epoch, "train_subset": lds.train_subset,
             "test_ids": ids, "method1": {"mode": mode, "grad_mode": grad_mode},
             "method2": {"mode": mode, "test_sample_num": len(ids), **(method2 or {})},
             "method3": {"mode": mode, "test_sample_num": min(len(ids), lds.method3_test_num)}}
    return opt.with_values(settings, {"mnist": mnist})


def method1_attributions(settings: opt.Settings, device) -> dict[str, np.ndarray]:
    """Method 1 scores (T, n) of the model of ``settings``, raw and normalized (each training
    point's gradient-norm vector divided by its sum), from Train.py's gradient-norm file."""
    cfg = settings.mnist
    model, _ = common.load_model(settings, cfg.method1.mode, device)
    norms, _ = common.load_grad_norms(settings, device=device)
    test = common.load_test_data(settings, device, lambda *_: None)
    layers = cfg.method1.layers
    activations = model.layer_activations(test.images[cfg.test_ids], layers)
    raw = utils_if.method1_scores(activations, {name: norms[name] for name in layers})
    normalized = utils_if.method1_scores(activations, {name: utils_if.normalize_rows(norms[name])
                                                       for name in layers})
    return {"raw": raw.cpu().numpy(), "normalized": normalized.cpu().numpy()}


def influence_matrix(record: dict, ids: list[int], path: str) -> np.ndarray:
    """The (T, n) influence matrix of an m2_Test file, checking that it covers ``ids`` in order."""
    if record["meta"]["test_ids"] != ids:
        raise opt.SettingsError(f"{path} was made for other test images ({record['meta']['test_ids'][:5]}...): "
                                f"delete it and run mnist_test/ldsTest.py again")
    return np.array([record[str(i)]["influence"] for i in range(len(ids))])


# ---- the report: scores per method, tables, figures ---------------------------------------------
def finite_mean(values) -> float:
    """Mean of the finite values (NaN, without a warning, when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def loo_changes(plan: dict, loo_jobs: list[dict], loo_loss: np.ndarray) -> dict[int, np.ndarray]:
    """{test position: measured loss change of each planned removal (helpful, harmful, random order)}:
    the mean over the removal's seeds minus the mean of the same seeds with nothing removed."""
    removed = [j["record"]["removed"] for j in loo_jobs]
    base_rows = [i for i, r in enumerate(removed) if r is None]
    base = loo_loss[base_rows].mean(0)
    out = {}
    for test in plan["tests"]:
        position = test["position"]
        points = test["helpful"] + test["harmful"] + test["random"]
        out[position] = np.array([loo_loss[[i for i, r in enumerate(removed) if r == p]].mean(0)[position]
                                  - base[position] for p in points])
    return out


def score_rows(methods: dict, masks: np.ndarray, measured: dict, plan: dict, changes: dict, lcfg: Lds
               ) -> tuple[list[dict], dict]:
    """One row per method (LDS on loss with its bootstrap interval, LDS on the margin, LDS over the
    first solver_test_num and method3_test_num test images, LOO Pearson/Spearman), best first; and
    {method: per-test LDS}."""
    rows, per_test = [], {}
    few, few3 = lcfg.solver_test_num, lcfg.method3_test_num
    for name, entry in methods.items():
        matrix, t = entry["matrix"], len(entry["ids"])
        scores = {target: utils_if.lds(matrix, masks, measured[target][:, :t], target) for target in ("loss", "margin")}
        mean, low, high = utils_if.bootstrap_mean(scores["loss"], lcfg.bootstrap, seed=lcfg.seed)
        loo_p, loo_s = [], []
        for test in plan["tests"]:
            position = test["position"]
            if position >= t:
                continue
            points = test["helpful"] + test["harmful"] + test["random"]
            loo_p.append(utils_if.pearson(matrix[position, points], changes[position]))
            loo_s.append(float(utils_if.spearman_columns(matrix[position, points], changes[position])[0]))
        rows.append({"method": name, "test_images": t, "lds": mean, "lds_low": low, "lds_high": high,
                     "lds_margin": finite_mean(scores["margin"]),
                     f"lds_first{few}": finite_mean(scores["loss"][:few]),
                     f"lds_first{few3}": finite_mean(scores["loss"][:few3]),
                     "loo_pearson": float(np.mean(loo_p)) if loo_p else float("nan"),
                     "loo_spearman": float(np.mean(loo_s)) if loo_s else float("nan"),
                     "seconds": round(float(entry["seconds"]), 2), "note": entry.get("note", "")})
        per_test[name] = scores["loss"].tolist()
    rows.sort(key=lambda r: (-np.nan_to_num(r["lds"], nan=-9), r["method"]))  # ties (few subsets) by name
    return rows, per_test


def markdown_table(rows: list[dict], failed: dict, lcfg: Lds) -> str:
    """The study's table; a failed row is marked and its reason given on a line of its own below."""
    few, few3 = lcfg.solver_test_num, lcfg.method3_test_num
    header = ["method", "test images", "LDS (loss) [95% CI]", "LDS (margin)", f"LDS, first {few}", f"LDS, first {few3}",
              "LOO Pearson", "LOO Spearman", "seconds", "note"]
    cells = [[r["method"], r["test_images"], f"{r['lds']:.3f} [{r['lds_low']:.3f}, {r['lds_high']:.3f}]",
              f"{r['lds_margin']:.3f}", f"{r[f'lds_first{few}']:.3f}", f"{r[f'lds_first{few3}']:.3f}",
              f"{r['loo_pearson']:.3f}", f"{r['loo_spearman']:.3f}", f"{r['seconds']:.1f}", r["note"]] for r in rows]
    cells += [[name, "", "FAILED (below)", "", "", "", "", "", "", ""] for name in failed]
    reasons = [f"- {name} failed: {' '.join(why.split())}" for name, why in failed.items()]
    return "\n".join([opt.markdown_table(header, cells)] + ([""] + reasons if reasons else []))


def curve_table(curves: dict[float, list[dict]]) -> str:
    """Single-model LDS per method (rows) and drop fraction (columns)."""
    drops = sorted(curves)
    methods = [r["method"] for r in curves[drops[0]]]
    by = {d: {r["method"]: r for r in curves[d]} for d in drops}
    return opt.markdown_table(["method"] + [f"drop {d:g}" for d in drops],
                              [[m] + [f"{by[d][m]['lds']:.3f}" if m in by[d] else "" for d in drops] for m in methods])


def _pyplot():
    import matplotlib
    if not opt.is_interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw(settings: opt.Settings, rows: list[dict], methods: dict, masks: np.ndarray, measured: dict, per_test: dict,
         tag: str, title: str, logger, failed: dict | None = None) -> str:
    """LDS per method (bars with intervals; an unconverged row in orange and marked, a failed one
    listed without a bar) and, for the best method's median test image, predicted against measured
    loss over the subsets."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2.5), gridspec_kw={"width_ratios": [1.6, 1]})
    names = [r["method"] for r in rows][::-1]
    means = np.array([r["lds"] for r in rows][::-1])
    err = np.array([[r["lds"] - r["lds_low"] for r in rows][::-1], [r["lds_high"] - r["lds"] for r in rows][::-1]])
    unconverged = ["NOT CONVERGED" in r.get("note", "") for r in rows[::-1]]
    ax.barh(range(len(rows)), means, xerr=err, color=["tab:orange" if u else "tab:blue" for u in unconverged],
            alpha=0.8, capsize=3)
    failed_names = list(failed or {})
    ax.set_yticks(range(len(rows) + len(failed_names)))
    ax.set_yticklabels([f"{n} ({r['test_images']})" + (" NOT CONVERGED" if u else "")
                        for n, r, u in zip(names, rows[::-1], unconverged)] + [f"{n}: FAILED" for n in failed_names],
                       fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("LDS (Spearman, mean over test images, 95% bootstrap interval)")
    ax.set_title("Linear datamodeling score per method (test images in brackets)")
    best = rows[0]["method"]
    scores = np.nan_to_num(np.asarray(per_test[best]), nan=-2.0)
    typical = int(np.argsort(scores, kind="stable")[len(scores) // 2])  # the median test image, not a showcase
    predicted = utils_if.datamodel_predictions(methods[best]["matrix"], masks, masks.shape[1])[:, typical]
    ax2.scatter(predicted, measured["loss"][:, typical], s=12)
    ax2.set_xlabel(f"predicted loss minus base loss ({best})")
    ax2.set_ylabel("measured loss")
    ax2.set_title(f"test image {methods[best]['ids'][typical]} (median LDS of {best}): {per_test[best][typical]:.2f}",
                  fontsize=9)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return opt.save_figure(fig, opt.output_path(settings, "fig", f"lds_{tag}.png"), logger)


def draw_curve(settings: opt.Settings, curves: dict[float, list[dict]], tag: str, logger) -> str:
    """Single-model LDS against the drop fraction, one line per method."""
    plt = _pyplot()
    drops = sorted(curves)
    fig, ax = plt.subplots(figsize=(9, 6))
    for method in [r["method"] for r in curves[drops[0]]]:
        values = [next((r["lds"] for r in curves[d] if r["method"] == method), np.nan) for d in drops]
        ax.plot(drops, values, marker="o", lw=2.5 if method.startswith("m3") else 1,
                label=method, color="k" if method.startswith("m3") else None)
    ax.set_xscale("log")
    ax.set_xticks(drops)
    ax.set_xticklabels([f"{d:g}" for d in drops])
    ax.set_xlabel("fraction of training images dropped (weight 0, same seed and order)")
    ax.set_ylabel("single-model LDS (loss)")
    ax.axhline(0, color="k", lw=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Single-model LDS against the drop fraction ({tag})")
    fig.tight_layout()
    return opt.save_figure(fig, opt.output_path(settings, "fig", f"lds_{tag}_drop_curve.png"), logger)
