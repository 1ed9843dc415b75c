"""Figures 4.3 (helpful) and 4.4 (harmful): for each test image of the Method-2 file (or Method 3's,
with mnist.vis_method = "method3"), its top
`vis_num` helpful and harmful training images. Caption: train id / label / influence; red = same
label as the test image's true label. Positive influence = the image helped (removing it would
raise the test loss).

Reads:  {if_dir}/if_....json (m2_Test.py) or m3_replay_....json (m3_Test.py), MNIST images
Writes: fig/{influence file stem}_helpful_top{vis_num}.png and ..._harmful_top{vis_num}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import common, plotting  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    logger = opt.make_logger(settings, "mnist_vis_m2")
    source, made_by, block = common.attribution_file(settings, cfg.vis_method)
    record = common.read_result(source, made_by, settings, block)
    solver = record["meta"]["solver_info"]["solver"]
    name = "Method 3 (exact, this run)" if block == "method3" else f"Method 2 ({solver})"
    stem = os.path.basename(source)[:-len(".json")]
    paths = {}
    for kind, meaning in (("helpful", "most positive: removing it raises the test loss"),
                          ("harmful", "most negative: removing it lowers the test loss")):
        fig = plotting.ranked_figure(settings, record, kind, "influence",
                            f"{name}: top {cfg.vis_num} {kind} training images "
                            f"({meaning})\ncaption: train id / label / influence; red: same label "
                            f"as the test image", ".3g")
        paths[kind] = opt.save_figure(
            fig, opt.output_path(settings, "fig", f"{stem}_{kind}_top{cfg.vis_num}.png"), logger)
    return {"figures": paths}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
