"""The FFDNet explainability study's plumbing (ffdnet_test/expTest.py reads as one story over it):
the study's tags, one fine-tuning run, the per-position influence maps, the predictions and the
report (table, verdicts, figures, JSON)."""
from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np
import torch

import utils_if
import utils_option as opt
from ffdnet_test import attribution, common, explain, plotting


def study_tag(settings: opt.Settings) -> str:
    """The model's tag + a hash of everything a run's outcome depends on besides its own job."""
    cfg = settings.ffdnet
    ecfg = settings.ffdnet.explain
    written = opt.as_dict(settings.ffdnet)  # hashed as the settings file holds them
    finetune = dict(written["explain"]["finetune"])
    if finetune.get("optimizer", "adam") == "adam":  # torch's Adam keeps the tags it had before these keys
        finetune = {k: v for k, v in finetune.items() if k not in ("optimizer", "momentum") and (k != "eps_root" or v)}
    key = {"finetune": finetune, "m1": [ecfg.m1_layer, ecfg.m1_mode, written["method1"]],
           "m2": os.path.basename(common.m2_result_file(settings, "")), "points": cfg.attribution.points,
           "model": common.resolve_model_path(settings), "test_images": ecfg.test_images,
           "removal": "weight0"}  # removed patches keep their place with weight 0 (earlier studies skipped them)
    if set(ecfg.rankings) & set(explain.SEED_RANKINGS):
        key["m3"] = os.path.basename(common.m3_result_file(settings, "", 0))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{common.run_tag(settings)}_{digest}"


def report_tag(settings: opt.Settings) -> str:
    """The report's files: the study and a short hash of the plan's choices that change the table but
    not any one run (rankings, manipulations, k values, seeds, maps), so that two tables made with other
    choices never overwrite each other."""
    ecfg = settings.ffdnet.explain
    plan = {k: getattr(ecfg, k) for k in ("rankings", "manipulations", "k_values", "seeds", "maps")}
    return f"{study_tag(settings)}_r{hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:6]}"


def run_job(job: dict, base, data, ranked, images, tests, target_list, settings, device) -> dict:
    """Fine-tune a copy of the base model on the job's training set and measure it."""
    cfg = settings.ffdnet
    ecfg = settings.ffdnet.explain
    noisy, clean, sigma = data
    n = len(clean)
    chosen = explain.chosen_patches(job, ranked, n, images)
    weights = explain.removal_weights(n, chosen if job["manipulation"] == "remove" else np.zeros(0, dtype=np.int64))
    targets_used = clean
    if job["manipulation"] == "corrupt":
        targets_used = clean.clone()
        index = torch.as_tensor(chosen, dtype=torch.long, device=device)
        targets_used[index] = noisy[index]
    run = explain.finetune_run(ecfg.finetune, n, job["seed"], weights)
    with opt.Timer() as timer:
        model = explain.finetune(copy.deepcopy(base), noisy, targets_used, sigma, run)
        outcome = explain.evaluate(model, tests, target_list, cfg.method2.window,
                                   cfg.test.noise_level_img / 255.0)
    return {"job": {k: v for k, v in job.items() if k != "path"}, "outcome": outcome,
            "chosen": [int(i) for i in chosen], "steps": run.num_steps, "seconds": round(timer.seconds, 2)}


def influence_map_rows(settings: opt.Settings, target_list, ranked, device, logger) -> list[dict]:
    """For each target, its top explain.maps patches by pixel-window influence, with where inside each
    patch that influence sits (conv inner products split per position, upsampled 2x to pixels)."""
    cfg = settings.ffdnet
    count = settings.ffdnet.explain.maps
    _, solver = opt.solver_run(cfg.method2, cfg.seed)
    if not count or solver.solver not in utils_if.KRONECKER_SOLVERS or "m2_window" not in settings.ffdnet.explain.rankings:
        logger.info("influence maps: skipped (they need ffdnet.explain.maps > 0, ranking m2_window and a "
                    "kfac/ekfac solver, whose parameters are the conv layers only)")
        return []
    model, _ = common.load_model(settings, device)
    problem = attribution.influence_problem(settings, model, solver)
    x_train, y_train, patches = attribution.training_points(settings, device)
    grads = []
    for t in target_list:
        x, y, _ = attribution.packed_test_image(settings, t["image"], device)
        loss = utils_if.masked_mse_sample_loss(attribution.window_mask(tuple(y.shape[1:]), t["point"],
                                                                       cfg.method2.window).to(device))
        grads.append(problem.sample_grads(x, y, loss=loss))
    s_test, _ = utils_if.inverse_hvp(problem, torch.cat(grads), x_train, y_train, solver, show_progress=False)
    rows = []
    for t, s_row in zip(target_list, s_test):
        top = ranked[f"m2_window|{t['label']}"][:count]
        maps = utils_if.conv_position_influence(problem, s_row, x_train[top], y_train[top]).cpu()
        totals = maps.sum((1, 2))
        logger.info(f"influence maps {t['label']}: patches {top.tolist()}, influence {[f'{v:.3g}' for v in totals]}")
        pixels = maps.repeat_interleave(2, 1).repeat_interleave(2, 2)  # FFDNet works on 2x2 pixel blocks
        rows.append({"title": t["label"], "target": t["label"], "top": top.tolist(), "totals": totals.tolist(),
                     "patches": [patches.clean[i] for i in top],
                     "maps": list(pixels), "captions": [f"#{i}: {v:.2g}" for i, v in zip(top.tolist(), totals)]})
    return rows


def predictors(settings: opt.Settings, target_list: list[dict], n_train: int) -> dict[str, explain.Predictions]:
    """What predicts the removal runs' changes: Method 3 of each seed's own run ("m3", when
    m3_Test's files exist) and Method 2's influence ("m2", from m2_Test's files), for every window
    and every image's whole-image loss."""
    out: dict[str, explain.Predictions] = {}
    if all(os.path.isfile(common.m3_result_file(settings, t["image"], seed))
           for t in target_list for seed in range(settings.ffdnet.explain.seeds)):
        out["m3"] = explain.method3_influence(settings, target_list, n_train)
    m2 = {}
    for image in dict.fromkeys(t["image"] for t in target_list):
        path = common.m2_result_file(settings, image)
        if not os.path.isfile(path):
            continue
        entries = opt.read_json(path, "ffdnet_test/m2_Test.py")["entries"]
        m2[(None, image)] = np.asarray(entries["whole"]["influence"], dtype=np.float64)
        for t in (t for t in target_list if t["image"] == image):
            entry = entries.get(f"point {explain.point_label(t['point'])}")
            if entry is not None:
                m2[(None, t["label"])] = np.asarray(entry["influence"], dtype=np.float64)
    if m2:
        out["m2"] = m2
    return out


def prediction_lines(table: list[dict]) -> list[str]:
    header = ["predictor", "over", "pairs", "pearson", "spearman", "size_ratio", "median_measured_over_predicted"]
    return opt.markdown_table(header, [[f"{r.get(h, float('nan')):.3g}" if h not in ("predictor", "over", "pairs")
                                         else str(r.get(h, "")) for h in header] for r in table]).split("\n")


def report(settings: opt.Settings, runs: dict, target_list: list[dict], base_outcome: dict, tag: str, ranked, n_train: int,
           device, logger) -> dict:
    ecfg = settings.ffdnet.explain
    rows = explain.effects(runs, target_list, predictors(settings, target_list, n_train))
    predictions = explain.prediction_table(rows, target_list)
    controls = {name: run["outcome"]["window_loss"] for name, run in runs.items() if run["job"]["ranking"] is None}
    table = explain.summary_table(rows, target_list)
    k_max = max(ecfg.k_values)
    verdicts = []
    for ranking in (r for r in ("m3_window", "m2_window") if r in ecfg.rankings):
        for manipulation in ecfg.manipulations:
            window = next((r for r in table if r["ranking"] == ranking and r["manipulation"] == manipulation
                           and r["k"] == k_max), None)
            if window is None:
                continue
            per_point = explain.own_over_random_per_target(rows, target_list, ranking, manipulation, k_max)
            holds = [label for label, ratio in per_point.items() if ratio >= 3]
            verdicts.append(f"{ranking}, {manipulation} top {k_max}: raises its own window's loss "
                            f"{window['own']:.3g} vs random {window['random_own']:.3g} "
                            f"(x{window['own_over_random']:.2f}; hypothesis >= 3: "
                            f"{'HOLDS' if window['own_over_random'] >= 3 else 'FAILS'}; per point "
                            f"{', '.join(f'{k} x{v:.2f}' for k, v in per_point.items())}: >= 3 at {len(holds)} of "
                            f"{len(per_point)}) and vs the other points {window['others']:.3g} "
                            f"(x{window['own_over_others']:.2f}; hypothesis >= 2: "
                            f"{'HOLDS' if window['own_over_others'] >= 2 else 'FAILS'})")
    for name in ("m3", "m2"):
        points = [r for r in predictions if r["predictor"] == name and r["over"] in {t["label"] for t in target_list}]
        good = [r["over"] for r in points if r.get("pearson", 0) >= 0.9 and 0.5 <= r.get("size_ratio", 0) <= 2]
        if points:
            verdicts.append(f"{name} predicted vs measured removal effects per point (goal Pearson >= 0.9 and size "
                            f"ratio within 2x): met at {len(good)} of {len(points)} points; " + "; ".join(
                                f"{r['over']} Pearson {r.get('pearson', float('nan')):.3f}, size ratio "
                                f"{r.get('size_ratio', float('nan')):.3g}" for r in points))
    for ranking in (r for r in explain.POINT_RANKINGS if r in ecfg.rankings):
        for manipulation in ecfg.manipulations:
            matrix = explain.specificity_matrix(rows, target_list, ranking, manipulation, k_max)
            done = [i for i in range(len(matrix)) if np.isfinite(matrix[i]).all()]
            specific = [target_list[i]["label"] for i in done if matrix[i, i] == matrix[i].max()]
            verdicts.append(f"{ranking}, {manipulation} top {k_max}: the list built for a target moves that target "
                            f"more than any other for {len(specific)} of {len(done)} targets ({', '.join(specific)})")
    header = ["ranking", "manipulation", "k", "runs", "own", "own_seed_spread", "own_positive", "others", "own_over_random",
              "own_over_others", "psnr_change"]
    seconds = [run["seconds"] for run in runs.values()]
    text = opt.markdown_table(header, [[r[h] for h in header] for r in table]) + (
        f"\n\nown = mean change of the window loss ({2 * settings.ffdnet.method2.window + 1}^2 "
        f"pixels) at the target the list was built for (m2_whole, random: at every target of the image), vs the "
        f"control of the same seed; others = at the image's other targets; own_seed_spread = std over seeds of "
        f"the per-seed mean; own_positive = the fraction of those changes above 0; psnr_change in dB. Window losses before fine-tuning: "
        f"{ {k: float(f'{v:.4g}') for k, v in base_outcome['window_loss'].items()} }. {len(runs)} runs, "
        f"{np.median(seconds):.0f} s each (median). Window losses of the controls (fine-tuning noise between "
        f"seeds): { {name: {k: float(f'{v:.4g}') for k, v in c.items()} for name, c in controls.items()} }.\n\n"
        f"Predicted vs measured: the first-order prediction of every removal run (sum of the removed patches' "
        f"influence / n; m3 = Method 3 of the seed's own control run, m2 = Method 2) against the measured change "
        f"of each window loss (and of each image's MSE), over (removal run, target) pairs of every ranking; "
        f"size_ratio = ||measured|| / ||predicted||.\n\n" + "\n".join(prediction_lines(predictions)) + "\n\n"
        + "\n".join(f"- {v}" for v in verdicts) + "\n")
    md = opt.write_text(opt.output_path(settings, "test", f"ffdnet_expTest_{tag}.md"), text, logger)
    csv = opt.write_csv(opt.output_path(settings, "test", f"ffdnet_expTest_{tag}.csv"),
                        [{h: r[h] for h in header} for r in table], logger)
    opt.write_json(opt.output_path(settings, "test", f"ffdnet_expTest_{tag}.json"),
                   {"table": table, "effects": rows, "base": base_outcome, "verdicts": verdicts,
                    "predictions": predictions, "controls": controls,
                    "settings": opt.as_dict(settings.ffdnet)}, logger)
    for v in verdicts:
        logger.info(v)
    figures = []
    labels = [t["label"] for t in target_list]
    for image in dict.fromkeys(t["image"] for t in target_list):
        _, _, clean, _ = attribution.test_image(settings, image)
        mine = [t for t in target_list if t["image"] == image]
        per_image = explain.summary_table([r for r in rows if r["target"] in {image, *[t["label"] for t in mine]}], mine)
        fig = plotting.effect_bars(clean, [t["point"] for t in mine], [t["label"] for t in mine], per_image,
                                   f"FFDNet explainability test, {image}: effect of manipulating the top-k patches")
        figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", f"ffdnet_expTest_{tag}_effects_{image}.png"), logger))
    matrices = {f"{ranking}, {manipulation} top {k_max}": explain.specificity_matrix(rows, target_list, ranking, manipulation, k_max)
                for ranking in explain.POINT_RANKINGS if ranking in ecfg.rankings for manipulation in ecfg.manipulations}
    if matrices:
        fig = plotting.specificity(matrices, labels, "specificity: window loss change (rows: list built for, "
                                                     "columns: measured at)")
        figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", f"ffdnet_expTest_{tag}_specificity.png"), logger))
    map_rows = influence_map_rows(settings, target_list, ranked, device, logger)
    if map_rows:
        fig = plotting.influence_maps(map_rows, "where the pixel-window influence sits inside the top patches")
        figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", f"ffdnet_expTest_{tag}_maps.png"), logger))
    return {"table": table, "verdicts": verdicts, "predictions": predictions, "markdown": md, "csv": csv, "figures": figures, "effects": rows,
            "maps": [{k: r[k] for k in ("target", "top", "totals")} for r in map_rows]}
