"""Figure 4.2: for each selected test image, its top `vis_num` training images by Method 1.
Row: the test image (id / label / prediction), then the training images (id / label / score);
red = the training label equals the test image's true label.

Reads:  act_grad/{mode}/..._scores.json (m1_Test.py), MNIST images
Writes: fig/{scores file stem}_top{vis_num}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import utils_option as opt  # noqa: E402
from mnist_test import common, plotting  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    logger = opt.make_logger(settings, "mnist_vis_m1")
    source = common.m1_file(settings)
    record = common.read_result(source, "mnist_test/m1_Test.py", settings, "method1")
    meta = record["meta"]
    fig = plotting.ranked_figure(settings, record, "top", "scores",
                        f"Method 1: top {cfg.vis_num} training images per test image "
                        f"(layers {'+'.join(meta['layers'])}, {meta['grad_mode']} norms)\n"
                        f"caption: train id / label / score; red: same label as the test image",
                        ".0f")
    stem = os.path.basename(source)[:-len(".json")]
    path = opt.save_figure(fig, opt.output_path(settings, "fig", f"{stem}_top{cfg.vis_num}.png"),
                           logger)
    return {"figure": path}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
