"""The denoiser's explainability test (expTest.py): which training patches does a ranking name for a
pixel, and does taking them away (or teaching the wrong answer on them) change that pixel?

A job = (ranking, the target it was built for, manipulation, k, seed), or the control (nothing
manipulated, one per seed). Every job fine-tunes the trained model with the same schedule: the
same number of Adam steps, the same learning rate, a data order drawn from the seed alone; a
removed patch keeps its place in that order with data weight 0 (batch loss sum_i w_i l_i / |B|),
a corrupted one keeps its place with its target changed. So a manipulated run and the control of
its seed see the same patches at the same steps except the manipulated ones: paired runs, whose
difference is the manipulation's effect, and exactly the counterfactual Method 3 differentiates
(d window loss / d w_i of the control run). Patches the schedule never reaches (it covers
explain.finetune.epochs of the set) cannot matter to the run at all.

Rankings (all training patches, best first):
  m2_window  Method 2, influence on the squared error of the window around one point (m2_Test)
  m2_whole   Method 2, influence on the whole-image loss (m2_Test): the same list for every point
  m1         Method 1 at one layer and mode (m1_Test)
  m3_window  Method 3, the exact derivative of the window loss of this seed's control run in each
             patch's data weight (m3_Test): one list per (point, seed)
  m3_whole   Method 3 on the whole-image loss: one list per (image, seed)
  random     k distinct patches drawn from a generator seeded by (seed, image, k)
Manipulations: remove (the patches leave the training set), corrupt (their clean target becomes
their own noisy input: the network is taught to keep the noise there).
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
from torch import nn

import utils_if
import utils_option as opt
from ffdnet_test import attribution, common
from options.blocks import Finetune, SmoothnessCheck

RANKINGS = ("m3_window", "m3_whole", "m2_window", "m2_whole", "m1", "random")
POINT_RANKINGS = ("m3_window", "m2_window", "m1")  # built for one point; the others for the whole image
SEED_RANKINGS = ("m3_window", "m3_whole")  # one list per seed: the derivative of that seed's own run


# the one-line verdict's advice when the fine-tuning is not smooth: no variant measured is, on two base models,
# and none predicts removals on both (docs/results.md, "Can the denoiser's fine-tuning be attributed?")
SMOOTHNESS_REMEDY = ("no fine-tuning variant measured is smooth or predicts removals on two base models "
                     "(docs/results.md): read Method 3's lists as rankings within a target, not as sizes")


def point_label(point: list[int]) -> str:
    return f"{point[0]},{point[1]}"


def targets(settings: opt.Settings, log=print) -> list[dict]:
    """The configured points of the first explain.test_images test images: {image, point, label}."""
    images = attribution.image_names(settings, log)[:settings.ffdnet.explain.test_images]
    return point_targets(images, settings.ffdnet.attribution.points)


def point_targets(images: list[str], points: list[list[int]]) -> list[dict]:
    """{image, point, label "image r,c"} for every point of every image, in that order."""
    return [{"image": image, "point": list(p), "label": f"{image} {point_label(p)}"}
            for image in images for p in points]


def random_patches(n_train: int, k: int, seed: int, image_index: int) -> np.ndarray:
    """k distinct patch indices from a generator seeded by (seed, image, k) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + image_index * 10_007 + k)
    return torch.randperm(n_train, generator=generator)[:k].numpy()


def ranking_key(ranking: str, owner: str, seed: int) -> str:
    """The key of a ranking in :func:`read_rankings`: per seed for Method 3 (each seed's own run)."""
    return f"{ranking}|{owner}|s{seed}" if ranking in SEED_RANKINGS else f"{ranking}|{owner}"


def method3_influence(settings: opt.Settings, target_list: list[dict], n_train: int) -> dict[tuple[int, str], np.ndarray]:
    """{(seed, entry): Method-3 influence of every patch} from m3_Test's files, entry = a target label
    or an image name (its whole-image loss); a file made for another number of patches is refused."""
    out = {}
    for seed in range(settings.ffdnet.explain.seeds):
        for image in dict.fromkeys(t["image"] for t in target_list):
            path = common.m3_result_file(settings, image, seed)
            record = opt.read_json(path, "ffdnet_test/m3_Test.py", shape=("entries", "meta"))
            if record["meta"]["n_train"] != n_train:
                raise opt.SettingsError(f"{path} scores {record['meta']['n_train']} patches, the training set has "
                                        f"{n_train}: run ffdnet_test/m3_Test.py again")
            entries = record["entries"]
            out[(seed, image)] = np.asarray(entries["whole"]["influence"], dtype=np.float64)
            for t in (t for t in target_list if t["image"] == image):
                key = f"point {point_label(t['point'])}"
                if key not in entries:
                    raise opt.SettingsError(f"{path} has no entry {key!r}: run ffdnet_test/m3_Test.py again with "
                                            f"the current ffdnet.attribution.points")
                out[(seed, t["label"])] = np.asarray(entries[key]["influence"], dtype=np.float64)
    return out


def read_rankings(settings: opt.Settings, target_list: list[dict], n_train: int) -> dict[str, np.ndarray]:
    """{ranking_key(ranking, target label or image, seed): training patch indices, best first} from the
    m1/m2/m3 files; a file made for another number of patches is refused (all patches must be scored)."""
    ecfg = settings.ffdnet.explain
    wanted = set(ecfg.rankings)
    out: dict[str, np.ndarray] = {}
    if wanted & set(SEED_RANKINGS):
        for (seed, owner), values in method3_influence(settings, target_list, n_train).items():
            ranking = "m3_whole" if owner in {t["image"] for t in target_list} else "m3_window"
            if ranking in wanted:
                out[ranking_key(ranking, owner, seed)] = np.argsort(-values, kind="stable")
    for image in dict.fromkeys(t["image"] for t in target_list):
        m2_path = common.m2_result_file(settings, image)
        if wanted & {"m2_window", "m2_whole"}:
            record = opt.read_json(m2_path, "ffdnet_test/m2_Test.py", shape=("entries",))
            if record["meta"]["n_train"] != n_train:
                raise opt.SettingsError(
                    f"{m2_path} scores {record['meta']['n_train']} patches, the training set has {n_train}: "
                    f"set ffdnet.method2.max_train_points = 0 and run ffdnet_test/m2_Test.py again")
            entries = record["entries"]
            if "m2_whole" in wanted:
                out[f"m2_whole|{image}"] = np.argsort(-np.asarray(entries["whole"]["influence"]), kind="stable")
            for t in (t for t in target_list if t["image"] == image and "m2_window" in wanted):
                key = f"point {point_label(t['point'])}"
                if key not in entries:
                    raise opt.SettingsError(f"{m2_path} has no entry {key!r}: run ffdnet_test/m2_Test.py "
                                            f"again with the current ffdnet.attribution.points")
                out[f"m2_window|{t['label']}"] = np.argsort(-np.asarray(entries[key]["influence"]), kind="stable")
        if "m1" in wanted:
            m1_path = common.m1_result_file(settings, image)
            record = opt.read_json(opt.require_file(m1_path, "ffdnet_test/m1_Test.py"), "ffdnet_test/m1_Test.py")
            for t in (t for t in target_list if t["image"] == image):
                rows = [e for e in record["entries"] if e["layer"] == ecfg.m1_layer
                        and e["mode"] == ecfg.m1_mode and list(e["point"]) == t["point"]]
                if not rows:
                    raise opt.SettingsError(f"{m1_path} has no layer {ecfg.m1_layer} / point {t['point']}: set "
                                            f"ffdnet.explain.m1_layer to one of ffdnet.method1.layers and run "
                                            f"ffdnet_test/m1_Test.py again")
                scores = np.array([-np.inf if s is None else s for s in rows[0]["scores"]])
                if len(scores) != n_train:
                    raise opt.SettingsError(f"{m1_path} scores {len(scores)} patches, the training set has "
                                            f"{n_train}: run ffdnet_test/FFDNet_Train.py and m1_Test.py again")
                out[f"m1|{t['label']}"] = np.argsort(-scores, kind="stable")
    return out


def plan(settings: opt.Settings, target_list: list[dict], folder: str) -> list[dict]:
    """Every job of the study: the control per seed, then manipulation x ranking x target x k x seed."""
    ecfg = settings.ffdnet.explain
    jobs = [{"name": f"control_s{seed}", "ranking": None, "target": None, "manipulation": None, "k": 0,
             "seed": seed} for seed in range(ecfg.seeds)]
    images = list(dict.fromkeys(t["image"] for t in target_list))
    for manipulation in ecfg.manipulations:  # all removals first: what the predictions need
        for ranking in ecfg.rankings:
            owners = ([t["label"] for t in target_list] if ranking in POINT_RANKINGS else images)
            for owner in owners:
                for k in ecfg.k_values:
                    for seed in range(ecfg.seeds):
                        name = f"{ranking}_{owner.replace(' ', '_').replace(',', '-')}_{manipulation}_k{k}_s{seed}"
                        jobs.append({"name": name, "ranking": ranking, "target": owner,
                                     "manipulation": manipulation, "k": k, "seed": seed})
    for job in jobs:
        job["path"] = os.path.join(folder, f"{job['name']}.json")
    return jobs


def chosen_patches(job: dict, ranked: dict[str, np.ndarray], n_train: int, images: list[str]) -> np.ndarray:
    """The k patches a job manipulates (exactly k distinct indices)."""
    if job["ranking"] is None:
        return np.zeros(0, dtype=np.int64)
    if job["ranking"] == "random":
        return random_patches(n_train, job["k"], job["seed"], images.index(job["target"]))
    return ranked[ranking_key(job["ranking"], job["target"], job["seed"])][:job["k"]]


def finetune_order(n_train: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """(steps, batch) patch indices: concatenated seeded permutations of all patches. The order depends
    on the seed only (removal is a data weight of 0 in place), so runs of one seed are paired."""
    generator = torch.Generator().manual_seed(seed)
    order, needed = [], steps * batch
    while needed > 0:
        perm = torch.randperm(n_train, generator=generator)[:needed]
        order.append(perm)
        needed -= len(perm)
    return torch.cat(order).reshape(steps, batch)


def removal_weights(n_train: int, removed: np.ndarray) -> torch.Tensor | None:
    """Data weights (n,) with the removed patches at 0 (None when nothing is removed: plain mean)."""
    if len(removed) == 0:
        return None
    weights = torch.ones(n_train)
    weights[torch.as_tensor(removed, dtype=torch.long)] = 0.0
    if not weights.any():
        raise ValueError("every training patch is removed")
    return weights


def finetune_run(ft: Finetune, n_train: int, seed: int,
                 weights: torch.Tensor | None = None) -> utils_if.AdamRun | utils_if.SgdRun:
    """The fine-tuning schedule ``ft`` (explain.finetune or the training's final window,
    ffdnet.window: epochs, learning_rate and its schedule, batch_size, the optimizer with its
    eps_root or momentum) of one seed as an Adam or SGD run: what expTest trains
    and what m3_Test replays (:func:`method3_replay`)."""
    steps = finetune_steps(n_train, ft.epochs, ft.batch_size)
    orders = finetune_order(n_train, steps, ft.batch_size, seed)
    if ft.optimizer == "sgd":
        return utils_if.SgdRun(ft.learning_rate, ft.momentum, 0.0, ft.batch_size, orders, weights,
                               schedule=ft.lr_schedule, num_points=n_train)
    return utils_if.AdamRun(learning_rate=ft.learning_rate, orders=orders, data_weights=weights, eps_root=ft.eps_root,
                            schedule=ft.lr_schedule)


def method3_replay(base: nn.Module, run: utils_if.AdamRun | utils_if.SgdRun, noisy: torch.Tensor, sigma: torch.Tensor,
                   clean: torch.Tensor) -> utils_if.Replay:
    """Method 3's replay of the fine-tuning ``run`` of ``base`` (BN held in eval mode): through Adam
    (:class:`utils_if.AdamReplay`) or SGD with momentum (:class:`utils_if.SgdReplay`), the parameter
    names of the network itself in both."""
    replay = utils_if.AdamReplay if isinstance(run, utils_if.AdamRun) else utils_if.SgdReplay
    return replay(copy.deepcopy(base).eval(), utils_if.mse_sample_loss, run, (noisy, sigma), clean)


def finetune_steps(n_train: int, epochs: float, batch: int) -> int:
    return max(1, math.ceil(epochs * n_train / batch))


def finetune(model: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor,
             run: utils_if.AdamRun | utils_if.SgdRun, show_progress: bool = False) -> nn.Module:
    """Adam or SGD (``run``: its optimiser and the batches) on the weighted MSE sum_i w_i l_i / |B| of
    each batch, BatchNorm held in eval mode (its running statistics fixed, its scale and shift
    trained): the network that influence describes, and the run m3_Test replays."""
    model.eval()
    optimizer = run.optimizer(list(model.parameters()))
    weights = None if run.data_weights is None else run.data_weights.to(noisy.device)
    for step, idx in enumerate(opt.progress(run.orders, desc="fine-tune", unit="step", disable=not show_progress,
                                            leave=False)):
        optimizer.param_groups[0]["lr"] = run.lr(step)  # the run's schedule, as its replay steps it
        idx = idx.to(noisy.device)
        losses = utils_if.mse_sample_loss(model(noisy[idx], sigma[idx]), clean[idx])
        loss = losses.mean() if weights is None else utils_if.weighted_batch_loss(losses, weights[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, tests: dict[str, tuple[torch.Tensor, torch.Tensor]], target_list: list[dict],
             window: int, sigma01: float) -> dict:
    """Window losses at every target (the squared error m2_Test's pixel-window influence predicts)
    and the whole-image MSE and PSNR of every test image."""
    from ffdnet_test import metrics
    device = next(model.parameters()).device
    outputs = {}
    result: dict = {"window_loss": {}, "mse": {}, "psnr": {}}
    for image, (clean, noisy) in tests.items():
        out = model(noisy[None].to(device), torch.tensor([sigma01], device=device))[0].cpu()
        outputs[image] = out
        result["mse"][image] = float(((out - clean) ** 2).mean())
        result["psnr"][image] = metrics.psnr(metrics.to_uint8(out), metrics.to_uint8(clean))
    for t in target_list:
        clean = tests[t["image"]][0]
        loss = utils_if.masked_mse_sample_loss(attribution.window_mask(tuple(clean.shape), t["point"], window))
        result["window_loss"][t["label"]] = float(loss(outputs[t["image"]][None], clean[None]))
    return result


Predictions = dict[tuple, np.ndarray]  # {(seed or None, target label or image): influence of every patch}


def effects(runs: dict[str, dict], target_list: list[dict], predictors: dict[str, Predictions] | None = None
            ) -> list[dict]:
    """One row per manipulated run: the change of every target's window loss, of each image's MSE and
    of its PSNR against the control of the same seed. With ``predictors`` ({name: {(seed, label):
    influence of every patch}}, seed None = one list for all seeds, label a target's or an image's
    (its whole-image loss)), removal runs also get each predictor's first-order prediction of those
    changes, sum of the removed patches' influence / n (positive influence = helped, so removing it
    raises the loss), under row["predicted"][name][label]."""
    rows = []
    for run in runs.values():
        job = run["job"]
        if job["ranking"] is None:
            continue
        control = runs.get(f"control_s{job['seed']}")
        if control is None:
            continue
        outcome, before = run["outcome"], control["outcome"]
        rows.append({**{k: job[k] for k in ("ranking", "target", "manipulation", "k", "seed")},
                     "window_effect": {t["label"]: outcome["window_loss"][t["label"]]
                                       - before["window_loss"][t["label"]] for t in target_list},
                     "mse_change": {image: outcome["mse"][image] - before["mse"][image] for image in outcome["mse"]},
                     "psnr_change": {image: outcome["psnr"][image] - before["psnr"][image] for image in outcome["psnr"]}})
        if predictors and job["manipulation"] == "remove":
            chosen = np.asarray(run["chosen"], dtype=np.int64)
            predicted = {}
            for name, table in predictors.items():
                for (seed, label), values in table.items():
                    if seed is None or seed == job["seed"]:
                        predicted.setdefault(name, {})[label] = float(values[chosen].sum() / len(values))
            rows[-1]["predicted"] = predicted
    return rows


def prediction_pairs(rows: list[dict], predictor: str, ranking: str | None = None, label: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, measured) over the (removal run, target) pairs of one predictor, optionally only
    the runs of one ranking or the pairs of one target (a target label: its window loss; an image
    name: its whole-image MSE)."""
    pairs = []
    for row in rows:
        if ranking is not None and row["ranking"] != ranking:
            continue
        for name, value in row.get("predicted", {}).get(predictor, {}).items():
            if label is None or name == label:
                measured = row["window_effect"].get(name, row["mse_change"].get(name))
                pairs.append((value, measured))
    return tuple(np.array(v, dtype=np.float64) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))


def prediction_agreement(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """How well predicted changes track measured ones: Pearson, Spearman, the ratio of sizes
    ||measured|| / ||predicted|| (1 = right scale) and the median measured / predicted."""
    if len(predicted) < 3:
        return {"pairs": len(predicted)}
    ratio = measured / np.where(predicted == 0, np.nan, predicted)
    size = float(np.linalg.norm(predicted))
    return {"pairs": len(predicted), "pearson": utils_if.pearson(predicted, measured),
            "spearman": float(utils_if.spearman_columns(predicted[:, None], measured[:, None])[0]),
            "size_ratio": float(np.linalg.norm(measured)) / size if size > 0 else float("nan"),
            "median_measured_over_predicted": float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else float("nan")}


def prediction_table(rows: list[dict], target_list: list[dict]) -> list[dict]:
    """Predicted vs measured per predictor: over all pairs, per ranking whose removals were
    predicted, and per target (each point's window, each image's whole-image MSE)."""
    table = []
    predictors = dict.fromkeys(name for row in rows for name in row.get("predicted", {}))
    rankings = [r for r in RANKINGS if any(row["ranking"] == r and "predicted" in row for row in rows)]
    labels = [t["label"] for t in target_list] + list(dict.fromkeys(t["image"] for t in target_list))
    for name in predictors:
        windows = [t["label"] for t in target_list]
        everything = [prediction_pairs(rows, name, label=label) for label in windows]
        table.append({"predictor": name, "over": "all windows",
                      **prediction_agreement(*(np.concatenate(v) for v in zip(*everything)))})
        for ranking in rankings:
            pairs = [prediction_pairs(rows, name, ranking, label) for label in windows]
            table.append({"predictor": name, "over": f"ranking {ranking}",
                          **prediction_agreement(*(np.concatenate(v) for v in zip(*pairs)))})
        for label in labels:
            table.append({"predictor": name, "over": label if label in windows else f"{label} whole image",
                          **prediction_agreement(*prediction_pairs(rows, name, label=label))})
    return table


def summary_table(rows: list[dict], target_list: list[dict]) -> list[dict]:
    """Per (ranking, manipulation, k): mean effect at the target the list was built for ("own"),
    at the image's other targets ("others"), their spread over seeds, and the PSNR change. For
    image-level rankings (m2_whole, random) "own" is the mean over all the image's targets."""
    image_of = {t["label"]: t["image"] for t in target_list}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ranking"], row["manipulation"], row["k"]), []).append(row)
    table = []
    for (ranking, manipulation, k), members in groups.items():
        own, others, per_seed, psnr = [], [], {}, []
        for row in members:
            image = image_of.get(row["target"], row["target"])
            labels = [t["label"] for t in target_list if t["image"] == image]
            if ranking in POINT_RANKINGS:
                mine = [row["window_effect"][row["target"]]]
                rest = [row["window_effect"][label] for label in labels if label != row["target"]]
            else:
                mine, rest = [row["window_effect"][label] for label in labels], []
            own += mine
            others += rest
            per_seed.setdefault(row["seed"], []).extend(mine)
            psnr.append(row["psnr_change"][image])
        seed_means = [float(np.mean(v)) for v in per_seed.values()]
        table.append({"ranking": ranking, "manipulation": manipulation, "k": k, "runs": len(members),
                      "own": float(np.mean(own)), "own_seed_spread": float(np.std(seed_means)),
                      "own_positive": float(np.mean(np.asarray(own) > 0)),
                      "others": float(np.mean(others)) if others else float("nan"),
                      "psnr_change": float(np.mean(psnr))})
    order = {name: i for i, name in enumerate(RANKINGS)}
    table.sort(key=lambda r: (r["manipulation"], r["k"], order.get(r["ranking"], 99)))
    for row in table:  # ratios against random at the same manipulation and k
        random_row = next((r for r in table if r["ranking"] == "random" and r["manipulation"] == row["manipulation"]
                           and r["k"] == row["k"]), None)
        row["random_own"] = random_row["own"] if random_row else float("nan")
        row["own_over_random"] = (row["own"] / row["random_own"] if random_row and row["random_own"] != 0
                                  else float("nan"))
        row["own_over_others"] = (row["own"] / row["others"] if row["others"] == row["others"] and row["others"] != 0
                                  else float("nan"))
    return table


def own_over_random_per_target(rows: list[dict], target_list: list[dict], ranking: str, manipulation: str,
                                k: int) -> dict[str, float]:
    """{target label: mean window-loss change at that target by the runs of ``ranking`` built for it
    (for an image-level ranking: for its image) / the same by random's runs of its image}."""
    out = {}
    for t in target_list:
        owner = t["label"] if ranking in POINT_RANKINGS else t["image"]
        mine = [r["window_effect"][t["label"]] for r in rows if r["ranking"] == ranking and r["target"] == owner
                and r["manipulation"] == manipulation and r["k"] == k]
        chance = [r["window_effect"][t["label"]] for r in rows if r["ranking"] == "random" and r["target"] == t["image"]
                  and r["manipulation"] == manipulation and r["k"] == k]
        if mine and chance and np.mean(chance) != 0:
            out[t["label"]] = float(np.mean(mine) / np.mean(chance))
    return out


def specificity_matrix(rows: list[dict], target_list: list[dict], ranking: str, manipulation: str, k: int
                       ) -> np.ndarray:
    """(targets x targets): entry (i, j) = mean effect at target j of the runs whose list was built
    for target i (NaN where none ran)."""
    labels = [t["label"] for t in target_list]
    matrix = np.full((len(labels), len(labels)), np.nan)
    for i, label in enumerate(labels):
        members = [r for r in rows if r["ranking"] == ranking and r["manipulation"] == manipulation
                   and r["k"] == k and r["target"] == label]
        if members:
            matrix[i] = [np.mean([r["window_effect"][other] for r in members]) for other in labels]
    return matrix


def metasmoothness(base: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, ft: Finetune,
                   m3: SmoothnessCheck, seed: int = 0) -> dict:
    """Is the fine-tuning (the order of ``seed``: expTest's seed 0, or the training's final window of
    ffdnet.seed) smooth in the patches' data weights? It is run with the
    data weights of :func:`utils_if.weight_sets` (1 + 2 x ffdnet.method3.smoothness_directions runs)
    and S_hat is computed from the final weights (:mod:`influence.smoothness`)."""
    from influence import smoothness
    n = len(clean)

    def train(weight_sets: list[torch.Tensor]):
        finals = []
        for w in opt.progress(weight_sets, desc="metasmoothness", unit="run", leave=False):
            tuned = finetune(copy.deepcopy(base), noisy, clean, sigma, finetune_run(ft, n, seed, weights=w.to(clean.dtype)))
            finals.append(torch.cat([p.detach().reshape(-1).cpu() for p in tuned.parameters()]))
        return finals, None
    return smoothness.measure(train, n, m3.smoothness_directions, m3.smoothness_step, 0)
