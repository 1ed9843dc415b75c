"""Ground truth for attributions on the MNIST MLP: the pieces of ldsTest.py that are not math.

- the subsets (seeded, one generator per subset index, so that more subsets later reuse the ones
  done) and the seeds of their models;
- the leave-one-out plan (which training points are removed, and the seeds);
- training a group of such models and storing only what the metric needs (each test image's loss
  and margin), one small JSON per model, so that a run resumes and splits across processes;
- the attributions of every method, from the files the existing scripts write.

The metric itself (LDS, Spearman, bootstrap) is math and lives in utils_if.py.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

import utils_if
import utils_option as opt
from mnist_test import common
from mnist_test.model import mnist_model
from mnist_test.training import train_group


# ---- settings of the study ---------------------------------------------------------------------
def lds_cfg(settings: dict) -> dict:
    return settings["mnist"]["lds"]


def recipe(settings: dict) -> dict:
    """The training recipe of every model of the study: the mnist block's optimiser, lds.epoch."""
    cfg = common.mnist_cfg(settings)
    return {"learning_rate": cfg["learning_rate"], "momentum": cfg["momentum"],
            "weight_decay": cfg["weight_decay"], "batch_size": cfg["batch_size"],
            "epoch": lds_cfg(settings)["epoch"]}


def test_ids(settings: dict) -> list[int]:
    ids = lds_cfg(settings)["test_ids"]
    return list(range(ids)) if isinstance(ids, int) else list(ids)


def study_tag(settings: dict) -> str:
    """Readable parts plus a short hash of everything that changes the retrained models' outputs."""
    lds = lds_cfg(settings)
    key = {"recipe": recipe(settings), "train_subset": lds["train_subset"], "test_ids": test_ids(settings),
           "fraction": lds["subset_fraction"], "seed": lds["seed"]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"n{lds['train_subset']}e{lds['epoch']}f{lds['subset_fraction']:g}_{digest}"


def study_folder(settings: dict, *parts: str) -> str:
    return opt.output_folder(settings, "lds", study_tag(settings), *parts)


def subset_mask(n_train: int, fraction: float, seed: int, index: int) -> np.ndarray:
    """Subset ``index`` as a boolean mask: round(fraction * n) distinct points, drawn from a
    generator seeded by (seed, index) alone, so that subset m is the same however many are drawn."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    chosen = torch.randperm(n_train, generator=generator)[:int(round(fraction * n_train))]
    mask = np.zeros(n_train, dtype=bool)
    mask[chosen.numpy()] = True
    return mask


def subset_model_seed(seed: int, index: int, replicate: int) -> int:
    return 1_000 + seed * 1_000_003 + index * 16 + replicate


def loo_model_seed(seed: int, replicate: int) -> int:
    return 900_000 + seed * 1_000_003 + replicate


# ---- the retrained models: train a group, store each model's outputs -----------------------------
@torch.no_grad()
def outputs_of(state: dict, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Loss and margin (correct-class logit minus the best other; log-probabilities give the
    same difference) of each test image under one model."""
    model = mnist_model().to(x_test.device)
    model.load_state_dict(state)
    model.eval()
    logp = model(x_test)
    loss = -logp.gather(1, y_test[:, None]).squeeze(1)
    others = logp.clone()
    others.scatter_(1, y_test[:, None], -torch.inf)
    margin = -loss - others.max(1).values
    return {"loss": loss.tolist(), "margin": margin.tolist()}


def train_and_store(jobs: list[dict], train, x_test, y_test, cfg: dict, group_size: int,
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
        states = train_group(train, [{"seed": j["seed"], "keep": j["keep"]} for j in group], cfg, device,
                             show_progress=False)
        for job, state in zip(group, states):
            record = {**job["record"], "seed": job["seed"],
                      **outputs_of({k: v.to(device) for k, v in state.items()}, x_test, y_test)}
            if keep_weights:
                opt.save_torch(job["path"][:-len(".json")] + ".pth", {"model": state, "job": job["record"]})
            opt.write_json(job["path"], record)


def read_outputs(paths: list[str]) -> dict[str, np.ndarray]:
    """{"loss": (len(paths), T), "margin": (len(paths), T)} from the models' JSON files."""
    records = [opt.read_json(p, "mnist_test/ldsTest.py") for p in paths]
    return {key: np.array([r[key] for r in records]) for key in ("loss", "margin")}


# ---- the attributions ------------------------------------------------------------------------------
def model_settings(settings: dict, index: int, ids: list[int], grad_mode: str = "batch",
                   method2: dict | None = None) -> dict:
    """Settings of the study's base model number ``index`` (seed lds.ensemble_seeds[index]),
    trained on the first lds.train_subset images for lds.epoch epochs, as the scripts see them.
    Method 1 per_sample norms get their own model name (Train.py writes one model per mode)."""
    lds = lds_cfg(settings)
    mode = f"lds{index}" + ("ps" if grad_mode == "per_sample" else "")
    mnist = {"seed": lds["ensemble_seeds"][index], "epoch": lds["epoch"], "train_subset": lds["train_subset"],
             "test_ids": ids, "method1": {"mode": mode, "grad_mode": grad_mode},
             "method2": {"mode": mode, "test_sample_num": len(ids), **(method2 or {})}}
    merged = opt.deep_merge(settings, {"mnist": mnist})
    opt.validate(merged, opt.SCHEMA)
    return merged


def method1_attributions(settings: dict, device) -> dict[str, np.ndarray]:
    """Method 1 scores (T, n) of the model of ``settings``, raw and normalized (each training
    point's gradient-norm vector divided by its sum), from Train.py's gradient-norm file."""
    cfg = common.mnist_cfg(settings)
    model, _ = common.load_model(settings, cfg["method1"]["mode"], device)
    norms, _ = common.load_grad_norms(settings, device=device)
    test = common.load_test_data(settings, device, lambda *_: None)
    layers = cfg["method1"]["layers"]
    activations = model.layer_activations(test.images[cfg["test_ids"]], layers)
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
