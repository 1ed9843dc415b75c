"""Finding flipped labels (settings: mnist.mislabel): a real use of self-influence.

A seeded fraction (mislabel.fraction) of the first train_subset training images gets another
label (a uniformly drawn other class). The MLP is trained on that set with the study's recipe,
recording Method-1 gradient norms (batch mode, all three layers) and a checkpoint every
mislabel.checkpoint_every epochs. Every training image is then ranked by
- EK-FAC self-influence g_i^T (F_hat + lambda)^-1 g_i (true Fisher, the project's EK-FAC),
- TracIn self-influence sum_c lr * ||g_i(theta_c)||^2 over the checkpoints,
- Method 1's total gradient norm (the sum of the image's gradient-norm vectors over layers),
- the training loss under the final model,
- random order (the baseline),
and the table gives the fraction of the flipped images found when inspecting the top 1%, 5%, 10%
and 20% of each ranking, and the ROC AUC. The trained model, its norms and checkpoints are kept
(model_zoo/mislabel/), so a second run only ranks.

Writes: test/mislabel_{tag}.{md,csv,json}, fig/mislabel_{tag}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common  # noqa: E402
from mnist_test.datasets import MnistData  # noqa: E402
from mnist_test.model import LAYER_MODULES, mnist_model  # noqa: E402
from mnist_test.training import train_model  # noqa: E402

INSPECTED = (0.01, 0.05, 0.10, 0.20)


def flipped_labels(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(new labels, boolean mask of the flipped images): round(fraction * n) distinct images, each
    given a uniformly drawn label other than its own, from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    chosen = torch.randperm(n, generator=generator)[:int(round(fraction * n))]
    shift = torch.randint(1, 10, (len(chosen),), generator=generator)
    new = labels.clone().cpu()
    new[chosen] = (new[chosen] + shift) % 10
    mask = np.zeros(n, dtype=bool)
    mask[chosen.numpy()] = True
    return new.to(labels.device), mask


def study_tag(settings: opt.Settings) -> str:
    cfg = settings.mnist
    mis = cfg.mislabel
    return (f"n{mis.train_subset or 60000}f{mis.fraction:g}e{mis.epoch}s{mis.seed}"
            f"ce{mis.checkpoint_every}b{cfg.batch_size}" + ("" if cfg.activation == "relu" else cfg.activation))


def trained(settings: opt.Settings, data: MnistData, device, logger) -> dict:
    """The model trained on the flipped set, with its Method-1 norms and checkpoints (cached)."""
    cfg = settings.mnist
    mis = cfg.mislabel
    path = opt.output_path(settings, "model_zoo", "mislabel", f"mislabel_{study_tag(settings)}.pth")
    if os.path.isfile(path):
        logger.info(f"reuse {path}")
        return opt.load_torch(path, "mnist_test/mislabelTest.py", map_location=device)
    checkpoints = []
    recipe = opt.Recipe.of(cfg).replace(epoch=mis.epoch, seed=mis.seed)
    with opt.Timer() as timer:
        model, norms = train_model(data, recipe, device, "batch", tuple(LAYER_MODULES), False,
                                   checkpoint_every=mis.checkpoint_every,
                                   on_checkpoint=lambda epoch, state: checkpoints.append(state))
    logger.info(f"trained on the flipped set in {timer.seconds:.1f} s ({len(checkpoints)} checkpoints)")
    record = {"model": model.state_dict(), "norms": norms, "checkpoints": checkpoints,
              "train_seconds": timer.seconds}
    opt.save_torch(path, record, logger)
    return record


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    mis = cfg.mislabel
    logger, device = opt.start_script(settings, "mnist_mislabelTest", cfg, seed=False)
    clean = common.load_train_data(opt.with_values(settings, {"mnist": {"train_subset": mis.train_subset}}),
                                   device, logger.info)
    labels, flipped = flipped_labels(clean.labels, mis.fraction, mis.seed)
    data = MnistData(clean.images, labels, clean.indices)
    logger.info(f"{int(flipped.sum())} of {len(data)} training labels flipped (seed {mis.seed})")
    record = trained(settings, data, device, logger)
    model = mnist_model(cfg.activation, cfg.logit_scale).to(device)
    model.load_state_dict(record["model"])
    model.eval()
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model),
                                        l2_reg=cfg.weight_decay)
    scores, seconds = {}, {}
    with opt.Timer() as t:
        curvature = utils_if.KroneckerCurvature(problem, data.images, data.labels, eigen_corrected=True,
                                                fisher="true", damp_factor=cfg.method2.kfac_damp_factor,
                                                seed=mis.seed)
        scores["EK-FAC self-influence"] = curvature.self_influence(data.images, data.labels)
    seconds["EK-FAC self-influence"] = t.seconds
    with opt.Timer() as t:
        curvature = utils_if.KroneckerCurvature(problem, data.images, data.labels, eigen_corrected=False,
                                                fisher="true", damp_factor=cfg.method2.kfac_damp_factor,
                                                seed=mis.seed, factored_damping=True)
        scores["K-FAC (factored damping) self-influence"] = curvature.self_influence(data.images, data.labels)
    seconds["K-FAC (factored damping) self-influence"] = t.seconds
    with opt.Timer() as t:
        trak = utils_if.Trak(problem, data.images, data.labels, cfg.method2.proj_dim, mis.seed)
        scores["TRAK self-influence"] = trak.self_influence()
    seconds["TRAK self-influence"] = t.seconds
    with opt.Timer() as t:
        checkpoints = []
        for state in record["checkpoints"]:
            m = mnist_model(cfg.activation, cfg.logit_scale).to(device)
            m.load_state_dict(state)
            checkpoints.append((utils_if.InfluenceProblem(m, utils_if.nll_sample_loss, problem.param_names),
                                cfg.learning_rate))
        if checkpoints:
            scores["TracIn self-influence"] = utils_if.tracin_self_influence(checkpoints, data.images, data.labels)
    seconds["TracIn self-influence"] = t.seconds
    with opt.Timer() as t:
        scores["Method 1 total gradient norm"] = sum(v.sum(1) for v in record["norms"].values())
    seconds["Method 1 total gradient norm"] = t.seconds
    with opt.Timer() as t, torch.no_grad():
        scores["training loss"] = utils_if.nll_sample_loss(model(data.images), data.labels)
    seconds["training loss"] = t.seconds
    generator = torch.Generator().manual_seed(mis.seed + 1)
    scores["random"] = torch.rand(len(data), generator=generator, dtype=torch.float64)
    seconds["random"] = 0.0
    rows, curves = [], {}
    grid = np.linspace(0.0, 1.0, 101)[1:]
    for name, values in scores.items():
        v = values.detach().double().cpu().numpy()
        found = utils_if.fraction_found(v, flipped, INSPECTED)
        rows.append({"ranking": name, **{f"found_top{int(f * 100)}%": x for f, x in zip(INSPECTED, found)},
                     "roc_auc": utils_if.roc_auc(v, flipped), "seconds": round(seconds[name], 2)})
        curves[name] = utils_if.fraction_found(v, flipped, grid)
    tag = study_tag(settings)
    lines = [opt.markdown_table(["ranking", *(f"top {int(f * 100)}%" for f in INSPECTED), "ROC AUC", "seconds"],
                                [[r["ranking"], *(f"{r[f'found_top{int(f * 100)}%']:.3f}" for f in INSPECTED),
                                  f"{r['roc_auc']:.4f}", f"{r['seconds']:.1f}"] for r in rows])]
    text = "\n".join(lines) + (f"\n\nFraction of the {int(flipped.sum())} flipped labels ({mis.fraction:g} of "
                               f"{len(data)}) found when inspecting the top of each ranking.")
    logger.info("\n" + text)
    md = opt.write_text(opt.output_path(settings, "test", f"mislabel_{tag}.md"), text + "\n", logger)
    csv = opt.write_csv(opt.output_path(settings, "test", f"mislabel_{tag}.csv"), rows, logger)
    figure = draw(settings, grid, curves, flipped, tag, logger)
    path = opt.write_json(opt.output_path(settings, "test", f"mislabel_{tag}.json"), {
        "meta": {"settings": opt.as_dict(settings.mnist), "tag": tag, "n_train": len(data), "n_flipped": int(flipped.sum()),
                 "flipped": np.flatnonzero(flipped).tolist(), "curvature": curvature.info(),
                 "train_seconds": float(record["train_seconds"])},
        "rows": rows, "curves": {"inspected": grid.tolist(), **curves}}, logger)
    return {"json": path, "markdown": md, "csv": csv, "figure": figure, "rows": rows}


def draw(settings, grid, curves, flipped, tag, logger) -> str:
    import matplotlib
    if not opt.is_interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for name, found in curves.items():
        ax.plot(grid * 100, np.array(found) * 100, label=name, lw=1.8, ls="--" if name == "random" else "-")
    ax.plot(grid * 100, np.minimum(grid / flipped.mean(), 1) * 100, color="gray", lw=0.8, ls=":", label="perfect")
    ax.set_xlabel("training images inspected (% of the set, top of the ranking first)")
    ax.set_ylabel("flipped labels found (%)")
    ax.set_title(f"Finding flipped labels ({flipped.mean() * 100:.0f}% flipped, {tag})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return opt.save_figure(fig, opt.output_path(settings, "fig", f"mislabel_{tag}.png"), logger)


if __name__ == "__main__":
    opt.run_script(main, __doc__)
