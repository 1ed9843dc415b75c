"""The LDS study's plumbing (mnist_test/ldsTest.py reads as one story over it): which attributions
to score and how they are made, the subset and leave-one-out jobs, and the report (table, figure,
JSON). The stages a study runs (Train, m2_Test, m3_Test) are passed in by the driver, so that this
library never imports a script."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

import utils_if
import utils_option as opt
from mnist_test import common, lds, question, training
from mnist_test.model import LAYER_MODULES
from options.blocks import Lds
from options.method2 import ENSEMBLE_ROWS


# what a solver's LDS row changes in method2 on this network: the dense solve runs on the MLP's last layer
ROW_SETTINGS = {"exact": {"params": [LAYER_MODULES["fc3"]]}}
# ensemble row -> the row it averages over lds.ensemble_seeds
ENSEMBLE_SOURCES = {row: row[len("ensemble_"):] for row in ENSEMBLE_ROWS}


def solver_rows() -> dict[str, dict]:
    """LDS row -> method2 overrides, one per solver the MNIST side offers with an LDS row, read from
    the registry when asked (a solver registered later counts)."""
    return {utils_if.SOLVERS[name].lds_name: {"solver": name, **ROW_SETTINGS.get(name, {})}
            for name in opt.offered_solvers("mnist") if utils_if.SOLVERS[name].lds_row}


def solver_variants(settings: opt.Settings) -> dict:
    """LDS row -> (method2 overrides, whether it runs on the first lds.solver_test_num test images only:
    a solver whose cost grows with the test points, Solver.slow_per_test)."""
    lcfg = settings.mnist.lds
    rows = solver_rows()
    variants = dict(rows)
    variants["if_lissa_deep"] = {**rows["if_lissa"], **dataclasses.asdict(lcfg.lissa_deep)}
    for row in ("if_ekfac", "if_kfac_factored"):  # the heuristic's factor: which damping predicts best
        for factor in getattr(lcfg, f"{row[3:]}_damp_factors"):
            variants[f"{row}_df{factor:g}"] = {**rows[row], "kfac_damp_factor": factor}
    for damp in lcfg.cg_damps:
        variants[f"if_cg_d{damp:g}"] = {"solver": utils_if.ConjugateGradient.name, "damp": damp, "cg_max_iter": lcfg.cg_max_iter,
                                        "write_unconverged": True}
    return {name: (overrides, utils_if.solver_for(overrides["solver"]).slow_per_test)
            for name, overrides in variants.items()}


def attributions(settings: opt.Settings, ids: list[int], device, logger, stages: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """({method: {"matrix": (T', n), "ids": the first T' test ids, "seconds": s, "note": str}},
    {method that failed: why}). ``stages``: the scripts it runs when their files are missing
    ({"Train": ..., "m2_Test": ..., "m3_Test": ...})."""
    lcfg = settings.mnist.lds
    wanted = set(lcfg.methods)
    out: dict[str, dict] = {}
    few = ids[:lcfg.solver_test_num]
    ensemble: dict[str, list[np.ndarray]] = {name: [] for name in ENSEMBLE_SOURCES}
    failed: dict[str, str] = {}
    for k in range(len(lcfg.ensemble_seeds)):
        s = lds.model_settings(settings, k, ids)
        opt.run_stage(stages["Train"], common.grad_norm_file(s), s, opt.detail_log(logger))
        with opt.Timer() as timer:
            m1 = lds.method1_attributions(s, device)
        if k == 0:
            key = question.trust_key(s.mnist, "method1")
            out["m1_batch_raw"] = {"matrix": m1["raw"], "ids": ids, "seconds": timer.seconds, "key": key}
            out["m1_batch_normalized"] = {"matrix": m1["normalized"], "ids": ids, "seconds": timer.seconds, "key": key}
        ensemble["ensemble_m1_batch_raw"].append(m1["raw"])
        for name, (overrides, limited) in solver_variants(settings).items():
            if k > 0 and name not in ENSEMBLE_SOURCES.values() or base_name(name) not in wanted:
                continue
            method_ids = few if limited else ids
            sm = lds.model_settings(settings, k, ids, method2={**overrides, "test_sample_num": len(method_ids)})
            path = common.m2_file(sm)
            try:
                opt.run_stage(stages["m2_Test"], path, sm, opt.detail_log(logger))
            except opt.SettingsError as err:  # e.g. LiSSA diverging on negative curvature: a finding
                logger.warning(f"WARNING: {name} failed and is left out of the table: {err}")
                failed[name] = str(err)
                continue
            record = opt.read_json(path, "mnist_test/m2_Test.py", shape=("meta.solver_info",))
            matrix = lds.influence_matrix(record, method_ids, path)
            info = record["meta"]["solver_info"]
            note = "" if info.get("converged", True) else "NOT CONVERGED (" + (
                f"residual {info['cg_relative_residual']:.2g}" if "cg_relative_residual" in info else
                f"moved {info.get('lissa_last_change', float('nan')):.1%} over the last 10% of its steps") + ")"
            if k == 0:
                out[name] = {"matrix": matrix, "ids": method_ids, "seconds": info["seconds_total"], "note": note,
                             "key": question.trust_key(sm.mnist, "method2")}
            for ens, source in ENSEMBLE_SOURCES.items():
                if source == name:
                    ensemble[ens].append(matrix)
            if name == "grad_dot" and k == 0:
                out["grad_cos"] = cosine(s, matrix, ids, device)
    if wanted & {"m1_per_sample_raw", "m1_per_sample_normalized"}:
        s = lds.model_settings(settings, 0, ids, grad_mode="per_sample")
        opt.run_stage(stages["Train"], common.grad_norm_file(s), s, opt.detail_log(logger))
        with opt.Timer() as timer:
            m1 = lds.method1_attributions(s, device)
        key = question.trust_key(s.mnist, "method1")
        out["m1_per_sample_raw"] = {"matrix": m1["raw"], "ids": ids, "seconds": timer.seconds, "key": key}
        out["m1_per_sample_normalized"] = {"matrix": m1["normalized"], "ids": ids, "seconds": timer.seconds, "key": key}
    if "m3_replay" in wanted:
        s = lds.model_settings(settings, 0, ids)
        if s.mnist.window and lcfg.setting == "algorithm":
            logger.warning("WARNING: m3_replay attributes the last steps of the base run (mnist.window), while "
                           "the algorithm setting's subsets are retrained from scratch: that row answers another "
                           "question (use lds.setting single_model)")
        path = common.m3_file(s)
        opt.run_stage(stages["m3_Test"], path, s, opt.detail_log(logger))
        record = opt.read_json(path, "mnist_test/m3_Test.py", shape=("meta.solver_info",))
        m3_ids = ids[:s.mnist.method3.test_sample_num]
        out["m3_replay"] = {"matrix": lds.influence_matrix(record, m3_ids, path), "ids": m3_ids,
                            "seconds": record["meta"]["solver_info"]["seconds_total"], "note": "exact, this run",
                            "smoothness": record["meta"]["solver_info"].get("metasmoothness"),
                            "key": question.trust_key(s.mnist, "method3")}
    for ens, matrices in ensemble.items():
        if len(matrices) == len(lcfg.ensemble_seeds) > 1:
            out[ens] = {"matrix": np.mean(matrices, axis=0), "ids": ids, "seconds": float("nan"),
                        "note": f"mean over {len(matrices)} models"}
    return {name: value for name, value in out.items() if base_name(name) in wanted}, failed


def base_name(method: str) -> str:
    """The lds.methods entry of a method (the CG variants are all "if_cg", the EK-FAC damping
    variants "if_ekfac", the factored K-FAC ones "if_kfac_factored")."""
    if method.startswith("if_cg_d"):
        return "if_cg"
    return method.partition("_df")[0] if method.startswith(("if_ekfac_df", "if_kfac_factored_df")) else method


def cosine(settings: opt.Settings, dot: np.ndarray, ids: list[int], device) -> dict:
    """Gradient cosine: the dot product divided by both gradients' norms (closed form)."""
    cfg = settings.mnist
    with opt.Timer() as timer:
        model, _ = common.load_model(settings, cfg.method2.mode, device)
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model))
        train = common.load_train_data(settings, device, lambda *_: None)
        test = common.load_test_data(settings, device, lambda *_: None)
        train_norm = utils_if.sample_grad_sq_norms(problem, train.images, train.labels).sqrt().cpu().numpy()
        test_norm = utils_if.sample_grad_sq_norms(problem, test.images[ids], test.labels[ids]).sqrt().cpu().numpy()
        matrix = dot / np.maximum(test_norm[:, None] * train_norm[None, :], 1e-30)
    return {"matrix": matrix, "ids": ids, "seconds": timer.seconds}


def loo_plan(lds_cfg: Lds, methods: dict, n_train: int, folder: str, logger) -> dict:
    """The points removed for each LOO test image (top-k helpful, top-k harmful by rank_by, k random),
    from the ``mnist.lds`` block; written into the study's ``folder``."""
    loo = lds_cfg.loo
    if not loo.test_num:  # no leave-one-out: no ranking needed (rank_by may name a method not computed)
        return {"rank_by": loo.rank_by, "k": loo.k, "tests": []}
    if loo.rank_by not in methods:
        raise opt.SettingsError(f"mnist.lds.loo.rank_by = {loo.rank_by!r} is not among the computed "
                                f"methods {sorted(methods)}")
    scores = methods[loo.rank_by]["matrix"]
    plan = {"rank_by": loo.rank_by, "k": loo.k, "tests": []}
    for position in range(loo.test_num):
        generator = torch.Generator().manual_seed(lds_cfg.seed * 7919 + position)
        plan["tests"].append({
            "position": position,
            "helpful": utils_if.top_indices(scores[position], loo.k, largest=True),
            "harmful": utils_if.top_indices(scores[position], loo.k, largest=False),
            "random": torch.randperm(n_train, generator=generator)[:loo.k].tolist()})
    path = os.path.join(folder, f"loo_plan_{loo.rank_by}_k{loo.k}_t{loo.test_num}.json")
    opt.write_json(path, plan, logger)
    return plan


def loo_points(plan: dict) -> list[int]:
    return sorted({i for t in plan["tests"] for key in ("helpful", "harmful", "random") for i in t[key]})


def subset_studies(settings: opt.Settings, n: int) -> dict[str, dict]:
    """The subset models of the study's setting: {"algorithm": ...} (random subsets, each model its
    own seed) or {"drop{f}": ...} per drop fraction (the base run, dropped points weighted 0).
    Each value: {"drop": fraction, "masks": (M, n) kept, "jobs": [...]}."""
    lcfg = settings.mnist.lds
    if lcfg.setting == "algorithm":
        masks = np.stack([lds.subset_mask(n, lcfg.subset_fraction, lcfg.seed, m) for m in range(lcfg.num_subsets)])
        folder = lds.study_folder(settings, "subsets")
        jobs = [{"seed": lds.subset_model_seed(lcfg.seed, m, r), "keep": np.flatnonzero(masks[m]).tolist(),
                 "path": os.path.join(folder, f"m{m}_s{r}.json"), "record": {"subset": m, "replicate": r}}
                for m in range(lcfg.num_subsets) for r in range(lcfg.seeds_per_subset)]
        return {"algorithm": {"drop": 1 - lcfg.subset_fraction, "masks": masks, "jobs": jobs}}
    base_seed, everyone = lcfg.ensemble_seeds[0], list(range(n))
    studies = {}
    for drop in lcfg.drop_fractions:
        masks = np.stack([lds.drop_mask(n, drop, lcfg.seed, m) for m in range(lcfg.num_subsets)])
        folder = lds.study_folder(settings, "single_model", f"s{base_seed}_d{drop:g}")
        studies[f"drop{drop:g}"] = {"drop": drop, "masks": masks, "jobs": [
            {"seed": base_seed, "keep": everyone, "weights": masks[m], "path": os.path.join(folder, f"m{m}.json"),
             "record": {"subset": m, "replicate": 0, "drop": drop}} for m in range(lcfg.num_subsets)]}
    return studies


def loo_jobs(settings: opt.Settings, plan: dict, n: int) -> list[dict]:
    """LOO models: nothing removed plus each planned point removed; algorithm setting: retrained
    with lds.loo.seeds seeds; single-model: the base run with the point weighted 0 (one model each)."""
    lcfg = settings.mnist.lds
    if not plan["tests"]:  # lds.loo.test_num = 0: no leave-one-out models at all
        return []
    if lcfg.setting == "single_model":
        folder, seed = lds.study_folder(settings, "single_model", f"s{lcfg.ensemble_seeds[0]}_loo"), lcfg.ensemble_seeds[0]

        def weights(point):
            w = np.ones(n, dtype=bool)
            if point is not None:
                w[point] = False
            return w
        return [{"seed": seed, "keep": list(range(n)), "weights": weights(p), "record": {"removed": p, "replicate": 0},
                 "path": os.path.join(folder, "base.json" if p is None else f"p{p}.json")}
                for p in [None, *loo_points(plan)]]
    folder, seeds = lds.study_folder(settings, "loo"), lcfg.loo.seeds
    jobs = [{"seed": lds.loo_model_seed(lcfg.seed, r), "keep": list(range(n)),
             "path": os.path.join(folder, f"base_s{r}.json"), "record": {"removed": None, "replicate": r}}
            for r in range(seeds)]
    for point in loo_points(plan):
        jobs += [{"seed": lds.loo_model_seed(lcfg.seed, r), "keep": [i for i in range(n) if i != point],
                  "path": os.path.join(folder, f"p{point}_s{r}.json"), "record": {"removed": point, "replicate": r}}
                 for r in range(seeds)]
    return jobs


def report(settings, methods, failed, studies, plan, loo, ids, device, logger, seconds) -> dict:
    """The table (Markdown, CSV), the figures and the JSON of a finished study (rank 0)."""
    lcfg = settings.mnist.lds
    single = lcfg.setting == "single_model"
    replicates = 1 if single else lcfg.seeds_per_subset
    loo_loss = lds.read_outputs([j["path"] for j in loo])["loss"] if loo else np.zeros((0, len(ids)))
    changes = lds.loo_changes(plan, loo, loo_loss) if loo else {}
    curves, per_study, noise = {}, {}, {}
    for key, study in studies.items():
        outputs = lds.read_outputs([j["path"] for j in study["jobs"]])
        measured = {k: v.reshape(len(study["masks"]), replicates, -1).mean(1) for k, v in outputs.items()}
        rows, per_test = lds.score_rows(methods, study["masks"], measured, plan, changes, lcfg)
        for row in rows:  # the settings each row was measured with: the trust table quotes a row only for them
            row["key"] = methods.get(row["method"], {}).get("key")
        curves[study["drop"]] = rows
        per_study[key] = {"rows": rows, "lds_per_test": per_test, "measured": measured, "masks": study["masks"]}
        if replicates > 1:  # training noise: two seeds of the same subset (the ceiling an attribution can reach)
            per = outputs["loss"].reshape(len(study["masks"]), replicates, -1)
            noise["replicate_spearman"] = lds.finite_mean(utils_if.spearman_columns(per[:, 0], per[:, 1]))
    main_key = min(studies, key=lambda k: abs(studies[k]["drop"] - 0.05)) if single else "algorithm"
    main = per_study[main_key]
    tag = lds.report_tag(settings)
    loo_cfg = lcfg.loo
    if single:
        noise.update(single_model_noise(settings, ids, loo, loo_loss, device, main))
        replica = noise.get("replica_mean_abs_loss_change")
        noise_line = (f"Single-model setting: every subset model is the base run (seed {lcfg.ensemble_seeds[0]}, same "
                      f"order) with the dropped points weighted 0, trained by the grouped trainer. Its replica of the base "
                      + (f"run (all weights 1) differs from Train.py's model by {replica:.2g} in test loss on average "
                         f"(rounding, grown through training); " if replica is not None else
                         "run is not measured (it is the LOO baseline: set lds.loo.test_num > 0); ")
                      + f"dropping {studies[main_key]['drop']:g} of the points moves it by {noise['typical_drop_effect']:.2g}.")
    else:
        noise_line = ("Training noise: two seeds of the same subset agree with Spearman "
                      + (f"{noise['replicate_spearman']:.3f}." if "replicate_spearman" in noise
                         else "(not measured: lds.seeds_per_subset = 1)."))
        base_rows = [i for i, j in enumerate(loo) if j["record"]["removed"] is None]
        if len(base_rows) > 1:  # the LOO noise floor: the loss's spread over seeds with nothing removed
            spread = loo_loss[base_rows].std(0, ddof=1)[:loo_cfg.test_num]
            noise["loo_base_loss_std_over_seeds"] = spread.tolist()
            noise_line += (f" LOO noise floor (std of the loss over {len(base_rows)} seeds, nothing removed): "
                           f"{', '.join(f'{v:.4f}' for v in spread)}; spread of the measured effects "
                           f"{', '.join(f'{np.std(changes[p]):.4f}' for p in sorted(changes))}.")
    smooth = methods.get("m3_replay", {}).get("smoothness")
    question_words = training_question(settings)
    noise_line += (" " + utils_if.verdict(smooth, training.SMOOTHNESS_REMEDY, question=question_words) + "." if smooth and "s_hat_interval" in smooth
                   else " Metasmoothness of the base run: not measured (it comes with m3_replay).")
    if single:
        noise_line += f" Single-model LDS: the question is {question_words}."
    text = lds.markdown_table(main["rows"], failed, lcfg) + (
        f"\n\nLDS: Spearman over {len(main['masks'])} subsets ({main_key}: {main['masks'][0].sum()} of "
        f"{main['masks'].shape[1]} images kept) between predicted and measured test loss; mean over test images, "
        f"bootstrap 95% interval. {noise_line}\n" + (
            f"LOO: {len(plan['tests'])} test images x {3 * loo_cfg.k} removals (top-{loo_cfg.k} helpful/harmful "
            f"by {plan['rank_by']}, {loo_cfg.k} random), "
            + ("the base run with the point weighted 0." if single else f"{loo_cfg.seeds} seeds each.")
            if plan["tests"] else "LOO: not run (lds.loo.test_num = 0)."))
    if single and len(curves) > 1:
        text += "\n\nSingle-model LDS (loss) per drop fraction:\n\n" + lds.curve_table(curves)
    logger.info("\n" + text)
    md = opt.write_text(opt.output_path(settings, "test", f"lds_{tag}.md"), text + "\n", logger)
    csv = opt.write_csv(opt.output_path(settings, "test", f"lds_{tag}.csv"),
                        [{"study": key, **row} for key, value in per_study.items() for row in value["rows"]], logger)
    figure = lds.draw(settings, main["rows"], methods, main["masks"], main["measured"], main["lds_per_test"], tag,
                      f"MNIST MLP, {main['masks'].shape[1]} training images, {len(main['masks'])} subsets, "
                      f"{lcfg.setting} setting ({main_key}; {tag})", logger, failed)
    curve = lds.draw_curve(settings, curves, tag, logger) if single and len(curves) > 1 else None
    path = opt.write_json(opt.output_path(settings, "test", f"lds_{tag}.json"), {
        "meta": {"settings": opt.as_dict(settings.mnist), "study": tag, "setting": lcfg.setting, "main_study": main_key,
                 "test_ids": ids, "n_train": int(main["masks"].shape[1]), "threads": torch.get_num_threads(),
                 "seconds": seconds, "training_noise": noise, "sign_convention": utils_if.SIGN_CONVENTION},
        "rows": main["rows"], "failed": failed, "lds_per_test": main["lds_per_test"],
        "studies": {key: {"drop": studies[key]["drop"], "rows": value["rows"], "lds_per_test": value["lds_per_test"]}
                    for key, value in per_study.items()},
        "loo_plan": plan}, logger)
    return {"json": path, "markdown": md, "csv": csv, "figure": figure, "curve": curve, "rows": main["rows"],
            "studies": {key: value["rows"] for key, value in per_study.items()}}


def training_question(settings: opt.Settings) -> str:
    """What the study's single-model removals (and Method 3) answer, in words, for its base model."""
    lcfg = settings.mnist.lds
    base = lds.model_settings(settings, 0, [0]).mnist
    return opt.Recipe.of(base).question(lcfg.train_subset)


def single_model_noise(settings, ids, loo, loo_loss, device, main) -> dict:
    """How far the grouped trainer's replica of the base run (the LOO 'nothing removed' model) is from
    Train.py's base model, against the typical effect of a drop (the spread of the subset models)."""
    out = {"typical_drop_effect": float(np.mean(np.std(main["measured"]["loss"], axis=0)))}
    base_rows = [i for i, j in enumerate(loo) if j["record"]["removed"] is None]
    if base_rows:
        model, _ = common.load_model(lds.model_settings(settings, 0, ids), "lds0", device)
        test = common.load_test_data(settings, device, lambda *_: None)
        cfg = settings.mnist
        base = np.array(lds.outputs_of(model.state_dict(), test.images[ids], test.labels[ids],
                                      cfg.activation, cfg.logit_scale)["loss"])
        out["replica_mean_abs_loss_change"] = float(np.mean(np.abs(loo_loss[base_rows[0]] - base)))
    return out
