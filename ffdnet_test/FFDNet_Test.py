"""Denoise a test set at one noise level and measure PSNR / SSIM per image and on average.

Noise: clean + N(0, sigma/255) with sigma = ffdnet.test.noise_level_img (one setting),
seeded per image (seed + image number); with is_clip the noisy input is
quantised to 8 bits as in the original. The model gets the images in its channel order
(ffdnet.channel_order: bgr for the original author's checkpoint).

Reads:  the model (ffdnet.test.model: "" = the one FFDNet_Train.py wrote for these settings, a .pth
        path, or "official" = KAIR's colour weights), ffdnet.test_dir (sorted file names)
Writes: test/ffdnet/{model}_{set}_s{sigma}[_noclip].json (per image psnr, ssim; averages; meta)
        and, with save_images, fig/ffdnet_test/{model}_{set}_s{sigma}/{name}_L.png and {name}_E.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import common, datasets, metrics  # noqa: E402


def denoise_folder(settings: opt.Settings, model, device, logger=None, save_dir: str | None = None) -> list[dict]:
    """PSNR/SSIM rows for every image of ffdnet.test_dir."""
    cfg = settings.ffdnet
    test = cfg.test
    sigma = test.noise_level_img
    files, images = datasets.read_folder(common.folder(settings, "test_dir"), cfg.is_gray)
    rows = []
    for k, (path, clean) in enumerate(opt.progress(list(zip(files, images)), desc="denoise",
                                                   disable=logger is None, leave=False)):
        noisy = common.noisy_test_image(clean, sigma, cfg.seed + k, test.is_clip)
        denoised = metrics.to_uint8(common.denoise(model, noisy, settings, device))
        reference = metrics.to_uint8(clean)
        noisy8 = metrics.to_uint8(noisy)
        name = os.path.splitext(os.path.basename(path))[0]
        rows.append({"image": name, "psnr": metrics.psnr(denoised, reference, test.border),
                     "ssim": metrics.ssim(denoised, reference, test.border),
                     "psnr_noisy": metrics.psnr(noisy8, reference, test.border)})
        if save_dir is not None:
            from PIL import Image
            os.makedirs(save_dir, exist_ok=True)  # made on the first image: a failed run leaves no empty folder
            for tag, array in (("L", noisy8), ("E", denoised)):
                Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
                    os.path.join(save_dir, f"{name}_{tag}.png"))
    return rows


def main(settings: opt.Settings) -> dict:
    cfg = settings.ffdnet
    test = cfg.test
    logger, device = opt.start_script(settings, "ffdnet_Test", cfg)
    model, model_path = common.load_model(settings, device, logger)
    set_name = os.path.basename(os.path.normpath(cfg.test_dir))
    stem = (f"{os.path.splitext(os.path.basename(model_path))[0]}_{set_name}_s{test.noise_level_img:g}"
            f"{'' if test.is_clip else '_noclip'}{'_bgr' if cfg.channel_order == 'bgr' else ''}")
    save_dir = os.path.join(opt.resolve_path(settings.output_dir), "fig", "ffdnet_test", stem) \
        if test.save_images else None
    try:
        rows = denoise_folder(settings, model, device, logger, save_dir)
    except datasets.ImageFolderError as err:
        raise opt.SettingsError(str(err)) from None
    logger.info(f"{'image':<14} {'noisy dB':>9} {'PSNR dB':>8} {'SSIM':>7}")
    for row in rows:
        logger.info(f"{row['image']:<14} {row['psnr_noisy']:>9.2f} {row['psnr']:>8.2f} {row['ssim']:>7.4f}")
    average = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "psnr_noisy")}
    logger.info(f"{'average':<14} {average['psnr_noisy']:>9.2f} {average['psnr']:>8.2f} {average['ssim']:>7.4f}"
                f"   ({set_name}, sigma {test.noise_level_img:g}, is_clip {test.is_clip})")
    path = opt.write_json(opt.output_path(settings, "test", "ffdnet", stem + ".json"), {
        "images": rows, "average": average, "meta": {
            "model_file": model_path, "test_dir": cfg.test_dir, "sigma": test.noise_level_img,
            "is_clip": test.is_clip, "channel_order": cfg.channel_order, "seed": cfg.seed,
            "border": test.border, "images_dir": save_dir}}, logger)
    return {"test_file": path, "average": average, "rows": rows}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
