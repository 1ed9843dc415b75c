"""MNIST-side plumbing shared by the scripts: file names, model and data loading, test-image choice.

File names carry every setting that changes their content, so runs with different settings never
overwrite each other: ``e{epoch}b{batch}s{seed}`` plus ``n{train_subset}`` when a subset is used and
the optimiser values when they differ from the original recipe.
"""
from __future__ import annotations

import logging
import os

import torch

import utils_option as opt
from mnist_test.datasets import MnistData, load_mnist
from mnist_test.model import mnist_model

ORIGINAL_RECIPE = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001}


def mnist_cfg(settings: dict) -> dict:
    return settings["mnist"]


def run_tag(settings: dict) -> str:
    """e20b8s0 (+ n1000 for a training subset, + optimiser values off the original recipe)."""
    cfg = mnist_cfg(settings)
    tag = f"e{cfg['epoch']}b{cfg['batch_size']}s{cfg['seed']}"
    if cfg["train_subset"]:
        tag += f"n{cfg['train_subset']}"
    short = {"learning_rate": "lr", "momentum": "mom", "weight_decay": "wd"}
    for key, default in ORIGINAL_RECIPE.items():
        if cfg[key] != default:
            tag += f"{short[key]}{cfg[key]:g}"
    return tag


def model_file(settings: dict, mode: str) -> str:
    return opt.output_path(settings, "model_zoo", f"mnist_{run_tag(settings)}_{mode}.pth")


def grad_norm_file(settings: dict, mode: str | None = None) -> str:
    m1 = mnist_cfg(settings)["method1"]
    mode = mode or m1["mode"]
    suffix = "" if m1["skip_first_epoch"] else "_allep"
    return opt.output_path(settings, "grad_norm", mode,
                           f"mnist_{run_tag(settings)}_{m1['grad_mode']}{suffix}.json")


def test_file(settings: dict, mode: str) -> str:
    return opt.output_path(settings, "test", f"mnist_{run_tag(settings)}_{mode}_test.json")


def m1_file(settings: dict, mode: str | None = None) -> str:
    m1 = mnist_cfg(settings)["method1"]
    mode = mode or m1["mode"]
    stem = os.path.basename(grad_norm_file(settings, mode))[:-len(".json")]
    layers = "-".join(m1["layers"])
    return opt.output_path(settings, "act_grad", mode, f"{stem}_{layers}_scores.json")


def m2_file(settings: dict, mode: str | None = None) -> str:
    """Influence file: the solver part (utils_option.solver_file_part), the run tag and mode."""
    cfg = mnist_cfg(settings)
    m2 = cfg["method2"]
    mode = mode or m2["mode"]
    extra = f"_ce{cfg['checkpoint_every']}" if m2["solver"] == "tracin" else ""
    every = "_all" if cfg["test_ids"] == "all" else ""
    name = f"if_{opt.solver_file_part(m2)}{extra}_{run_tag(settings)}_{mode}{every}.json"
    return opt.output_path(settings, m2["if_dir"], name)


def checkpoint_file(settings: dict, mode: str, epoch: int) -> str:
    """Train.py's checkpoint after ``epoch`` epochs (mnist.checkpoint_every > 0), for TracIn."""
    return opt.output_path(settings, "model_zoo", "checkpoints", f"mnist_{run_tag(settings)}_{mode}",
                           f"ep{epoch}.pth")


def checkpoint_files(settings: dict, mode: str) -> list[str]:
    """The checkpoints Train.py wrote with the current settings, in epoch order (error if none)."""
    every = mnist_cfg(settings)["checkpoint_every"]
    if not every:
        raise opt.SettingsError("method2.solver = \"tracin\" needs checkpoints: set mnist.checkpoint_every "
                                "(e.g. 1) and run mnist_test/Train.py again")
    epochs = range(every, mnist_cfg(settings)["epoch"] + 1, every)
    return [opt.require_file(checkpoint_file(settings, mode, e), "mnist_test/Train.py (mnist.checkpoint_every > 0)")
            for e in epochs]


def factor_file(settings: dict, mode: str | None = None) -> str:
    """K-FAC/EK-FAC factors of a model (they depend on the model, data, Fisher kind and seed only,
    not on the damping or the test images): written once, reused by later runs."""
    m2 = mnist_cfg(settings)["method2"]
    mode = mode or m2["mode"]
    params = "_p" + "+".join(m2["params"]) if m2["params"] else ""
    name = f"mnist_{run_tag(settings)}_{mode}_{m2['solver']}_{m2['fisher']}{params}_l2{m2['l2_reg']:g}.pt"
    return opt.output_path(settings, m2["if_dir"], "factors", name)


def load_grad_norms(settings: dict, mode: str | None = None,
                    device: torch.device = torch.device("cpu")) -> tuple[dict, dict]:
    """The gradient-norm file of Train.py: ({layer: (n_train, n_out) float64 tensor}, meta)."""
    record = opt.read_json(grad_norm_file(settings, mode), "mnist_test/Train.py")
    arrays = {name: torch.tensor(rows, dtype=torch.float64, device=device)
              for name, rows in record["arrays"].items()}
    return arrays, record["meta"]


def load_train_data(settings: dict, device: torch.device, log=print) -> MnistData:
    cfg = mnist_cfg(settings)
    data = load_mnist(opt.resolve_path(cfg["data_dir"]), train=True, log=log)
    return data.subset(cfg["train_subset"]).to(device)


def load_test_data(settings: dict, device: torch.device, log=print) -> MnistData:
    return load_mnist(opt.resolve_path(mnist_cfg(settings)["data_dir"]), train=False, log=log).to(device)


def load_model(settings: dict, mode: str, device: torch.device,
               logger: logging.Logger | None = None) -> tuple[torch.nn.Module, str]:
    """The trained MLP of ``mode`` under the current settings, in eval mode."""
    path = opt.require_file(model_file(settings, mode), "mnist_test/Train.py")
    model = mnist_model().to(device)
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"] if "model" in state else state)
    model.eval()
    if logger is not None:
        logger.info(f"model: {path}")
    return model, path


def selected_test_ids(settings: dict, mode: str | None = None) -> list[int]:
    """The chosen test images: the settings' explicit list, or those Test.py chose by loss rank."""
    cfg = mnist_cfg(settings)
    if isinstance(cfg["test_ids"], list):
        return list(cfg["test_ids"])
    if cfg["test_ids"] == "all":
        return list(range(10000))
    record = opt.read_json(test_file(settings, mode or cfg["method1"]["mode"]), "mnist_test/Test.py")
    return record["test_ids"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: MnistData, chunk: int = 10000):
    """Per-image NLL loss and prediction for a whole dataset, in a few big forward passes."""
    model.eval()
    losses, preds = [], []
    for s in range(0, len(data), chunk):
        out = model(data.images[s:s + chunk])
        losses.append(-out.gather(1, data.labels[s:s + chunk, None]).squeeze(1))
        preds.append(out.argmax(1))
    return torch.cat(losses), torch.cat(preds)
