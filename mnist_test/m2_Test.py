"""Method 2: influence of every training image on each selected test image (Koh & Liang).

influence[t][i] = grad L(test t)^T H^-1 grad L(train i), H the Hessian of the training objective
(mean NLL + l2_reg/2 ||theta||^2), H^-1 v by method2.solver (lissa | cg | exact).
Positive = training image i helped (removing it would raise the test loss);
influence / n_train = predicted change of the test loss when i is removed.

Reads:  model_zoo/mnist_{tag}_{method2.mode}.pth (Train.py), the test ids (Test.py or the settings)
Writes: {if_dir}/if_{solver}_{details}_{tag}_{mode}.json: per test image test_id_num, label,
        prediction, loss, influence (n_train floats, training-index order), helpful, harmful
        (top_k indices, most positive / most negative first); "meta" with every setting and timings.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common  # noqa: E402


def main(settings: dict) -> dict:
    cfg = common.mnist_cfg(settings)
    m2 = cfg["method2"]
    logger = opt.make_logger(settings, "mnist_m2_Test")
    device = opt.select_device(cfg["use_gpu"], logger)
    opt.seed_everything(cfg["seed"])
    model, model_path = common.load_model(settings, m2["mode"], device, logger)
    train = common.load_train_data(settings, device, logger.info)
    test = common.load_test_data(settings, device, logger.info)
    ids = common.selected_test_ids(settings, m2["mode"])[:m2["test_sample_num"]]
    solver = utils_if.SolverSettings.from_method2(m2, cfg["seed"])
    try:
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                            utils_if.select_parameters(model, m2["params"]),
                                            l2_reg=m2["l2_reg"])
    except ValueError as err:
        raise opt.SettingsError(str(err)) from None
    logger.info(f"influence of {len(train)} training images on test images {ids}: solver "
                f"{solver.solver}, {problem.num_params} parameters, effective damping "
                f"{solver.effective_damping}")
    x_test, y_test = test.images[ids], test.labels[ids]
    with opt.Timer() as total:
        try:
            influence, info = utils_if.compute_influences(problem, x_test, y_test, train.images,
                                                          train.labels, solver)
        except (utils_if.LissaDiverged, ValueError) as err:
            raise opt.SettingsError(str(err)) from None
    with torch.no_grad():
        out = model(x_test)
    losses = utils_if.nll_sample_loss(out, y_test)
    info["seconds_total"] = round(total.seconds, 3)
    if not info.get("converged", True):
        logger.warning(f"WARNING: {info['warning']}")
        if not m2["write_unconverged"] and info.get("cg_relative_residual", 0.0) > 1e-2:
            raise opt.SettingsError(f"{info['warning']}; nothing written (set mnist.method2."
                                    f"write_unconverged = true to write it anyway, marked in meta)")
    logger.info(f"test gradients {info['seconds_test_grads']} s, s_test {info['seconds_s_test']} s, "
                f"sweep {info['seconds_sweep']} s, total {info['seconds_total']} s")
    result = {"meta": {
        "settings": cfg, "profile": settings["profile"], "model_file": model_path,
        "n_train": len(train), "sign_convention": utils_if.SIGN_CONVENTION, "solver_info": info,
        "test_ids": ids}}
    influence = influence.cpu()
    for position, test_id in enumerate(ids):
        row = influence[position]
        result[str(position)] = {
            "test_id_num": test_id, "label": int(y_test[position]),
            "prediction": int(out[position].argmax()), "loss": float(losses[position]),
            "influence": row.tolist(),
            "helpful": utils_if.top_indices(row, m2["top_k"], largest=True),
            "harmful": utils_if.top_indices(row, m2["top_k"], largest=False)}
        logger.info(f"test {test_id} (label {int(y_test[position])}): helpful "
                    f"{result[str(position)]['helpful'][:5]}, harmful {result[str(position)]['harmful'][:5]}")
    path = common.m2_file(settings)
    opt.write_json(path, result, logger)
    return {"if_file": path, "info": info}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
