"""FFDNet attribution plumbing shared by m1_Test, m2_Test, the figures and the diagnosis: the test
image (noisy input exactly as FFDNet_Test makes it), activations at a pixel, the Method-1
gradient-norm file in the chosen mode."""
from __future__ import annotations

import os

import torch

import utils_if
import utils_option as opt
from ffdnet_test import common, datasets
from ffdnet_test.model import FFDNet, PackedInput, feature_position


def test_image(settings: opt.Settings, name: str) -> tuple[int, str, torch.Tensor, torch.Tensor]:
    """(index, path, clean, noisy) of test image ``name``; noisy as FFDNet_Test makes it."""
    cfg = settings.ffdnet
    paths = datasets.list_images(common.folder(settings, "test_dir"))
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if name not in names:
        raise opt.SettingsError(f"bad setting ffdnet.attribution.images: no test image {name!r} in "
                                f"{cfg.test_dir} (names: {names})")
    k = names.index(name)
    clean = datasets.read_image(paths[k], cfg.is_gray)
    noisy = common.noisy_test_image(clean, cfg.test.noise_level_img, cfg.seed + k, cfg.test.is_clip)
    return k, paths[k], clean, noisy


def model_order_pairs(settings: opt.Settings, images: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{image: (clean, noisy)} of the test images in the model's channel order: what the studies'
    reruns are measured on (explain.evaluate)."""
    pairs = {}
    for image in images:
        _, _, clean, noisy = test_image(settings, image)
        pairs[image] = (common.to_model_order(clean, settings), common.to_model_order(noisy, settings))
    return pairs


def image_names(settings: opt.Settings, log=print) -> list[str]:
    """The test images to explain: ffdnet.attribution.images when the test folder has them. When
    it has none of them (e.g. the defaults "01", "02" of Set12 with the scikit-image photographs),
    the first as many images of the folder, in name order, with a warning saying so; a list of
    which only some exist is a typo and stops with one line."""
    cfg = settings.ffdnet
    wanted = cfg.attribution.images
    names = [os.path.splitext(os.path.basename(p))[0]
             for p in datasets.list_images(common.folder(settings, "test_dir"))]
    missing = [n for n in wanted if n not in names]
    if not missing:
        return list(wanted)
    if len(missing) < len(wanted):
        raise opt.SettingsError(f"bad setting ffdnet.attribution.images: no test image {missing[0]!r} in "
                                f"{cfg.test_dir} (names: {names})")
    chosen = names[:len(wanted)]
    log(f"WARNING: ffdnet.attribution.images {wanted} are not in {cfg.test_dir}: using its first "
        f"{len(chosen)} images {chosen} instead (set ffdnet.attribution.images to choose)")
    return chosen


def check_point(point: list[int], image: torch.Tensor) -> None:
    if not (0 <= point[0] < image.shape[-2] and 0 <= point[1] < image.shape[-1]):
        raise opt.SettingsError(f"bad setting ffdnet.attribution.points: {point} is outside the "
                                f"{image.shape[-2]}x{image.shape[-1]} test image")


@torch.no_grad()
def activations_at(model: FFDNet, noisy: torch.Tensor, sigma01: float, layers: list[int],
                   points: list[list[int]], where: str) -> dict[int, torch.Tensor]:
    """{layer: (n_points, channels)} feature vectors at the given full-image pixels.

    ``where`` = "block": after the block's ReLU; "conv": the raw conv output (the original's)."""
    store: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        index = model.block_output_index(layer) if where == "block" else model.conv_index(layer)
        hooks.append(model.main[index].register_forward_hook(
            lambda m, i, o, key=layer: store.__setitem__(key, o.detach())))
    try:
        model(noisy[None].to(next(model.parameters()).device),
              torch.tensor([sigma01], device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for layer, fmap in store.items():
        vectors = [fmap[0, :, r, c] for r, c in (feature_position(*p) for p in points)]
        out[layer] = torch.stack(vectors).cpu()
    return out


def grad_norms(settings: opt.Settings) -> tuple[dict[int, torch.Tensor], dict]:
    """The gradient-norm file of FFDNet_Train: ({layer: (P, channels) float64}, meta)."""
    record = opt.read_json(common.grad_norm_file(settings), "ffdnet_test/FFDNet_Train.py")
    arrays = {int(k[1:]): torch.tensor(v, dtype=torch.float64) for k, v in record["arrays"].items()}
    return arrays, record["meta"]


def mode_scores(activation: torch.Tensor, norms: torch.Tensor, mode: str, outlim: float
                ) -> torch.Tensor:
    """Method-1 scores (n_points, P) of one layer in mode raw / normalized / remove_out
    (outliers get -inf so that they never rank)."""
    if mode == "normalized":
        norms = utils_if.normalize_rows(norms)
    scores = utils_if.method1_scores({"l": activation}, {"l": norms})
    if mode == "remove_out":
        scores[:, utils_if.outliers(norms, outlim)] = float("-inf")
    return scores


def window_mask(shape: tuple[int, ...], point: list[int], window: int) -> torch.Tensor:
    """(C, H, W) mask of the (2*window+1)^2 pixels around ``point`` (clipped at the border)."""
    mask = torch.zeros(shape)
    r, c = point
    mask[:, max(r - window, 0):r + window + 1, max(c - window, 0):c + window + 1] = 1.0
    return mask


def training_triples(settings: opt.Settings, device, n: int = 0):
    """(noisy, clean, sigma, patches) of the first n training patches (0 = all), in the model's
    channel order: the fixed (noisy, clean, sigma) triples that influence and retraining share."""
    if not settings.ffdnet.fixed_noise:
        raise opt.SettingsError("ffdnet.fixed_noise = false: attribution needs one fixed (noisy, clean, "
                                "sigma) triple per training patch; set it to true (and retrain)")
    patches = common.train_patches(settings)
    sigma, noise = common.patch_noise(settings, patches)
    n = n or len(patches)
    clean = common.to_model_order(patches.clean[:n], settings)
    noisy = clean + common.to_model_order(noise[:n], settings)
    return noisy.to(device), clean.to(device), sigma[:n].to(device), patches


def training_points(settings: opt.Settings, device):
    """Packed noisy inputs and clean targets of the (first max_train_points) training patches."""
    noisy, clean, sigma, patches = training_triples(settings, device,
                                                    settings.ffdnet.method2.max_train_points)
    return PackedInput.pack(noisy, sigma), clean, patches


def influence_problem(settings: opt.Settings, model: FFDNet, solver: "utils_if.SolverSettings",
                      log=lambda _: None) -> "utils_if.InfluenceProblem":
    """The influence problem of ffdnet.method2 over the model's chosen parameters (seen by the engine
    under PackedInput's "net."). Kronecker solvers cover the conv layers only: BatchNorm's scale and
    shift are held fixed (logged), and ``solver`` gets the factor file of these settings (its Fisher is
    the empirical one: the denoiser's block offers no other, options/method2.py)."""
    m2 = settings.ffdnet.method2
    try:
        names = utils_if.select_parameters(model, m2.params)
    except ValueError as err:
        raise opt.solver_error("ffdnet.method2", err) from None
    if solver.solver in utils_if.KRONECKER_SOLVERS:
        modules = dict(model.named_modules())
        convs = [n for n in names if isinstance(modules[n.rpartition(".")[0]], torch.nn.Conv2d)]
        if len(convs) < len(names):
            log(f"{solver.solver}: {len(names) - len(convs)} BatchNorm parameters held fixed "
                f"(not in the Kronecker-factored set)")
        names = convs
        solver.factor_file = common.factor_file(settings, solver.solver)
    return utils_if.InfluenceProblem(PackedInput(model).eval(), utils_if.mse_sample_loss, ["net." + n for n in names],
                                     l2_reg=m2.l2_reg, batched_hvp=False)


def packed_test_image(settings: opt.Settings, image: str, device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(packed noisy input (1, C+1, H, W), clean target (1, C, H, W), path) of a test image, in the
    model's channel order, at the test noise level."""
    _, path, clean, noisy = test_image(settings, image)
    sigma01 = settings.ffdnet.test.noise_level_img / 255.0
    x = PackedInput.pack(common.to_model_order(noisy, settings)[None], torch.tensor([sigma01]))
    return x.to(device), common.to_model_order(clean, settings)[None].to(device), path


def target_grads(settings: opt.Settings, problem: "utils_if.InfluenceProblem", image: str, points: list[list[int]],
                 device) -> tuple[torch.Tensor, list[tuple[str, list[int] | None]], str]:
    """The gradients (1 + len(points), p) of one test image's targets over ``problem``'s parameters:
    the whole-image MSE, then the squared error of the ffdnet.method2.window window around each
    point; with their (entry label, point) and the image's path."""
    window = settings.ffdnet.method2.window
    x, y, path = packed_test_image(settings, image, device)
    rows, labels = [problem.sample_grads(x, y)], [("whole", None)]
    for point in points:
        check_point(point, y[0])
        loss = utils_if.masked_mse_sample_loss(window_mask(tuple(y.shape[1:]), point, window).to(device))
        rows.append(problem.sample_grads(x, y, loss=loss))
        labels.append((f"point {point[0]},{point[1]}", point))
    return torch.cat(rows), labels, path
