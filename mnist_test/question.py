"""The question in one step: which training images made the network do this, by each method, and
how far to trust each list. Used by run_pipeline.py; the trust numbers are measured LDS whose every
score-changing setting matches this run's (trust_key): from an ldsTest study in the output folder,
else from the project's own measured table (docs/measured_lds.json), else "not measured for these
settings", with the keys in which the nearest measured row differs."""
from __future__ import annotations

import glob
import json
import os
import textwrap

import torch

import utils_if
import utils_option as opt
from mnist_test import common, plotting, training
from options.blocks import Mnist, score_fields

MEASURED_TABLE = os.path.join(opt.REPO_ROOT, "docs", "measured_lds.json")
NOT_MEASURED = "not measured for these settings"


def lds_row(method: str, settings: opt.Settings) -> str:
    """The ldsTest row that scores a method as these settings run it."""
    cfg = settings.mnist
    if method == "method1":
        return f"m1_{cfg.method1.grad_mode}_raw"
    if method == "method3":
        return "m3_replay"
    return utils_if.solver_for(cfg.method2.solver).lds_name


def trust_key(cfg: Mnist, method: str) -> dict:
    """Every setting that changes the scores of ``method`` ("method1" | "method2" | "method3") for the
    model these settings train, the key a measured LDS must match to be quoted as this run's:
    the training recipe (options.recipe.Recipe.key: its optimiser, schedule, network, seed, the number of training images and
    the attribution window), then the method's own settings: Method 2's solver part of its file
    name (the registry's own list of what a solver reads, its damping and parameters included),
    Method 1's and Method 3's block fields that change scores (options.blocks.score_fields)."""
    if method == "method2":
        own = {"solver": opt.solver_file_part(cfg.method2)}
    else:
        own = score_fields(getattr(cfg, method))
    return {"recipe": opt.Recipe.of(cfg).key(), method: own}


def _measured_rows(settings: opt.Settings, table: str) -> list[dict]:
    """Every measured LDS row this run could quote: ldsTest tables in the output folder first, then
    the project's shipped table. Each row: {"setting", "row", "lds", "drop", "key", "source"}."""
    rows = []
    for path in sorted(glob.glob(os.path.join(opt.resolve_path(settings.output_dir), "test", "lds_*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            setting = record["meta"]["setting"]
            for study in record["studies"].values():
                for row in study["rows"]:
                    if row.get("key"):
                        rows.append({"setting": setting, "row": row["method"], "lds": row["lds"], "key": row["key"],
                                     "drop": study["drop"] if setting == "single_model" else None,
                                     "source": f"ldsTest in this output folder: {path}"})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not an ldsTest table of this kind: ignored
    with open(table, encoding="utf-8") as f:
        for entry in json.load(f)["entries"]:
            for row, value in entry["rows"].items():
                rows.append({"setting": entry["setting"], "row": row, "lds": value["lds"], "key": value["key"],
                             "drop": entry.get("drop"), "source": f"the project's measured table ({entry['source']})",
                             "name": entry["name"]})
    return rows


def measured_lds(settings: opt.Settings, methods: list[tuple[str, str, dict]], table: str = MEASURED_TABLE) -> dict:
    """How far to trust each method's list, for exactly these settings. ``methods``: (title, ldsTest
    row, trust key). Returns {title: {"algorithm": lds or None, "single_model": {drop: lds},
    "source": where or NOT_MEASURED, "differs": [...], "nearest": a row or None}} and "question":
    what the single-model numbers answer (removals from the whole run or from its window). A number is
    quoted only when its row and every setting of its key match; otherwise the nearest measured row
    of the same method is named with the keys in which it differs. ``table``: the shipped table
    (tests pass their own)."""
    cfg = settings.mnist
    rows = _measured_rows(settings, table)
    out: dict = {"question": opt.Recipe.of(cfg).question(cfg.train_subset or 60000)}
    for title, row, key in methods:
        same = [r for r in rows if r["row"] == row and r["key"] == key]
        found = {"algorithm": None, "single_model": {}, "source": NOT_MEASURED, "differs": [], "nearest": None}
        for r in same:  # the output folder's tables come first and win
            if r["setting"] == "algorithm" and found["algorithm"] is None:
                found["algorithm"] = r["lds"]
            elif r["setting"] == "single_model":
                found["single_model"].setdefault(r["drop"], r["lds"])
        if same:
            found["source"] = same[0]["source"]
        else:
            others = [r for r in rows if r["row"] == row]
            if others:
                nearest = min(others, key=lambda r: len(opt.key_differences(key, r["key"])))
                found["nearest"] = nearest
                found["differs"] = opt.key_differences(key, nearest["key"])
        out[title] = found
    return out


def _fmt(value) -> str:
    return f"{value:+.3f}" if isinstance(value, (int, float)) else "-"


def _single_model_text(values: dict) -> str:
    return ", ".join(f"{_fmt(values[drop])} at a {100 * drop:g}% drop" for drop in sorted(values)) or "-"


def trust_lines(methods: list[tuple[str, str, dict]], trust: dict) -> list[str]:
    """The trust table: each method's measured LDS in both questions, where the numbers come from,
    and for a method not measured for these settings, the keys in which the nearest measured row
    differs. ``methods``: (title, ldsTest row, trust key)."""
    lines = [f"How far to trust each list: measured LDS (Spearman; 1 = predicts the retrained models exactly, 0 = "
             f"chance). \"What training does\": models retrained from scratch on half the images; \"this network\": "
             f"{trust['question']}.",
             f"  {'method':<30} {'what training does':>19}   this network"]
    for title, _, _ in methods:
        found = trust[title]
        lines.append(f"  {title:<30} {_fmt(found['algorithm']):>19}   {_single_model_text(found['single_model'])}")
    for title, _, _ in methods:
        found = trust[title]
        if found["source"] != NOT_MEASURED:
            lines.append(f"  {title}: {found['source']}")
        elif found["nearest"]:
            near = found["nearest"]
            value = (_fmt(near["lds"]) + (f" at a {100 * near['drop']:g}% drop" if near.get("drop") else "")
                     + f" ({'what training does' if near['setting'] == 'algorithm' else 'this network'})")
            lines.append(f"  {title}: {NOT_MEASURED}; it differs from the nearest measured row ({value}, "
                         f"{near['source']}) in " + "; ".join(found["differs"]))
        else:
            lines.append(f"  {title}: {NOT_MEASURED} (no measured row of this method)")
    return lines


def question_figure(settings: opt.Settings, test_id: int, methods: list[tuple[str, dict, str]], trust: dict,
                    k: int, test, train, caveats: list[str] = ()):
    """One figure for one test image: the image with its label, prediction and loss, then for each
    method a row of its top-k helpful and a row of its top-k harmful training images (id / label /
    score; red = the test image's label), its measured LDS (the trust table's words) and every caveat
    the console printed. ``methods``: (title, result record, ldsTest row)."""
    rows, labels, titles = [], [], []
    label = int(test.labels[test_id])
    entry0 = None
    for title, record, row in methods:
        entry = next(v for key, v in record.items() if key != "meta" and v["test_id_num"] == test_id)
        entry0 = entry if entry0 is None or ("loss" in entry and "loss" not in entry0) else entry0
        scores = entry.get("influence") or entry.get("scores")
        for kind in ("helpful", "harmful") if "harmful" in entry else ("top",):
            top = entry[kind][:k]
            rows.append([None] + [{"image": train.images[i], "red": int(train.labels[i]) == label,
                                   "caption": f"{i} / {int(train.labels[i])}\n{scores[i]:.3g}"} for i in top])
            short = "M2 " + title.split("(")[1].rstrip(")") if title.startswith("Method 2 (") else title.split(" (")[0]
            labels.append(f"{short}\n{kind}")
        found = trust[title]
        if found["source"] == NOT_MEASURED:
            measured = NOT_MEASURED + (f" (differs in {', '.join(d.split(' (')[0] for d in found['differs'])})"
                                       if found["differs"] else "")
        else:
            measured = (f"what training does {_fmt(found['algorithm'])}; this network "
                        f"{_single_model_text(found['single_model'])}")
        titles.append(f"{title}: {measured}")
    titles.append(f"this network = {trust['question']}")
    titles += [f"caveat: {line}" for line in caveats]
    rows[0][0] = {"image": test.images[test_id], "bold": True,
                  "caption": f"test {test_id}\nlabel {label} / pred {entry0['prediction']}"
                  + (f"\nloss {entry0['loss']:.3g}" if "loss" in entry0 else "")}
    fig = plotting.digit_grid(rows, f"Which training images made the network do this? Test image {test_id} "
                              f"(caption: train id / label / score; red: label {label})\n"
                              + "\n".join(textwrap.fill(t, 150) for t in titles),
                              gap_after_first=True, row_labels=labels)
    return fig


def method3_seconds(settings: opt.Settings, tests: int) -> tuple[float, float]:
    """(check, replay) seconds of Method 3 for this run, estimated from measured costs on the MLP (1
    thread). The check: 1 + 2 x smoothness_directions trainings side by side, at about
    (0.2 + 0.0065 x batch) ms per model and step (bench/attributable.py: 0.21 ms at batch 8, 0.42 at
    32, 1.84 at 256). The replay: the forward replay of every step, 0.7 ms
    at batch 8 and 2.0 ms at batch 128; the walk back over the steps of the attribution window,
    (1.5 + 0.2 per test image) ms per 8 images of the batch. Measured: docs/performance.md."""
    cfg = settings.mnist
    n, batch = cfg.train_subset or 60000, cfg.batch_size
    steps = cfg.epoch * -(-n // batch)
    walked = steps - opt.Recipe.of(cfg).window_start(n)
    trainings = 1 + 2 * cfg.method3.smoothness_directions if cfg.method3.smoothness_directions else 0
    check = trainings * steps * (0.2 + 0.0065 * batch) / 1000.0
    replay = (steps * max(0.7, 0.0156 * batch) + walked * batch / 8 * (1.5 + 0.2 * tests)) / 1000.0
    return check, replay


def method3_check(settings: opt.Settings, ids: list[int], train, test) -> dict:
    """Method 3's metasmoothness check of the run of these settings on the CPU, on the test images
    ``ids`` (printed with its verdict), before the pipeline decides whether to spend the replay;
    ``train``, ``test``: :func:`load_sets`."""
    cfg = settings.mnist
    return training.metasmoothness_said(train, test.images[ids], test.labels[ids], cfg, torch.device("cpu"))


def run_part(settings: opt.Settings, methods: list[tuple[str, str, str, dict]]) -> str:
    """A short hash of what one question's answer holds: each method shown with its trust key (every
    setting that changes its scores), the figure's length and the test selection. Two runs that
    differ in any of these never share a figure or a JSON."""
    import hashlib
    cfg = settings.mnist
    content = {"methods": [(title, row, key) for title, _, row, key in methods], "vis_num": cfg.vis_num}
    return "q" + hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_sets(settings: opt.Settings):
    """(train, test) MNIST on the CPU, for the figures."""
    return (common.load_train_data(settings, torch.device("cpu"), lambda *_: None),
            common.load_test_data(settings, torch.device("cpu"), lambda *_: None))


def best_solver_settings(settings: opt.Settings) -> opt.Settings | None:
    """The settings with Method 2's best measured solver (mnist.question.best_solver), or None when
    the settings already use it. The user's own solver still runs: this one is added, not swapped."""
    best = settings.mnist.question.best_solver  # a registry name: checked with the settings
    if settings.mnist.method2.solver == best:
        return None
    return opt.with_values(settings, {"mnist": {"method2": {"solver": best}}})
