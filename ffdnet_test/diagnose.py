"""Do the FFDNet attributions explain pixels? For the chosen points of two test images: the mean
top-100 overlap between different points of the same image, and between the same point in the
two images, for Method 1 (each layer and mode) and Method 2 (whole image, pixel window). The
report's failure is an overlap near 100% everywhere (the same patches whatever the pixel);
attributions that explain pixels should overlap little between distant points.

Reads:  the m1_Test.py and m2_Test.py files of ffdnet.attribution.images (the first two)
Writes: test/ffdnet_diagnosis_{m2 file name without the image}_{m1 grad_mode, activation}.md (printed too)
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common  # noqa: E402


def overlap(a: list[int], b: list[int], top: int) -> float:
    return 100.0 * utils_if.top_k_overlap(a, b, top) / top


def summarise(lists: dict[str, dict[tuple, list[int]]], top: int) -> tuple[float, float]:
    """lists[image][point] -> (mean overlap between points of one image, between the two images)."""
    images = list(lists)
    within = [overlap(lists[img][p], lists[img][q], top) for img in images
              for p, q in itertools.combinations(sorted(lists[img]), 2)]
    across = [overlap(lists[images[0]][p], lists[images[1]][p], top) for p in lists[images[0]]
              if len(images) > 1 and p in lists[images[1]]]
    return (float(np.mean(within)) if within else float("nan"),
            float(np.mean(across)) if across else float("nan"))


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    if len(cfg.attribution.images) < 2:
        raise opt.SettingsError("ffdnet.attribution.images needs two test images for the diagnosis")
    logger = opt.make_logger(settings, "ffdnet_diagnose")
    images = attribution.image_names(settings, logger.info)[:2]
    top = 100
    rows = []
    m1 = {img: opt.read_json(common.m1_result_file(settings, img), "ffdnet_test/m1_Test.py") for img in images}
    for layer in sorted({e["layer"] for e in m1[images[0]]["entries"]}):
        for mode in common.M1_MODES:
            lists = {img: {tuple(e["point"]): e["top"] for e in m1[img]["entries"]
                           if e["layer"] == layer and e["mode"] == mode} for img in images}
            rows.append((f"Method 1, layer {layer}, {mode}", *summarise(lists, top)))
    m2 = {img: opt.read_json(common.m2_result_file(settings, img), "ffdnet_test/m2_Test.py") for img in images}
    for kind in ("helpful", "harmful"):
        whole = {img: {("whole",): m2[img]["entries"]["whole"][kind]} for img in images}
        rows.append((f"Method 2, whole image, {kind}", float("nan"), summarise(whole, top)[1]))
        pixel = {img: {tuple(e["point"]): e[kind] for label, e in m2[img]["entries"].items() if e["point"]}
                 for img in images}
        rows.append((f"Method 2, pixel window, {kind}", *summarise(pixel, top)))
    points = cfg.attribution.points
    lines = [f"Top-{top} overlap (%), test images {images[0]} and {images[1]}, points {points}", "",
             opt.markdown_table(["method", "between points (same image)", "between images (same point)"],
                                [[name, f"{a:.1f}".replace("nan", "–"), f"{b:.1f}".replace("nan", "–")]
                                 for name, a, b in rows])]
    text = "\n".join(lines)
    logger.info("\n" + text)
    m1 = settings.ffdnet.method1
    inputs = os.path.basename(common.m2_result_file(settings, "")).removesuffix("_.json")
    path = opt.output_path(settings, "test", f"ffdnet_diagnosis_{inputs}_{m1.grad_mode}_{m1.activation}.md")
    opt.write_text(path, text + "\n")
    return {"table": path, "rows": rows}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
