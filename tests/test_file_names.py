"""Result file names are determined by every setting that changes their content."""
import tempfile

import pytest

import utils_option as opt
from ffdnet_test import common as fcommon
from mnist_test import common as mcommon

# the path builders create their folders: under a temporary output_dir, never the clone's results/
BASE = opt.load_settings(profile="report", overrides={"output_dir": tempfile.mkdtemp(prefix="toolkit-file-names-")})

MNIST_M2_CHANGES = [
    {"solver": "cg"}, {"solver": "exact"}, {"solver": "ekfac"}, {"solver": "kfac"}, {"solver": "identity"},
    {"damp": 0.02}, {"scale": 200}, {"stochastic": True}, {"hvp_batch_size": 16}, {"repeats": 3},
    {"recursion_depth": 500}, {"params": ["main.4"]}, {"l2_reg": 0.0},
]
SOLVER_SPECIFIC = [  # settings that only matter for one solver: changed with that solver chosen
    ({"solver": "cg"}, {"cg_tol": 1e-4}), ({"solver": "cg"}, {"cg_max_iter": 50}),
    ({"solver": "cg"}, {"hessian_points": 1000}), ({"solver": "exact"}, {"hessian_points": 1000}),
    ({"solver": "ekfac"}, {"fisher": "empirical"}), ({"solver": "ekfac"}, {"kfac_damp_factor": 0.5}),
    ({"solver": "exact"}, {"damp": 0.5}),
]


def with_m2(side: str, change: dict) -> dict:
    return opt.with_values(BASE, {side: {"method2": change}})


@pytest.mark.parametrize("change", MNIST_M2_CHANGES)
def test_mnist_influence_name_changes_with_each_setting(change):
    assert mcommon.m2_file(with_m2("mnist", change)) != mcommon.m2_file(BASE)


@pytest.mark.parametrize("base, change", SOLVER_SPECIFIC)
def test_solver_specific_settings_change_the_name(base, change):
    chosen = with_m2("mnist", base)
    assert mcommon.m2_file(opt.with_values(chosen, {"mnist": {"method2": change}})) != mcommon.m2_file(chosen)


def test_mnist_names_other_settings():
    assert "_all_" in mcommon.m2_file(opt.with_values(BASE, {"mnist": {"test_ids": "all"}}))
    for change in ({"test_ids": [1, 2]}, {"test_ids": [1, 3]}, {"test_num": 5}, {"test_rank_step": 500},
                   {"method2": {"test_sample_num": 3}}, {"method2": {"top_k": 7}}):
        changed = opt.with_values(BASE, {"mnist": change})
        assert mcommon.m2_file(changed) != mcommon.m2_file(BASE), change
    for change in ({"test_ids": [1, 2]}, {"test_num": 5}, {"method1": {"top_k": 7}}, {"method1": {"layers": ["fc1"]}}):
        assert mcommon.m1_file(opt.with_values(BASE, {"mnist": change})) != mcommon.m1_file(BASE), change
    tracin = with_m2("mnist", {"solver": "tracin"})
    assert mcommon.m2_file(opt.with_values(tracin, {"mnist": {"checkpoint_every": 2}})) != mcommon.m2_file(tracin)
    lissa_label = mcommon.m2_file(BASE)
    assert "lam1_" in lissa_label  # damp 0.01 x scale 100: the damping LiSSA really applies


def test_thread_count_activation_and_method3_settings_change_the_names():
    """Another thread count sums in another order (other weights): its own files; 1 keeps the old names."""
    from mnist_test import lds
    assert lds.report_tag(opt.with_values(BASE, {"mnist": {"lds": {"methods": ["trak"]}}})) != lds.report_tag(BASE)
    assert "_single_" in lds.report_tag(opt.with_values(BASE, {"mnist": {"lds": {"setting": "single_model"}}}))
    two = opt.with_values(BASE, {"threads": 2})
    for name in (mcommon.model_file(two, "staTest0"), mcommon.m2_file(two), mcommon.m3_file(two)):
        assert "t2_" in name
    assert lds.study_tag(two) != lds.study_tag(BASE) and "t1" not in mcommon.run_tag(BASE)
    for change in ({"activation": "softplus"}, {"lr_schedule": "linear"}, {"lr_schedule": "cosine"}):
        other = opt.with_values(BASE, {"mnist": change})
        assert mcommon.model_file(other, "staTest0") != mcommon.model_file(BASE, "staTest0"), change
        assert lds.study_tag(other) != lds.study_tag(BASE), change
    for change in ({"target": "margin"}, {"test_sample_num": 3}, {"top_k": 7}, {"window": 1}):
        assert mcommon.m3_file(opt.with_values(BASE, {"mnist": {"method3": change}})) != mcommon.m3_file(BASE), change
    assert mcommon.m3_file(opt.with_values(BASE, {"mnist": {"method3": {"checkpoint_interval": 7}}})) == \
        mcommon.m3_file(BASE)  # the result does not depend on it (tested in test_method3)
    # a window asks another question: its own Method-3 file and its own single-model study
    windows = [opt.with_values(BASE, {"mnist": {"window": size, "window_unit": unit}})
               for size, unit in ((1, "epochs"), (0.1, "fraction"), (500, "steps"))]
    assert len({mcommon.m3_file(w) for w in windows} | {mcommon.m3_file(BASE)}) == 4
    assert "_w1epochs_" in mcommon.m3_file(windows[0])
    single = [opt.with_values(w, {"mnist": {"lds": {"setting": "single_model"}}}) for w in windows]
    whole_single = opt.with_values(BASE, {"mnist": {"lds": {"setting": "single_model"}}})
    assert len({lds.study_tag(w) for w in single} | {lds.study_tag(whole_single)}) == 4
    # the algorithm setting's subsets carry no data weights: the same models whatever the window
    assert {lds.study_tag(w) for w in windows} == {lds.study_tag(BASE)}
    too_long = opt.with_values(whole_single, {"mnist": {"window": 10_000}})
    with pytest.raises(opt.SettingsError, match="mnist.window: .* choose 1 to"):
        lds.study_tag(too_long)


FFDNET_M2_CHANGES = [{"solver": "cg"}, {"damp": 0.1}, {"scale": 50}, {"l2_reg": 0.01}, {"stochastic": True},
                     {"params": ["main.0"]}, {"max_train_points": 100}, {"window": 3}, {"recursion_depth": 50}]


@pytest.mark.parametrize("change", FFDNET_M2_CHANGES)
def test_ffdnet_m2_name_changes_with_each_setting(change):
    assert fcommon.m2_result_file(with_m2("ffdnet", change), "01") != fcommon.m2_result_file(BASE, "01")


@pytest.mark.parametrize("change", [{"test": {"noise_level_img": 50}}, {"test": {"is_clip": False}},
                                    {"method1": {"outlim": 3}}, {"method1": {"activation": "conv"}},
                                    {"method1": {"grad_mode": "per_sample"}}, {"method1": {"layers": [1]}}])
def test_ffdnet_m1_name_changes_with_each_setting(change):
    changed = opt.with_values(BASE, {"ffdnet": change})
    assert fcommon.m1_result_file(changed, "01") != fcommon.m1_result_file(BASE, "01")
    if "test" in change:
        assert fcommon.m2_result_file(changed, "01") != fcommon.m2_result_file(BASE, "01")


def test_a_result_made_with_other_settings_is_refused(tmp_path):
    settings = opt.with_values(BASE, {"output_dir": str(tmp_path)})
    path = tmp_path / "r.json"
    made = opt.deep_merge(opt.as_dict(settings.mnist), {"method2": {"damp": 0.5}})
    opt.write_json(str(path), {"meta": {"settings": made}})
    with pytest.raises(opt.SettingsError, match="made with mnist.method2.damp = 0.5, not 0.01"):
        mcommon.read_result(str(path), "mnist_test/m2_Test.py", settings, "method2")
    opt.write_json(str(path), {"meta": {"settings": opt.deep_merge(opt.as_dict(settings.mnist), {"epoch": 3})}})
    with pytest.raises(opt.SettingsError, match="mnist.epoch = 3, not 20"):
        mcommon.read_result(str(path), "mnist_test/m1_Test.py", settings, "method1")
    opt.write_json(str(path), {"meta": {"settings": opt.as_dict(settings.mnist), "solver_info": {"solver": "lissa"}}})
    assert mcommon.read_result(str(path), "x", settings, "method2")["meta"]["settings"] == opt.as_dict(settings.mnist)


def test_a_result_of_the_wrong_shape_is_one_line_naming_the_file_and_exit_2(tmp_path, capsys):
    """A well-formed JSON that is not an influence file (here: no meta.solver_info) is refused in one
    line that names the file and what to do, exit status 2 (not a KeyError)."""
    settings = opt.with_values(BASE, {"output_dir": str(tmp_path)})
    path = tmp_path / "r.json"
    opt.write_json(str(path), {"meta": {"settings": opt.as_dict(settings.mnist)}})
    with pytest.raises(SystemExit) as stopped:
        opt.settings_or_exit(lambda: mcommon.read_result(str(path), "mnist_test/m2_Test.py", settings, "method2"))
    said = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(said.splitlines()) == 1
    assert str(path) in said and "it has no 'meta.solver_info'" in said and "run mnist_test/m2_Test.py again" in said


def test_adam_eps_root_gets_its_own_method3_files_and_study():
    from ffdnet_test import common as fcommon, explain_study
    other = opt.with_values(BASE, {"ffdnet": {"explain": {"finetune": {"eps_root": 1e-6}}}})
    assert fcommon.m3_result_file(other, "01", 0) != fcommon.m3_result_file(BASE, "01", 0)
    assert "er1e-06" in fcommon.m3_result_file(other, "01", 0)
    official = {"ffdnet": {"test": {"model": "official"}}}  # the study's key names its base model: no training needed
    assert explain_study.study_tag(opt.with_values(other, official)) != explain_study.study_tag(opt.with_values(BASE, official))


def test_sgd_finetuning_gets_its_own_method3_files_and_study_and_adam_keeps_its_tags():
    from ffdnet_test import common as fcommon, explain_study
    sgd = opt.with_values(BASE, {"ffdnet": {"explain": {"finetune": {"optimizer": "sgd", "learning_rate": 0.01}}}})
    assert "sgd0.9" in fcommon.m3_result_file(sgd, "01", 0) and "sgd" not in fcommon.m3_result_file(BASE, "01", 0)
    official = {"ffdnet": {"test": {"model": "official"}}}
    tags = {explain_study.study_tag(opt.with_values(s, official)) for s in
            (BASE, sgd, opt.with_values(sgd, {"ffdnet": {"explain": {"finetune": {"momentum": 0.5}}}}))}
    assert len(tags) == 3
    # Adam's momentum setting is not part of its run: it changes nothing
    unused = opt.with_values(BASE, {"ffdnet": {"explain": {"finetune": {"momentum": 0.5}}}})
    assert explain_study.study_tag(opt.with_values(unused, official)) == explain_study.study_tag(opt.with_values(BASE, official))
    assert fcommon.m3_result_file(unused, "01", 0) == fcommon.m3_result_file(BASE, "01", 0)
