"""Ground truth for the denoiser in the single-model setting: the linear datamodeling score (LDS) of
every method, per pixel window and per whole image (settings: ffdnet.lds; the math: ffdnet_test/lds.py).

The trained denoiser must end with a final window (ffdnet.window.epochs > 0; ffdnet.recipe
"attributable" sets one). For each fraction of ffdnet.lds.drop_fractions, ffdnet.lds.num_subsets
random subsets of the patches the window reaches are weighted 0 and the window is rerun from its
saved start (same order, same noise); every target's loss is recorded. The targets: for each of the
first ffdnet.lds.test_images images of ffdnet.attribution.images, the whole-image MSE and the
squared error of the (2 ffdnet.method2.window + 1)^2 window around each ffdnet.attribution.points.

Methods (ffdnet.lds.methods): m3 = Method 3 through the window (the exact derivative of each
target in each patch's weight, ffdnet_test/window.py); a Method-2 solver name = pixel-window
influence on the trained model with that solver over all patches (m2_Test, run here when missing);
m1 = Method 1 at ffdnet.explain.m1_layer / m1_mode (pixel windows only; m1_Test). LDS per target =
Spearman over the subsets between predicted and measured change, with a bootstrap interval over
the subsets. Beside it, the top-k removal view (ffdnet.lds.top_k): removing Method 3's top k patches
for each target, measured against predicted, and against k random patches.

Resumable (every rerun is one small JSON; finished ones are skipped) and splittable:
torchrun --nproc_per_node=K ffdnet_test/ldsTest.py shares the reruns across K processes.

Writes: lds/ffdnet/{study}/*.json (one per rerun), lds/ffdnet/{study}/m3_influence.json;
        test/ffdnet_ldsTest_{study}_r{hash}.{json,md}; fig/ffdnet_ldsTest_{study}_r{hash}.png ({hash}: the
        methods' settings, so that a table of other rows never replaces this one)
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, explain, lds, m1_Test, m2_Test, plotting, window  # noqa: E402
from ffdnet_test import question  # noqa: E402


def method_settings(settings: opt.Settings, method: str) -> opt.Settings:
    """The settings m2_Test runs for an ldsTest row: that solver over all training patches."""
    return opt.with_values(settings, {"ffdnet": {"method2": {"solver": method, "max_train_points": 0}}})


def prerequisites(settings: opt.Settings, images: list[str], log) -> None:
    """Train the model (with its window) and run m1_Test / m2_Test where their files are missing."""
    cfg = settings.ffdnet
    opt.run_stage(FFDNet_Train, [common.model_file(settings), common.window_start_file(settings)]
                  + ([common.grad_norm_file(settings)] if "m1" in cfg.lds.methods else []), settings, log)
    for method in cfg.lds.methods:
        if method == "m1":
            opt.run_stage(m1_Test, [common.m1_result_file(settings, image) for image in images], settings, log)
        elif method != "m3":
            chosen = method_settings(settings, method)
            opt.run_stage(m2_Test, [common.m2_result_file(chosen, image) for image in images], chosen, log)


def predictions(settings: opt.Settings, images: list[str], folder: str, device, logger) -> tuple[dict, dict]:
    """({method: {target label: influence (n,)}}, Method 3's info) for ffdnet.lds.methods."""
    cfg = settings.ffdnet
    out, info = {}, {}
    for method in cfg.lds.methods:
        table = {}
        if method == "m3":
            path = os.path.join(folder, "m3_influence.json")
            if not os.path.isfile(path):
                influence, targets, replay_info = window.method3(settings, images, device, progress=opt.progress)
                opt.write_json(path, {"targets": [f"{t['image']} {t['label'].replace('point ', '')}" for t in targets],
                                      "influence": influence.tolist(), "info": replay_info}, logger)
            record = opt.read_json(path, "ffdnet_test/ldsTest.py", shape=("targets", "influence"))
            table = dict(zip(record["targets"], np.asarray(record["influence"])))
            info = record["info"]
        elif method == "m1":
            ecfg = cfg.explain
            for image in images:
                record = opt.read_json(common.m1_result_file(settings, image), "ffdnet_test/m1_Test.py")
                for entry in record["entries"]:
                    if entry["layer"] == ecfg.m1_layer and entry["mode"] == ecfg.m1_mode:
                        table[f"{image} {explain.point_label(entry['point'])}"] = np.array(
                            [0.0 if s is None else s for s in entry["scores"]])
        else:
            for image in images:
                path = common.m2_result_file(method_settings(settings, method), image)
                for label, entry in opt.read_json(path, "ffdnet_test/m2_Test.py", shape=("entries",))["entries"].items():
                    table[f"{image} {label.replace('point ', '')}"] = np.asarray(entry["influence"])
        out[method] = table
    return out, info


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    rank, world = opt.distributed_start(cfg.use_gpu)
    logger, device = opt.start_script(settings, "ffdnet_ldsTest", cfg, seed=False)
    images = attribution.image_names(settings, logger.info)[:cfg.lds.test_images]
    if rank == 0:
        prerequisites(settings, images, logger.info)
    opt.distributed_barrier()
    start = window.load_start(settings, device)
    noisy, clean, sigma, patches = attribution.training_triples(settings, device)
    n = len(patches)
    tests = attribution.model_order_pairs(settings, list(images))
    target_list = explain.point_targets(images, cfg.attribution.points)
    labels = lds.target_labels(images, cfg.attribution.points)
    folder = lds.study_folder(settings)
    jobs = lds.plan(settings, n, folder)
    pending, mine = opt.pending_share(jobs, rank, world)
    run = window.window_run(cfg, n)
    logger.info(f"FFDNet single-model LDS {os.path.basename(folder)}: {n} patches, window {run.num_steps} steps "
                f"({len(window.patches_reached(cfg, n))} patches reached), {len(labels)} targets, {len(jobs)} reruns "
                f"({len(jobs) - len(pending)} done); rank {rank}/{world} runs {len(mine)}; "
                f"torch threads {torch.get_num_threads()}")
    bar = opt.progress(mine, desc=f"rank {rank}: window reruns", unit="run")
    for job in bar:
        record = lds.run_job(job, start, (noisy, clean, sigma), tests, target_list, settings)
        opt.write_json(job["path"], record)
        bar.set_postfix(last=f"{record['seconds']:.0f}s")
    opt.distributed_barrier()
    result = {"runs": len(mine), "jobs": len(jobs)}
    if rank == 0:
        result.update(report(settings, jobs, images, labels, target_list, tests, folder, (start, (noisy, clean, sigma)),
                             device, logger))
    opt.distributed_end()
    return result


def report(settings, jobs, images, labels, target_list, tests, folder, window_data, device, logger) -> dict:
    """Score every method against the reruns; check the control reproduces the trained model."""
    cfg = settings.ffdnet
    n = len(window_data[1][1])
    records = [opt.read_json(job["path"], "ffdnet_test/ldsTest.py") for job in jobs]
    trained, model_path = common.load_model(settings, device)
    expected = lds.losses_by_label(explain.evaluate(trained, tests, target_list, cfg.method2.window,
                                                    cfg.test.noise_level_img / 255.0))
    control = records[0]["losses"]
    if any(control[label] != expected[label] for label in labels):
        raise opt.SettingsError(f"the window's rerun with every patch kept does not reproduce {model_path} (stale "
                                f"reruns in {folder}, or a model trained with other settings or another number of torch "
                                f"threads, which changes the last bits): delete the folder "
                                f"or train again (ffdnet_test/FFDNet_Train.py)")
    table, m3_info = predictions(settings, images, folder, device, logger)
    rows = lds.score(table, records, labels, n, cfg.lds.bootstrap)
    top = top_k_view(settings, table["m3"], target_list, images, tests, window_data, folder) if "m3" in table else []
    keys = {method: question.lds_key(cfg, method) for method in cfg.lds.methods}
    choices = json.dumps({"keys": keys, "top_k": cfg.lds.top_k, "bootstrap": cfg.lds.bootstrap}, sort_keys=True)
    name = f"{os.path.basename(folder)}_r{hashlib.sha1(choices.encode()).hexdigest()[:6]}"  # other rows: another file
    meta = {"settings": opt.as_dict(cfg), "model_file": model_path, "n_train": n, "labels": labels,
            "keys": keys, "method3": m3_info,
            "seconds_reruns": round(sum(r["seconds"] for r in records), 1),
            "question": f"removing patches in the training's final window ({window.window_run(cfg, n).num_steps} "
                        f"steps), this very model (single-model setting)"}
    summary = [r for r in rows if "min" in r]
    text = opt.markdown_table(["method", "drop", "targets", "mean LDS", "min"],
                              [[r["method"], f"{r['fraction']:.0%}", r["target"], r["lds"], r["min"]] for r in summary])
    text += "\n\n" + opt.markdown_table(["method", "drop", "target", "LDS", "95% interval"],
                                        [[r["method"], f"{r['fraction']:.0%}", r["target"], r["lds"],
                                          f"[{r['low']:.2f}, {r['high']:.2f}]"] for r in rows if "min" not in r])
    if top:
        text += "\n\n" + opt.markdown_table(["target", "k", "measured", "predicted", "measured / predicted",
                                             "random", "measured / |random|"],
                                            [[r["target"], r["k"], r["measured"], r["predicted"], r["ratio"],
                                              r["random"], r["over_random"]] for r in top])
    path = opt.write_json(opt.output_path(settings, "test", f"ffdnet_ldsTest_{name}.json"),
                          {"rows": rows, "top_k": top, "meta": meta}, logger)
    opt.write_text(opt.output_path(settings, "test", f"ffdnet_ldsTest_{name}.md"), text + "\n", logger)
    figure = opt.save_figure(plotting.lds_bars(rows, f"Denoiser, single-model LDS ({meta['question']}; "
                                                     f"{len(records) - 1} reruns)"),
                             opt.output_path(settings, "fig", f"ffdnet_ldsTest_{name}.png"), logger)
    print(opt.markdown_table(["method", "drop", "targets", "mean LDS", "min"],
                             [[r["method"], f"{r['fraction']:.0%}", r["target"], r["lds"], r["min"]] for r in summary]))
    print(f"table: {path}\nfigure: {figure}")
    return {"rows": rows, "top_k": top, "file": path, "figure": figure, "meta": meta}


def top_k_view(settings, influence: dict, target_list, images, tests, window_data, folder) -> list[dict]:
    """expTest's view beside the LDS: for each target, rerun the window without Method 3's top k
    (helpful) patches, and without k random ones of the window per image; measured change against
    Method 3's predicted one, and against random's. One file per rerun (resumable)."""
    cfg = settings.ffdnet
    k = cfg.lds.top_k
    if not k:
        return []
    start, data = window_data
    n = len(data[1])
    reached = window.patches_reached(cfg, n)
    jobs = [{"name": "control", "removed": torch.zeros(0, dtype=torch.long), "fraction": 0.0, "k": -1}]
    for label, values in influence.items():
        jobs.append({"name": f"top{k}_{label.replace(' ', '_').replace(',', '-')}", "label": label, "k": k,
                     "removed": torch.as_tensor(np.argsort(-values, kind="stable")[:k]), "fraction": 0.0})
    for index, image in enumerate(images):
        generator = torch.Generator().manual_seed(cfg.lds.seed * 7919 + index)
        jobs.append({"name": f"random{k}_{image}", "image": image, "k": k, "fraction": 0.0,
                     "removed": reached[torch.randperm(len(reached), generator=generator)[:k]]})
    records = {}
    os.makedirs(os.path.join(folder, "top_k"), exist_ok=True)
    for job in opt.progress(jobs, desc="top-k reruns", unit="run"):
        path = os.path.join(folder, "top_k", f"{job['name']}.json")
        if not os.path.isfile(path):
            opt.write_json(path, lds.run_job(job, start, data, tests, target_list, settings))
        records[job["name"]] = opt.read_json(path, "ffdnet_test/ldsTest.py")
    control = records["control"]["losses"]
    rows = []
    for label, values in influence.items():
        top = records[f"top{k}_{label.replace(' ', '_').replace(',', '-')}"]
        image = label.rsplit(" ", 1)[0]
        random = records[f"random{k}_{image}"]
        measured = top["losses"][label] - control[label]
        predicted = float(lds.predicted_changes(values, [top["removed"]], n)[0])
        chance = random["losses"][label] - control[label]
        rows.append({"target": label, "k": k, "measured": measured, "predicted": predicted,
                     "ratio": measured / predicted if predicted else float("nan"), "random": chance,
                     "over_random": measured / abs(chance) if chance else float("nan")})  # random's sign is chance
    return rows


if __name__ == "__main__":
    opt.run_script(main, __doc__)
