"""Behaviour unchanged, proven: every number the toolkit writes for a fixed set of small real runs,
written once before a refactor and compared number for number after it.

    python bench/refactor_reference.py                   # this tree against BASELINE (a commit, below)
    python bench/refactor_reference.py --against REV     # ... against any other commit
    python bench/refactor_reference.py --write out.json  # only run here and write the numbers

The baseline's numbers are made afresh from a git worktree of that commit (its own code, this
clone's data folders linked in), so no reference file has to live in the repository: exit 0 and
one line when every number matches, exit 1 and a list of the differences otherwise.

What runs (threads 1, real MNIST, real photographs from the scikit-image wheel that the tests use,
all in a temporary folder; about 3 minutes on one core):
- MNIST: Train, Test, m1_Test, m2_Test with every Method-2 solver (lissa, cg, exact on the last
  layer, kfac, ekfac, kfac_factored, arnoldi, identity, trak, tracin), m3_Test;
- ldsTest in the algorithm setting (Method 1, EK-FAC, CG, TRAK, Arnoldi, ensembles, LOO) and in the
  single-model setting (Method 3's replay among the methods);
- FFDNet: a tiny training, then m2_Test's pixel-window influence with LiSSA and EK-FAC.

Every number of every JSON/CSV result is compared: bitwise where the arithmetic did not change is
not asked, but 1e-6 relative (and 1e-9 absolute, for numbers that are zero up to rounding) is. Keys
that hold times, dates, paths, hashes of code or the log are left out.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import zipfile

import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "8bcc83e"  # the last commit before the influence/ package (issue 27)
# intended renames since the baseline: {old name: new name}, compared as one file
RENAMED = {"results/test/mnist_e1b8s0n400_staTest0_test.json":  # Test.py's file names its selection (issue 28)
           "results/test/mnist_e1b8s0n400_staTest0_lr3x50_test.json",
           # the LDS report's hash covers lds.lissa_deep, whose keys are LiSSA's own names now (issue 35)
           **{f"lds/test/lds_n300e2f0.5_1d7eedea_{old}.{ext}": f"lds/test/lds_n300e2f0.5_1d7eedea_{new}.{ext}"
              for old, new in (("r717b7d", "r549cf0"), ("single_r0ca257", "single_r24649a")) for ext in ("csv", "json")}}
# intended renames of settings keys and values (issue 35: the block's keys are the solvers' own names)
RENAMED_KEYS = {".training_points": ".recursion_depth", ".recursion_nums": ".repeats", ".method3.window": ".window"}
RENAMED_VALUES = {"relu_mlp": "folded_mlp"}  # LiSSA's folded path runs softplus MLPs too
RENAMED_TEXT = {"raise training_points": "raise recursion_depth",  # within messages
                "_r717b7d": "_r549cf0", "_single_r0ca257": "_single_r24649a"}  # the LDS report's names (above)
SKIPPED_KEYS = ("seconds", "time", "date", "when", "path", "file", "log", "peak", "rss", "elapsed", "started",
                "host", "torch", "threads_used", "git")

MNIST = {"epoch": 1, "train_subset": 400, "test_ids": "loss_rank", "test_num": 3, "test_rank_step": 50,
         "checkpoint_every": 1,
         "method2": {"training_points": 50, "recursion_nums": 2, "chunk_size": 150, "test_sample_num": 3,
                     "arnoldi_iterations": 30, "arnoldi_rank": 10, "proj_dim": 256, "cg_max_iter": 30},
         "method3": {"test_sample_num": 3}}
SOLVERS = [{"solver": "lissa"}, {"solver": "cg", "damp": 1.0, "write_unconverged": True}, {"solver": "exact", "params": ["main.4"]},
           {"solver": "kfac"}, {"solver": "ekfac"}, {"solver": "kfac_factored"}, {"solver": "arnoldi"},
           {"solver": "identity"}, {"solver": "trak"}, {"solver": "tracin"}]
LDS = {"train_subset": 300, "test_ids": 6, "num_subsets": 6, "seeds_per_subset": 2, "epoch": 2, "group_size": 4,
       "methods": ["m1_batch_raw", "m1_per_sample_normalized", "if_ekfac", "if_kfac_factored", "grad_dot", "if_cg",
                   "ensemble_if_ekfac", "trak", "if_arnoldi", "if_lissa"],
       "ensemble_seeds": [0, 1], "solver_test_num": 3, "cg_damps": [1.0], "cg_max_iter": 30, "bootstrap": 50,
       "ekfac_damp_factors": [1.0], "kfac_factored_damp_factors": [], "method3_test_num": 6,
       "loo": {"test_num": 1, "k": 2, "seeds": 2, "rank_by": "if_ekfac"}}
LDS_SINGLE = {**LDS, "setting": "single_model", "drop_fractions": [0.05], "num_subsets": 5,
              "methods": ["m1_batch_raw", "if_ekfac", "grad_dot", "m3_replay"], "loo": {"test_num": 0}}


def _photos(folder: str, names: list[tuple[str, str]], size: int) -> str:
    """Gray centre crops of the scikit-image wheel's photographs (the tests' images)."""
    from PIL import Image

    from data.ffdnet_data import DATA_ROOT, _pip_download
    wheel = _pip_download("scikit-image", os.path.join(DATA_ROOT, "downloads"), lambda *_: None)
    if wheel is None:
        sys.exit("refactor_reference: the scikit-image wheel is not reachable (PyPI): no FFDNet photographs")
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for photo, target in names:
            image = Image.open(io.BytesIO(z.read(f"skimage/data/{photo}"))).convert("L")
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            image.crop((left, top, left + size, top + size)).save(os.path.join(folder, target))
    return folder


def run_all(out: str) -> None:
    """Every run of the reference, into ``out``."""
    import torch

    import utils_option as opt
    from mnist_test import Test, Train, ldsTest, m1_Test, m2_Test, m3_Test
    torch.set_num_threads(1)
    base = {"output_dir": os.path.join(out, "results"), "threads": 1}
    vary = getattr(opt, "with_values", opt.deep_merge)  # typed settings (issue 35) or the dicts before them
    settings = opt.load_settings(overrides={**base, "mnist": MNIST})
    for module in (Train, Test, m1_Test):
        module.main(settings)
    for solver in SOLVERS:
        m2_Test.main(vary(settings, {"mnist": {"method2": solver}}))
    m3_Test.main(settings)
    lds_base = {**base, "output_dir": os.path.join(out, "lds")}
    ldsTest.main(opt.load_settings(overrides={**lds_base, "mnist": {**MNIST, "lds": LDS}}))
    ldsTest.main(opt.load_settings(overrides={**lds_base, "mnist": {**MNIST, "lds": LDS_SINGLE}}))

    from ffdnet_test import FFDNet_Train
    from ffdnet_test import m2_Test as ffdnet_m2
    test_dir = _photos(os.path.join(out, "photos_test"), [("camera.png", "01.png"), ("coins.png", "02.png")], 256)
    train_dir = _photos(os.path.join(out, "photos_train"),
                        [("astronaut.png", "test_001.png"), ("chelsea.png", "test_002.png")], 180)
    ffdnet = opt.load_settings(overrides={**base, "output_dir": os.path.join(out, "ffdnet"), "ffdnet": {
        "train_dir": train_dir, "max_patches": 40, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8,
        "val_dir": test_dir, "test_dir": test_dir,
        "attribution": {"images": ["01"], "points": [[20, 30], [200, 220]], "vis_num": 3},
        "method2": {"training_points": 5, "max_train_points": 40, "chunk_size": 16, "scale": 1000}}})
    FFDNet_Train.main(ffdnet)
    ffdnet_m2.main(ffdnet)
    ffdnet_m2.main(vary(ffdnet, {"ffdnet": {"method2": {"solver": "ekfac"}}}))


def _numbers(node, prefix: str, out: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if any(word in str(key).lower() for word in SKIPPED_KEYS):
                continue
            _numbers(value, f"{prefix}.{key}", out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _numbers(value, f"{prefix}[{i}]", out)
    elif isinstance(node, bool) or node is None:
        out[prefix] = node
    elif isinstance(node, (int, float)):
        out[prefix] = float(node)
    elif isinstance(node, str) and not os.path.sep in node:
        out[prefix] = node


def collect(out: str) -> dict:
    """{relative file path: {flattened key: value}} for every JSON and CSV result under ``out``."""
    found: dict[str, dict] = {}
    for folder, _, files in os.walk(out):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if rel.startswith("photos") or "/logs/" in f"/{rel}":
                continue
            if name.endswith(".json"):
                with open(path) as f:
                    record = json.load(f)
            elif name.endswith(".csv"):
                import csv
                with open(path, newline="") as f:
                    record = [{k: _maybe_float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            else:
                continue
            values: dict = {}
            _numbers(record, "", values)
            found[rel] = values
    return found


def _maybe_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def compare(reference: dict, now: dict, rtol: float = 1e-6, atol: float = 1e-9) -> tuple[list[str], list[str]]:
    """(one line per difference: a file or key missing or new, a value off; one line per key that only
    the new code writes: added information, e.g. TracIn's learning rates, reported but not a failure)."""
    problems = [f"missing file {f}" for f in sorted(set(reference) - set(now))]
    problems += [f"new file {f}" for f in sorted(set(now) - set(reference))]
    added: list[str] = []
    for name in sorted(set(reference) & set(now)):
        ref, cur = reference[name], now[name]
        problems += [f"{name}: key {k} missing" for k in sorted(set(ref) - set(cur))][:5]
        added += [f"{name}: new key {k}" for k in sorted(set(cur) - set(ref))][:5]
        off = 0
        for key in sorted(set(ref) & set(cur)):
            a, b = ref[key], cur[key]
            if isinstance(a, float) and isinstance(b, float):
                same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + rtol * abs(a)
            else:
                same = a == b
            if not same:
                off += 1
                if off <= 5:
                    problems.append(f"{name}: {key} was {a!r}, now {b!r}")
        if off > 5:
            problems.append(f"{name}: {off} values differ in all")
    return problems, added


def _renamed_key(key: str) -> str:
    for old, new in RENAMED_KEYS.items():
        key = key.replace(old, new)
    return key


def _rows_by_method(values: dict) -> dict:
    """A table's rows keyed by their method, not their position: rows of exactly equal LDS (a rank
    correlation over a few subsets ties often) are ordered by name since issue 35, by insertion before."""
    import re
    methods = {}
    for key, value in values.items():
        found = re.match(r"^(.*\.rows|)\[(\d+)\]\.method$", key)
        if found:
            methods[(found.group(1), found.group(2))] = value
    if not methods:
        return values
    out = {}
    for key, value in values.items():
        found = re.match(r"^(.*\.rows|)\[(\d+)\](\..*)$", key)
        if found and (found.group(1), found.group(2)) in methods:
            key = f"{found.group(1)}[{methods[(found.group(1), found.group(2))]}]{found.group(3)}"
        out[key] = value
    return out


def _renamed_value(value):
    if not isinstance(value, str):
        return value
    value = RENAMED_VALUES.get(value, value)
    for old, new in RENAMED_TEXT.items():
        value = value.replace(old, new)
    return value


def numbers_at(root: str, out_json: str) -> dict:
    """Run the reference with the code of the tree at ``root`` (a subprocess) and read its numbers."""
    command = [sys.executable, os.path.abspath(__file__), "--write", out_json, "--root", root]
    done = subprocess.run(command, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the reference run at {root} failed:\n{done.stderr[-3000:]}")
    with open(out_json) as f:
        return json.load(f)


def worktree(rev: str, folder: str) -> str:
    """A detached git worktree of ``rev`` with this clone's (ignored) data folders linked in."""
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", folder, rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for data in ("data/MNIST", "data/downloads", "data/ffdnet", "data/weights"):
        if os.path.exists(os.path.join(ROOT, data)) and not os.path.exists(os.path.join(folder, data)):
            os.symlink(os.path.join(ROOT, data), os.path.join(folder, data))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default=BASELINE, help="the commit whose numbers are the reference")
    parser.add_argument("--write", default="", help="only run (with the code at --root) and write the numbers here")
    parser.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="", help="numbers written earlier with --write (instead of --against)")
    parser.add_argument("--now", default="", help=argparse.SUPPRESS)  # numbers of this tree written earlier
    args = parser.parse_args()
    if args.write:
        sys.path.insert(0, args.root)
        with tempfile.TemporaryDirectory() as tmp:
            run_all(tmp)
            found = collect(tmp)
        with open(args.write, "w") as f:
            json.dump(found, f)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference:
            with open(args.reference) as f:
                reference = json.load(f)
        else:
            base = worktree(args.against, os.path.join(tmp, "baseline"))
            try:
                reference = numbers_at(base, os.path.join(tmp, "reference.json"))
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], check=False)
        if args.now:
            with open(args.now) as f:
                now = json.load(f)
        else:
            now = numbers_at(ROOT, os.path.join(tmp, "now.json"))
    reference = {RENAMED.get(name, name): _rows_by_method({_renamed_key(k): _renamed_value(v) for k, v in values.items()})
                 for name, values in reference.items()}
    now = {name: _rows_by_method(values) for name, values in now.items()}
    problems, added = compare(reference, now)
    count = sum(len(v) for v in reference.values())
    for line in added[:10]:
        print(f"added (not compared): {line}")
    if len(added) > 10:
        print(f"... {len(added) - 10} more added keys (new settings blocks in every file's meta, new info)")
    against = args.reference or args.against
    if problems:
        print("\n".join(problems))
        print(f"DIFFERENT: {len(problems)} problems against {against}")
        return 1
    print(f"same as {against}: {len(reference)} result files, {count} numbers within 1e-6 relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
