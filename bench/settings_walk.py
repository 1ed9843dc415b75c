"""How settings travel through a tree (issue 35's numbers): static counts over the scripts and libraries
(re-typings of a settings dict, dict reads of settings, validate round trips, the longest module and
function) and, in one real m2_Test run (LiSSA, 300 MNIST images, 1 epoch, 2 test images), how often the
solver is looked up, the settings re-typed and the solver's settings built.

    python3 bench/settings_walk.py [--root TREE]     # TREE: e.g. a git worktree of another commit
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import subprocess
import sys
import tempfile

RUN = r'''
import collections, os, sys, tempfile
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import utils_option as opt
import influence.solvers as S
import options.blocks as blocks
from mnist_test import Test, Train, m2_Test
settings = opt.load_settings(overrides={{"output_dir": tempfile.mkdtemp(), "mnist": {{"epoch": 1, "train_subset": 300,
    "test_ids": [0, 1], "method2": {{"training_points": 20, "recursion_nums": 1}}}}}})
Train.main(settings); Test.main(settings)
counts = collections.Counter()
def counted(key, function):
    def wrapper(*args, **kwargs):
        counts[key] += 1
        return function(*args, **kwargs)
    return wrapper
original_lookup, original_typed = S.solver_for, blocks.typed
lookup, retype = counted("solver lookups", original_lookup), counted("re-typings of a settings dict", original_typed)
for module in list(sys.modules.values()):
    if getattr(module, "solver_for", None) is original_lookup:
        module.solver_for = lookup
    if getattr(module, "typed", None) is original_typed:
        module.typed = retype
if hasattr(opt, "solver_settings"):  # before issue 35: one SolverSettings for every solver
    S.SolverSettings.__init__ = counted("solver settings built", S.SolverSettings.__init__)
else:
    S.Solver.settings_from = counted("solver settings built", S.Solver.settings_from)
m2_Test.main(settings)
print("RUN", dict(counts))
'''


def static_counts(root: str) -> str:
    code = [p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
            if not any(f"{os.sep}{d}{os.sep}" in p for d in ("tests", "bench", "data"))]
    def count(pattern: str, paths) -> int:
        return sum(len(re.findall(pattern, open(p, encoding="utf-8").read())) for p in paths)
    outside_loading = [p for p in code if f"{os.sep}options{os.sep}" not in p and not p.endswith("utils_option.py")]
    retype = count(r"\b(mnist|ffdnet|lds|explain)_cfg\((?!settings: dict)", code) + count(r"opt\.typed\(", code)
    reads = count(r'settings\[\s*"|settings\.get\(|\bs\["mnist"\]|\bs\["ffdnet"\]', outside_loading)
    modules = max((sum(1 for _ in open(p, encoding="utf-8")), os.path.relpath(p, root)) for p in code)
    longest = (0, "")
    for p in code:
        for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{os.path.relpath(p, root)}:{node.name}"))
    return (f"re-typings {retype}; dict reads of settings outside loading {reads}; validate round trips "
            f"{count(r'opt[.]validate[(]', code)}; longest module {modules[0]} ({modules[1]}); longest function "
            f"{longest[0]} ({longest[1]})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    print(static_counts(root))
    with tempfile.TemporaryDirectory():
        done = subprocess.run([sys.executable, "-c", RUN.format(root=root)], capture_output=True, text=True,
                              env={**os.environ, "MPLBACKEND": "Agg"})
    line = next((l for l in done.stdout.splitlines() if l.startswith("RUN ")), None)
    print(f"one m2_Test run: {line[4:] if line else 'failed: ' + done.stderr[-500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
