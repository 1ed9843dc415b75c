"""The explainability test's jobs: which training points each retraining manipulates, and where
its model goes. One job = (method list, manipulation, N, test image); N = 0 is the unmanipulated
base model, shared by all.

Rules (as the original): relabelled points get label 0, or 1 when the test image's label is 0;
random sets are exactly N distinct indices from a generator seeded by (seed, N, test id);
explanatory sets are the top N of the method's scores (Method 1) or helpful/harmful influence
(Method 2, Method 3) for that test image under the seed's base model.

A removal weights the removed points 0 in their places (same seed, same data order for everyone
else), so that the retrained model is the single-model counterfactual of the base model, the
question Method 3 answers exactly. (Before Method 3 removals dropped the points from the list and
reshuffled; those models live under {manipulation}/ and are not read: see REMOVAL_FOLDER.)
"""
from __future__ import annotations

import os

import numpy as np
import torch

import utils_if
import utils_option as opt
from mnist_test import common
from mnist_test.datasets import MnistData
from options.blocks import Mnist

REMOVAL_FOLDER = "{manipulation}_weight0"  # removals by weight 0: their own folder, never an older file


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def method_lists(cfg: Mnist) -> list[str]:
    """e.g. ["method1", "method2_helpful", "method3_helpful"] from the mnist block's method and explain.m2_lists."""
    out = []
    for method in as_list(cfg.method):
        out += ["method1"] if method == "method1" else [f"{method}_{k}" for k in cfg.explain.m2_lists]
    return out


def relabel_target(test_label: int) -> int:
    return 1 if test_label == 0 else 0


def random_points(n_points: int, n_train: int, seed: int, test_id: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_points * 10_007 + test_id)
    return torch.randperm(n_train, generator=generator)[:n_points].tolist()


def ranked_points(settings: opt.Settings) -> dict[str, dict[int, tuple[int, np.ndarray]]]:
    """{method list: {test id: (test label, training indices best first)}} from the m1/m2/m3 files."""
    cfg = settings.mnist
    out: dict[str, dict] = {}
    for name in method_lists(cfg):
        if name == "method1":
            record = common.read_result(common.m1_file(settings), "mnist_test/m1_Test.py", settings, "method1")
            key, largest = "scores", True
        else:
            path, script, block = common.attribution_file(settings, name.split("_")[0])
            record = common.read_result(path, script, settings, block)
            key, largest = "influence", name.endswith("helpful")
        entries = [v for k, v in record.items() if k != "meta"]
        out[name] = {e["test_id_num"]: (e["label"], np.array(utils_if.top_indices(
            e[key], len(e[key]), largest=largest))) for e in entries}
    return out


def plan(settings: opt.Settings, ranked: dict | None = None) -> list[dict]:
    """All jobs of the study (unique model files), base model first. ``ranked`` (from
    :func:`ranked_points`) saves reading the method files again."""
    cfg = settings.mnist
    root = opt.output_folder(settings, "model_zoo", "expTest", common.run_tag(settings))
    jobs = [{"name": "base", "path": os.path.join(root, "base.pth"), "method": None,
             "manipulation": None, "n": 0, "test_id": None, "test_label": None}]
    ranked = ranked if ranked is not None else ranked_points(settings)
    for method, per_test in ranked.items():
        for manipulation in as_list(cfg.newData):
            for n in cfg.explain.n_values:
                if n == 0:
                    continue
                # a removal acts in the attribution window only (the question Method 3 answers): its own folder
                folder = REMOVAL_FOLDER.format(manipulation=manipulation) + common.window_part(opt.Recipe.of(cfg)) \
                    if manipulation.startswith("remove") else manipulation
                for test_id, (label, _) in per_test.items():
                    jobs.append({"name": f"{method}/{manipulation}/n{n}/t{test_id}",
                                 "path": os.path.join(root, method, folder, f"n{n}", f"t{test_id}.pth"),
                                 "method": method, "manipulation": manipulation, "n": n,
                                 "test_id": test_id, "test_label": label})
    return jobs


def chosen_points(job: dict, ranked: dict, n_train: int, seed: int) -> list[int]:
    if job["manipulation"] in ("random", "remove_random"):
        return random_points(job["n"], n_train, seed, job["test_id"])
    return ranked[job["method"]][job["test_id"]][1][:job["n"]].tolist()


def training_spec(job: dict, ranked: dict, data: MnistData, seed: int) -> dict:
    """What train_group needs for this job: seed, and labels (relabel) or data weights (remove: the
    removed points weighted 0 in place), by the dataset's relabel rule (``data`` indexed by original
    training index)."""
    if job["n"] == 0:
        return {"seed": seed}
    points = data.indices[chosen_points(job, ranked, len(data), seed)]
    if job["manipulation"] in ("algo", "random"):
        return {"seed": seed, "labels": data.relabel(points, relabel_target(job["test_label"])).labels}
    weights = torch.ones(len(data), device=data.images.device)
    weights[data.positions_of(points)] = 0.0
    return {"seed": seed, "weights": weights}
