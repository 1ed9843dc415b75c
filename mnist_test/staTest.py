"""Stability test: do models trained with different seeds explain a test image with the same
training images? Six models staTest0..staTest5 (seeds from stability.seeds) are trained, the
methods of stability.methods are run on each for the same test images (chosen by Test.py under
staTest0), and for each test image and model k = 1..5 the overlap of its top-100 with staTest0's
top-100 is tabled for Method 1, Method 2 helpful and Method 2 harmful (the report's Tables
4.1-4.3) and Method 3 helpful and harmful, plus two agreement measures the report lacks:
Spearman's rank correlation over all training points and the Jaccard index of the top-100.
Method 3 is exact for each run, so its tables measure how much "which training images made this
network do this" is a property of the one run rather than of the data (README, staTest).

The driver runs the whole study; every stage skips work whose output already exists.
Parallel: torchrun --nproc_per_node=K mnist_test/staTest.py splits the models across ranks.

Writes: test/staTest_{tag}_{table}.md and .csv, test/staTest_{tag}.json (plus each model's files)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import Test, Train, common, m1_Test, m2_Test, m3_Test  # noqa: E402

TABLES = {"method1": (("method1", "scores", True),),  # per method: (table, key, largest first)
          "method2": (("method2_helpful", "influence", True), ("method2_harmful", "influence", False)),
          "method3": (("method3_helpful", "influence", True), ("method3_harmful", "influence", False))}
SCRIPTS = {"method1": m1_Test, "method2": m2_Test, "method3": m3_Test}


def result_file(settings: opt.Settings, method: str) -> tuple[str, str, str]:
    """(file, the script that makes it, its settings block) of one method's result."""
    if method == "method1":
        return common.m1_file(settings), "mnist_test/m1_Test.py", "method1"
    return common.attribution_file(settings, method)


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def agreement(record_0: dict, record_k: dict, key: str, largest: bool, top: int) -> list[dict]:
    """Per test image: top-`top` overlap, Jaccard and Spearman between two models' results."""
    rows = []
    by_id = {v["test_id_num"]: v for k, v in record_k.items() if k != "meta"}
    for k, entry in sorted(((k, v) for k, v in record_0.items() if k != "meta"), key=lambda kv: int(kv[0])):
        a = np.asarray(entry[key], dtype=np.float64)
        b = np.asarray(by_id[entry["test_id_num"]][key], dtype=np.float64)
        overlap = utils_if.top_k_overlap(utils_if.top_indices(a, top, largest), utils_if.top_indices(b, top, largest), top)
        rows.append({"test_id": entry["test_id_num"], "overlap": overlap,
                     "jaccard": overlap / (2 * top - overlap),
                     "spearman": float(np.corrcoef(ranks(a), ranks(b))[0, 1])})
    return rows


def tables(settings: opt.Settings, seeds: list[int], test_ids: list[int], logger) -> dict:
    stability = settings.mnist.stability
    top, methods = stability.top, stability.methods
    results = {}
    loaded = {}
    for seed in seeds:
        s = common.stability_settings(settings, seed, test_ids)
        loaded[seed] = {}
        for method in methods:
            path, script, block = result_file(s, method)
            loaded[seed][method] = common.read_result(path, script, s, block)
    tag = common.run_tag(common.stability_settings(settings, seeds[0]))
    for name, key, largest in [table for method in methods for table in TABLES[method]]:
        source = name.split("_")[0]
        per_model = {k: agreement(loaded[seeds[0]][source], loaded[seed][source], key, largest, top)
                     for k, seed in enumerate(seeds) if k > 0}
        ids = [r["test_id"] for r in per_model[1]]
        csv_rows, table = [], []
        ordinal = {1: "1st", 2: "2nd", 3: "3rd"}
        for k, rows in per_model.items():
            cells = [100 * r["overlap"] / top for r in rows]
            table.append([ordinal.get(k, f"{k}th")] + [f"{c:.0f}" for c in cells] + [f"{np.mean(cells):.1f}"])
            csv_rows += [{"table": name, "model": k, **r} for r in rows]
        avg = [np.mean([100 * per_model[k][i]["overlap"] / top for k in per_model]) for i in range(len(ids))]
        table.append(["Avg"] + [f"{a:.0f}" for a in avg] + [f"{np.mean(avg):.1f}"])
        lines = [f"**{name}**: overlap of the top-{top} with staTest0's (% of {top})", "",
                 opt.markdown_table(["model", *map(str, ids), "mean"], table)]
        jac = np.mean([r["jaccard"] for rows in per_model.values() for r in rows])
        spear = np.mean([r["spearman"] for rows in per_model.values() for r in rows])
        lines += ["", f"mean Jaccard of the top-{top}: {jac:.3f}; mean Spearman over all training points: {spear:.3f}"]
        text = "\n".join(lines)
        logger.info("\n" + text)
        md = opt.output_path(settings, "test", f"staTest_{tag}_{name}.md")
        opt.write_text(md, text + "\n")
        path = opt.write_csv(opt.output_path(settings, "test", f"staTest_{tag}_{name}.csv"), csv_rows, logger)
        results[name] = {"markdown": md, "csv": path, "average": float(np.mean(avg)),
                         "jaccard": float(jac), "spearman": float(spear), "per_test_avg": avg, "ids": ids}
    opt.write_json(opt.output_path(settings, "test", f"staTest_{tag}.json"), results, logger)
    return results


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    seeds = cfg.stability.seeds
    rank, world = opt.distributed_start(cfg.use_gpu)
    logger = opt.make_logger(settings, "mnist_staTest")
    mine = opt.partition(seeds, rank, world)
    for seed in mine:  # stage 1: train
        s = common.stability_settings(settings, seed)
        opt.run_stage(Train, common.grad_norm_file(s), s, logger.info)
    opt.distributed_barrier()
    base = common.stability_settings(settings, seeds[0])
    if rank == 0:  # stage 2: the test images, chosen under staTest0
        opt.run_stage(Test, common.test_file(base, "staTest0"), base, logger.info)
    opt.distributed_barrier()
    test_ids = common.selected_test_ids(base, "staTest0")
    for seed in mine:  # stage 3: every method on every model, same test images
        s = common.stability_settings(settings, seed, test_ids)
        for method in cfg.stability.methods:
            opt.run_stage(SCRIPTS[method], result_file(s, method)[0], s, logger.info)
    opt.distributed_barrier()
    results = tables(settings, seeds, test_ids, logger) if rank == 0 else None
    opt.distributed_end()
    return {"tables": results}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
