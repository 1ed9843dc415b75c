"""Which training patches made the denoiser output this pixel? The FFDNet question in one command.

Trains FFDNet if its model is missing, checks that it denoises the image asked about, then ranks
every training patch for each point of ffdnet.attribution (images, points as [row, col]):

- With a final window (ffdnet.recipe "attributable"): by Method 3 through the window, the exact
  derivative of the point's window loss in each patch's weight (ffdnet_test/window.py), and quotes
  the single-model LDS measured for exactly these settings (ffdnet_test/ldsTest.py's tables in the
  output folder, then docs/measured_lds.json), per target kind.
- With the report's recipe: by the best measured ranking, pixel-window influence with
  ffdnet.question.best_solver (EK-FAC) over all patches (m2_Test with those two values; your own
  ffdnet.method2 files are left as they are), with where inside each patch the influence sits; it
  says in one line that no method's answer has been measured for this recipe, and how to measure one.

One figure per point: a crop of the test image around the point, then the top helpful and harmful
patches, each named by its photograph and position; and the trust lines.

    python3 ffdnet_test/run_pipeline.py -opt settings/ffdnet_attributable.json

Default profile: quick unless -profile names another.
Writes: what FFDNet_Train (and m2_Test) write, if/ffdnet/{tag}_m3window_... (Method 3), and
        fig/ffdnet_question/{ranking file stem}_{row}-{col}.png
"""
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, m2_Test, plotting, question, window  # noqa: E402


def main(settings: opt.Settings) -> dict:
    start = time.perf_counter()
    cfg = settings.ffdnet
    attributable = window.has_window(cfg)
    opt.run_stage(FFDNet_Train, [common.model_file(settings)]
                  + ([common.window_start_file(settings)] if attributable else []), settings, print)
    caveats: list[str] = []  # a substituted input or a model that does not denoise: console, figure and result
    images = attribution.image_names(settings, caveats.append)
    logger, device = opt.start_script(settings, "ffdnet_question", cfg, seed=False)
    model, _ = common.load_model(settings, device)
    for image in images:  # before attributing: does the model denoise the image it is asked about?
        check = question.denoising_check(settings, model, image, device)
        if not check["denoises"]:
            caveats.append(check["line"])
        else:
            logger.info(check["line"])
    for caveat in caveats:
        logger.warning(caveat if caveat.startswith("WARNING") else f"WARNING: {caveat}")
    if attributable:
        files, ranking, trust = method3_answer(settings, images, device, logger)
        ranked_settings = settings
    else:
        ranked_settings = question.best_settings(settings)
        with opt.quiet_console():
            files = m2_Test.main(ranked_settings)["files"]
        solver = ranked_settings.ffdnet.method2.solver
        ranking = f"{solver} over all patches"
        counterfactual, differs = question.counterfactual_trust(ranked_settings)
        trust = {"lines": question.measured_lines(ranked_settings, solver, f"pixel-window influence ({solver})"),
                 "per_point": counterfactual, "differs": differs}
    patches = common.train_patches(settings)
    k = cfg.attribution.vis_num
    figures, lines = [], []
    for image, path in files.items():
        record = opt.read_json(path, "ffdnet_test/run_pipeline.py", shape=("entries",))
        _, _, clean, _ = attribution.test_image(settings, image)
        for label, entry in record["entries"].items():
            if entry["point"] is None:
                continue
            crop, at = question.crop_around(clean, entry["point"], 3 * patches.patch_size)
            rows = []
            for kind in ("helpful", "harmful"):
                top = entry[kind][:k]
                maps = None if attributable else list(question.point_maps(ranked_settings, image, entry["point"], top,
                                                                           device))
                rows.append({"title": f"{image} {label}\n{kind}", "image": crop, "point": at,
                             "patches": [patches.clean[i] for i in top], "maps": maps,
                             "captions": [f"#{i} {patch_origin(patches, i)}\n{entry['influence'][i]:.3g}"
                                          for i in top]})
            point_line = trust.get("per_point", {}).get(label)
            if point_line is None and not attributable:
                point_line = question.NOT_MEASURED + (f"; the newest expTest report differs in "
                                                      f"{'; '.join(trust['differs'])}" if trust["differs"] else "")
            lines.append(f"{image} {label}: " + (point_line or trust["lines"][0]))
            fig = plotting.question_maps(rows, f"Which training patches made the denoiser output this pixel? "
                                               f"{image} {label}, window {2 * cfg.method2.window + 1}^2 "
                                               f"({ranking}, {len(entry['influence'])} patches)\n"
                                               + ("" if attributable else "red: this part of the patch helped; "
                                                                          "blue: it hurt. ")
                                               + "Trust: " + textwrap.fill(lines[-1].split(": ", 1)[1], 150)
                                               + "".join("\n" + textwrap.fill(c if c.startswith("WARNING") else
                                                                                 f"WARNING: {c}", 150)
                                                         for c in caveats))
            stem = os.path.splitext(os.path.basename(path))[0]
            figures.append(opt.save_figure(fig, opt.output_path(
                settings, "fig", "ffdnet_question", f"{stem}_{entry['point'][0]}-{entry['point'][1]}.png"), logger))
    print(f"\nRanked by {ranking}. How far to trust it:\n" + "\n".join(f"  {l}" for l in trust["lines"])
          + ("" if attributable else "\n" + "\n".join(f"  {l}" for l in lines)))
    print(f"answer figures ({len(figures)}): {figures[0] if figures else '-'}" + (" ..." if len(figures) > 1 else ""))
    print(f"FFDNet question (profile {settings.profile}) finished in {time.perf_counter() - start:.0f} s")
    return {"figures": figures, "trust": trust["lines"] + lines, "files": files, "caveats": caveats,
            "ranking": ranking}


def method3_answer(settings: opt.Settings, images: list[str], device, logger) -> tuple[dict, str, dict]:
    """Method 3 through the final window for every point of the images: one result file per image
    (m2_Test's shape), the ranking's name, and the measured trust lines."""
    cfg = settings.ffdnet
    paths = {image: common.m3_window_result_file(settings, image) for image in images}
    if not all(os.path.isfile(p) for p in paths.values()):
        influence, targets, info = window.method3(settings, images, device, progress=opt.progress)
        logger.info(f"Method 3 through the window: {info['steps']} steps, forward {info['seconds_forward']} s, "
                    f"backward {info['seconds_backward']} s for {info['targets']} targets")
        for image, path in paths.items():
            entries = {}
            for target, row in zip(targets, influence):
                if target["image"] == image:
                    entries[target["label"]] = {"point": target["point"], "influence": row.tolist(),
                                                "helpful": utils_if.top_indices(row, cfg.method3.top_k, True),
                                                "harmful": utils_if.top_indices(row, cfg.method3.top_k, False)}
            opt.write_json(path, {"entries": entries, "meta": {
                "model_file": common.resolve_model_path(settings), "n_train": info["n_train"], "solver_info": info,
                "window": opt.as_dict(cfg.window), "pixel_window": cfg.method2.window,
                "sign_convention": utils_if.METHOD3_SIGN_CONVENTION}}, logger)
    steps = window.window_run(cfg, opt.read_json(next(iter(paths.values())), "run_pipeline")["meta"]["n_train"]).num_steps
    ranking = f"Method 3 through the final window ({steps} steps)"
    return paths, ranking, {"lines": question.measured_lines(settings, "m3", "Method 3")}


def patch_origin(patches, index: int) -> str:
    """Where a training patch comes from: its photograph's name and its top-left corner (row, col)."""
    where = patches.locate(index)
    return f"{os.path.splitext(os.path.basename(where['file']))[0]} ({where['row']},{where['col']})"


if __name__ == "__main__":
    if not any(a == "-profile" for a in sys.argv[1:]):  # as the MNIST pipeline: quick unless told otherwise
        sys.argv += ["-profile", "quick"]
    opt.run_script(main, __doc__)
