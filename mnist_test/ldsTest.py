"""Ground truth for every attribution: the linear datamodeling score (LDS) and leave-one-out (LOO)
on the MNIST MLP (settings: mnist.lds).

1. Subset models: M = lds.num_subsets random halves (lds.subset_fraction) of the first
   lds.train_subset training images, lds.seeds_per_subset models each (their outputs are averaged),
   trained from scratch with the study's recipe by the grouped trainer. Only each test image's loss
   and margin is kept per model (lds.keep_weights keeps the weights too).
2. Attributions of every method, on the base model (seed lds.ensemble_seeds[0]) trained on all
   lds.train_subset images, from the files the existing scripts write (run here when missing):
   Method 1 (batch / per_sample norms, raw / normalized), Method 2 (EK-FAC, K-FAC, exact on the
   last layer, LiSSA at the report's settings and deeper, CG at each lds.cg_damps), gradient dot
   product and cosine (no Hessian), and ensembles (the mean attribution over the models of
   lds.ensemble_seeds).
3. LOO: for the first lds.loo.test_num test images, the top-k helpful, top-k harmful (by
   lds.loo.rank_by) and k random training points are each removed and the model retrained with
   lds.loo.seeds seeds; the actual change of the test loss (mean over seeds, minus the mean of the
   same seeds with nothing removed) is correlated with every method's attribution.
4. LDS(t) = Spearman over the subsets between predicted and measured loss (default; the margin is
   reported too); mean over test images with a bootstrap 95% interval.

Resumable (every retrained model is one small JSON; finished ones are skipped) and splittable:
torchrun --nproc_per_node=K mnist_test/ldsTest.py shares the models across K processes.

Writes: lds/{study}/subsets/m{m}_s{s}.json, lds/{study}/loo/...json, lds/{study}/loo_plan.json;
        test/lds_{report}.{md,csv,json}; fig/lds_{report}.png ({report} = {study}[_single]_r{hash of the table choices})
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from mnist_test import Train, lds, lds_study, m2_Test, m3_Test  # noqa: E402
from mnist_test.datasets import load_mnist  # noqa: E402

STAGES = {"Train": Train, "m2_Test": m2_Test, "m3_Test": m3_Test}  # what the study runs when a file is missing


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    lcfg = settings.mnist.lds
    rank, world = opt.distributed_start(cfg.use_gpu)
    logger, device = opt.start_script(settings, "mnist_ldsTest", cfg, seed=False)
    ids = lds.test_ids(settings)
    full = load_mnist(opt.data_path(cfg.data_dir), train=True, log=logger.info)
    train = full.subset(lcfg.train_subset).to(device)
    n = len(train)
    test = load_mnist(opt.data_path(cfg.data_dir), train=False, log=logger.info).to(device)
    x_test, y_test = test.images[ids], test.labels[ids]
    recipe = lds.recipe(settings)
    studies = lds_study.subset_studies(settings, n)
    logger.info(f"LDS study {lds.study_tag(settings)}, {lcfg.setting} setting: {n} training images, {len(ids)} "
                f"test images, {recipe.epoch} epochs; " + (
                    f"{lcfg.num_subsets} subsets x {lcfg.seeds_per_subset} seeds" if lcfg.setting == "algorithm"
                    else f"{lcfg.num_subsets} subsets per drop fraction {lcfg.drop_fractions}, the base run "
                         f"(seed {lcfg.ensemble_seeds[0]}) with the dropped points weighted 0")
                + f"; torch threads {torch.get_num_threads()}; rank {rank}/{world}")

    # 1. subset models
    jobs = [job for study in studies.values() for job in study["jobs"]]
    pending, mine = opt.pending_share(jobs, rank, world)
    logger.info(f"subset models: {len(jobs)} in all, {len(jobs) - len(pending)} done; rank {rank} trains {len(mine)}")
    trained = {"subsets": len(mine)}
    with opt.Timer() as subset_timer:
        lds.train_and_store(mine, train, x_test, y_test, recipe, lcfg.group_size, lcfg.keep_weights,
                            device, f"rank {rank}: subset models")
    if mine:
        logger.info(f"rank {rank}: {len(mine)} subset models in {subset_timer.seconds:.1f} s")

    # 2. attributions (rank 0) and the LOO plan
    methods, failed, plan = {}, {}, None
    plan_holder = os.path.join(lds.study_folder(settings), "loo_plan_current.json")
    if rank == 0:
        methods, failed = lds_study.attributions(settings, ids, device, logger, STAGES)
        plan = lds_study.loo_plan(settings.mnist.lds, methods, n, lds.study_folder(settings), logger)
        opt.write_json(plan_holder, plan)
    opt.distributed_barrier()
    plan = plan or opt.read_json(plan_holder, "mnist_test/ldsTest.py (rank 0)")

    # 3. LOO models
    loo = lds_study.loo_jobs(settings, plan, n)
    pending, mine = opt.pending_share(loo, rank, world)
    logger.info(f"LOO models: {len(loo)} in all, {len(loo) - len(pending)} done; rank {rank} trains {len(mine)}")
    trained["loo"] = len(mine)
    with opt.Timer() as loo_timer:
        lds.train_and_store(mine, train, x_test, y_test, recipe, lcfg.group_size, False, device,
                            f"rank {rank}: LOO models")
    opt.distributed_barrier()
    result = None
    if rank == 0:
        result = lds_study.report(settings, methods, failed, studies, plan, loo, ids, device, logger,
                        {"subset_models": subset_timer.seconds, "loo_models": loo_timer.seconds})
    opt.distributed_end()
    return {**(result or {}), "trained": trained}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
