"""Method 3: exact attribution of the one trained network (metagradients through its SGD run).

influence[t][i] = -n_train * dF_t/dw_i, where w_i is training image i's data weight in the batch
loss (sum_i w_i NLL_i / |B|; 1 = as trained) and F_t the test target (loss, or minus the margin)
of the final weights. Train.py's run is replayed step by step (same seed, same init, same order),
then walked back once per chunk of test images (utils_if.SgdReplay). Positive = image i helped;
influence / n_train = the first-order change of F_t if image i is removed from this very run
(weight 0, same seed, same order: the single-model counterfactual).

Reads:  model_zoo/mnist_{tag}_{method3.mode}.pth (Train.py), the test ids (Test.py or the settings)
Writes: {if_dir}/m3_replay_{target}_{tag}_{mode}_{tests}_top{k}.json, in m2_Test's shape: per test
        image test_id_num, label, prediction, loss, influence (n_train floats), helpful, harmful.
Refuses (one line, nothing written) a model whose run the replay does not reproduce. Prints the
metasmoothness check's verdict first (the replay runs whatever it says; run_pipeline skips it when
the verdict is no, unless mnist.question.replay_when_not_smooth).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, training  # noqa: E402

TARGETS = {"loss": utils_if.nll_sample_loss, "margin": utils_if.negative_margin_sample_loss}


def main(settings: opt.Settings, check: dict | None = None) -> dict:
    """``check``: the metasmoothness check already measured for these settings (run_pipeline measures it
    to decide whether to replay); else it is measured here when method3.smoothness_directions > 0."""
    cfg = settings.mnist
    m3 = cfg.method3
    logger, device = opt.start_script(settings, "mnist_m3_Test", cfg)
    model, model_path = common.load_model(settings, m3.mode, device, logger)
    train, test = common.load_data(settings, device, logger.info)
    ids = common.selected_test_ids(settings, m3.mode)[:m3.test_sample_num]
    recipe = opt.Recipe.of(cfg)
    asked = recipe.question(len(train))  # what Method 3's scores answer, in words
    smoothness = check
    if smoothness is None and m3.smoothness_directions:
        smoothness = training.metasmoothness_said(train, test.images[ids], test.labels[ids], cfg, device)
    run = training.sgd_run(recipe, len(train), device)
    replay = utils_if.SgdReplay(training.new_model(cfg.seed, device, cfg.activation, cfg.logit_scale), utils_if.nll_sample_loss, run,
                                train.images, train.labels)
    logger.info(f"Method 3: replaying {run.num_steps:,} SGD steps ({cfg.epoch} epochs x {run.steps_per_epoch} "
                f"batches of {run.batch_size}, {len(train)} images), then walking back "
                + (f"the window's last {run.num_steps - run.window_start:,} steps " if run.window_start else "")
                + f"for {len(ids)} test images (target {m3.target}, {m3.test_chunk} per walk)")
    with opt.Timer() as total:
        try:
            _, error, seconds_forward = utils_if.forward_checked(replay, model, m3.checkpoint_interval,
                                                                 m3.replay_tolerance, progress=opt.progress)
        except utils_if.ReplayMismatch as mismatch:
            raise opt.SettingsError(
                f"{model_path}: replaying its run ends {mismatch.error:.2g} (relative) away from the saved weights "
                f"(tolerance mnist.method3.replay_tolerance = {mismatch.tolerance:g}), so its run cannot be "
                f"replayed here ({common.replay_record(model_path, device)}); retrain it with mnist_test/Train.py "
                f"on this machine and run m3_Test.py again") from None
        logger.info(f"forward replay {seconds_forward:.1f} s; final weights vs {model_path}: relative error {error:.2g}")
        x_test, y_test = test.images[ids], test.labels[ids]
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, replay.names)
        target_grads = problem.sample_grads(x_test, y_test, loss=TARGETS[m3.target])
        chunks = []
        with opt.Timer() as backward_timer:
            for start in range(0, len(ids), m3.test_chunk):
                chunks.append(replay.metagradient(target_grads[start:start + m3.test_chunk], progress=opt.progress))
        influence = -len(train) * torch.cat(chunks)
    if "closed_form_check" in replay.info:
        logger.warning(f"WARNING: {replay.info['closed_form_check']}")
    info = {"solver": "method3", "target": m3.target, "question": asked, "path": replay.info["path"],
            "steps": run.num_steps, "window_start": run.window_start,
            "checkpoint_interval": replay.interval, "replay_relative_error": error, "converged": True,
            "seconds_forward": round(seconds_forward, 3), "seconds_backward": round(backward_timer.seconds, 3),
            "seconds_total": round(total.seconds, 3), "metasmoothness": smoothness,
            "peak_state_floats": replay.interval * replay.num_params + 2 * len(replay.checkpoints) * replay.num_params
            + 2 * min(len(ids), m3.test_chunk) * replay.num_params}
    logger.info(f"forward {info['seconds_forward']} s, backward {info['seconds_backward']} s "
                f"({info['path']}), total {info['seconds_total']} s")
    path = common.m3_file(settings)
    opt.write_json(path, common.attribution_record(settings, model, model_path, x_test, y_test, ids, influence,
                                                   m3.top_k, info, utils_if.METHOD3_SIGN_CONVENTION
                                                   + f"; the question: {asked}", logger), logger)
    return {"if_file": path, "info": info}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
