"""Benchmark: FFDNet attribution speed on the gray model of the quick profile (Train400).
- Method 2, pixel-level influence for ONE point over the first 5,000 training patches
  (LiSSA t=100, r=1, batch 8). Target (issue 7): <= 10 minutes on a 2-core CPU.
- Method 1 scores for 4 points of one test image over all training patches. Target: <= 10 s.

Needs the quick gray model: python ffdnet_test/FFDNet_Train.py -opt settings/shared.json -profile quick
Usage: python bench/bench_ffdnet_attribution.py [--image 01]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import m1_Test, m2_Test  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="01")
    parser.add_argument("--points", type=int, default=5000)
    args = parser.parse_args()
    base = opt.load_settings(opt.resolve_path("settings/shared.json"), "quick")
    m2 = opt.with_values(base, {"ffdnet": {"attribution": {"images": [args.image], "points": [[100, 100]]},
                                          "method2": {"max_train_points": args.points}}})
    start = time.perf_counter()
    result = m2_Test.main(m2)
    wall = time.perf_counter() - start
    info = result["info"]
    print(f"\nMethod 2, one pixel (window 3x3) + the whole image, {info['n_train']} patches, "
          f"{info['num_params']} parameters: {wall:.0f} s wall (s_test {info['seconds_s_test']:.0f} s, "
          f"sweep {info['seconds_sweep']:.0f} s); target <= 600 s")
    m1 = opt.with_values(base, {"ffdnet": {"attribution": {"images": [args.image]}}})
    start = time.perf_counter()
    files = m1_Test.main(m1)["files"]
    wall = time.perf_counter() - start
    meta = opt.read_json(files[args.image], "m1_Test")["meta"]
    print(f"Method 1, 4 points x 3 layers x 3 modes over {meta['n_train']} patches: scoring "
          f"{meta['seconds']:.2f} s, whole script {wall:.1f} s (incl. reading the norms); target <= 10 s")


if __name__ == "__main__":
    main()
