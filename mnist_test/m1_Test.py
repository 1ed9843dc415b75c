"""Method 1: score of every training image for each selected test image.

score[t][i] = sum over layers l of  a_l(test t) . G_l[i]
a_l = the post-ReLU activations of layer l (fc1: 128, fc2: 64 values; fc3: the 10 logits),
G_l[i] = training image i's accumulated gradient-norm vector of layer l (Train.py).
All test images at once: one matrix product per layer; the gradient-norm file is read once.

Reads:  model_zoo/mnist_{tag}_{mode}.pth and grad_norm/{mode}/mnist_{tag}_{grad_mode}.json
        (Train.py), the test ids (Test.py or the settings)
Writes: act_grad/{mode}/mnist_{tag}_{grad_mode}_{layers}_scores.json: per test image
        test_id_num, label, prediction, scores (n_train floats), top (top_k indices); "meta".
Settings: mnist.method1.{mode, grad_mode, layers, top_k}, mnist.test_ids.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    m1 = cfg.method1
    logger, device = opt.start_script(settings, "mnist_m1_Test", cfg)
    model, model_path = common.load_model(settings, m1.mode, device, logger)
    with opt.Timer() as read_timer:
        norms, norm_meta = common.load_grad_norms(settings, device=device)
    logger.info(f"gradient norms {common.grad_norm_file(settings)} read in {read_timer.seconds:.1f} s")
    test = common.load_test_data(settings, device, logger.info)
    if cfg.test_ids == "all":
        raise opt.SettingsError('mnist.test_ids = "all" is for m2_Test with a fast solver; Method 1 scores of '
                                'every test x training image would be a 600-million-number JSON: give a list')
    ids = common.selected_test_ids(settings, m1.mode)
    x, labels = test.images[ids], test.labels[ids]
    activations = model.layer_activations(x, m1.layers)
    with opt.Timer() as score_timer:
        scores = utils_if.method1_scores(activations, {l: norms[l] for l in m1.layers}).cpu()
    predictions = model(x).argmax(1).tolist()
    logger.info(f"scored {scores.shape[1]} training images for {len(ids)} test images in "
                f"{score_timer.seconds:.2f} s (layers {m1.layers})")
    result = {"meta": {
        "settings": opt.as_dict(settings.mnist), "profile": settings.profile, "model_file": model_path,
        "grad_norm_file": common.grad_norm_file(settings), "grad_mode": norm_meta["grad_mode"],
        "layers": m1.layers, "n_train": scores.shape[1], "test_ids": ids,
        "definition": "score[i] = sum_l a_l . G_l[i]; a_l post-ReLU activations (fc3: logits); "
                      "top = indices of the largest scores", "seconds_scores": score_timer.seconds}}
    for position, test_id in enumerate(ids):
        top = utils_if.top_indices(scores[position], m1.top_k)
        result[str(position)] = {"test_id_num": test_id, "label": int(labels[position]),
                                 "prediction": predictions[position],
                                 "scores": scores[position].tolist(), "top": top}
        logger.info(f"test {test_id} (label {int(labels[position])}, predicted "
                    f"{predictions[position]}): top {top[:5]}")
    path = common.m1_file(settings)
    opt.write_json(path, result, logger)
    return {"act_grad_file": path}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
