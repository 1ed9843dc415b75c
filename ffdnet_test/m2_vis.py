"""Method-2 figures for FFDNet: Figure 4.12 (the most helpful and harmful training patches for the
whole-image loss of each test image) and the same for every pixel-level target.

Reads:  if/ffdnet/... (m2_Test.py), the training patches
Writes: fig/ffdnet_m2/{influence file stem}_{helpful|harmful}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, plotting  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    att = cfg.attribution
    logger = opt.make_logger(settings, "ffdnet_m2_vis")
    images = attribution.image_names(settings, logger.info)
    patches = common.train_patches(settings)
    figures = []
    for image in images:
        path = common.m2_result_file(settings, image)
        record = opt.read_json(path, "ffdnet_test/m2_Test.py", shape=("entries",))
        _, _, clean, _ = attribution.test_image(settings, image)
        for kind in ("helpful", "harmful"):
            rows = []
            for label, entry in record["entries"].items():
                top = entry[kind][:att.vis_num]
                rows.append({"image": clean, "point": entry["point"], "title": f"{image}: {label}",
                             "patches": [patches.clean[i] for i in top],
                             "captions": [f"#{i} / {entry['influence'][i]:.3g}" for i in top]})
            fig = plotting.patch_rows(rows, f"Method 2: most {kind} training patches (whole image, then "
                                            f"the pixel windows; window {record['meta']['window']})")
            stem = os.path.splitext(os.path.basename(path))[0]
            figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", "ffdnet_m2", f"{stem}_{kind}.png"), logger))
    return {"figures": figures}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
