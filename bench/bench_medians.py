"""Nothing gets slower: the medians of Train.py, m2_Test (LiSSA and EK-FAC at the report's Method-2
settings) and m3_Test (quick profile), for this tree and a baseline commit, run interleaved so that
both see the same machine load.

    python bench/bench_medians.py                      # against refactor_reference.BASELINE
    python bench/bench_medians.py --against REV --repeats 5 --epochs 5 --m3_tests 2

Each stage runs in a fresh child process with the code of its tree (a git worktree for the
baseline), 1 torch thread, real MNIST (all 60,000 images), the quick profile's 5 epochs, and its own
output folder; the time is the stage's main() alone (imports and data loading included, as a user
sees it). Prints one table of medians (seconds) and the ratio now / baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from refactor_reference import BASELINE, ROOT, worktree  # noqa: E402

STAGE = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import utils_option as opt
from mnist_test import Test, Train, m2_Test, m3_Test
settings = opt.load_settings(profile="quick", overrides={{"output_dir": {out!r}, "threads": 1,
    "mnist": {{"epoch": {epochs}, "method3": {{"test_sample_num": {m3_tests}}}}}}})
stage = {stage!r}
module = {{"train": Train, "test": Test, "m2_lissa": m2_Test, "m2_ekfac": m2_Test, "m3": m3_Test}}[stage]
if stage == "m2_ekfac":  # the factors are computed every time (a kept factor file would be read)
    import shutil
    shutil.rmtree(opt.output_path(settings, "if", "factors"), ignore_errors=True)
    settings = getattr(opt, "with_values", opt.deep_merge)(settings, {{"mnist": {{"method2": {{"solver": "ekfac"}}}}}})
start = time.perf_counter()
module.main(settings)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
STAGES = ("train", "test", "m2_lissa", "m2_ekfac", "m3")  # test: chooses the test images the others read


def time_stage(root: str, out: str, stage: str, args) -> float:
    code = STAGE.format(root=root, out=out, stage=stage, epochs=args.epochs, m3_tests=args.m3_tests)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{stage} at {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default=BASELINE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--m3_tests", type=int, default=2)
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": worktree(args.against, os.path.join(tmp, "baseline")), "now": ROOT}
        try:
            for repeat in range(args.repeats):
                for stage in STAGES:
                    for name, root in trees.items():
                        seconds = time_stage(root, os.path.join(tmp, f"out_{name}"), stage, args)
                        times.setdefault((stage, name), []).append(seconds)
                        print(f"repeat {repeat + 1}/{args.repeats} {stage:<9} {name:<8} {seconds:7.2f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", trees["baseline"]], check=False)
    print(f"\nmedians over {args.repeats} runs, 1 thread ({args.epochs} epochs, all 60,000 images; "
          f"m3: {args.m3_tests} test images)")
    print("| stage | baseline (s) | now (s) | now / baseline |\n|---|---|---|---|")
    for stage in STAGES:
        base, now = statistics.median(times[(stage, "baseline")]), statistics.median(times[(stage, "now")])
        print(f"| {stage} | {base:.2f} | {now:.2f} | {now / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
