"""ldsTest on a tiny real-MNIST study: reproducible subset draws, resume, the torchrun split, and
a table whose numbers come from the files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils_if
import utils_option as opt
from mnist_test import lds, lds_study, ldsTest
from tests.conftest import small_settings

TINY = {"train_subset": 300, "test_ids": 6, "num_subsets": 6, "seeds_per_subset": 2, "epoch": 2,
        "group_size": 4, "methods": ["m1_batch_raw", "if_ekfac", "grad_dot", "if_cg", "ensemble_if_ekfac", "trak",
                                     "ensemble_trak", "if_arnoldi"],
        "ensemble_seeds": [0, 1], "solver_test_num": 3, "cg_damps": [1.0], "cg_max_iter": 30, "bootstrap": 50,
        "ekfac_damp_factors": [], "kfac_factored_damp_factors": [],
        "loo": {"test_num": 1, "k": 2, "seeds": 2, "rank_by": "if_ekfac"}}


def test_subset_draws_are_reproducible_and_independent_of_how_many():
    a = lds.subset_mask(1000, 0.5, seed=3, index=7)
    assert a.sum() == 500 and np.array_equal(a, lds.subset_mask(1000, 0.5, seed=3, index=7))
    assert not np.array_equal(a, lds.subset_mask(1000, 0.5, seed=3, index=8))
    assert not np.array_equal(a, lds.subset_mask(1000, 0.5, seed=4, index=7))
    seeds = {lds.subset_model_seed(0, m, r) for m in range(50) for r in range(4)}
    assert len(seeds) == 200  # every model of the study has its own seed


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, mnist_raw):
    tmp = tmp_path_factory.mktemp("lds")
    settings = small_settings(tmp, lds=TINY)
    return settings, ldsTest.main(settings)


def test_table_rows_and_resume(tiny_study):
    settings, first = tiny_study
    assert first["trained"] == {"subsets": 12, "loo": 2 + 2 * len(lds_study.loo_points(first_plan(first)))}
    rows = {r["method"]: r for r in first["rows"]}
    assert set(rows) == {"m1_batch_raw", "if_ekfac", "grad_dot", "if_cg_d1", "ensemble_if_ekfac", "trak",
                         "ensemble_trak", "if_arnoldi"}
    assert rows["if_cg_d1"]["test_images"] == 3 and rows["if_ekfac"]["test_images"] == 6
    for r in rows.values():
        assert -1 <= r["lds"] <= 1 and r["lds_low"] <= r["lds"] <= r["lds_high"]
    # the table's number is the mean of the per-test LDS recomputed from the stored outputs
    record = opt.read_json(first["json"], "ldsTest")
    assert np.nanmean(record["lds_per_test"]["if_ekfac"]) == pytest.approx(rows["if_ekfac"]["lds"])
    # resume: nothing is retrained; a deleted model file is retrained alone, with the same outputs
    subsets = lds.study_folder(settings, "subsets")
    victim = os.path.join(subsets, "m2_s1.json")
    before = json.load(open(victim))
    os.remove(victim)
    again = ldsTest.main(settings)
    assert again["trained"] == {"subsets": 1, "loo": 0}
    assert np.allclose(json.load(open(victim))["loss"], before["loss"], atol=1e-6)
    assert ldsTest.main(settings)["trained"] == {"subsets": 0, "loo": 0}


def test_without_leave_one_out_rank_by_need_not_be_computed():
    from options.blocks import Lds
    lds_cfg = opt.with_values(Lds(), {"loo": {"test_num": 0, "k": 5, "rank_by": "if_ekfac"}})
    plan = lds_study.loo_plan(lds_cfg, {"trak": {}}, 100, "unused", None)
    assert plan["tests"] == []


def first_plan(result):
    return opt.read_json(result["json"], "ldsTest")["loo_plan"]


def test_torchrun_split_matches_one_process(tiny_study, tmp_path):
    settings, first = tiny_study
    other = {**opt.as_dict(settings), "output_dir": str(tmp_path / "two")}
    settings_file = tmp_path / "s.json"
    settings_file.write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29541", os.path.join(opt.REPO_ROOT, "mnist_test", "ldsTest.py"),
                           "-opt", str(settings_file)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = lds.study_folder(settings, "subsets")
    two = os.path.join(str(tmp_path / "two"), "lds", lds.study_tag(settings), "subsets")
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    for name in os.listdir(one):
        a, b = json.load(open(os.path.join(one, name))), json.load(open(os.path.join(two, name)))
        assert np.allclose(a["loss"], b["loss"], atol=1e-5) and np.allclose(a["margin"], b["margin"], atol=1e-5)
    table_one = {r["method"]: r["lds"] for r in first["rows"]}
    table_two = {r["method"]: r["lds"] for r in opt.read_json(
        os.path.join(str(tmp_path / "two"), "test", os.path.basename(first["json"])), "")["rows"]}
    for method, value in table_one.items():
        assert table_two[method] == pytest.approx(value, abs=0.05)


SINGLE = {**TINY, "setting": "single_model", "drop_fractions": [0.05, 0.5], "num_subsets": 8, "test_ids": 8,
          "methods": ["if_ekfac", "grad_dot", "m3_replay"], "method3_test_num": 8, "ensemble_seeds": [0],
          "loo": {"test_num": 1, "k": 3, "seeds": 1, "rank_by": "m3_replay"}}


def test_single_model_setting_scores_method3_against_the_base_run_with_points_weighted_zero(tmp_path, mnist_raw):
    settings = small_settings(tmp_path, lds=SINGLE, activation="softplus")
    result = ldsTest.main(settings)
    assert set(result["studies"]) == {"drop0.05", "drop0.5"}
    assert result["trained"] == {"subsets": 16, "loo": 1 + len(lds_study.loo_points(first_plan(result)))}
    rows = {r["method"]: r for r in result["rows"]}  # the main table: the fraction nearest 5%
    # with a smooth run (softplus), the exact metagradient of this very run predicts its counterfactuals:
    # measured LDS 0.988 and LOO Pearson 1.000 (grad_dot 0.643, EK-FAC 0.390); with ReLU 0.649 (README)
    assert rows["m3_replay"]["lds"] > 0.95 and rows["m3_replay"]["loo_pearson"] > 0.95
    assert rows["m3_replay"]["lds"] > rows["grad_dot"]["lds"] + 0.2
    record = opt.read_json(result["json"], "ldsTest")
    assert record["meta"]["setting"] == "single_model" and record["meta"]["training_noise"]["typical_drop_effect"] > 0
    assert os.path.isfile(result["curve"])
    # the caption says whether the base run can be attributed, with S_hat's interval, and what it answers:
    # this smooth run can (Method 3's LDS > 0.95 above)
    caption = open(result["markdown"]).read()
    assert "metasmoothness of removing images from the whole run (steps 1-76): S_hat 0.99" in caption
    assert ": yes, smooth - " in caption and "held-out" in caption
    # the run the verdict vouches for scores at least what the vouched held-out runs scored (their bound is
    # at a 1% drop; this study's main fraction is 5% of 300 images)
    from influence import smoothness
    assert rows["m3_replay"]["lds"] >= smoothness.CALIBRATION["yes"]["lds"][0]
    # the subset models are the base run with weights: same seed for all, 5% of 300 = 15 points dropped
    folder = lds.study_folder(settings, "single_model", "s0_d0.05")
    assert json.load(open(os.path.join(folder, "m0.json")))["seed"] == 0
    assert (~lds.drop_mask(300, 0.05, 0, 0)).sum() == 15


def test_a_run_the_verdict_rejects_is_rejected_and_method3_misses_its_removals(tmp_path, mnist_raw):
    """The report's ReLU recipe on the same tiny study: the check says no, and Method 3's single-model
    LDS is below what any vouched run scored (measured here: about 0.65)."""
    from influence import smoothness
    result = ldsTest.main(small_settings(tmp_path, lds={**SINGLE, "methods": ["m3_replay"], "drop_fractions": [0.05],
                                                        "loo": {"test_num": 0, "k": 3, "seeds": 1,
                                                                "rank_by": "m3_replay"}}))
    caption = open(result["markdown"]).read()
    assert ": no, not smooth - " in caption, caption
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["m3_replay"]["lds"] < smoothness.CALIBRATION["yes"]["lds"][0]


def test_single_model_removals_act_only_in_the_attribution_window(tmp_path, mnist_raw):
    """mnist.window = the last 10% of 4 epochs' steps: m3_Test walks back those steps only, and ldsTest's
    subsets weight the dropped points 0 there only. A case where the two questions differ strongly:
    against the windowed truth Method 3 scores LDS 1.00 and misses the sizes by 6% (relative error of
    the centred changes); the same removals over the whole run would give LDS 0.64 and an error of 82%
    (computed below as the negative control), so a ground truth that ignored the window fails both."""
    window = {**SINGLE, "epoch": 4, "methods": ["grad_dot", "m3_replay"], "drop_fractions": [0.05],
              "loo": {"test_num": 0, "k": 3, "seeds": 1, "rank_by": "m3_replay"}}
    settings = small_settings(tmp_path, lds=window, activation="softplus", window=0.1, window_unit="fraction")
    whole = small_settings(tmp_path, lds=window, activation="softplus")
    assert lds.study_tag(settings) != lds.study_tag(whole)
    result = ldsTest.main(settings)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["m3_replay"]["lds"] > 0.95
    record = opt.read_json(result["json"], "ldsTest")
    m3_file = next(p for p in __import__("glob").glob(os.path.join(str(tmp_path), "**", "m3_replay_*.json"),
                                                      recursive=True))
    influence = np.array([v["influence"] for k, v in opt.read_json(m3_file, "m3_Test").items() if k != "meta"])
    masks = np.stack([lds.drop_mask(300, 0.05, 0, m) for m in range(8)])
    predicted = (masks - 1.0) @ (-influence / 300).T                               # (subsets, tests)
    folder = lds.study_folder(settings, "single_model", "s0_d0.05")
    measured = lds.read_outputs([os.path.join(folder, f"m{m}.json") for m in range(8)])["loss"][:, :len(influence)]

    def size_error(y):  # relative error of the predicted changes, both centred over the subsets
        p, m = predicted - predicted.mean(0), y - y.mean(0)
        return float(np.linalg.norm(m - p) / np.linalg.norm(m))
    assert size_error(measured) < 0.2, size_error(measured)
    # the same removals over the whole run: what a ground truth that ignored the window would measure
    import dataclasses
    from mnist_test import common, training
    base = lds.model_settings(settings, 0, [0])
    data = common.load_train_data(base, torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    ids = record["meta"]["test_ids"][:len(influence)]
    whole_run = lds.single_model_loss_changes(data, opt.Recipe.of(base.mnist).replace(window=0), masks, test.images[ids], test.labels[ids], np.zeros(len(ids)),
                                              torch.device("cpu"))
    assert size_error(whole_run) > 0.5 and np.mean(utils_if.spearman_columns(predicted, whole_run)) < 0.8
    import glob
    m3 = glob.glob(os.path.join(str(tmp_path), "**", "m3_replay_*.json"), recursive=True)
    assert m3 and all("_w0.1fraction_" in f for f in m3)
    record = opt.read_json(m3[0], "m3_Test")
    steps = record["meta"]["solver_info"]["steps"]
    assert record["meta"]["solver_info"]["window_start"] == steps - round(0.1 * steps)  # the last 10% of the steps
