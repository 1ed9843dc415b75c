"""A training patch index -> its source image, position and crop.

Usage: python ffdnet_test/m1_PatchImg.py [-opt FILE] [-patch 123 456 ...]
Writes: fig/ffdnet_patches/{tag}_patch{index}.png (the clean crop) and prints where it comes from.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import common, metrics  # noqa: E402


def main(settings: opt.Settings, indices: list[int] | None = None) -> dict:
    logger = opt.make_logger(settings, "ffdnet_m1_PatchImg")
    patches = common.train_patches(settings)
    indices = indices if indices is not None else [0, len(patches) - 1]
    from PIL import Image
    found = {}
    for index in indices:
        try:
            where = patches.locate(index)
        except IndexError as err:
            raise opt.SettingsError(str(err)) from None
        crop = metrics.to_uint8(patches.clean[index])
        path = opt.output_path(settings, "fig", "ffdnet_patches", f"{common.run_tag(settings)}_patch{index}.png")
        Image.fromarray(crop[..., 0] if crop.shape[2] == 1 else crop).save(path)
        logger.info(f"patch {index}: {os.path.basename(where['file'])} rows {where['row']}-"
                    f"{where['row'] + where['size'] - 1}, cols {where['col']}-{where['col'] + where['size'] - 1} -> {path}")
        found[index] = {**where, "png": path}
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-patch", type=int, nargs="+")
    known, rest = parser.parse_known_args()
    settings = opt.script_settings(__doc__, rest)
    opt.settings_or_exit(lambda: main(settings, known.patch))
