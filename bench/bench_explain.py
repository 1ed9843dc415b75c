"""Benchmark: the explainability grid for Method 2 helpful with relabelling, explanatory and random
(2 manipulations x 6 non-zero N values x 10 test images + the base model = 121 retrainings of 20
epochs at batch 8 on all 60,000 images), with expTrain.py as a user runs it. Target (issue 6):
<= 60 minutes on a 2-core CPU. Then expTest.py, the loss increase ratio at N = 5,000 and the flips.

Needs the base model's Method-2 file (m2_Test.py, report settings) in --output_dir; trains it if
missing. Usage: python bench/bench_explain.py [--output_dir results]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import Test, Train, common, expTest, expTrain, m2_Test  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="results")
    args = parser.parse_args()
    settings = opt.load_settings(profile="report", overrides={
        "output_dir": args.output_dir, "mnist": {"method": "method2", "newData": ["algo", "random"],
                                                 "explain": {"m2_lists": ["helpful"]}}})
    for module, path in ((Train, common.model_file(settings, "staTest0")),
                         (Test, common.test_file(settings, "staTest0")), (m2_Test, common.m2_file(settings))):
        if not os.path.isfile(path):
            module.main(settings)
    start = time.perf_counter()
    trained = expTrain.main(settings)
    minutes = (time.perf_counter() - start) / 60
    result = expTest.main(settings)
    record = opt.read_json(result["json"], "expTest")
    inc = record["increases"].get("method2_helpful/algo/n5000")
    print(f"\nexpTrain: {trained['trained']} models trained now ({trained['jobs']} in the grid) in "
          f"{minutes:.1f} min (target <= 60 min for 121)")
    if inc:
        print(f"N = 5,000, relabel: mean test-loss increase {inc['explanatory_increase']:+.3f} (explanatory) vs "
              f"{inc['random_increase']:+.3f} (random): ratio {inc['explanatory_increase'] / inc['random_increase']:.1f}")
    print(f"decision flips: {result['flips']}")


if __name__ == "__main__":
    main()
