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
        test/lds_{study}.{md,csv,json}; fig/lds_{study}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import Train, common, lds, m2_Test  # noqa: E402
from mnist_test.datasets import load_mnist  # noqa: E402

# Method 2 variants: name -> (method2 overrides, only on the first lds.solver_test_num test images)
SOLVERS = {
    "if_ekfac": ({"solver": "ekfac"}, False),
    "if_kfac": ({"solver": "kfac"}, False),
    "if_kfac_factored": ({"solver": "kfac_factored"}, False),
    "if_exact_last": ({"solver": "exact", "params": ["main.4"]}, False),
    "grad_dot": ({"solver": "identity"}, False),
    "if_lissa": ({"solver": "lissa"}, True),
}
ENSEMBLE_SOURCES = {"ensemble_m1_batch_raw": "m1_batch_raw", "ensemble_if_ekfac": "if_ekfac",
                    "ensemble_if_kfac_factored": "if_kfac_factored", "ensemble_grad_dot": "grad_dot"}


def run_stage(module, path: str, settings: dict, log) -> None:
    if os.path.isfile(path):
        log(f"reuse {path}")
    else:
        module.main(settings)


def solver_variants(settings: dict) -> dict:
    lcfg = lds.lds_cfg(settings)
    variants = dict(SOLVERS)
    deep = lcfg["lissa_deep"]
    variants["if_lissa_deep"] = ({"solver": "lissa", **deep}, True)
    for solver in ("ekfac", "kfac_factored"):  # the heuristic's factor: which damping predicts best
        for factor in lcfg[f"{solver}_damp_factors"]:
            variants[f"if_{solver}_df{factor:g}"] = ({"solver": solver, "kfac_damp_factor": factor}, False)
    for damp in lcfg["cg_damps"]:
        variants[f"if_cg_d{damp:g}"] = ({"solver": "cg", "damp": damp, "cg_max_iter": lcfg["cg_max_iter"],
                                             "write_unconverged": True}, True)
    return variants


def attributions(settings: dict, ids: list[int], device, logger) -> tuple[dict[str, dict], dict[str, str]]:
    """({method: {"matrix": (T', n), "ids": the first T' test ids, "seconds": s, "note": str}},
    {method that failed: why})."""
    lcfg = lds.lds_cfg(settings)
    wanted = set(lcfg["methods"])
    out: dict[str, dict] = {}
    few = ids[:lcfg["solver_test_num"]]
    ensemble: dict[str, list[np.ndarray]] = {name: [] for name in ENSEMBLE_SOURCES}
    failed: dict[str, str] = {}
    for k in range(len(lcfg["ensemble_seeds"])):
        s = lds.model_settings(settings, k, ids)
        run_stage(Train, common.grad_norm_file(s), s, logger.info)
        with opt.Timer() as timer:
            m1 = lds.method1_attributions(s, device)
        if k == 0:
            out["m1_batch_raw"] = {"matrix": m1["raw"], "ids": ids, "seconds": timer.seconds}
            out["m1_batch_normalized"] = {"matrix": m1["normalized"], "ids": ids, "seconds": timer.seconds}
        ensemble["ensemble_m1_batch_raw"].append(m1["raw"])
        for name, (overrides, limited) in solver_variants(settings).items():
            if k > 0 and name not in ENSEMBLE_SOURCES.values() or base_name(name) not in wanted:
                continue
            method_ids = few if limited else ids
            sm = lds.model_settings(settings, k, ids, method2={**overrides, "test_sample_num": len(method_ids)})
            path = common.m2_file(sm)
            try:
                run_stage(m2_Test, path, sm, logger.info)
            except opt.SettingsError as err:  # e.g. LiSSA diverging on negative curvature: a finding
                logger.warning(f"WARNING: {name} failed and is left out of the table: {err}")
                failed[name] = str(err)
                continue
            record = opt.read_json(path, "mnist_test/m2_Test.py")
            matrix = lds.influence_matrix(record, method_ids, path)
            info = record["meta"]["solver_info"]
            note = "" if info.get("converged", True) else "NOT CONVERGED (" + (
                f"residual {info['cg_relative_residual']:.2g}" if "cg_relative_residual" in info else
                f"moved {info.get('lissa_last_change', float('nan')):.1%} over the last 10% of its steps") + ")"
            if k == 0:
                out[name] = {"matrix": matrix, "ids": method_ids, "seconds": info["seconds_total"], "note": note}
            for ens, source in ENSEMBLE_SOURCES.items():
                if source == name:
                    ensemble[ens].append(matrix)
            if name == "grad_dot" and k == 0:
                out["grad_cos"] = cosine(s, matrix, ids, device)
    if wanted & {"m1_per_sample_raw", "m1_per_sample_normalized"}:
        s = lds.model_settings(settings, 0, ids, grad_mode="per_sample")
        run_stage(Train, common.grad_norm_file(s), s, logger.info)
        with opt.Timer() as timer:
            m1 = lds.method1_attributions(s, device)
        out["m1_per_sample_raw"] = {"matrix": m1["raw"], "ids": ids, "seconds": timer.seconds}
        out["m1_per_sample_normalized"] = {"matrix": m1["normalized"], "ids": ids, "seconds": timer.seconds}
    for ens, matrices in ensemble.items():
        if len(matrices) == len(lcfg["ensemble_seeds"]) > 1:
            out[ens] = {"matrix": np.mean(matrices, axis=0), "ids": ids, "seconds": float("nan"),
                        "note": f"mean over {len(matrices)} models"}
    return {name: value for name, value in out.items() if base_name(name) in wanted}, failed


def finite_mean(values) -> float:
    """Mean of the finite values (NaN, without a warning, when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def base_name(method: str) -> str:
    """The lds.methods entry of a method (the CG variants are all "if_cg", the EK-FAC damping
    variants "if_ekfac", the factored K-FAC ones "if_kfac_factored")."""
    if method.startswith("if_cg_d"):
        return "if_cg"
    return method.partition("_df")[0] if method.startswith(("if_ekfac_df", "if_kfac_factored_df")) else method


def cosine(settings: dict, dot: np.ndarray, ids: list[int], device) -> dict:
    """Gradient cosine: the dot product divided by both gradients' norms (closed form)."""
    cfg = common.mnist_cfg(settings)
    with opt.Timer() as timer:
        model, _ = common.load_model(settings, cfg["method2"]["mode"], device)
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model))
        train = common.load_train_data(settings, device, lambda *_: None)
        test = common.load_test_data(settings, device, lambda *_: None)
        train_norm = utils_if.sample_grad_sq_norms(problem, train.images, train.labels).sqrt().cpu().numpy()
        test_norm = utils_if.sample_grad_sq_norms(problem, test.images[ids], test.labels[ids]).sqrt().cpu().numpy()
        matrix = dot / np.maximum(test_norm[:, None] * train_norm[None, :], 1e-30)
    return {"matrix": matrix, "ids": ids, "seconds": timer.seconds}


def loo_plan(settings: dict, methods: dict, n_train: int, logger) -> dict:
    """The points removed for each LOO test image (top-k helpful, top-k harmful by rank_by, k random)."""
    loo = lds.lds_cfg(settings)["loo"]
    if loo["rank_by"] not in methods:
        raise opt.SettingsError(f"mnist.lds.loo.rank_by = {loo['rank_by']!r} is not among the computed "
                                f"methods {sorted(methods)}")
    scores = methods[loo["rank_by"]]["matrix"]
    plan = {"rank_by": loo["rank_by"], "k": loo["k"], "tests": []}
    for position in range(loo["test_num"]):
        generator = torch.Generator().manual_seed(lds.lds_cfg(settings)["seed"] * 7919 + position)
        plan["tests"].append({
            "position": position,
            "helpful": utils_if.top_indices(scores[position], loo["k"], largest=True),
            "harmful": utils_if.top_indices(scores[position], loo["k"], largest=False),
            "random": torch.randperm(n_train, generator=generator)[:loo["k"]].tolist()})
    path = os.path.join(lds.study_folder(settings), f"loo_plan_{loo['rank_by']}"
                                                     f"_k{loo['k']}_t{loo['test_num']}.json")
    opt.write_json(path, plan, logger)
    return plan


def loo_points(plan: dict) -> list[int]:
    return sorted({i for t in plan["tests"] for key in ("helpful", "harmful", "random") for i in t[key]})


def main(settings: dict) -> dict:
    cfg = common.mnist_cfg(settings)
    lcfg = lds.lds_cfg(settings)
    rank, world = opt.distributed_start(cfg["use_gpu"])
    logger = opt.make_logger(settings, "mnist_ldsTest")
    device = opt.select_device(cfg["use_gpu"], logger)
    ids = lds.test_ids(settings)
    full = load_mnist(opt.resolve_path(cfg["data_dir"]), train=True, log=logger.info)
    train = full.subset(lcfg["train_subset"]).to(device)
    n = len(train)
    test = load_mnist(opt.resolve_path(cfg["data_dir"]), train=False, log=logger.info).to(device)
    x_test, y_test = test.images[ids], test.labels[ids]
    recipe = lds.recipe(settings)
    logger.info(f"LDS study {lds.study_tag(settings)}: {n} training images, {len(ids)} test images, "
                f"{lcfg['num_subsets']} subsets x {lcfg['seeds_per_subset']} seeds, {recipe['epoch']} epochs; "
                f"torch threads {torch.get_num_threads()}; rank {rank}/{world}")

    # 1. subset models
    subsets = lds.study_folder(settings, "subsets")
    masks = np.stack([lds.subset_mask(n, lcfg["subset_fraction"], lcfg["seed"], m) for m in range(lcfg["num_subsets"])])
    jobs = [{"seed": lds.subset_model_seed(lcfg["seed"], m, r), "keep": np.flatnonzero(masks[m]).tolist(),
             "path": os.path.join(subsets, f"m{m}_s{r}.json"), "record": {"subset": m, "replicate": r}}
            for m in range(lcfg["num_subsets"]) for r in range(lcfg["seeds_per_subset"])]
    pending, mine = opt.pending_share(jobs, rank, world)
    logger.info(f"subset models: {len(jobs)} in all, {len(jobs) - len(pending)} done; rank {rank} trains {len(mine)}")
    trained = {"subsets": len(mine)}
    with opt.Timer() as subset_timer:
        lds.train_and_store(mine, train, x_test, y_test, recipe, lcfg["group_size"], lcfg["keep_weights"],
                            device, f"rank {rank}: subset models")
    if mine:
        logger.info(f"rank {rank}: {len(mine)} subset models in {subset_timer.seconds:.1f} s")

    # 2. attributions (rank 0) and the LOO plan
    methods, failed, plan = {}, {}, None
    plan_holder = os.path.join(lds.study_folder(settings), "loo_plan_current.json")
    if rank == 0:
        methods, failed = attributions(settings, ids, device, logger)
        plan = loo_plan(settings, methods, n, logger)
        opt.write_json(plan_holder, plan)
    opt.distributed_barrier()
    plan = plan or opt.read_json(plan_holder, "mnist_test/ldsTest.py (rank 0)")

    # 3. LOO models
    loo = lcfg["loo"]
    loo_dir = lds.study_folder(settings, "loo")
    loo_jobs = [{"seed": lds.loo_model_seed(lcfg["seed"], r), "keep": list(range(n)),
                 "path": os.path.join(loo_dir, f"base_s{r}.json"), "record": {"removed": None, "replicate": r}}
                for r in range(loo["seeds"])]
    if not plan["tests"]:  # lds.loo.test_num = 0: no leave-one-out models at all
        loo_jobs = []
    for point in loo_points(plan):
        loo_jobs += [{"seed": lds.loo_model_seed(lcfg["seed"], r), "keep": [i for i in range(n) if i != point],
                      "path": os.path.join(loo_dir, f"p{point}_s{r}.json"), "record": {"removed": point, "replicate": r}}
                     for r in range(loo["seeds"])]
    pending, mine = opt.pending_share(loo_jobs, rank, world)
    logger.info(f"LOO models: {len(loo_jobs)} in all, {len(loo_jobs) - len(pending)} done; rank {rank} trains {len(mine)}")
    trained["loo"] = len(mine)
    with opt.Timer() as loo_timer:
        lds.train_and_store(mine, train, x_test, y_test, recipe, lcfg["group_size"], False, device,
                            f"rank {rank}: LOO models")
    opt.distributed_barrier()
    result = None
    if rank == 0:
        result = report(settings, methods, failed, masks, jobs, plan, loo_jobs, ids, logger,
                        {"subset_models": subset_timer.seconds, "loo_models": loo_timer.seconds})
    opt.distributed_end()
    return {**(result or {}), "trained": trained}


def report(settings, methods, failed, masks, jobs, plan, loo_jobs, ids, logger, seconds) -> dict:
    lcfg = lds.lds_cfg(settings)
    replicates = lcfg["seeds_per_subset"]
    outputs = lds.read_outputs([j["path"] for j in jobs])
    measured = {key: value.reshape(len(masks), replicates, -1).mean(1) for key, value in outputs.items()}
    # training noise: agreement of two replicates of the same subset (the ceiling an attribution can reach)
    noise = {}
    if replicates > 1:
        per = outputs["loss"].reshape(len(masks), replicates, -1)
        noise["replicate_spearman"] = finite_mean(utils_if.spearman_columns(per[:, 0], per[:, 1]))
    loo = lcfg["loo"]
    removed = [j["record"]["removed"] for j in loo_jobs]
    loo_out = lds.read_outputs([j["path"] for j in loo_jobs])["loss"] if loo_jobs else np.zeros((0, len(ids)))
    base_rows = [i for i, r in enumerate(removed) if r is None]
    base_mean = loo_out[base_rows].mean(0) if base_rows else np.full(len(ids), np.nan)
    base_std = loo_out[base_rows].std(0, ddof=1) if len(base_rows) > 1 else np.full(len(ids), np.nan)
    rows, per_test = [], {}
    few = lcfg["solver_test_num"]
    for name, entry in methods.items():
        matrix, t = entry["matrix"], len(entry["ids"])
        scores = {target: utils_if.lds(matrix, masks, measured[target][:, :t], target) for target in ("loss", "margin")}
        mean, low, high = utils_if.bootstrap_mean(scores["loss"], lcfg["bootstrap"], seed=lcfg["seed"])
        loo_p, loo_s = [], []
        for test in plan["tests"]:
            position = test["position"]
            if position >= t:
                continue
            points = test["helpful"] + test["harmful"] + test["random"]
            actual = np.array([loo_out[[i for i, r in enumerate(removed) if r == p]].mean(0)[position]
                               - base_mean[position] for p in points])
            loo_p.append(utils_if.pearson(matrix[position, points], actual))
            loo_s.append(float(utils_if.spearman_columns(matrix[position, points], actual)[0]))
        rows.append({"method": name, "test_images": t, "lds": mean, "lds_low": low, "lds_high": high,
                     "lds_margin": finite_mean(scores["margin"]),
                     f"lds_first{few}": finite_mean(scores["loss"][:few]),
                     "loo_pearson": float(np.mean(loo_p)) if loo_p else float("nan"),
                     "loo_spearman": float(np.mean(loo_s)) if loo_s else float("nan"),
                     "seconds": round(float(entry["seconds"]), 2), "note": entry.get("note", "")})
        per_test[name] = scores["loss"].tolist()
    rows.sort(key=lambda r: -np.nan_to_num(r["lds"], nan=-9))
    tag = lds.study_tag(settings)
    header = (f"| method | test images | LDS (loss) [95% CI] | LDS (margin) | LDS, first {few} | LOO Pearson | "
              f"LOO Spearman | seconds | note |\n|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [f"| {r['method']} | {r['test_images']} | {r['lds']:.3f} [{r['lds_low']:.3f}, {r['lds_high']:.3f}] | "
                        f"{r['lds_margin']:.3f} | {r[f'lds_first{few}']:.3f} | {r['loo_pearson']:.3f} | "
                        f"{r['loo_spearman']:.3f} | {r['seconds']:.1f} | {r['note']} |" for r in rows]
    loo_noise = {"base_loss_std_over_seeds": [float(v) for v in base_std[:loo["test_num"]]],
                 "std_error_of_a_difference": [float(v * np.sqrt(2.0 / loo["seeds"])) for v in base_std[:loo["test_num"]]]}
    actual_spread = []
    for test in plan["tests"]:
        points = test["helpful"] + test["harmful"] + test["random"]
        actual_spread.append(float(np.std([loo_out[[i for i, r in enumerate(removed) if r == p]].mean(0)[test["position"]]
                                           - base_mean[test["position"]] for p in points])))
    loo_noise["std_of_actual_changes"] = actual_spread
    lines += [f"| {name} | | failed | | | | | | {why[:120]} |" for name, why in failed.items()]
    text = "\n".join(lines) + (
        f"\n\nLDS: Spearman over {len(masks)} subsets ({lcfg['subset_fraction']:g} of {masks.shape[1]} images, "
        f"{replicates} seeds each, outputs averaged) between predicted and measured test loss; mean over test "
        f"images, bootstrap 95% interval. Training noise: two seeds of the same subset agree with Spearman "
        f"{noise.get('replicate_spearman', float('nan')):.3f}.\nLOO: {len(plan['tests'])} test images x "
        f"{3 * loo['k']} removals (top-{loo['k']} helpful/harmful by {plan['rank_by']}, {loo['k']} random), "
        f"{loo['seeds']} seeds each. Noise floor (std of the loss over seeds, nothing removed): "
        f"{', '.join(f'{v:.4f}' for v in loo_noise['base_loss_std_over_seeds'])}; std error of a removal's "
        f"measured effect {', '.join(f'{v:.4f}' for v in loo_noise['std_error_of_a_difference'])}; spread of "
        f"the measured effects {', '.join(f'{v:.4f}' for v in actual_spread)}.")
    logger.info("\n" + text)
    md = opt.output_path(settings, "test", f"lds_{tag}.md")
    opt.write_text(md, text + "\n", logger)
    csv = opt.write_csv(opt.output_path(settings, "test", f"lds_{tag}.csv"), rows, logger)
    figure = draw(settings, rows, methods, masks, measured, per_test, tag, logger)
    path = opt.write_json(opt.output_path(settings, "test", f"lds_{tag}.json"), {
        "meta": {"settings": settings["mnist"], "study": tag, "test_ids": ids, "n_train": int(masks.shape[1]),
                 "threads": torch.get_num_threads(), "seconds": seconds, "training_noise": noise,
                 "loo_noise": loo_noise, "sign_convention": utils_if.SIGN_CONVENTION},
        "rows": rows, "failed": failed, "lds_per_test": per_test, "loo_plan": plan}, logger)
    return {"json": path, "markdown": md, "csv": csv, "figure": figure, "rows": rows}


def draw(settings, rows, methods, masks, measured, per_test, tag, logger) -> str:
    import matplotlib
    if not opt.is_interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2.5),
                                  gridspec_kw={"width_ratios": [1.6, 1]})
    names = [r["method"] for r in rows][::-1]
    means = np.array([r["lds"] for r in rows][::-1])
    err = np.array([[r["lds"] - r["lds_low"] for r in rows][::-1], [r["lds_high"] - r["lds"] for r in rows][::-1]])
    ax.barh(range(len(rows)), means, xerr=err, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{n} ({r['test_images']})" for n, r in zip(names, rows[::-1])], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("LDS (Spearman, mean over test images, 95% bootstrap interval)")
    ax.set_title("Linear datamodeling score per method (test images in brackets)")
    best = rows[0]["method"]
    matrix = methods[best]["matrix"]
    scores = np.nan_to_num(np.asarray(per_test[best]), nan=-2.0)
    typical = int(np.argsort(scores, kind="stable")[len(scores) // 2])  # the median test image, not a showcase
    predicted = utils_if.datamodel_predictions(matrix, masks, masks.shape[1])[:, typical]
    ax2.scatter(predicted, measured["loss"][:, typical], s=12)
    ax2.set_xlabel(f"predicted loss minus base loss ({best})")
    ax2.set_ylabel("measured loss (mean over seeds)")
    ax2.set_title(f"test image {methods[best]['ids'][typical]} (median LDS of {best}): {per_test[best][typical]:.2f}",
                  fontsize=9)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"MNIST MLP, {masks.shape[1]} training images, {len(masks)} subsets ({tag})")
    fig.tight_layout()
    return opt.save_figure(fig, opt.output_path(settings, "fig", f"lds_{tag}.png"), logger)


if __name__ == "__main__":
    opt.run_script(main, __doc__)
