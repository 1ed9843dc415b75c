"""Method 2: influence of every training image on each selected test image (Koh & Liang).

influence[t][i] = grad L(test t)^T H^-1 grad L(train i), H the Hessian of the training objective
(mean NLL + l2_reg/2 ||theta||^2), H^-1 v by method2.solver (the solvers are listed below).
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


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    m2 = cfg.method2
    logger, device = opt.start_script(settings, "mnist_m2_Test", cfg)
    model, model_path = common.load_model(settings, m2.mode, device, logger)
    train, test = common.load_data(settings, device, logger.info)
    solver, solver_cfg = opt.solver_run(m2, cfg.seed)  # its own settings, read from the block, and the run's
    if solver.kronecker:
        solver_cfg.factor_file = common.factor_file(settings)
    try:
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                            utils_if.select_parameters(model, m2.params),
                                            l2_reg=m2.l2_reg)
    except ValueError as err:
        raise opt.solver_error("mnist.method2", err) from None
    if solver.needs_checkpoints:
        solver_cfg.checkpoints = tracin_checkpoints(settings, problem, device, logger)
    if cfg.test_ids == "all":
        return all_pairs(settings, model, model_path, problem, solver_cfg, train, test, logger)
    ids = common.selected_test_ids(settings, m2.mode)[:m2.test_sample_num]
    shown = ids if len(ids) <= 10 else f"{ids[:10]}... ({len(ids)})"
    logger.info(f"influence of {len(train)} training images on test images {shown}: solver "
                f"{solver.name}, {problem.num_params} parameters, effective damping "
                f"{solver.effective_damping(solver_cfg)}")
    x_test, y_test = test.images[ids], test.labels[ids]
    with opt.Timer() as total:
        try:
            influence, info = solver.attribute(problem, x_test, y_test, train.images, train.labels, solver_cfg)
        except (utils_if.LissaDiverged, ValueError) as err:
            raise opt.solver_error("mnist.method2", err) from None
    info["seconds_total"] = round(total.seconds, 3)
    if "lissa_mlp_check" in info:  # correct but slower: the model changed shape under the fast LiSSA
        logger.warning(f"WARNING: {info['lissa_mlp_check']}")
    if not info.get("converged", True):
        logger.warning(f"WARNING: {info['warning']}")
        if not m2.write_unconverged and info.get("cg_relative_residual", 0.0) > 1e-2:
            raise opt.SettingsError(f"{info['warning']}; nothing written (set mnist.method2."
                                    f"write_unconverged = true to write it anyway, marked in meta)")
    logger.info(", ".join(f"{key[len('seconds_'):].replace('_', ' ')} {value} s"
                          for key, value in info.items() if key.startswith("seconds_")))
    result = common.attribution_record(settings, model, model_path, x_test, y_test, ids, influence, m2.top_k,
                                       info, utils_if.SIGN_CONVENTION, logger)
    path = common.m2_file(settings)
    opt.write_json(path, result, logger)
    return {"if_file": path, "info": info}


def tracin_checkpoints(settings, problem, device, logger) -> list:
    """(influence problem at each of Train.py's checkpoints, its learning rate) for TracIn."""
    from mnist_test.model import mnist_model
    cfg, out = settings.mnist, []
    for path in common.checkpoint_files(settings, cfg.method2.mode):
        state = opt.load_torch(path, "mnist_test/Train.py (mnist.checkpoint_every > 0)", map_location=device)
        model = mnist_model(cfg.activation, cfg.logit_scale).to(device)
        model.load_state_dict(state["model"])
        out.append((utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, problem.param_names),
                    float(state["learning_rate"])))
    logger.info(f"TracIn over {len(out)} checkpoints")
    return out


def all_pairs(settings, model, model_path, problem, solver_cfg, train, test, logger) -> dict:
    """test_ids = "all": every test image x every training image, streamed in chunks of
    method2.test_chunk test images. Per test image the JSON keeps the top-k helpful and harmful
    lists (no influence row); the full matrix goes to a .npy beside it only when
    method2.save_matrix asks (written chunk by chunk into a memory-mapped file, never held twice).
    With method2.self_influence, the self-influence of every training image is written too."""
    import numpy as np
    m2 = settings.mnist.method2
    if not utils_if.solver_for(solver_cfg.solver).all_pairs:
        fast = [name for name, s in utils_if.SOLVERS.items() if s.all_pairs]
        raise opt.SettingsError(f'mnist.test_ids = "all" needs a fast solver: set mnist.method2.solver to one of '
                                f'{", ".join(fast)} (now {solver_cfg.solver!r}, which would take hours)')
    n_test, n_train, k = len(test), len(train), m2.top_k
    path = common.m2_file(settings)
    save = m2.save_matrix != "none"
    matrix_path = path[:-len(".json")] + f"_{m2.save_matrix}.npy"
    helpful = torch.empty(n_test, k, dtype=torch.long)
    harmful = torch.empty(n_test, k, dtype=torch.long)
    logger.info(f"all pairs: {n_test} test x {n_train} training images, solver {solver_cfg.solver}, chunks of "
                f"{m2.test_chunk} test images{', matrix ' + m2.save_matrix if save else ''}")

    def sweep(tmp: str | None) -> None:  # tmp: the matrix's temporary file (atomic_write renames it)
        matrix = None if tmp is None else np.lib.format.open_memmap(
            tmp, mode="w+", dtype=m2.save_matrix, shape=(n_test, n_train))
        bar = opt.progress(total=n_test, desc="all pairs", unit="test image")
        for start, chunk in utils_if.influence_chunks(problem, test.images, test.labels, train.images, train.labels,
                                                      solver_cfg, m2.test_chunk, log=logger.info):
            rows = slice(start, start + len(chunk))
            helpful[rows] = torch.topk(chunk, k, dim=1).indices.cpu()
            harmful[rows] = torch.topk(chunk, k, dim=1, largest=False).indices.cpu()
            if matrix is not None:
                matrix[rows] = chunk.cpu().numpy().astype(m2.save_matrix)
            bar.update(len(chunk))
        bar.close()
        if matrix is not None:
            matrix.flush()

    with opt.Timer() as timer:
        if save:
            opt.atomic_write(matrix_path, sweep, logger, suffix=".npy")
        else:
            sweep(None)
    logger.info(f"all {n_test * n_train:,} pairs in {timer.seconds:.1f} s")
    with torch.no_grad():
        out = model(test.images)
    result = {"meta": {"settings": opt.as_dict(settings.mnist), "profile": settings.profile,
                       "model_file": model_path, "n_train": n_train, "test_ids": "all",
                       "sign_convention": utils_if.SIGN_CONVENTION, "seconds_all_pairs": round(timer.seconds, 2),
                       "solver_info": {"solver": solver_cfg.solver, "factor_file": solver_cfg.factor_file}}}
    if save:
        result["meta"]["matrix_file"] = matrix_path
        logger.info(f"wrote {matrix_path}")
    if m2.self_influence:
        with opt.Timer() as self_timer:
            values = utils_if.solver_for(solver_cfg.solver).self_influence(problem, train.images, train.labels, solver_cfg,
                                                                       logger.info)
        result["self_influence"] = values.cpu().tolist()
        logger.info(f"self-influence of {n_train} training images in {self_timer.seconds:.1f} s; largest: "
                    f"{utils_if.top_indices(values, 10)}")
    losses = utils_if.nll_sample_loss(out, test.labels)
    predictions = out.argmax(1).tolist()
    for t in range(n_test):
        result[str(t)] = {"test_id_num": t, "label": int(test.labels[t]), "prediction": predictions[t],
                          "loss": float(losses[t]), "helpful": helpful[t].tolist(), "harmful": harmful[t].tolist()}
    opt.write_json(path, result, logger)
    return {"if_file": path, "seconds": timer.seconds, "matrix": result["meta"].get("matrix_file")}


if __name__ == "__main__":
    opt.run_script(main, f"{__doc__}\nmnist.method2.solver:\n{utils_if.solver_help(opt.offered_solvers('mnist'))}")
