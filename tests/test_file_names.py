"""Result file names are determined by every setting that changes their content."""
import pytest

import utils_option as opt
from ffdnet_test import common as fcommon
from mnist_test import common as mcommon

BASE = opt.load_settings(profile="report")

MNIST_M2_CHANGES = [
    {"solver": "cg"}, {"solver": "exact"}, {"solver": "ekfac"}, {"solver": "kfac"}, {"solver": "identity"},
    {"damp": 0.02}, {"scale": 200}, {"stochastic": True}, {"hvp_batch_size": 16}, {"recursion_nums": 3},
    {"training_points": 500}, {"params": ["main.4"]}, {"l2_reg": 0.0},
]
SOLVER_SPECIFIC = [  # settings that only matter for one solver: changed with that solver chosen
    ({"solver": "cg"}, {"cg_tol": 1e-4}), ({"solver": "cg"}, {"cg_max_iter": 50}),
    ({"solver": "cg"}, {"hessian_points": 1000}), ({"solver": "exact"}, {"hessian_points": 1000}),
    ({"solver": "ekfac"}, {"fisher": "empirical"}), ({"solver": "ekfac"}, {"kfac_damp_factor": 0.5}),
    ({"solver": "exact"}, {"damp": 0.5}),
]


def with_m2(side: str, change: dict) -> dict:
    return opt.deep_merge(BASE, {side: {"method2": change}})


@pytest.mark.parametrize("change", MNIST_M2_CHANGES)
def test_mnist_influence_name_changes_with_each_setting(change):
    assert mcommon.m2_file(with_m2("mnist", change)) != mcommon.m2_file(BASE)


@pytest.mark.parametrize("base, change", SOLVER_SPECIFIC)
def test_solver_specific_settings_change_the_name(base, change):
    chosen = with_m2("mnist", base)
    assert mcommon.m2_file(opt.deep_merge(chosen, {"mnist": {"method2": change}})) != mcommon.m2_file(chosen)


def test_mnist_names_other_settings():
    assert mcommon.m2_file(opt.deep_merge(BASE, {"mnist": {"test_ids": "all"}})).endswith("_all.json")
    tracin = with_m2("mnist", {"solver": "tracin"})
    assert mcommon.m2_file(opt.deep_merge(tracin, {"mnist": {"checkpoint_every": 2}})) != mcommon.m2_file(tracin)
    lissa_label = mcommon.m2_file(BASE)
    assert "lam1_" in lissa_label  # damp 0.01 x scale 100: the damping LiSSA really applies


FFDNET_M2_CHANGES = [{"solver": "cg"}, {"damp": 0.1}, {"scale": 50}, {"l2_reg": 0.01}, {"stochastic": True},
                     {"params": ["main.0"]}, {"max_train_points": 100}, {"window": 3}, {"training_points": 50}]


@pytest.mark.parametrize("change", FFDNET_M2_CHANGES)
def test_ffdnet_m2_name_changes_with_each_setting(change):
    assert fcommon.m2_result_file(with_m2("ffdnet", change), "01") != fcommon.m2_result_file(BASE, "01")


@pytest.mark.parametrize("change", [{"test": {"noise_level_img": 50}}, {"test": {"is_clip": False}},
                                    {"method1": {"outlim": 3}}, {"method1": {"activation": "conv"}},
                                    {"method1": {"grad_mode": "per_sample"}}, {"method1": {"layers": [1]}}])
def test_ffdnet_m1_name_changes_with_each_setting(change):
    changed = opt.deep_merge(BASE, {"ffdnet": change})
    assert fcommon.m1_result_file(changed, "01") != fcommon.m1_result_file(BASE, "01")
    if "test" in change:
        assert fcommon.m2_result_file(changed, "01") != fcommon.m2_result_file(BASE, "01")
