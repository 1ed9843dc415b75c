"""Figure 4.5: Method 1's top training images for each test image under each stability model.

Reads:  the stability study's Method-1 files (staTest.py)
Writes: fig/staTest_{tag}_m1_t{test id}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test.plotting import stability_figures  # noqa: E402


def main(settings: opt.Settings) -> dict:
    return {"figures": stability_figures(settings, "m1", "top", "scores", ".0f", "m1")}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
