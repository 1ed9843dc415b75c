"""Method-1 figures for FFDNet.
- Figures 4.11 / 4.14 / 4.15: one row per point: the test image with a red dot at the pixel, then
  its top `vis_num` training patches (index / score), for each layer and mode.
- Figure 4.16: one point across layers (normalized mode).
- Figure 4.13: histogram of the patches' total gradient norm, with outlim.

Reads:  act_grad/ffdnet/... (m1_Test.py), the gradient norms and training patches
Writes: fig/ffdnet_m1/{tag}_{image}_l{layer}_{mode}.png, ..._layers.png, {tag}_l{layer}_hist.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, plotting  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    att = cfg.attribution
    logger = opt.make_logger(settings, "ffdnet_m1_vis")
    images = attribution.image_names(settings, logger.info)
    patches = common.train_patches(settings)
    norms, _ = attribution.grad_norms(settings)
    tag = common.run_tag(settings)
    figures = []
    for layer, g in norms.items():
        fig = plotting.histogram(g.sum(1).numpy(), cfg.method1.outlim,
                                 f"layer {layer}: total gradient norm per patch ({len(g)} patches)")
        figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", "ffdnet_m1", f"{tag}_l{layer}_hist.png"), logger))
    for image in images:
        record = opt.read_json(common.m1_result_file(settings, image), "ffdnet_test/m1_Test.py")
        _, _, clean, _ = attribution.test_image(settings, image)
        entries = record["entries"]

        def row(entry, title):
            top = entry["top"][:att.vis_num]
            return {"image": clean, "point": entry["point"], "title": title,
                    "patches": [patches.clean[i] for i in top],
                    "captions": [f"#{i} / {entry['scores'][i]:.3g}" if entry["scores"][i] is not None
                                 else f"#{i} / outlier" for i in top]}
        for layer in sorted({e["layer"] for e in entries}):
            for mode in common.M1_MODES:
                rows = [row(e, f"{image} {e['point']}") for e in entries if e["layer"] == layer and e["mode"] == mode]
                fig = plotting.patch_rows(rows, f"Method 1: top {att.vis_num} training patches, {image}, "
                                                f"layer {layer}, {mode} ({record['meta']['activation']} activation)")
                figures.append(opt.save_figure(fig, opt.output_path(
                    settings, "fig", "ffdnet_m1", f"{tag}_{image}_l{layer}_{mode}.png"), logger))
        first = att.points[0]
        rows = [row(e, f"layer {e['layer']}") for e in entries if e["mode"] == "normalized" and e["point"] == first]
        fig = plotting.patch_rows(rows, f"Method 1 across layers: {image} point {first} (normalized)")
        figures.append(opt.save_figure(fig, opt.output_path(settings, "fig", "ffdnet_m1", f"{tag}_{image}_layers.png"), logger))
    return {"figures": figures}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
