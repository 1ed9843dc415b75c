"""The question in one step: which training images made the network do this, by each method, and
how far to trust each list. Used by run_pipeline.py; the trust numbers are measured LDS, from an
ldsTest study of the same recipe in the output folder, else from the project's own measured table
(docs/measured_lds.json), else "not measured for this recipe"."""
from __future__ import annotations

import glob
import json
import os

import torch

import utils_if
import utils_option as opt
from mnist_test import common, plotting, training

MEASURED_TABLE = os.path.join(opt.REPO_ROOT, "docs", "measured_lds.json")
NOT_MEASURED = "not measured for this recipe"


def lds_row(method: str, settings: dict) -> str:
    """The ldsTest row that scores a method as these settings run it."""
    cfg = common.mnist_cfg(settings)
    if method == "method1":
        return f"m1_{cfg.method1.grad_mode}_raw"
    if method == "method3":
        return "m3_replay"
    return utils_if.solver_for(cfg.method2.solver).lds_name


def model_recipe(settings: dict) -> dict:
    """What makes the trained network and the question Method 3 answers: size, epochs, optimiser,
    schedule, activation and attribution window (the last two only when off the report's, so that
    the shipped table's entries, measured before they existed, still match)."""
    cfg = settings["mnist"]  # read as a result's meta stores it (_study_recipe): one function for both
    return _recipe(cfg, cfg["train_subset"] or 60000, cfg["epoch"])


def _study_recipe(mnist: dict) -> dict:
    """The same for the models of an ldsTest table (its settings, as written in its meta; a table
    written before a key existed was made with that key's report value)."""
    return _recipe(mnist, mnist["lds"]["train_subset"], mnist["lds"]["epoch"])


def _recipe(mnist: dict, train_size: int, epoch: int) -> dict:
    recipe = {"train_size": train_size, "epoch": epoch, "batch_size": mnist["batch_size"],
              "learning_rate": mnist["learning_rate"], "momentum": mnist["momentum"],
              "weight_decay": mnist["weight_decay"], "activation": mnist.get("activation", "relu")}
    if mnist.get("lr_schedule", "constant") != "constant":
        recipe["lr_schedule"] = mnist["lr_schedule"]
    if mnist.get("logit_scale", 1.0) != 1.0:
        recipe["logit_scale"] = mnist["logit_scale"]
    window = mnist.get("method3", {}).get("window", 0)
    if window:
        recipe["window"] = f"{window:g} {mnist['method3']['window_unit']}"
    return recipe


def measured_lds(settings: dict) -> dict:
    """{"algorithm": {row: lds}, "single_model": {row: lds}, "source": where, "recipe": its name}
    for the model these settings train: ldsTest studies of the same recipe in the output folder
    first, else the shipped table, else empty tables with source NOT_MEASURED."""
    wanted = model_recipe(settings)
    found: dict = {"algorithm": {}, "single_model": {}}
    sources = []
    for path in sorted(glob.glob(opt.output_path(settings, "test", "lds_*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            if _study_recipe(record["meta"]["settings"]) != wanted:
                continue
            setting = record["meta"]["setting"]
            found[setting].update({row["method"]: row["lds"] for row in record["rows"]})
            sources.append(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an ldsTest table of this kind: ignored
    if sources:
        return {**found, "source": "ldsTest in this output folder: " + ", ".join(sources), "recipe": "this recipe"}
    with open(MEASURED_TABLE, encoding="utf-8") as f:
        table = json.load(f)
    for entry in table["recipes"]:
        if entry["recipe"] == wanted:
            return {"algorithm": entry["algorithm"], "single_model": entry["single_model"],
                    "source": f"the project's measured table ({entry['source']})", "recipe": entry["name"]}
    optimiser = ("batch_size", "learning_rate", "momentum", "weight_decay", "activation", "lr_schedule", "window")
    same = [e for e in table["recipes"] if all(e["recipe"].get(k) == wanted.get(k) for k in optimiser)]
    nearest = min(same, key=lambda e: abs(e["recipe"]["train_size"] - wanted["train_size"]) / 60000
                  + abs(e["recipe"]["epoch"] - wanted["epoch"]) / 20) if same else None
    return {**found, "source": NOT_MEASURED, "recipe": "", "nearest": nearest}


def trust_lines(methods: list[tuple[str, str, str]], trust: dict) -> list[str]:
    """A short table: each method, its measured LDS in both settings, and where the numbers come from.
    ``methods``: (title, file, ldsTest row)."""
    def fmt(value) -> str:
        return f"{value:+.3f}" if isinstance(value, (int, float)) else "-"
    lines = ["How far to trust each list: measured LDS (1 = predicts retraining exactly, 0 = no better than "
             "chance)", f"  {'method':<34} {'what training does':>19} {'this network':>13}"]
    for title, _, row in methods:
        lines.append(f"  {title:<34} {fmt(trust['algorithm'].get(row)):>19} {fmt(trust['single_model'].get(row)):>13}")
    lines.append(f"  source: {trust['source']}" + (f" ({trust['recipe']})" if trust.get("recipe") else ""))
    nearest = trust.get("nearest")
    if nearest:  # another recipe's numbers, labelled as such: which list to believe, in general
        lines.append(f"  nearest measured recipe, {nearest['name']} ({nearest['source']}):")
        for title, _, row in methods:
            lines.append(f"  {title:<34} {fmt(nearest['algorithm'].get(row)):>19} "
                         f"{fmt(nearest['single_model'].get(row)):>13}")
    return lines


def question_figure(settings: dict, test_id: int, methods: list[tuple[str, dict, str]], trust: dict,
                    k: int, test, train):
    """One figure for one test image: the image with its label, prediction and loss, then for each
    method a row of its top-k helpful and a row of its top-k harmful training images (id / label /
    score; red = the test image's label). ``methods``: (title, result record, ldsTest row)."""
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
        algorithm, single = trust["algorithm"].get(row), trust["single_model"].get(row)
        measured = "; ".join(f"{name} {value:+.3f}" for name, value in (("LDS", algorithm), ("single-model", single))
                             if isinstance(value, (int, float))) or NOT_MEASURED
        nearest = trust.get("nearest")
        if measured == NOT_MEASURED and nearest:
            near = "; ".join(f"{name} {value:+.3f}" for name, value in
                             (("LDS", nearest["algorithm"].get(row)), ("single-model", nearest["single_model"].get(row)))
                             if isinstance(value, (int, float)))
            measured = f"nearest measured recipe: {near or 'not measured'}"
        titles.append(f"{title}: {measured}")
    if trust.get("nearest") and trust["source"] == NOT_MEASURED:
        titles.insert(0, f"trust (LDS): {NOT_MEASURED}; nearest measured recipe: {trust['nearest']['name']}")
    rows[0][0] = {"image": test.images[test_id], "bold": True,
                  "caption": f"test {test_id}\nlabel {label} / pred {entry0['prediction']}"
                  + (f"\nloss {entry0['loss']:.3g}" if "loss" in entry0 else "")}
    fig = plotting.digit_grid(rows, f"Which training images made the network do this? Test image {test_id} "
                              f"(caption: train id / label / score; red: label {label})\n" + "\n".join(titles),
                              gap_after_first=True, row_labels=labels)
    return fig


def method3_seconds(settings: dict, tests: int) -> float:
    """Method 3's replay time for this run, estimated from its measured cost per step on the MLP (1
    thread): the forward replay of every step, 0.7 ms at batch 8 and 2.0 ms at batch 128; the walk
    back over the steps of the attribution window, (1.5 + 0.2 per test image) ms per 8 images of the
    batch. Measured: 92 s for one test image over the quick profile's 37,500 steps; 58 s for 20 test
    images of the attributable recipe (9,380 steps, 469 walked back), with another job beside it."""
    cfg = common.mnist_cfg(settings)
    n, batch = cfg.train_subset or 60000, cfg.batch_size
    steps = cfg.epoch * -(-n // batch)
    walked = steps - training.attribution_window(cfg, n)
    return (steps * max(0.7, 0.0156 * batch) + walked * batch / 8 * (1.5 + 0.2 * tests)) / 1000.0


def load_sets(settings: dict):
    """(train, test) MNIST on the CPU, for the figures."""
    return (common.load_train_data(settings, torch.device("cpu"), lambda *_: None),
            common.load_test_data(settings, torch.device("cpu"), lambda *_: None))


def best_solver_settings(settings: dict) -> dict | None:
    """The settings with Method 2's best measured solver (mnist.question.best_solver), or None when
    the settings already use it. The user's own solver still runs: this one is added, not swapped."""
    best = common.mnist_cfg(settings).question.best_solver  # a registry name: checked with the settings
    if common.mnist_cfg(settings).method2.solver == best:
        return None
    return opt.deep_merge(settings, {"mnist": {"method2": {"solver": best}}})
