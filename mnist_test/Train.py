"""Train the MNIST MLP and record Method-1 gradient norms for every training image.

Reads:  MNIST (fetched on first use into data/MNIST/raw).
Writes: model_zoo/mnist_{tag}_{mode}.pth (with what Method 3's replay needs) and grad_norm/{mode}/mnist_{tag}_{grad_mode}.json
        (one n_train x n_out array per layer under "arrays", and a "meta" block).
Settings: mnist.{seed, epoch, batch_size, learning_rate, momentum, weight_decay, train_subset},
          mnist.method1.{mode, grad_mode, skip_first_epoch}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from mnist_test import common  # noqa: E402
from mnist_test.model import LAYER_MODULES  # noqa: E402
from mnist_test.training import REPLAY_RECIPE, train_model  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    m1 = cfg.method1
    logger, device = opt.start_script(settings, "mnist_Train", cfg)
    train, test = common.load_data(settings, device, logger.info)
    logger.info(f"training on {len(train)} images, {cfg.epoch} epochs, batch {cfg.batch_size}, "
                f"seed {cfg.seed}, gradient norms: {m1.grad_mode} "
                f"(first epoch {'skipped' if m1.skip_first_epoch else 'included'})")
    layers = tuple(LAYER_MODULES)  # all three weight matrices are always recorded
    def save_checkpoint(epoch: int, state: dict) -> None:  # TracIn's checkpoints
        opt.save_torch(common.checkpoint_file(settings, m1.mode, epoch),
                       {"model": state, "epoch": epoch, "learning_rate": cfg.learning_rate})

    with opt.Timer() as timer:
        model, norms = train_model(train, cfg, device, m1.grad_mode, layers,
                                   m1.skip_first_epoch, checkpoint_every=cfg.checkpoint_every,
                                   on_checkpoint=save_checkpoint)
    losses, preds = common.evaluate(model, test)
    accuracy = (preds == test.labels).double().mean().item()
    logger.info(f"trained in {timer.seconds:.1f} s; test accuracy {accuracy:.4f} on all "
                f"{len(test)} test images, mean test loss {losses.mean().item():.4f}")

    model_path = common.model_file(settings, m1.mode)
    replay = {"recipe": REPLAY_RECIPE, "seed": cfg.seed, "n_train": len(train), "device": str(device),
              "threads": torch.get_num_threads(), "torch": str(torch.__version__)}  # what m3_Test's replay needs
    opt.save_torch(model_path, {"model": model.state_dict(), "settings": opt.as_dict(settings.mnist), "replay": replay,
                                "test_accuracy": accuracy}, logger)
    grad_path = common.grad_norm_file(settings)
    meta = {
        "settings": opt.as_dict(settings.mnist), "profile": settings.profile, "model_file": model_path,
        "grad_mode": m1.grad_mode, "skip_first_epoch": m1.skip_first_epoch,
        "layers": {name: {"module": f"{LAYER_MODULES[name]}.weight",
                          "shape": [len(train), norms[name].shape[1]]} for name in layers},
        "n_train": len(train), "train_indices": "0..n_train-1 (original MNIST order)",
        "test_accuracy": accuracy, "train_seconds": round(timer.seconds, 2), "threads": torch.get_num_threads(),
        "definition": ("row-wise L2 norm (over inputs) of each layer's weight gradient, one value per "
                       "output neuron, summed over the recorded epochs; batch = norm of the "
                       "batch-mean gradient given to every batch member; per_sample = norm of each "
                       "image's own loss gradient"),
    }
    with opt.Timer() as write_timer:
        opt.write_json_with_matrices(grad_path, {"meta": meta},
                                     {name: norms[name].cpu().numpy() for name in layers}, logger)
    logger.info(f"gradient-norm JSON written in {write_timer.seconds:.1f} s")
    return {"model": model_path, "grad_norm": grad_path, "test_accuracy": accuracy, "log": logger.log_file,
            "train_seconds": timer.seconds, "write_seconds": write_timer.seconds}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
