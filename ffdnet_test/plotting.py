"""FFDNet figures: a test image with the explained pixel marked, then training patches."""
from __future__ import annotations

import matplotlib

if not any(k in matplotlib.get_backend().lower() for k in ("inline", "qt", "tk", "macosx", "nbagg")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(ax, image: torch.Tensor) -> None:
    array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        ax.imshow(array[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(array)
    ax.axis("off")


def patch_rows(rows: list[dict], suptitle: str):
    """rows: {"image": (C,H,W), "point": (r, c) or None, "title": str,
    "patches": [(C,h,w) tensor], "captions": [str]}."""
    n_cols = 1 + max(len(r["patches"]) for r in rows)
    row_height, title_height = 2.1, 0.8  # inches: each row leaves room for its captions above it
    height = row_height * len(rows) + title_height
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.1 * n_cols, height), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        _show(ax_row[0], row["image"])
        if row.get("point") is not None:  # x = column, y = row (the original swapped them)
            ax_row[0].scatter([row["point"][1]], [row["point"][0]], s=40, c="red", marker="o",
                              edgecolors="white", linewidths=0.8)
        ax_row[0].set_title(row["title"], fontsize=8)
        for ax, patch, caption in zip(ax_row[1:], row["patches"], row["captions"]):
            _show(ax, patch)
            ax.set_title(caption, fontsize=7)
    fig.suptitle(suptitle, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.1 / height, top=1 - title_height / height,
                        hspace=0.45, wspace=0.08)
    return fig


def histogram(values, limit: float, title: str):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=100, color="tab:blue")
    ax.axvline(limit, color="red", lw=1, label=f"outlim = {limit:g}")
    ax.set_yscale("log")
    ax.set_xlabel("total gradient norm of a training patch")
    ax.set_ylabel("patches")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig
