"""The question in one step for the denoiser: which training patches made the network output this
pixel, by the best measured ranking (pixel-window influence with a Kronecker solver over all
patches), where inside each patch that influence sits, and how far to trust the list (the
counterfactual study of the same model, ffdnet_test/expTest.py, when it exists). Used by
ffdnet_test/run_pipeline.py."""
from __future__ import annotations

import glob
import json
import os

import torch

import utils_if
import utils_option as opt
from ffdnet_test import attribution, common
from options.blocks import Ffdnet, score_fields

NOT_MEASURED = "not measured for these settings (run ffdnet_test/expTest.py: the counterfactual study)"


def best_settings(settings: opt.Settings) -> dict:
    """The settings of the best measured ranking: ffdnet.question.best_solver over all training patches."""
    best = settings.ffdnet.question.best_solver
    return opt.with_values(settings, {"ffdnet": {"method2": {"solver": best, "max_train_points": 0}}})


def trust_key(cfg: Ffdnet) -> dict:
    """Every setting that changes the pixel-window ranking's scores: the model's training (the
    ffdnet block's fields that change scores, options.blocks.score_fields) and Method 2's solver part
    of its file name with its training patches and pixel window. An expTest report is quoted only
    when its own settings give the same key."""
    m2 = cfg.method2
    return {"model": {**score_fields(cfg), "window": score_fields(cfg.window) if cfg.window.epochs else "none"},
            "method2": {"solver": opt.solver_file_part(m2),
                        "max_train_points": m2.max_train_points, "window": m2.window}}


MEASURED_TABLE = os.path.join(opt.REPO_ROOT, "docs", "measured_lds.json")
LDS_COMMAND = "python3 ffdnet_test/ldsTest.py -set 'ffdnet.recipe=\"attributable\"'"


def model_key(cfg: Ffdnet) -> dict:
    """The trained denoiser's part of a trust key: the ffdnet block's fields that change scores and
    its final window's (or "none")."""
    return {**score_fields(cfg), "window": score_fields(cfg.window) if cfg.window.epochs else "none"}


def lds_key(cfg: Ffdnet, method: str) -> dict:
    """The trust key of one ffdnet_test/ldsTest row: the model, and the method's own settings (Method 3:
    the pixel window; Method 1: its layer, mode and recording; a solver: its file part and the window)."""
    if method == "m3":
        own = {"pixel_window": cfg.method2.window}
    elif method == "m1":
        own = {"layer": cfg.explain.m1_layer, "mode": cfg.explain.m1_mode, **score_fields(cfg.method1)}
    else:
        own = {"solver": opt.solver_file_part(opt.with_values(cfg.method2, {"solver": method})),
               "pixel_window": cfg.method2.window}
    return {"model": model_key(cfg), method: own}


def _measured_rows(settings: opt.Settings, table: str) -> list[dict]:
    """Every measured single-model LDS row of the denoiser this run could quote: ldsTest tables in the
    output folder first, then the project's table. {"method", "kind", "drop", "lds", "min", "key", "source"}."""
    rows = []
    for path in sorted(glob.glob(os.path.join(opt.resolve_path(settings.output_dir), "test", "ffdnet_ldsTest_*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            for row in record["rows"]:
                if "min" in row:
                    rows.append({"method": row["method"], "kind": row["kind"], "drop": row["fraction"],
                                 "lds": row["lds"], "min": row["min"], "key": record["meta"]["keys"][row["method"]],
                                 "source": f"ldsTest in this output folder: {path}"})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    with open(table, encoding="utf-8") as f:
        for entry in json.load(f)["entries"]:
            if entry.get("network") != "ffdnet":
                continue
            for name, value in entry["rows"].items():
                method, kind = name.split(" ", 1)
                rows.append({"method": method, "kind": kind, "drop": entry["drop"], "lds": value["lds"],
                             "min": value["min"], "key": value["key"],
                             "source": f"the project's measured table ({entry['source']})"})
    return rows


def measured_lines(settings: opt.Settings, method: str, title: str, table: str = MEASURED_TABLE) -> list[str]:
    """How far to trust ``method``'s lists for exactly these settings, one line per target kind: the
    measured single-model LDS (mean over the pixel windows, and the smallest) at each drop, and where
    it comes from; or "not measured for these settings" with the keys in which the nearest measured
    row differs and the command that would measure it."""
    if not settings.ffdnet.window.epochs:  # ldsTest reruns the final window: a training without one has no ground truth
        return [f"{title}: no method's answer has been measured for this recipe (it has no final window to rerun); "
                f"set ffdnet.recipe = \"attributable\" and measure it: {LDS_COMMAND}"]
    key = lds_key(settings.ffdnet, method)
    rows = [r for r in _measured_rows(settings, table) if r["method"] == method]
    lines = []
    for kind in ("pixel window", "whole image"):
        mine = [r for r in rows if r["kind"] == kind and r["key"] == key]
        if mine:
            source = mine[0]["source"]
            drops = {}
            for r in mine:
                drops.setdefault(r["drop"], r)
            text = ", ".join(f"{drops[d]['lds']:+.3f} (smallest {drops[d]['min']:+.3f}) at a {100 * d:g}% drop"
                             for d in sorted(drops))
            lines.append(f"{title}, {kind}s: single-model LDS {text}, removals in the training's final window "
                         f"({source})")
            continue
        others = [r for r in rows if r["kind"] == kind]
        if others:
            near = min(others, key=lambda r: len(opt.key_differences(key, r["key"])))
            lines.append(f"{title}, {kind}s: not measured for these settings; the nearest measured row "
                         f"({near['lds']:+.2f} at a {100 * near['drop']:g}% drop, {near['source']}) differs in "
                         + "; ".join(opt.key_differences(key, near["key"])[:4]) + f". Measure it: {LDS_COMMAND}")
        else:
            lines.append(f"{title}, {kind}s: not measured (no measured row of this method). Measure it: {LDS_COMMAND}")
    return lines


def counterfactual_trust(settings: opt.Settings) -> tuple[dict[str, str], list[str]]:
    """({point label: one trust line}, []) from an expTest report whose trust key is these settings':
    removing the pixel-window ranking's top-k raises the point's own window loss x times a random
    removal, and Method 2's predicted vs measured Pearson there. Else ({}, the keys in which the
    newest expTest report in the output folder differs; [] when there is none)."""
    wanted = trust_key(settings.ffdnet)
    differs: list[str] = []
    pattern = os.path.join(opt.resolve_path(settings.output_dir), "test", "ffdnet_expTest_*.json")
    for path in sorted(glob.glob(pattern), reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            found = trust_key(opt.with_values(settings.ffdnet, record["settings"], where=path))
        except (OSError, ValueError, KeyError, TypeError, opt.SettingsError):
            continue
        if found != wanted:
            differs = differs or [f"{part}.{k} ({wanted[part][k]!r} here, {found[part][k]!r} measured)"
                                  for part in wanted for k in wanted[part] if wanted[part][k] != found[part].get(k)]
            continue
        k_max = max(r["k"] for r in record["table"])
        lines = {}
        for row in record["effects"]:
            if row.get("ranking") == "m2_window" and row.get("manipulation") == "remove" and row.get("k") == k_max:
                label = row["target"]
                random = [r for r in record["effects"] if r.get("ranking") == "random" and r.get("k") == k_max
                          and r.get("manipulation") == "remove"]
                lines.setdefault(label, f"removing its top {k_max} raised this window's loss by "
                                        f"{row.get('own', float('nan')):.3g} (random removals: "
                                        f"{sum(r.get('own', 0) for r in random) / max(len(random), 1):.3g})")
        for row in record["predictions"]:
            if row.get("predictor") == "m2" and row.get("over") in lines:
                lines[row["over"]] += f"; predicted vs measured Pearson {row.get('pearson', float('nan')):.2f}"
        return {label: f"{line} ({path})" for label, line in lines.items()}, []
    return {}, differs


def point_maps(settings: opt.Settings, image: str, point: list[int], top: list[int], device) -> torch.Tensor:
    """(k, H, W) where inside each of the ``top`` training patches its influence on the point's
    window sits (per conv output position, upsampled 2x to pixels; they sum to its influence)."""
    cfg = settings.ffdnet
    _, solver = opt.solver_run(cfg.method2, cfg.seed)
    model, _ = common.load_model(settings, device)
    problem = attribution.influence_problem(settings, model, solver)
    x_train, y_train, _ = attribution.training_points(settings, device)
    x, y, _ = attribution.packed_test_image(settings, image, device)
    loss = utils_if.masked_mse_sample_loss(attribution.window_mask(tuple(y.shape[1:]), point,
                                                                   cfg.method2.window).to(device))
    s_test, _ = utils_if.inverse_hvp(problem, problem.sample_grads(x, y, loss=loss), x_train, y_train, solver,
                                     show_progress=False)
    maps = utils_if.conv_position_influence(problem, s_test[0], x_train[top], y_train[top]).cpu()
    return maps.repeat_interleave(2, 1).repeat_interleave(2, 2)  # FFDNet works on 2x2 pixel blocks


def crop_around(image: torch.Tensor, point: list[int], size: int) -> tuple[torch.Tensor, list[int]]:
    """A (C, size, size) crop of ``image`` around ``point`` (clipped at the borders) and the point in it."""
    _, height, width = image.shape
    top = min(max(point[0] - size // 2, 0), max(height - size, 0))
    left = min(max(point[1] - size // 2, 0), max(width - size, 0))
    return image[:, top:top + size, left:left + size], [point[0] - top, point[1] - left]


DENOISES_BY_DB = 0.5  # below this PSNR gain over its own noisy input, the model is said not to denoise


def denoising_check(settings: opt.Settings, model, image: str, device) -> dict:
    """Does the model denoise the test image it is asked about? The PSNR of its output and of its
    noisy input against the clean image (the same noisy input the attribution explains, 8-bit as
    FFDNet_Test scores it), and a one-line verdict: a warning when the gain is below
    :data:`DENOISES_BY_DB` dB, since the attribution would explain a model that does not denoise."""
    from ffdnet_test import metrics
    cfg = settings.ffdnet
    _, _, clean, noisy = attribution.test_image(settings, image)
    sigma = cfg.test.noise_level_img
    reference = metrics.to_uint8(clean)
    denoised = metrics.psnr(metrics.to_uint8(common.denoise(model, noisy, settings, device)), reference,
                            cfg.test.border)
    noisy_db = metrics.psnr(metrics.to_uint8(noisy), reference, cfg.test.border)
    gain = denoised - noisy_db
    line = (f"{image}: the denoiser gives {denoised:.2f} dB against its noisy input's {noisy_db:.2f} dB "
            f"(sigma {sigma:g}, {gain:+.2f} dB)")
    if gain < DENOISES_BY_DB:
        line = (f"WARNING: {line}: it does not denoise this image, so its attribution explains a model that "
                f"fails at the task; train it longer (ffdnet.epoch) or use the quick profile's model")
    return {"psnr": denoised, "psnr_noisy": noisy_db, "gain": gain, "line": line, "denoises": gain >= DENOISES_BY_DB}
