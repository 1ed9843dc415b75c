"""Explainability test, step 1: retrain a fresh, seeded model from scratch on each manipulated
training set.

For each method list (method1, method2 / method3 helpful / harmful), each manipulation in newData
(algo: relabel the top N; random: relabel N random; remove_algo; remove_random: the N points
weighted 0 in place, same seed and order, i.e. the single-model counterfactual), each N in
explain.n_values and each test image. Many models train at once (vmap; a model trained in a group
equals the same model trained alone, see training.train_group). Jobs whose model file exists are skipped, so a crashed or
interrupted run resumes; files are written atomically.

Parallel: torchrun --nproc_per_node=K mnist_test/expTrain.py gives each rank a disjoint share of
the jobs (gloo on CPU, NCCL on GPU); rank 0 writes the summary. Without torchrun: one process.

Reads:  the Method-1 / 2 / 3 files of the base settings (m1_Test.py, m2_Test.py, m3_Test.py)
Writes: model_zoo/expTest/{tag}/base.pth and {method}/{manipulation}/n{N}/t{test_id}.pth
        (removals: {method}/{manipulation}_weight0/...);
        test/expTrain_{tag}_summary.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import common, explain, training  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    rank, world = opt.distributed_start(cfg.use_gpu)
    logger, device = opt.start_script(settings, "mnist_expTrain", cfg, seed=False)
    ranked = explain.ranked_points(settings)
    jobs = explain.plan(settings, ranked)
    pending, mine = opt.pending_share(jobs, rank, world)
    logger.info(f"{len(jobs)} models in the study, {len(jobs) - len(pending)} already done; "
                f"rank {rank}/{world} trains {len(mine)}")
    if mine:
        train = common.load_train_data(settings, device, logger.info)
        group = cfg.explain.group_size
        # every model trains on all n items (a removal weights its points 0), so any jobs share a group
        chunks = [mine[i:i + group] for i in range(0, len(mine), group)]
        start = 0
        for chunk in chunks:
            specs = [explain.training_spec(job, ranked, train, cfg.seed) for job in chunk]
            with opt.Timer() as timer:
                states = training.train_group(train, specs, cfg, device,
                                     desc=f"rank {rank}: models {start + 1}-{start + len(chunk)}/{len(mine)}")
            for job, state in zip(chunk, states):
                os.makedirs(os.path.dirname(job["path"]), exist_ok=True)
                opt.save_torch(job["path"], {"model": state, "job": {k: v for k, v in job.items() if k != "path"}})
            logger.info(f"rank {rank}: {len(chunk)} models trained in {timer.seconds:.0f} s")
            start += len(chunk)
    opt.distributed_barrier()
    summary = None
    if rank == 0:
        done = [job for job in jobs if os.path.isfile(job["path"])]
        summary = opt.write_json(opt.output_path(settings, "test", f"expTrain_{common.run_tag(settings)}_summary.json"),
                                 {"jobs": done, "missing": [j["name"] for j in jobs if j not in done],
                                  "world_size": world, "settings": opt.as_dict(settings.mnist)}, logger)
    opt.distributed_end()
    return {"summary": summary, "trained": len(mine), "jobs": len(jobs)}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
