"""Figure 4.1: the training images with the largest output-layer (fc3) gradient norm, for every
output node 0-9. Caption: train id / label / value; red where
the label equals the node.

Reads:  grad_norm/{mode}/mnist_{tag}_{grad_mode}.json (Train.py), MNIST training images
Writes: fig/mnist_{tag}_{grad_mode}_{mode}_m1_grad_nodes.png
Settings: mnist.vis_num, mnist.method1.{mode, grad_mode}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, plotting  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    m1 = cfg.method1
    logger = opt.make_logger(settings, "mnist_vis_m1_grad")
    norms, _meta = common.load_grad_norms(settings)
    train = common.load_train_data(settings, torch.device("cpu"), logger.info)
    rows = []
    for node in range(10):
        top = utils_if.top_indices(norms["fc3"][:, node], cfg.vis_num)
        rows.append([{"image": train.images[i], "red": int(train.labels[i]) == node,
                      "caption": f"{i} / {int(train.labels[i])} / {norms['fc3'][i, node]:.2f}"}
                     for i in top])
        logger.info(f"node {node}: top {top}", extra=opt.DETAIL)
    fig = plotting.digit_grid(rows, f"Top {cfg.vis_num} training images per output node by fc3 "
                              f"gradient norm ({m1.grad_mode}, e{cfg.epoch} b{cfg.batch_size})"
                              f"\nrows: nodes 0-9; caption: train id / label / norm (red: label = node)",
                              row_labels=[f"node {node}" for node in range(10)])
    stem = os.path.basename(common.grad_norm_file(settings))[:-len(".json")]
    path = opt.save_figure(fig, opt.output_path(settings, "fig", f"{stem}_{m1.mode}_m1_grad_nodes.png"),
                           logger)
    return {"figure": path}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
