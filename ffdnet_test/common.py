"""FFDNet-side plumbing: file names, data, models, noisy inputs."""
from __future__ import annotations

import logging
import json
import os

import torch

import utils_option as opt
from ffdnet_test import datasets
from ffdnet_test.checkpoints import load_checkpoint
from ffdnet_test.model import FFDNet, orthogonal_init


def run_tag(settings: opt.Settings) -> str:
    """FFDNet_{gray|rgb}_{layout}_e{E}b{B}s{seed}p{patch}st{stride} (+ nN, fn fixed noise, ft fine-tune)."""
    cfg = settings.ffdnet
    tag = (f"FFDNet_{'gray' if cfg.is_gray else 'rgb'}_{cfg.layout}_e{cfg.epoch}"
           f"b{cfg.batch_size}s{cfg.seed}p{cfg.patch_size}st{cfg.stride}"
           f"sg{cfg.sigma[0]:g}-{cfg.sigma[1]:g}")
    if cfg.max_patches:
        tag += f"n{cfg.max_patches}"
    if cfg.fixed_noise:
        tag += "fn"
    if cfg.lr_decay_epochs:
        tag += "d" + "-".join(map(str, cfg.lr_decay_epochs))
    if cfg.learning_rate != 1e-3:
        tag += f"lr{cfg.learning_rate:g}"
    if cfg.init_checkpoint:
        tag += "ft"
    if cfg.residual:
        tag += "res"
    if cfg.bn_recalibrate_batches:
        tag += f"bnr{cfg.bn_recalibrate_batches}"
    if cfg.activation != "relu":
        tag += f"_{cfg.activation}"
    if cfg.window.epochs:
        tag += "_" + window_part(cfg.window)
    if os.path.normpath(opt.resolve_path(cfg.train_dir)) != opt.resolve_path("data/ffdnet/train"):
        tag += "_" + os.path.basename(os.path.normpath(cfg.train_dir))
    return tag


def window_part(window) -> str:
    """The final window's part of a file name (ffdnet.window): w{epochs}{optimizer}{lr}{schedule}b{batch}."""
    name = {"adam": "adam", "sgd": f"sgd{window.momentum:g}"}[window.optimizer]
    if window.optimizer == "adam" and window.eps_root:
        name += f"er{window.eps_root:g}"
    return f"w{window.epochs:g}{name}lr{window.learning_rate:g}{window.lr_schedule[:3]}b{window.batch_size}"


def window_start_file(settings: opt.Settings) -> str:
    """The model at the start of the final window (FFDNet_Train saves it): where Method 3's replay
    and ldsTest's reruns begin."""
    return opt.output_path(settings, "model_zoo", f"{run_tag(settings)}_window_start.pth")


def model_file(settings: opt.Settings, epoch: int | None = None) -> str:
    suffix = f"_check{epoch}" if epoch is not None else ""
    return opt.output_path(settings, "model_zoo", f"{run_tag(settings)}{suffix}.pth")


def grad_norm_file(settings: opt.Settings) -> str:
    """Method 1's gradient norms, recorded over the training before any final window: one file for the
    model with and without the window (the window records nothing)."""
    m1 = settings.ffdnet.method1
    before_window = opt.with_values(settings, {"ffdnet": {"window": {"epochs": 0.0}}})
    return opt.output_path(settings, "grad_norm", "ffdnet", f"{run_tag(before_window)}_{m1.grad_mode}.json")


M1_MODES = ("raw", "normalized", "remove_out")  # every m1_Test file holds all three


def test_noise_part(settings: opt.Settings) -> str:
    """The test image's noise: sigma (0-255) and whether the noisy input is clipped to 8 bits."""
    test = settings.ffdnet.test
    return f"s{test.noise_level_img:g}{'c' if test.is_clip else 'u'}"


def points_part(settings: opt.Settings) -> str:
    """Which pixels a per-image result explains (ffdnet.attribution.points): a short hash of the list,
    so that a run for other points never replaces this one's file."""
    import hashlib
    points = settings.ffdnet.attribution.points
    return "pts" + hashlib.sha1(json.dumps([list(p) for p in points]).encode()).hexdigest()[:6]


def m1_result_file(settings: opt.Settings, image: str) -> str:
    """m1_Test's scores for one test image (all modes; outlim decides remove_out)."""
    m1 = settings.ffdnet.method1
    layers = "-".join(map(str, m1.layers))
    return opt.output_path(settings, "act_grad", "ffdnet",
                           f"{run_tag(settings)}_{m1.grad_mode}_{image}_{m1.activation}_l{layers}"
                           f"_out{m1.outlim:g}_{test_noise_part(settings)}_{points_part(settings)}.json")


def m2_result_file(settings: opt.Settings, image: str) -> str:
    """m2_Test's influences for one test image: the shared solver part, the training patches used,
    the window, the test noise."""
    m2 = settings.ffdnet.method2
    return opt.output_path(settings, "if", "ffdnet",
                           f"{run_tag(settings)}_{opt.solver_file_part(m2)}_n{m2.max_train_points}"
                           f"_w{m2.window}_{test_noise_part(settings)}_{points_part(settings)}_{image}.json")


def m3_result_file(settings: opt.Settings, image: str, seed: int) -> str:
    """m3_Test's metagradients for one test image through the fine-tuning run of one seed (the
    schedule ffdnet.explain.finetune, all training patches, the window, the test noise)."""
    cfg = settings.ffdnet
    ft = cfg.explain.finetune
    return opt.output_path(settings, "if", "ffdnet",
                           f"{run_tag(settings)}_m3_ft-e{ft.epochs:g}lr{ft.learning_rate:g}b{ft.batch_size}"
                           + (f"er{ft.eps_root:g}" if ft.eps_root and ft.optimizer == "adam" else "")
                           + (f"sgd{ft.momentum:g}" if ft.optimizer == "sgd" else "") +
                           f"_seed{seed}_w{cfg.method2.window}_{test_noise_part(settings)}_{points_part(settings)}"
                           f"_{image}.json")


def m3_window_result_file(settings: opt.Settings, image: str) -> str:
    """Method 3 through the training's final window for one test image's targets (the pixel window,
    the test noise, the points)."""
    cfg = settings.ffdnet
    return opt.output_path(settings, "if", "ffdnet", f"{run_tag(settings)}_m3window_w{cfg.method2.window}_"
                                                     f"{test_noise_part(settings)}_{points_part(settings)}_{image}.json")


def factor_file(settings: opt.Settings, solver: str) -> str:
    """K-FAC/EK-FAC factors of the model over its (first max_train_points) training patches."""
    m2 = settings.ffdnet.method2
    params = "_p" + "+".join(m2.params) if m2.params else ""
    return opt.output_path(settings, "if", "ffdnet", "factors",
                           f"{run_tag(settings)}_{solver}_{m2.fisher}{params}_n{m2.max_train_points}"
                           + (f"_fp{m2.fit_points}" if m2.fit_points else "") + ".pt")  # factors fitted on a subsample


def folder(settings: opt.Settings, key: str) -> str:
    """A data folder from the settings; the default ones are filled on first use."""
    path = opt.resolve_path(getattr(settings.ffdnet, key))
    if path.startswith(opt.resolve_path("data/ffdnet")) and not os.path.isdir(path):
        from data.ffdnet_data import ensure_ffdnet_images
        ensure_ffdnet_images()
    return path


def train_patches(settings: opt.Settings) -> datasets.PatchSet:
    cfg = settings.ffdnet
    return datasets.PatchSet.from_folder(folder(settings, "train_dir"), cfg.is_gray,
                                         cfg.patch_size, cfg.stride, cfg.max_patches)


def patch_noise(settings: opt.Settings, patches: datasets.PatchSet):
    """The fixed per-patch (sigma, noise) of these settings (seeded), or None without fixed_noise."""
    cfg = settings.ffdnet
    if not cfg.fixed_noise:
        return None
    return datasets.fixed_noise(len(patches), tuple(patches.clean.shape[1:]), tuple(cfg.sigma),
                                cfg.seed + 1000003)


def new_model(settings: opt.Settings, device: torch.device) -> FFDNet:
    cfg = settings.ffdnet
    torch.manual_seed(cfg.seed)
    model = FFDNet(cfg.is_gray, cfg.layout, residual=cfg.residual, activation=cfg.activation)
    orthogonal_init(model)
    if cfg.init_checkpoint:
        pretrained, _ = load_checkpoint(opt.resolve_path(cfg.init_checkpoint))
        model.load_state_dict(pretrained.state_dict())
    return model.to(device)


def resolve_model_path(settings: opt.Settings) -> str:
    """The model the test/attribution scripts use: ffdnet.test.model, or the trained one."""
    choice = settings.ffdnet.test.model
    if choice == "official":
        from data.ffdnet_data import official_color_weights
        return official_color_weights()
    if choice:
        return opt.require_file(opt.resolve_path(choice), "the settings' ffdnet.test.model (a path)")
    return opt.require_file(model_file(settings), "ffdnet_test/FFDNet_Train.py")


def load_model(settings: opt.Settings, device: torch.device, logger: logging.Logger | None = None):
    path = resolve_model_path(settings)
    model, info = load_checkpoint(path)
    cfg = settings.ffdnet
    if info["is_gray"] != cfg.is_gray:
        raise opt.SettingsError(f"model {path} is {'gray' if info['is_gray'] else 'colour'} but "
                                f"ffdnet.is_gray = {str(cfg.is_gray).lower()}: change one of them")
    if logger is not None:
        logger.info(f"model {path}: {info}")
    return model.to(device).eval(), path


def to_model_order(image: torch.Tensor, settings: opt.Settings) -> torch.Tensor:
    """RGB -> the model's channel order (BGR for the original author's checkpoint); an involution."""
    if settings.ffdnet.channel_order == "bgr" and image.shape[-3] == 3:
        return image.flip(-3)
    return image


@torch.no_grad()
def denoise(model, noisy: torch.Tensor, settings: opt.Settings, device) -> torch.Tensor:
    """The model's output (C, H, W, RGB order, on the CPU) for one noisy test image at the test sigma
    (ffdnet.test.noise_level_img): what FFDNet_Test scores and the one-step answer checks."""
    sigma = settings.ffdnet.test.noise_level_img
    out = model(to_model_order(noisy, settings)[None].to(device), torch.tensor([sigma / 255.0], device=device))[0]
    return to_model_order(out.cpu(), settings)


def noisy_test_image(clean: torch.Tensor, sigma255: float, seed: int, is_clip: bool) -> torch.Tensor:
    """clean + N(0, sigma/255), seeded per image; optionally quantised to 8 bits like the original."""
    generator = torch.Generator().manual_seed(seed)
    noisy = clean + torch.randn(clean.shape, generator=generator) * (sigma255 / 255.0)
    if is_clip:
        noisy = (noisy.clamp(0, 1) * 255.0).round() / 255.0
    return noisy
