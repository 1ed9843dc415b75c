"""Train FFDNet on image patches (MSE, Adam, orthogonal conv init), validating PSNR every epoch,
and (method1.record) accumulate Method-1 gradient-norm vectors per patch for the chosen conv layers.
Replaces the original's separate m1_Train.py.

Reads:  ffdnet.train_dir, ffdnet.val_dir (sorted file names), optionally ffdnet.init_checkpoint
Then, with a final window (ffdnet.window.epochs > 0, ffdnet.recipe "attributable"), saves the model
as model_zoo/{tag}_window_start.pth and trains the window (ffdnet_test/window.py).
Writes: model_zoo/{tag}.pth (+ {tag}_check{e}.pth every train_checkpoints epochs);
        grad_norm/ffdnet/{tag}_{grad_mode}.json: per layer a (n_patches, channels) array under
        "arrays" ("l{L}"), the patch table (file, row, col) and "meta".
Settings: ffdnet.{is_gray, layout, activation, patch_size, stride, sigma, fixed_noise, epoch, batch_size,
          learning_rate, lr_decay_epochs, seed, window.*, method1.*}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, datasets, window  # noqa: E402
from ffdnet_test.checkpoints import checkpoint_state  # noqa: E402
from ffdnet_test.model import count_parameters  # noqa: E402
from ffdnet_test.training import train_ffdnet, validate  # noqa: E402


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    m1 = cfg.method1
    logger, device = opt.start_script(settings, "ffdnet_Train", cfg)
    try:
        patches = common.train_patches(settings)
        _, val_images = datasets.read_folder(common.folder(settings, "val_dir"), cfg.is_gray)
    except datasets.ImageFolderError as err:
        raise opt.SettingsError(str(err)) from None
    model = common.new_model(settings, device)
    layers = tuple(m1.layers) if m1.record else ()
    for layer in layers:
        model.conv_index(layer)  # a clear error for a layer the net does not have
    logger.info(f"{len(patches)} patches {cfg.patch_size}x{cfg.patch_size} (stride {cfg.stride}) "
                f"from {len(patches.files)} images in {cfg.train_dir}; model {count_parameters(model)} "
                f"parameters; noise {'fixed per patch' if cfg.fixed_noise else 'fresh each step'} "
                f"sigma in {cfg.sigma}; method-1 layers {list(layers)} ({m1.grad_mode})")

    def checkpoint(epoch, net, record):
        logger.info(f"epoch {epoch}: train loss {record['train_loss']:.6f}, val PSNR "
                    f"{record.get('val_psnr', float('nan')):.2f} dB (sigma {cfg.val_sigma:g})")
        if epoch % cfg.train_checkpoints == 0 and epoch != cfg.epoch:
            opt.save_torch(common.model_file(settings, epoch), {"model": checkpoint_state(net)}, logger)

    to_model = lambda x: common.to_model_order(x, settings)  # noqa: E731
    # the phase before a final window is the same training as the model without it (same settings, same seed):
    # reuse that model when it exists, with its Method-1 norms when they are recorded (one file for both)
    plain = common.model_file(opt.with_values(settings, {"ffdnet": {"window": {"epochs": 0.0}}}))
    with opt.Timer() as timer:
        if window.has_window(cfg) and os.path.isfile(plain) and (not layers or os.path.isfile(common.grad_norm_file(settings))):
            saved = opt.load_torch(plain, "ffdnet_test/FFDNet_Train.py", weights_only=False)
            model.load_state_dict({k: v for k, v in saved["model"].items() if not k.endswith("_flag")})
            model.eval()
            norms, history = None, list(saved["history"])
            logger.info(f"the training before the window is {plain}'s (the same settings without the window): reused")
        else:
            model, norms, history = train_ffdnet(
                model, patches, cfg, device, common.patch_noise(settings, patches),
                m1.grad_mode if layers else None, layers, val_images, to_model, checkpoint)
    result = {"history": history, "seconds": timer.seconds}
    if window.has_window(cfg):  # the final window: its start is saved, where Method 3 and ldsTest begin
        opt.save_torch(common.window_start_file(settings), {"model": checkpoint_state(model)}, logger)
        noisy, clean, sigma, _ = attribution.training_triples(settings, device)
        with opt.Timer() as window_timer:
            window.train_window(model, noisy, clean, sigma, cfg, show_progress=True)
        run = window.window_run(cfg, len(clean))
        record = {"epoch": f"window ({cfg.window.epochs:g} epochs, {run.num_steps} steps)",
                  "val_psnr": validate(model, val_images, cfg.val_sigma, cfg.seed, device, to_model),
                  "seconds": round(window_timer.seconds, 2)}
        history.append(record)
        result["seconds_window"] = window_timer.seconds
        logger.info(f"final window: {run.num_steps} {cfg.window.optimizer} steps, lr {cfg.window.learning_rate:g} "
                    f"{cfg.window.lr_schedule} to 0, BatchNorm frozen, {window_timer.seconds:.0f} s; val PSNR "
                    f"{record['val_psnr']:.2f} dB")
    path = opt.save_torch(common.model_file(settings), {"model": checkpoint_state(model), "settings": opt.as_dict(settings.ffdnet),
                                                        "history": history}, logger)
    logger.info(f"trained in {timer.seconds + result.get('seconds_window', 0):.0f} s; final val PSNR "
                f"{history[-1].get('val_psnr', 0):.2f} dB")
    result["model"] = path
    if norms is None and layers:
        result["grad_norm"] = common.grad_norm_file(settings)  # reused with the training before the window
    if norms:
        table = [[os.path.basename(patches.files[int(k)]), int(r), int(c)]
                 for k, (r, c) in zip(patches.image_index, patches.position.tolist())]
        meta = {"settings": opt.as_dict(settings.ffdnet), "model_file": path, "grad_mode": m1.grad_mode,
                "layers": {f"l{layer}": {"module": f"main.{model.conv_index(layer)}.weight",
                                         "shape": list(norms[layer].shape)} for layer in layers},
                "n_train": len(patches), "files": [os.path.basename(f) for f in patches.files],
                "patches": table, "patch_columns": ["file", "row", "col"],
                "definition": "per patch and output channel: L2 norm of the weight gradient over input "
                              "channels, summed over the 3x3 taps and over all epochs"}
        result["grad_norm"] = opt.write_json_with_matrices(
            common.grad_norm_file(settings), {"meta": meta},
            {f"l{layer}": norms[layer].cpu().numpy() for layer in layers}, logger)
    return result


if __name__ == "__main__":
    opt.run_script(main, __doc__)
