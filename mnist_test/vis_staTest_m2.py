"""Figures 4.6 / 4.7: Method 2's most helpful and most harmful training images for each test image
under each stability model.

Reads:  the stability study's Method-2 files (staTest.py)
Writes: fig/staTest_{tag}_m2_helpful_t{test id}.png and ..._m2_harmful_...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test.plotting import stability_figures  # noqa: E402


def main(settings: opt.Settings) -> dict:
    return {"figures": {kind: stability_figures(settings, "m2", kind, "influence", ".3g", f"m2_{kind}")
                        for kind in ("helpful", "harmful")}}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
