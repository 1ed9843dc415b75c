"""Method 1 for FFDNet: score of every training patch for chosen pixels of a test image.

score[i] = < a_L(point), G_L[i] >: a_L is the feature vector of layer L at the pixel (full-image
(row, col) -> feature map (row // 2, col // 2); after the block's ReLU, or the raw conv output with
method1.activation = "conv" as the original), G_L[i] the patch's gradient-norm vector (FFDNet_Train).
Modes: raw, normalized (G[i] / sum G[i]), remove_out (patches with total norm > outlim never rank).
Every point, layer and mode in one run; one matrix product per layer.

Reads:  the model and grad_norm/ffdnet/{tag}_{grad_mode}.json (FFDNet_Train.py), ffdnet.test_dir
Writes: act_grad/ffdnet/{tag}_{image}_{activation}.json: per (layer, mode, point) the scores and top
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common  # noqa: E402

MODES = common.M1_MODES


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    m1, att = cfg.method1, cfg.attribution
    logger, device = opt.start_script(settings, "ffdnet_m1_Test", cfg, seed=False)
    images = attribution.image_names(settings, logger.info)
    model, model_path = common.load_model(settings, device, logger)
    with opt.Timer() as read_timer:
        norms, meta = attribution.grad_norms(settings)
    layers = sorted(norms)
    logger.info(f"gradient norms of layers {layers} for {meta['n_train']} patches read in {read_timer.seconds:.1f} s")
    outputs = {}
    for image in images:
        _, path, clean, noisy = attribution.test_image(settings, image)
        for point in att.points:
            attribution.check_point(point, clean)
        with opt.Timer() as timer:
            acts = attribution.activations_at(model, common.to_model_order(noisy, settings),
                                              cfg.test.noise_level_img / 255.0, layers, att.points,
                                              m1.activation)
            entries = []
            for layer in layers:
                for mode in MODES:
                    scores = attribution.mode_scores(acts[layer], norms[layer], mode, m1.outlim)
                    for point, row in zip(att.points, scores):
                        entries.append({"layer": layer, "mode": mode, "point": point,
                                        "scores": [s if s != float("-inf") else None for s in row.tolist()],
                                        "top": utils_if.top_indices(row, m1.top_k)})
        logger.info(f"{image}: {len(att.points)} points x {len(layers)} layers x {len(MODES)} modes "
                    f"scored over {meta['n_train']} patches in {timer.seconds:.2f} s")
        for e in entries:
            if e["mode"] == "raw":
                logger.info(f"  layer {e['layer']} point {e['point']}: top {e['top'][:5]}")
        outputs[image] = opt.write_json(common.m1_result_file(settings, image), {"entries": entries, "meta": {
            "model_file": model_path, "test_image": path, "grad_norm_file": common.grad_norm_file(settings),
            "grad_mode": meta["grad_mode"], "activation": m1.activation, "outlim": m1.outlim,
            "n_train": meta["n_train"], "sigma": cfg.test.noise_level_img, "seconds": timer.seconds,
            "point_convention": "points are full-image (row, col); features read at (row // 2, col // 2)"}},
            logger)
    return {"files": outputs}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
