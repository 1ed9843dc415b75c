"""FFDNet figures: a test image with the explained pixel marked, then training patches."""
from __future__ import annotations

import matplotlib

if not any(k in matplotlib.get_backend().lower() for k in ("inline", "qt", "tk", "macosx", "nbagg")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
        if row.get("point") is not None:  # x = column, y = row
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


def effect_bars(image: torch.Tensor, points: list[list[int]], labels: list[str], table: list[dict], title: str):
    """Left: the test image with its targets numbered. Right: one panel per (manipulation, k), bars
    per ranking: mean change of the window loss at the ranking's own target (+- spread over seeds)
    and, hatched, at the other targets."""
    import numpy as np
    groups = sorted({(r["manipulation"], r["k"]) for r in table})
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(3.2 * (1 + len(groups)), 3.4), squeeze=False)
    axes = axes[0]
    _show(axes[0], image)
    for number, point in enumerate(points, 1):
        axes[0].scatter([point[1]], [point[0]], s=30, c="red", edgecolors="white", linewidths=0.6)
        axes[0].annotate(str(number), (point[1], point[0]), color="yellow", fontsize=8, xytext=(4, 4),
                         textcoords="offset points")
    axes[0].set_title("targets: " + ", ".join(f"{i}={label}" for i, label in enumerate(labels, 1)), fontsize=6)
    for ax, (manipulation, k) in zip(axes[1:], groups):
        rows = [r for r in table if r["manipulation"] == manipulation and r["k"] == k]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["own"] for r in rows], 0.4, yerr=[r["own_seed_spread"] for r in rows],
               color="tab:blue", label="at its target")
        ax.bar(x + 0.2, [0 if r["others"] != r["others"] else r["others"] for r in rows], 0.4,
               color="tab:gray", hatch="//", label="at the other targets")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels([r["ranking"] for r in rows], rotation=30, fontsize=7)
        ax.set_title(f"{manipulation} top {k}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[1].set_ylabel("window loss change vs control", fontsize=7)
    axes[-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def specificity(matrices: dict, labels: list[str], title: str):
    """One heat map per ranking: row i = the list built for target i, column j = effect at target j."""
    import numpy as np
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    limit = max([np.nanmax(np.abs(m)) for m in matrices.values() if np.isfinite(m).any()] + [1e-12])
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.1e}", ha="center", va="center", fontsize=5)
        ax.set_xticks(range(len(labels)))
        ax.set_yticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, fontsize=6)
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xlabel("effect measured at", fontsize=7)
        ax.set_ylabel("top-k list built for", fontsize=7)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def influence_maps(rows: list[dict], title: str):
    """rows: {"title", "patches": [(C,h,w)], "maps": [(h,w)], "captions"}: each training patch with
    where its influence sits drawn over it (red helps, blue hurts)."""
    n_cols = max(len(r["patches"]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 2.0 * len(rows) + 0.5), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for ax, patch, heat, caption in zip(ax_row, row["patches"], row["maps"], row["captions"]):
            _show(ax, patch)
            limit = float(heat.abs().max()) or 1.0
            ax.imshow(heat.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55)
            ax.set_title(caption, fontsize=6)
        ax_row[0].text(-0.1, 0.5, row["title"], transform=ax_row[0].transAxes, rotation=90, va="center",
                       ha="right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def question_maps(rows: list[dict], title: str):
    """rows: {"title", "image": a crop of the test image (C,h,w), "point": (r, c) in it, "patches",
    "maps": [(h,w)] or None, "captions"}: the crop with the point, then each training patch with where its
    influence sits drawn over it (red helps, blue hurts)."""
    n_cols = 1 + max(len(r["patches"]) for r in rows)
    title_height = 0.35 + 0.17 * (title.count("\n") + 1)
    height = 2.0 * len(rows) + title_height
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, height), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        _show(ax_row[0], row["image"])
        ax_row[0].scatter([row["point"][1]], [row["point"][0]], s=40, c="red", marker="o", edgecolors="white",
                          linewidths=0.8)
        ax_row[0].set_title(row["title"], fontsize=7)
        overlay = None
        for ax, patch, heat, caption in zip(ax_row[1:], row["patches"], row["maps"] or [None] * len(row["patches"]),
                                            row["captions"]):
            _show(ax, patch)
            if heat is not None:  # Method 3's scores have no per-position split: the patch alone
                limit = float(heat.abs().max()) or 1.0
                overlay = ax.imshow((heat / limit).numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, alpha=0.55)
            ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=8)
    top = 1 - title_height / height
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.1 / height, top=top, hspace=0.45, wspace=0.08)
    if overlay is not None:
        bar = fig.colorbar(overlay, cax=fig.add_axes([0.92, 0.1 / height + 0.05, 0.012, top - 0.1 / height - 0.1]))
        bar.set_label("influence per position / the patch's largest |value|\n(red helped, blue hurt)", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    return fig


def lds_bars(rows: list[dict], title: str):
    """ffdnet_test/ldsTest's figure: one panel per drop fraction, the LDS of every method at every
    target with its bootstrap interval (the pixel windows, then the whole images)."""
    per_target = [r for r in rows if "low" in r]
    fractions = sorted({r["fraction"] for r in per_target})
    methods = list(dict.fromkeys(r["method"] for r in per_target))
    targets = list(dict.fromkeys(r["target"] for r in per_target))
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(6, 0.7 * len(targets)) * len(fractions), 4.2),
                             squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, fraction in zip(axes[0], fractions):
        for m, method in enumerate(methods):
            mine = {r["target"]: r for r in per_target if r["method"] == method and r["fraction"] == fraction}
            xs = [i + (m - (len(methods) - 1) / 2) * width for i, t in enumerate(targets) if t in mine]
            values = [mine[t]["lds"] for t in targets if t in mine]
            errors = np.array([[mine[t]["lds"] - mine[t]["low"], mine[t]["high"] - mine[t]["lds"]]
                               for t in targets if t in mine]).T
            ax.bar(xs, values, width, yerr=np.nan_to_num(errors), capsize=2, label=method)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-1, 1)
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels(targets, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{fraction:.0%} of the window's patches dropped", fontsize=9)
        ax.set_ylabel("LDS (Spearman over reruns)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
