"""Method 3 for FFDNet: the exact attribution of one fine-tuning run, per pixel window.

expTest fine-tunes the trained model with one schedule (ffdnet.explain.finetune: Adam, BatchNorm
statistics fixed, the fixed noise of each patch, a data order drawn from the seed). For each seed's
run, and each target of expTest's test images (the whole-image MSE, and the squared error of the
(2*window+1)^2 window around each ffdnet.attribution.points), this script computes

    influence[t][i] = -n * dF_t / dw_i,

w_i training patch i's data weight in the batch loss (sum_i w_i l_i / |B|; 1 = as trained), F_t the
target after the run's last step, by reverse mode through every Adam step (utils_if.AdamReplay).
Positive = patch i helped; influence / n = the first-order change of F_t when patch i is removed
from this very run (weight 0 in place, same seed, same order): what expTest measures. A patch the
run never reaches scores exactly 0.

Reads:  the model, the training patches (the same fixed noise as FFDNet_Train), the test images
Writes: if/ffdnet/{tag}_m3_ft-{schedule}_seed{s}_w{window}_{test noise}_{image}.json, in m2_Test's
        shape (entries "whole" and "point r,c": influence, helpful, harmful; "meta")
Refuses (one line, nothing written) when the replay does not end where a real fine-tuning run of
the same seed ends (ffdnet.method3.replay_tolerance).
Resumable per seed (a seed whose files exist is reused) and splittable: the seeds are independent
jobs, so torchrun --nproc_per_node=K ffdnet_test/m3_Test.py shares them across K processes (on a
2-core CPU, 2 processes with "threads": 1 finish two seeds sooner than one process with 2 threads).
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, explain  # noqa: E402
from ffdnet_test.model import PackedInput  # noqa: E402


def main(settings: opt.Settings, share: tuple[int, int] = (0, 1)) -> dict:
    """Method 3 for every seed of ffdnet.explain.seeds whose files are missing; ``share`` = (rank,
    world): this process takes every world-th of them (torchrun)."""
    cfg = settings.ffdnet
    m3, ft = cfg.method3, cfg.explain.finetune
    logger, device = opt.start_script(settings, "ffdnet_m3_Test", cfg, seed=False)
    target_list = explain.targets(settings, logger.info)
    images = list(dict.fromkeys(t["image"] for t in target_list))
    base, model_path = common.load_model(settings, device, logger)
    noisy, clean, sigma, patches = attribution.training_triples(settings, device)
    n = len(clean)
    files, infos = {}, []
    pending = [{"seed": seed, "paths": [common.m3_result_file(settings, image, seed) for image in images]}
               for seed in range(cfg.explain.seeds)]
    pending = [job for job in pending if not all(os.path.isfile(p) for p in job["paths"])]
    if share[1] > 1:
        opt.distributed_barrier()  # every process lists the pending seeds before any writes one
    mine = opt.partition(pending, *share)
    logger.info(f"{cfg.explain.seeds - len(pending)} seed(s) already done; this process: seeds "
                f"{[job['seed'] for job in mine]}")
    smooth = None
    if mine and m3.smoothness_directions:
        with opt.Timer() as check_timer:
            smooth = explain.metasmoothness(base, noisy, clean, sigma, ft, m3)
        smooth["seconds"] = round(check_timer.seconds, 2)
        asked = f"removing patches from the fine-tuning run (steps 1-{explain.finetune_run(ft, n, 0).num_steps:,})"
        print(utils_if.verdict(smooth, explain.SMOOTHNESS_REMEDY, question=asked)
              + f" [{smooth['trainings']} fine-tuning runs, {check_timer.seconds:.0f} s]")
    for seed in (job["seed"] for job in mine):
        run = explain.finetune_run(ft, n, seed)
        replay = explain.method3_replay(base, run, noisy, sigma, clean)
        logger.info(f"Method 3, seed {seed}: replaying {run.num_steps} {ft.optimizer} steps of {ft.batch_size} patches "
                    f"({n} patches, {replay.num_params:,} parameters), then walking back for "
                    f"{len(target_list) + len(images)} targets")
        with opt.Timer() as total:
            with opt.Timer() as finetune_timer:
                tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run, show_progress=True)
            try:
                _, error, seconds_forward = utils_if.forward_checked(replay, tuned, m3.checkpoint_interval,
                                                                     m3.replay_tolerance, progress=opt.progress)
            except utils_if.ReplayMismatch as mismatch:
                raise opt.SettingsError(f"seed {seed}: {mismatch} (ffdnet.method3.replay_tolerance): the replay does "
                                        f"not describe this run, nothing written") from None
            logger.info(f"fine-tuning run {finetune_timer.seconds:.1f} s, forward replay {seconds_forward:.1f} s; "
                        f"replayed vs fine-tuned weights: relative error {error:.2g}")
            problem = utils_if.InfluenceProblem(PackedInput(tuned).eval(), utils_if.mse_sample_loss,
                                                ["net." + name for name in replay.names])
            grads, targets = [], []
            for image in images:
                rows, labels, path = attribution.target_grads(settings, problem, image, cfg.attribution.points, device)
                grads.append(rows)
                targets += [(image, path, label, point) for label, point in labels]
            with opt.Timer() as backward_timer:
                influence = -n * replay.metagradient(torch.cat(grads), progress=opt.progress).cpu()
        info = {"solver": "method3", "seed": seed, "steps": run.num_steps, "checkpoint_interval": replay.interval,
                "replay_relative_error": error, "converged": True, "path": replay.info["path"],
                "seconds_finetune": round(finetune_timer.seconds, 3), "seconds_forward": round(seconds_forward, 3),
                "seconds_backward": round(backward_timer.seconds, 3), "seconds_total": round(total.seconds, 3),
                "state_megabytes": round(replay.state_floats(len(targets)) * base.main[0].weight.element_size() / 2**20, 1),
                "threads": torch.get_num_threads(), "patches_reached": int(run.orders.unique().numel()),
                "metasmoothness": smooth}
        infos.append(info)
        logger.info(f"seed {seed}: backward {info['seconds_backward']} s = {info['seconds_backward'] / finetune_timer.seconds:.1f}x "
                    f"the fine-tuning run; state {info['state_megabytes']} MB; {info['patches_reached']} of {n} "
                    f"patches reached (the rest score 0)")
        for image in images:
            entries = {}
            for (img, path, label, point), row in zip(targets, influence):
                if img == image:
                    entries[label] = {"point": point, "influence": row.tolist(),
                                      "helpful": utils_if.top_indices(row, m3.top_k, True),
                                      "harmful": utils_if.top_indices(row, m3.top_k, False)}
            files[f"{image} seed {seed}"] = opt.write_json(common.m3_result_file(settings, image, seed), {
                "entries": entries, "meta": {
                    "model_file": model_path, "test_image": path, "sigma": cfg.test.noise_level_img, "n_train": n,
                    "window": cfg.method2.window, "seed": seed, "finetune": opt.as_dict(settings.ffdnet.explain.finetune),
                    "settings": opt.as_dict(settings.ffdnet.method3), "solver_info": info,
                    "sign_convention": utils_if.METHOD3_SIGN_CONVENTION, "patch_size": patches.patch_size,
                    "targets": "whole = MSE over the whole image; point r,c = squared error over the "
                               "(2*window+1)^2 pixels around (row r, col c), after the seed's fine-tuning run"}}, logger)
    return {"files": files, "info": infos}


def distributed_main(settings: opt.Settings) -> dict:
    """The script's entry: under torchrun each process takes its share of the seeds."""
    rank, world = opt.distributed_start(settings.ffdnet.use_gpu)
    try:
        return main(settings, (rank, world))
    finally:
        opt.distributed_barrier()
        opt.distributed_end()


if __name__ == "__main__":
    opt.run_script(distributed_main, __doc__)
