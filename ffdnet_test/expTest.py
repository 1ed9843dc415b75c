"""FFDNet explainability test: do the training patches a ranking names for a pixel matter for that
pixel? Counterfactual fine-tuning over every training patch (settings: ffdnet.explain).

For each target (the ffdnet.attribution.points of the first explain.test_images test images) and
each ranking (explain.rankings: Method 3 of the seed's own run on the window or the whole image,
Method 2 pixel-window influence, Method 2 whole-image influence, Method 1 at explain.m1_layer /
m1_mode, random), the top k patches (explain.k_values) are removed (data weight 0 in place) or
corrupted (clean target := noisy input; explain.manipulations), and the trained model is
fine-tuned on that set with one schedule for every run (explain.finetune: epochs, learning rate,
batch; BatchNorm statistics fixed), explain.seeds times. A control per seed is fine-tuned the same
way on the untouched set, with the same data order (see ffdnet_test/explain.py: runs are paired).

effect at target j = window loss at j after the manipulated run - the same seed's control there.
The hypothesis under test: removing the top-k patches by pixel-window influence raises that
window's loss >= 3x more than removing k random patches, and >= 2x more than at the other points.
Predicted vs measured: each removal run's change of every window loss against the sum of the
removed patches' Method-3 (and Method-2) scores / n.

Resumable (one small JSON per run; finished runs are skipped) and splittable:
torchrun --nproc_per_node=K ffdnet_test/expTest.py shares the runs across K processes.

Reads:  the model, the training patches, m1_Test's, m2_Test's and m3_Test's files for the same
        settings (m2 over all patches: ffdnet.method2.max_train_points = 0); the scripts that make
        them (FFDNet_Train, m1_Test, m2_Test, m3_Test) are run here first where a file is missing,
        so one command is the whole study
Writes: test/ffdnet_expTest/{study}/{run}.json; test/ffdnet_expTest_{study}_r{plan}.{md,csv,json};
        fig/ffdnet_expTest_{study}_r{plan}_{effects_IMAGE,specificity,maps}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, explain, explain_study, m1_Test, m2_Test, m3_Test  # noqa: E402


def prerequisites(settings: opt.Settings, target_list: list[dict], log) -> None:
    """Run FFDNet_Train, m1_Test, m2_Test and m3_Test where their files for these settings are
    missing (what the rankings and the predictions need), so that this script is the whole study."""
    cfg = settings.ffdnet
    ecfg = settings.ffdnet.explain
    wanted = set(ecfg.rankings)
    all_images = attribution.image_names(settings, lambda _: None)
    images = list(dict.fromkeys(t["image"] for t in target_list))
    if not cfg.test.model:
        opt.run_stage(FFDNet_Train, [common.model_file(settings), common.grad_norm_file(settings)], settings, log)
    if "m1" in wanted:
        opt.run_stage(m1_Test, [common.m1_result_file(settings, image) for image in all_images], settings, log)
    if wanted & {"m2_window", "m2_whole"}:
        opt.run_stage(m2_Test, [common.m2_result_file(settings, image) for image in all_images], settings, log)
    if wanted & set(explain.SEED_RANKINGS):
        opt.run_stage(m3_Test, [common.m3_result_file(settings, image, seed) for image in images
                                for seed in range(ecfg.seeds)], settings, log)


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    ecfg = settings.ffdnet.explain
    rank, world = opt.distributed_start(cfg.use_gpu)
    logger, device = opt.start_script(settings, "ffdnet_expTest", cfg, seed=False)
    target_list = explain.targets(settings, logger.info)
    images = list(dict.fromkeys(t["image"] for t in target_list))
    if rank == 0:
        prerequisites(settings, target_list, logger.info)
    opt.distributed_barrier()
    noisy, clean, sigma, patches = attribution.training_triples(settings, device)
    ranked = explain.read_rankings(settings, target_list, len(patches))
    base, model_path = common.load_model(settings, device, logger)
    tests = attribution.model_order_pairs(settings, list(images))
    tag = explain_study.study_tag(settings)
    folder = opt.output_folder(settings, "test", "ffdnet_expTest", tag)
    jobs = explain.plan(settings, target_list, folder)
    pending, mine = opt.pending_share(jobs, rank, world)
    steps = explain.finetune_steps(len(patches), ecfg.finetune.epochs, ecfg.finetune.batch_size)
    logger.info(f"FFDNet explainability study {tag}: {len(patches)} training patches, {len(target_list)} targets, "
                f"{len(jobs)} runs of {steps} fine-tuning steps, {len(jobs) - len(pending)} already done; "
                f"rank {rank}/{world} runs {len(mine)}; torch threads {torch.get_num_threads()}")
    bar = opt.progress(mine, desc=f"rank {rank}: runs", unit="run")
    for job in bar:
        record = explain_study.run_job(job, base, (noisy, clean, sigma), ranked, images, tests, target_list, settings, device)
        opt.write_json(job["path"], record)
        bar.set_postfix(last=f"{record['seconds']:.0f}s")
    opt.distributed_barrier()
    result = {"runs": len(mine), "jobs": len(jobs), "study": tag}
    if rank == 0:
        runs = {job["name"]: opt.read_json(job["path"], "ffdnet_test/expTest.py") for job in jobs
                if os.path.isfile(job["path"])}
        base_outcome = explain.evaluate(base, tests, target_list, cfg.method2.window,
                                        cfg.test.noise_level_img / 255.0)
        result.update(explain_study.report(settings, runs, target_list, base_outcome, explain_study.report_tag(settings), ranked, len(patches),
                             device, logger))
        result["model_file"] = model_path
    opt.distributed_end()
    return result


if __name__ == "__main__":
    opt.run_script(main, __doc__)
