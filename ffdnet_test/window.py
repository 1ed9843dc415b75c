"""The training's final window (ffdnet.window; ffdnet.recipe "attributable" sets it) and Method 3
through it.

After its ffdnet.epoch epochs, training ends with a window: ffdnet.window.epochs more epochs of the
weighted MSE sum_i w_i l_i / |B| with BatchNorm held in eval mode (its statistics frozen, so each
patch's loss is its own), a fresh optimiser (Adam, Adam with eps_root, or SGD with momentum), the
data order of ffdnet.seed and the learning rate decaying to 0 (ffdnet.window.lr_schedule). The
model at the window's start is saved (common.window_start_file). Method 3 is then exact for the
question "which patches, seen in the window, made the trained network do this?":

    influence[t][i] = -n dF_t / dw_i,

by reverse mode through every step of the window (utils_if.AdamReplay / SgdReplay), checked first
to end where training ended. ffdnet_test/ldsTest.py measures it: reruns of the window from its
saved start with random patches weighted 0.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import utils_if
import utils_option as opt
from ffdnet_test import attribution, common, explain
from ffdnet_test.model import PackedInput
from options.blocks import Ffdnet


def has_window(cfg: Ffdnet) -> bool:
    return cfg.window.epochs > 0


def window_run(cfg: Ffdnet, n_train: int, weights: torch.Tensor | None = None
               ) -> utils_if.AdamRun | utils_if.SgdRun:
    """The window of these settings as a run (its optimiser, schedule and batches; data order of
    ffdnet.seed), with ``weights`` (n,) on the patches' losses (None = all 1: the trained run)."""
    return explain.finetune_run(cfg.window, n_train, cfg.seed, weights)


def train_window(model: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, cfg: Ffdnet,
                 weights: torch.Tensor | None = None, show_progress: bool = False) -> nn.Module:
    """Run the window on ``model`` in place (BatchNorm frozen): the end of training, or, with
    ``weights``, its rerun with patches removed (ldsTest)."""
    return explain.finetune(model, noisy, clean, sigma, window_run(cfg, len(clean), weights), show_progress)


def patches_reached(cfg: Ffdnet, n_train: int) -> torch.Tensor:
    """The sorted indices of the patches the window's batches hold (a window under one epoch leaves
    the others out: their weight cannot matter, and Method 3 scores them exactly 0)."""
    return window_run(cfg, n_train).orders.unique()


def load_start(settings: opt.Settings, device: torch.device) -> nn.Module:
    """The model at the window's start (saved by FFDNet_Train), or one line on what to run."""
    from ffdnet_test.checkpoints import load_checkpoint
    if not has_window(settings.ffdnet):
        raise opt.SettingsError("ffdnet.window.epochs = 0: this training has no final window to attribute; set "
                                "ffdnet.recipe = \"attributable\" (or ffdnet.window.epochs > 0) and run "
                                "ffdnet_test/FFDNet_Train.py")
    path = opt.require_file(common.window_start_file(settings), "ffdnet_test/FFDNet_Train.py (with its final window)")
    model, _ = load_checkpoint(path)
    return model.to(device).eval()


def target_gradients(settings: opt.Settings, model: nn.Module, names: list[str], images: list[str], device
                     ) -> tuple[torch.Tensor, list[dict]]:
    """Gradients (k, p) over ``names`` at ``model`` of every target of ``images``: the whole-image MSE
    and the squared error of the ffdnet.method2.window window around each ffdnet.attribution.points;
    with {image, label ("whole" or "point r,c"), point, path} per row."""
    problem = utils_if.InfluenceProblem(PackedInput(model).eval(), utils_if.mse_sample_loss, ["net." + n for n in names])
    rows, targets = [], []
    for image in images:
        grads, labels, path = attribution.target_grads(settings, problem, image, settings.ffdnet.attribution.points,
                                                       device)
        rows.append(grads)
        targets += [{"image": image, "label": label, "point": point, "path": path} for label, point in labels]
    return torch.cat(rows), targets


def method3(settings: opt.Settings, images: list[str], device, progress=None, trained: nn.Module | None = None
            ) -> tuple[torch.Tensor, list[dict], dict]:
    """Method 3 through the window: (influence (k, n) float64, the targets, info). The replay starts
    from the saved window start and must end at the trained model (ffdnet.method3.replay_tolerance),
    else nothing is returned: its derivative would describe another run."""
    cfg = settings.ffdnet
    start = load_start(settings, device)
    if trained is None:
        trained, _ = common.load_model(settings, device)
    noisy, clean, sigma, _ = attribution.training_triples(settings, device)
    n = len(clean)
    run = window_run(cfg, n)
    replay = explain.method3_replay(start, run, noisy, sigma, clean)
    try:
        _, error, seconds_forward = utils_if.forward_checked(replay, trained, cfg.method3.checkpoint_interval,
                                                             cfg.method3.replay_tolerance, progress=progress)
    except utils_if.ReplayMismatch as mismatch:
        raise opt.SettingsError(f"{mismatch} (ffdnet.method3.replay_tolerance): the replay of the window does not "
                                f"end at the trained model {common.resolve_model_path(settings)}; train it again "
                                f"(ffdnet_test/FFDNet_Train.py)") from None
    grads, targets = target_gradients(settings, trained, replay.names, images, device)
    with opt.Timer() as backward:
        influence = -n * replay.metagradient(grads, progress=progress).cpu()
    info = {"solver": "method3_window", "steps": run.num_steps, "checkpoint_interval": replay.interval,
            "replay_relative_error": error, "seconds_forward": round(seconds_forward, 3),
            "seconds_backward": round(backward.seconds, 3), "targets": len(targets), "n_train": n,
            "patches_reached": int(run.orders.unique().numel()), "threads": torch.get_num_threads()}
    return influence, targets, info


def rerun(start: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, cfg: Ffdnet,
          removed: torch.Tensor | None) -> nn.Module:
    """The window rerun from its saved start with the ``removed`` patches weighted 0 (None: the
    trained run itself, to the bit)."""
    weights = explain.removal_weights(len(clean), removed.numpy()) if removed is not None and len(removed) else None
    return train_window(copy.deepcopy(start), noisy, clean, sigma, cfg, weights)
