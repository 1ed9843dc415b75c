"""Figures 4.5-4.7, shared by vis_staTest_m1.py and vis_staTest_m2.py: for one test image, the
test image, then one row of its top `vis_num` training images per stability model (staTest0 ...),
red = same label as the test image's true label."""
from __future__ import annotations

import torch

import utils_option as opt
from mnist_test import common, plotting


def draw(settings: dict, source: str, list_key: str, value_key: str, value_fmt: str, name: str) -> list[str]:
    """One figure per selected test image; ``source`` is "m1" or "m2"."""
    cfg = common.mnist_cfg(settings)
    seeds = cfg["stability"]["seeds"]
    base = common.stability_settings(settings, seeds[0])
    test_ids = common.selected_test_ids(base, "staTest0")
    records = []
    for seed in seeds:
        s = common.stability_settings(settings, seed, test_ids)
        path = common.m1_file(s) if source == "m1" else common.m2_file(s)
        records.append(opt.read_json(path, "mnist_test/staTest.py"))
    train = common.load_train_data(settings, torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    logger = opt.make_logger(settings, f"mnist_vis_staTest_{name}")
    figures = []
    for test_id in test_ids:
        label = int(test.labels[test_id])
        rows = [[None] * (cfg["vis_num"] // 2) + [{"image": test.images[test_id], "bold": True,
                                                   "caption": f"test {test_id} / label {label}"}]]
        for k, record in enumerate(records):
            entry = next(v for key, v in record.items() if key != "meta" and v["test_id_num"] == test_id)
            top = entry[list_key][:cfg["vis_num"]]
            rows.append([{"image": train.images[i], "red": int(train.labels[i]) == label,
                          "caption": f"m{k}: {i} / {int(train.labels[i])}\n{entry[value_key][i]:{value_fmt}}"}
                         for i in top])
        fig = plotting.digit_grid(rows, f"Stability, {name}: top {cfg['vis_num']} per model (row k = staTest k; "
                                        f"caption: model: train id / label, value)\nred: same label as the test image")
        figures.append(opt.save_figure(fig, opt.output_path(
            settings, "fig", f"staTest_{common.run_tag(base)}_{name}_t{test_id}.png"), logger))
    return figures
