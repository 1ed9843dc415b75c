"""Test the trained MLP: loss, prediction and correctness of the selected test images, plus the
accuracy over the whole 10,000-image test set, and (test_ids = "loss_rank") the choice of test
images by the report's rule: sort the test set by loss under this model, descending, take ranks
0, test_rank_step, 2*test_rank_step, ... (test_num images).

Reads:  model_zoo/mnist_{tag}_{method1.mode}.pth (Train.py)
Writes: test/mnist_{tag}_{mode}_{selection}_test.json: "test_ids" (read by every later script),
        "selection" (the rule it was made for: lr{num}x{step}, all, or ids{hash}), per image
        test_id_num / label / prediction / loss / correct / loss_rank, and "meta".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from mnist_test import common  # noqa: E402


def choose_by_loss_rank(losses: torch.Tensor, count: int, step: int) -> list[int]:
    """Test indices at loss ranks 0, step, 2*step, ... of the descending loss order (stable)."""
    order = torch.sort(losses.cpu(), descending=True, stable=True).indices
    ranks = list(range(0, min(len(order), count * step), step))[:count]
    return [int(order[r]) for r in ranks]


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    mode = cfg.method1.mode
    logger, device = opt.start_script(settings, "mnist_Test", cfg)
    model, model_path = common.load_model(settings, mode, device, logger)
    test = common.load_test_data(settings, device, logger.info)
    losses, preds = common.evaluate(model, test)
    accuracy = (preds == test.labels).double().mean().item()
    if cfg.test_ids == "loss_rank":
        ids = choose_by_loss_rank(losses, cfg.test_num, cfg.test_rank_step)
        rule = f"loss rank 0, {cfg.test_rank_step}, ... (descending loss under {model_path})"
    elif cfg.test_ids == "all":
        ids, rule = list(range(len(test))), "all test images (mnist.test_ids = \"all\")"
    else:
        ids, rule = list(cfg.test_ids), "explicit list in the settings (mnist.test_ids)"
    rank_of = torch.empty(len(losses), dtype=torch.long)
    rank_of[torch.sort(losses.cpu(), descending=True, stable=True).indices] = torch.arange(len(losses))
    images = [{"test_id_num": i, "label": int(test.labels[i]), "prediction": int(preds[i]),
               "loss": float(losses[i]), "correct": bool(preds[i] == test.labels[i]),
               "loss_rank": int(rank_of[i])} for i in ids]
    logger.info(f"{'test id':>8} {'label':>5} {'pred':>5} {'loss':>10} {'rank':>6}")
    for row in images:
        logger.info(f"{row['test_id_num']:>8} {row['label']:>5} {row['prediction']:>5} "
                    f"{row['loss']:>10.4f} {row['loss_rank']:>6}")
    wrong = [r["test_id_num"] for r in images if not r["correct"]]
    logger.info(f"misclassified among the selected: {wrong}; accuracy on the whole test set "
                f"{accuracy:.4f} ({int((preds == test.labels).sum())}/{len(test)})")
    path = common.test_file(settings, mode)
    selection = common.test_selection_part(settings)
    opt.write_json(path, {"test_ids": ids, "selection": selection, "images": images, "meta": {
        "model_file": model_path, "selection_rule": rule, "test_accuracy": accuracy,
        "mean_test_loss": float(losses.mean()), "settings": opt.as_dict(settings.mnist)}}, logger)
    return {"test_file": path, "test_ids": ids, "test_accuracy": accuracy}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
