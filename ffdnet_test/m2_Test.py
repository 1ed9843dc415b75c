"""Method 2 for FFDNet: influence of every training patch (a fixed (noisy, clean, sigma) triple,
so ffdnet.fixed_noise must be true) on
  (a) the whole-image denoising loss of a test image (the report's), and
  (b) the loss at one pixel, or a (2*window+1)^2 window, around each chosen point (which the report
      could not do): the squared error of the denoised output there.
Same engine and sign convention as the MNIST side (utils_if.py): positive = the patch helped.
All targets of all test images share one inverse-HVP solve and one sweep.

Reads:  the model, ffdnet.train_dir (the same patches and noise as FFDNet_Train), ffdnet.test_dir
Writes: if/ffdnet/{tag}_{solver details}_{image}.json: entries "whole" and "point r,c" with
        influence (n_patches floats), helpful, harmful; "meta"
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    m2, att = cfg.method2, cfg.attribution
    logger, device = opt.start_script(settings, "ffdnet_m2_Test", cfg)
    images = attribution.image_names(settings, logger.info)
    model, model_path = common.load_model(settings, device, logger)
    solver, solver_cfg = opt.solver_run(m2, cfg.seed)  # its own settings, read from the block, and the run's
    problem = attribution.influence_problem(settings, model, solver_cfg, logger.info)
    x_train, y_train, patches = attribution.training_points(settings, device)
    rows, targets = [], []
    with opt.Timer() as grad_timer:
        for image in images:
            grads, labels, path = attribution.target_grads(settings, problem, image, att.points, device)
            rows.append(grads)
            targets += [(image, path, label, point) for label, point in labels]
    logger.info(f"influence of {len(x_train)} training patches on {len(targets)} targets "
                f"({problem.num_params} parameters, solver {m2.solver}, effective damping "
                f"{solver.effective_damping(solver_cfg)}); test gradients in {grad_timer.seconds:.1f} s")
    try:
        influence, info = solver.influences(problem, torch.cat(rows), x_train, y_train, solver_cfg)
    except (utils_if.LissaDiverged, ValueError) as err:
        raise opt.solver_error("ffdnet.method2", err) from None
    info["seconds_test_grads"] = round(grad_timer.seconds, 3)
    logger.info(f"s_test {info['seconds_s_test']} s, sweep {info['seconds_sweep']} s")
    influence = influence.cpu()
    files = {}
    for image in images:
        entries = {}
        for (img, path, label, point), row in zip(targets, influence):
            if img != image:
                continue
            entries[label] = {"point": point, "influence": row.tolist(),
                              "helpful": utils_if.top_indices(row, m2.top_k, True),
                              "harmful": utils_if.top_indices(row, m2.top_k, False)}
            logger.info(f"{image} {label}: helpful {entries[label]['helpful'][:5]}, harmful {entries[label]['harmful'][:5]}")
        files[image] = opt.write_json(common.m2_result_file(settings, image), {"entries": entries, "meta": {
            "model_file": model_path, "test_image": path, "sigma": cfg.test.noise_level_img,
            "n_train": len(x_train), "window": m2.window, "settings": opt.as_dict(settings.ffdnet.method2), "solver_info": info,
            "sign_convention": utils_if.SIGN_CONVENTION, "patch_size": patches.patch_size,
            "targets": "whole = MSE over the whole image; point r,c = squared error over the "
                       "(2*window+1)^2 pixels around (row r, col c)"}}, logger)
    return {"files": files, "info": info}


if __name__ == "__main__":
    opt.run_script(main, f"{__doc__}\nffdnet.method2.solver:\n{utils_if.solver_help(opt.offered_solvers('ffdnet'))}")
