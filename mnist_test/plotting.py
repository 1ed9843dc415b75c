"""Digit grids in the original's look: inverted gray digits, captions under the images, red
captions where a training image's label matches (the node, or the test image's true label)."""
from __future__ import annotations

import matplotlib

if not any(k in matplotlib.get_backend().lower() for k in ("inline", "qt", "tk", "macosx", "nbagg")):
    matplotlib.use("Agg")  # headless unless Spyder/IPython already chose an interactive backend
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import utils_option as opt  # noqa: E402


def digit_grid(rows: list[list[dict]], suptitle: str, gap_after_first: bool = False,
               row_labels: list[str] | None = None):
    """A figure of rows of cells; a cell is {"image": (784,) in [-1, 1], "caption": str,
    "red": bool, "bold": bool} or None for an empty cell."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    widths = [1.0] + ([0.25] if gap_after_first else []) + [1.0] * (n_cols - 1)
    top_margin = 0.35 + 0.17 * (suptitle.count("\n") + 1)  # inches for the title, by its lines
    height = 1.9 * n_rows + top_margin
    fig, axes = plt.subplots(n_rows, len(widths), figsize=(1.5 * sum(widths) + 0.3, height),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(len(widths)):
            axes[r][c].axis("off")
        for c, cell in enumerate(row):
            if cell is None:
                continue
            col = c + (1 if gap_after_first and c > 0 else 0)
            ax = axes[r][col]
            image = torch.as_tensor(cell["image"]).detach().cpu().reshape(28, 28)
            ax.imshow(image.numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.text(0.5, -0.04, cell["caption"], transform=ax.transAxes, ha="center", va="top",
                    fontsize=8, color="red" if cell.get("red") else "black",
                    fontweight="bold" if cell.get("bold") else "normal")
    for r, label in enumerate(row_labels or []):  # e.g. "node 3" left of each row (Fig 4.1)
        axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center",
                        fontsize=10, fontweight="bold", rotation=90)
    fig.suptitle(suptitle, fontsize=10)
    fig.subplots_adjust(left=0.06 if row_labels else 0.02, right=0.98, bottom=0.45 / height,
                        top=1 - top_margin / height,
                        hspace=0.45, wspace=0.08)
    return fig


def test_row(test_image, test_id: int, label: int, prediction: int, train_images, train_ids,
             train_labels, values, value_fmt: str = ".2f") -> list[dict]:
    """One row: the test image, then its training images; red = same label as the test image's
    true label (the report's captions)."""
    row = [{"image": test_image, "caption": f"test {test_id}\nlabel {label} / pred {prediction}",
            "bold": True}]
    for img, tid, lab, val in zip(train_images, train_ids, train_labels, values):
        row.append({"image": img, "caption": f"{tid} / {lab} / {val:{value_fmt}}", "red": lab == label})
    return row


def ranked_figure(settings: opt.Settings, record: dict, list_key: str, value_key: str, title: str, value_fmt: str):
    """Rows of test image + its top training images, from an m1 or m2 result file (Figs 4.2-4.4)."""
    from mnist_test import common  # the data loaders; plotting itself stays free of file names
    cfg = settings.mnist
    train = common.load_train_data(settings, torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    rows = []
    for key in sorted((k for k in record if k != "meta"), key=int):
        entry = record[key]
        top = entry[list_key][:cfg.vis_num]
        values = [entry[value_key][i] for i in top]
        rows.append(test_row(test.images[entry["test_id_num"]], entry["test_id_num"], entry["label"],
                             entry["prediction"], train.images[top], top, train.labels[top].tolist(), values,
                             value_fmt))
    return digit_grid(rows, title, gap_after_first=True)


def stability_figures(settings: opt.Settings, source: str, list_key: str, value_key: str, value_fmt: str,
                      name: str) -> list[str]:
    """Figures 4.5-4.7 (vis_staTest_m1.py, vis_staTest_m2.py): per selected test image, the test image
    and one row of its top `vis_num` training images per stability model (staTest0 ...), red = same
    label as the test image's true label; ``source`` is "m1" or "m2". Returns the figure paths."""
    from mnist_test import common
    cfg = settings.mnist
    seeds = cfg.stability.seeds
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
        rows = [[None] * (cfg.vis_num // 2) + [{"image": test.images[test_id], "bold": True,
                                                   "caption": f"test {test_id} / label {label}"}]]
        for k, record in enumerate(records):
            entry = next(v for key, v in record.items() if key != "meta" and v["test_id_num"] == test_id)
            top = entry[list_key][:cfg.vis_num]
            rows.append([{"image": train.images[i], "red": int(train.labels[i]) == label,
                          "caption": f"m{k}: {i} / {int(train.labels[i])}\n{entry[value_key][i]:{value_fmt}}"}
                         for i in top])
        fig = digit_grid(rows, f"Stability, {name}: top {cfg.vis_num} per model (row k = staTest k; "
                                        f"caption: model: train id / label, value)\nred: same label as the test image")
        figures.append(opt.save_figure(fig, opt.output_path(
            settings, "fig", f"staTest_{common.run_tag(base)}_{name}_t{test_id}.png"), logger))
    return figures
