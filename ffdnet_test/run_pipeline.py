"""Which training patches made the denoiser output this pixel? The FFDNet question in one command.

Trains FFDNet if its model is missing, then ranks every training patch for each point of
ffdnet.attribution (images, points as [row, col]) by the best measured ranking: pixel-window
influence with ffdnet.question.best_solver (EK-FAC) over all patches (m2_Test with those two values;
your own ffdnet.method2 files are left as they are). One figure per point: a crop of the test image
around the point, then the top helpful and harmful patches, each with where inside it the influence
sits drawn over it; and one trust line per point from the counterfactual study of the same model
(expTest.py), or "not measured".

    python3 ffdnet_test/run_pipeline.py -profile quick -set 'ffdnet.attribution.images=["01"]' -set 'ffdnet.attribution.points=[[64,64]]'

Default profile: quick unless -profile names another.
Writes: what FFDNet_Train and m2_Test write, and fig/ffdnet_question/{m2 file stem}_{row}-{col}.png
"""
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, m2_Test, plotting, question  # noqa: E402


def main(settings: opt.Settings) -> dict:
    start = time.perf_counter()
    cfg = settings.ffdnet
    opt.run_stage(FFDNet_Train, [common.model_file(settings)], settings, print)
    best = question.best_settings(settings)
    with opt.quiet_console():
        files = m2_Test.main(best)["files"]
    trust, differs = question.counterfactual_trust(best)  # quoted only for the ranking shown, these settings
    caveats: list[str] = []  # a substituted input or a model that does not denoise: console, figure and result
    attribution.image_names(settings, caveats.append)
    patches = common.train_patches(best)
    logger, device = opt.start_script(settings, "ffdnet_question", cfg, seed=False)
    model, _ = common.load_model(settings, device)
    for image in files:  # before attributing: does the model denoise the image it is asked about?
        check = question.denoising_check(settings, model, image, device)
        if not check["denoises"]:
            caveats.append(check["line"])
        else:
            logger.info(check["line"])
    for caveat in caveats:
        logger.warning(caveat if caveat.startswith("WARNING") else f"WARNING: {caveat}")
    k, solver = cfg.attribution.vis_num, best.ffdnet.method2.solver
    figures, lines = [], []
    for image, path in files.items():
        record = opt.read_json(path, "ffdnet_test/m2_Test.py", shape=("entries",))
        _, _, clean, _ = attribution.test_image(settings, image)
        for label, entry in record["entries"].items():
            if entry["point"] is None:
                continue
            crop, at = question.crop_around(clean, entry["point"], 3 * patches.patch_size)
            rows = []
            for kind in ("helpful", "harmful"):
                top = entry[kind][:k]
                maps = question.point_maps(best, image, entry["point"], top, device)
                rows.append({"title": f"{image} {label}\n{kind}", "image": crop, "point": at,
                             "patches": [patches.clean[i] for i in top], "maps": list(maps),
                             "captions": [f"#{i} {patch_origin(patches, i)}\n{entry['influence'][i]:.3g}"
                                          for i in top]})
            line = trust.get(label, question.NOT_MEASURED + (f"; the newest expTest report differs in {'; '.join(differs)}"
                                                             if differs else ""))
            lines.append(f"{image} {label}: {line}")
            fig = plotting.question_maps(rows, f"Which training patches made the denoiser output this pixel? "
                                               f"{image} {label}, window {2 * cfg.method2.window + 1}^2 "
                                               f"({solver} over all {len(entry['influence'])} patches)\n"
                                               f"red: this part of the patch helped; blue: it hurt. Trust: {line}"
                                               + "".join("\n" + textwrap.fill(c if c.startswith("WARNING") else
                                                                                 f"WARNING: {c}", 150)
                                                         for c in caveats))
            stem = os.path.splitext(os.path.basename(path))[0]
            figures.append(opt.save_figure(fig, opt.output_path(
                settings, "fig", "ffdnet_question", f"{stem}_{entry['point'][0]}-{entry['point'][1]}.png"), logger))
    print("\nHow far to trust each list (the counterfactual study of this model):\n" + "\n".join(f"  {l}" for l in lines))
    print(f"answer figures ({len(figures)}): {figures[0] if figures else '-'}" + (" ..." if len(figures) > 1 else ""))
    print(f"FFDNet question (profile {settings.profile}) finished in {time.perf_counter() - start:.0f} s")
    return {"figures": figures, "trust": lines, "files": files, "caveats": caveats}


def patch_origin(patches, index: int) -> str:
    """Where a training patch comes from: its photograph's name and its top-left corner (row, col)."""
    where = patches.locate(index)
    return f"{os.path.splitext(os.path.basename(where['file']))[0]} ({where['row']},{where['col']})"


if __name__ == "__main__":
    if not any(a == "-profile" for a in sys.argv[1:]):  # as the MNIST pipeline: quick unless told otherwise
        sys.argv += ["-profile", "quick"]
    opt.run_script(main, __doc__)
