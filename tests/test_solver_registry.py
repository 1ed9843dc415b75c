"""The solver registry: one class per solver is the only place its name, file part and damping live;
the settings check, file names and -h read it; adding a solver is one class; TracIn and TRAK report
what they computed."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import utils_if
import utils_option as opt
from influence import solvers
from tests.conftest import ROOT


def test_settings_check_file_names_and_help_read_the_registry():
    names = utils_if.solver_names("mnist")
    assert set(names) == {"lissa", "cg", "exact", "kfac", "ekfac", "kfac_factored", "arnoldi", "identity",
                          "tracin", "trak"}
    assert set(utils_if.solver_names("ffdnet")) == {"lissa", "cg", "exact", "kfac", "ekfac", "kfac_factored",
                                                    "identity"}
    settings = opt.load_settings()
    for name in names:
        opt.validate(opt.deep_merge(settings, {"mnist": {"method2": {"solver": name}}}), opt.SCHEMA)
        part = opt.solver_file_part(dataclasses.replace(opt.typed(settings).mnist.method2, solver=name))
        assert part.startswith(f"{name}_") and part.endswith("_l20.001")
    with pytest.raises(opt.SettingsError, match="arnoldi"):  # MNIST only
        opt.validate(opt.deep_merge(settings, {"ffdnet": {"method2": {"solver": "arnoldi"}}}), opt.SCHEMA)
    # LiSSA's file part carries the damping it really applies: damp x scale
    assert "_lam1_" in opt.solver_file_part(dataclasses.replace(opt.typed(settings).mnist.method2, solver="lissa")) + "_"
    text = subprocess.run([sys.executable, "mnist_test/m2_Test.py", "-h"], cwd=ROOT, capture_output=True,
                          text=True).stdout
    assert all(f"  {name} " in text for name in names), text


def test_a_new_solver_is_one_class_and_one_registration():
    @solvers.register
    class Halved(solvers.Solver):
        """(2 I)^-1: half the gradient dot product (a worked example, not a method)."""
        name = "halved_for_test"
        summary = "half the gradient dot product"

        def effective_damping(self, cfg):
            return 0.0

        def inverse_hvp(self, problem, vectors, x, y, cfg, info, show_progress=True):
            return vectors.detach() / 2
    try:
        settings = opt.load_settings()
        opt.validate(opt.deep_merge(settings, {"mnist": {"method2": {"solver": "halved_for_test"}}}), opt.SCHEMA)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LogSoftmax(dim=1)).double()
        problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model))
        x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
        half, info = utils_if.compute_influences(problem, x[:2], y[:2], x, y,
                                                 utils_if.SolverSettings(solver="halved_for_test"))
        dot, _ = utils_if.compute_influences(problem, x[:2], y[:2], x, y, utils_if.SolverSettings(solver="identity"))
        assert torch.allclose(half, dot / 2) and info["solver"] == "halved_for_test"
    finally:
        del solvers.SOLVERS["halved_for_test"]


def test_tracin_and_trak_report_what_they_computed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)).double()
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model))
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    cfg = utils_if.SolverSettings(solver="tracin", checkpoints=[(problem, 0.1), (problem, 0.05)])
    scores, info = utils_if.compute_influences(problem, x[:2], y[:2], x, y, cfg)
    dot, _ = utils_if.compute_influences(problem, x[:2], y[:2], x, y, utils_if.SolverSettings(solver="identity"))
    assert torch.allclose(scores, dot * 0.15)
    assert info["checkpoints"] == 2 and info["learning_rates"] == [0.1, 0.05] and "seconds_s_test" not in info
    scores, info = utils_if.compute_influences(problem, x[:2], y[:2], x, y,
                                               utils_if.SolverSettings(solver="trak", proj_dim=16))
    assert scores.shape == (2, 9) and info["proj_dim"] > 0 and info["seconds_total"] >= info["seconds_scores"] >= 0
    with pytest.raises(ValueError, match="inverse-HVP"):
        utils_if.inverse_hvp(problem, dot, x, y, utils_if.SolverSettings(solver="trak"))
