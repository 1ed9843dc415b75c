"""The solver registry: one class per solver is the only place its name, file part and damping live;
the settings check, file names and -h read it; adding a solver is one class; TracIn and TRAK report
what they computed."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import utils_if
import utils_option as opt
from influence import solvers
from tests.conftest import ROOT


def test_settings_check_file_names_and_help_read_the_registry():
    from options.method2 import NETWORKS
    mnist, ffdnet = opt.offered_solvers("mnist"), opt.offered_solvers("ffdnet")
    assert mnist == tuple(solvers.SOLVERS)  # every registered solver attributes a classifier
    assert ffdnet == tuple(n for n, s in solvers.SOLVERS.items()
                           if "regression" in s.tasks and n not in NETWORKS["ffdnet"].not_offered)
    assert "trak" not in ffdnet and "lissa" in ffdnet  # TRAK scores a class margin; the denoiser has none
    settings = opt.load_settings()
    blocks = opt.typed(settings)
    for name in mnist:
        opt.with_values(settings, {"mnist": {"method2": {"solver": name}}})
        part = opt.solver_file_part(dataclasses.replace(blocks.mnist.method2, solver=name))
        assert part.startswith(f"{name}_") and part.endswith("_l20.001")
        # every setting the solver declares is a key of both blocks that offer it, under its own name
        for f in solvers.SOLVERS[name].Settings.setting_fields():
            assert f"mnist.method2.{f.name}" in opt.SCHEMA
            assert name not in ffdnet or f"ffdnet.method2.{f.name}" in opt.SCHEMA
    with pytest.raises(opt.SettingsError, match="arnoldi"):  # not offered on the denoiser
        opt.with_values(settings, {"ffdnet": {"method2": {"solver": "arnoldi"}}})
    # LiSSA's file part carries the damping it really applies: damp x scale
    assert "_lam1_" in opt.solver_file_part(dataclasses.replace(blocks.mnist.method2, solver="lissa")) + "_"
    # the denoiser's block holds its own defaults, never MNIST's
    assert (blocks.ffdnet.method2.recursion_depth, blocks.ffdnet.method2.repeats) == (100, 1)
    assert blocks.ffdnet.method2.fisher == "empirical" and blocks.mnist.method2.fisher == "true"
    text = subprocess.run([sys.executable, "mnist_test/m2_Test.py", "-h"], cwd=ROOT, capture_output=True,
                          text=True).stdout
    assert all(f"  {name} " in text for name in mnist), text


def test_renamed_keys_are_read_under_their_new_names_and_said(tmp_path):
    settings = opt.load_settings(overrides={"mnist": {"method2": {"training_points": 77}}},
                                 assignments=["ffdnet.method2.recursion_nums=3"])
    blocks = opt.typed(settings)
    assert blocks.mnist.method2.recursion_depth == 77 and blocks.ffdnet.method2.repeats == 3
    assert any("mnist.method2.training_points is now mnist.method2.recursion_depth" in line
               for line in settings.source.renamed)
    assert "-set: ffdnet.method2.recursion_nums is now ffdnet.method2.repeats (read as ffdnet.method2.repeats)" \
        in settings.source.renamed


def _docs_example() -> str:
    """The solver of docs/methods.md's "Adding a solver", as the page shows it."""
    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    section = text[text.index("## Adding a solver"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def test_a_new_solver_with_its_own_setting_is_one_class_in_one_file(tmp_path):
    """docs/methods.md's example, appended to influence/solvers.py of a copy of the repository (the one
    file touched): m2_Test runs it with its own setting, -h lists both, an ldsTest row scores it, and
    the test suite still collects."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "repo"
    for rel in listed:
        if rel.startswith(("results/", "data/MNIST")) or not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), copy / rel)
    with open(copy / "influence" / "solvers.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + _docs_example() + "\n")
    out = tmp_path / "out"
    small = ["-set", f"output_dir={out}", "-set", "mnist.train_subset=300", "-set", "mnist.epoch=1",
             "-set", "mnist.test_num=2", "-set", "mnist.test_rank_step=10"]

    def run(*args):
        done = subprocess.run([sys.executable, *args], cwd=copy, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    helped = run("mnist_test/m2_Test.py", "-h")
    assert "  scaled_identity " in helped and "mnist.method2.identity_scale = 2.0" in helped
    run("mnist_test/Train.py", *small)
    run("mnist_test/Test.py", *small)
    chosen = ["-set", "mnist.method2.solver=scaled_identity", "-set", "mnist.method2.identity_scale=4"]
    run("mnist_test/m2_Test.py", *small, *chosen)
    run("mnist_test/m2_Test.py", *small, "-set", "mnist.method2.solver=identity")
    files = {name: json.load(open(os.path.join(out, "if", name))) for name in os.listdir(out / "if")
             if name.endswith(".json")}
    scaled = next(r for n, r in files.items() if n.startswith("if_scaled_identity_c4_"))
    plain = next(r for n, r in files.items() if n.startswith("if_identity_"))
    assert scaled["meta"]["solver_info"]["effective_damping"] == 4
    for position in ("0", "1"):
        assert np.allclose(np.array(scaled[position]["influence"]) * 4, plain[position]["influence"],
                           rtol=1e-5, atol=1e-12)
    lds = ["-set", "mnist.lds.train_subset=120", "-set", "mnist.lds.test_ids=4", "-set", "mnist.lds.num_subsets=3",
           "-set", "mnist.lds.seeds_per_subset=1", "-set", "mnist.lds.epoch=1", "-set", "mnist.lds.ensemble_seeds=[0]",
           "-set", "mnist.lds.bootstrap=10", "-set", "mnist.lds.loo.test_num=0",
           "-set", 'mnist.lds.methods=["if_scaled_identity","grad_dot"]']
    run("mnist_test/ldsTest.py", *small, *lds, "-set", "mnist.method2.identity_scale=4")
    table = json.load(open(next(os.path.join(out, "test", n) for n in os.listdir(out / "test")
                                if n.startswith("lds_") and n.endswith(".json"))))
    rows = {row["method"]: row["lds"] for row in table["rows"]}
    assert rows["if_scaled_identity"] == pytest.approx(rows["grad_dot"])  # a positive scale ranks as the dot product
    collected = run("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests")
    assert " error" not in collected and "tests collected" in collected


def test_tracin_and_trak_report_what_they_computed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)).double()
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model))
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    cfg = utils_if.solver_config("tracin", checkpoints=[(problem, 0.1), (problem, 0.05)])
    scores, info = utils_if.compute_influences(problem, x[:2], y[:2], x, y, cfg)
    dot, _ = utils_if.compute_influences(problem, x[:2], y[:2], x, y, utils_if.solver_config("identity"))
    assert torch.allclose(scores, dot * 0.15)
    assert info["checkpoints"] == 2 and info["learning_rates"] == [0.1, 0.05] and "seconds_s_test" not in info
    scores, info = utils_if.compute_influences(problem, x[:2], y[:2], x, y,
                                               utils_if.solver_config("trak", proj_dim=16))
    assert scores.shape == (2, 9) and info["proj_dim"] > 0 and info["seconds_total"] >= info["seconds_scores"] >= 0
    with pytest.raises(ValueError, match="inverse-HVP"):
        utils_if.inverse_hvp(problem, dot, x, y, utils_if.solver_config("trak"))
