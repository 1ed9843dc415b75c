"""The question in one step: run_pipeline for one test image writes its figure and a trust table
whose numbers are measured LDS of exactly these settings (an ldsTest study in the output folder,
else the project's measured table), and says "not measured for these settings" otherwise, naming
the keys in which the nearest measured row differs."""
import json
import os

import numpy as np
import pytest

import utils_option as opt
from mnist_test import common, ldsTest, question, run_pipeline
from tests.conftest import small_settings

SMALL = {"train_subset": 300, "epoch": 2, "test_ids": [42], "method3": {"test_sample_num": 1},
         "method2": {"chunk_size": 150}}


def _real_picture(path):
    import matplotlib.image as mpimg
    pixels = mpimg.imread(path)
    return pixels.ndim == 3 and pixels.shape[0] > 500 and pixels[..., :3].std() > 0.1


def _row(printed: str, title: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith("  " + title + " "))  # the table's row


def test_one_step_for_one_test_image_with_the_trust_of_an_ldstest_study_of_the_same_settings(tmp_path, mnist_raw,
                                                                                           capsys):
    settings = small_settings(tmp_path, **SMALL)
    first = run_pipeline.main(settings)
    printed = capsys.readouterr().out
    assert first["test_ids"] == [42] and len(first["figures"]) == 1 and _real_picture(first["figures"][0])
    titles = [title for title, _, _ in first["methods"]]
    assert titles[:3] == ["Method 1 (the report's)", "Method 2 (lissa)", "Method 2 (kfac_factored)"]
    assert question.NOT_MEASURED in printed and all(t in printed for t in titles)
    assert "this network\": removing images from the whole run (steps 1-76)" in printed
    # an ldsTest study of these very settings (same size, epochs, optimiser, seed, solvers) in the output folder
    lds = {"train_subset": 300, "epoch": 2, "test_ids": 4, "num_subsets": 4, "seeds_per_subset": 1,
           "group_size": 4, "methods": ["m1_batch_raw", "if_kfac_factored"], "ensemble_seeds": [0],
           "solver_test_num": 4, "bootstrap": 20, "ekfac_damp_factors": [], "kfac_factored_damp_factors": [],
           "loo": {"test_num": 0}}
    table = {row["method"]: row["lds"] for row in ldsTest.main(small_settings(tmp_path, **SMALL, lds=lds))["rows"]}
    again = run_pipeline.main(settings)
    printed = capsys.readouterr().out
    assert "ldsTest in this output folder" in again["trust"]["Method 2 (kfac_factored)"]["source"]
    for title, row in (("Method 1 (the report's)", "m1_batch_raw"), ("Method 2 (kfac_factored)", "if_kfac_factored")):
        assert np.isclose(float(_row(printed, title).split()[-2]), table[row], atol=5e-4), (printed, table[row])
    name = f"question_{common.run_tag(settings)}_{question.run_part(settings, again['keyed_methods'])}_" \
           f"{common.test_selection_part(settings)}.json"
    record = opt.read_json(opt.output_path(settings, "test", name), "mnist_test/run_pipeline.py")
    kept = {m["lds_row"]: m["lds_what_training_does"] for m in record["methods"]}
    assert kept["if_kfac_factored"] == table["if_kfac_factored"] and record["test_ids"] == [42]
    assert record["question"] == "removing images from the whole run (steps 1-76)"


# ---- the match key: one negative case per kind of key, against a table the test writes ----------------------
BASE = {"train_subset": 300, "epoch": 2, "seed": 0, "logit_scale": 1.0}
FIXTURE = {"m1_batch_raw": 0.111, "if_lissa": 0.222, "m3_replay": 0.333}


def _methods(settings):
    return [("Method 1", "m1_batch_raw", question.trust_key(settings.mnist, "method1")),
            ("Method 2", "if_lissa", question.trust_key(settings.mnist, "method2")),
            ("Method 3", "m3_replay", question.trust_key(settings.mnist, "method3"))]


@pytest.fixture()
def fixture_table(tmp_path):
    """A measured table whose three rows were 'measured' with BASE's settings, at values no real table has."""
    settings = small_settings(tmp_path, **BASE)
    keys = {row: key for _, row, key in _methods(settings)}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"entries": [{"name": "fixture", "setting": "single_model", "drop": 0.05,
                                             "source": "the test's fixture",
                                             "rows": {row: {"lds": value, "key": keys[row]}
                                                      for row, value in FIXTURE.items()}}]}))
    return str(path)


def test_the_table_quotes_a_row_for_exactly_its_settings(tmp_path, fixture_table):
    settings = small_settings(tmp_path, **BASE)
    trust = question.measured_lds(settings, _methods(settings), fixture_table)
    lines = "\n".join(question.trust_lines(_methods(settings), trust))
    for title, row in (("Method 1", "m1_batch_raw"), ("Method 2", "if_lissa"), ("Method 3", "m3_replay")):
        assert trust[title]["single_model"] == {0.05: FIXTURE[row]} and "the test's fixture" in trust[title]["source"]
        assert f"{FIXTURE[row]:+.3f} at a 5% drop" in _row(lines, title)


@pytest.mark.parametrize("change, method, key", [
    ({"method2": {"damp": 1.0}}, "Method 2", "method2.solver"),                       # LiSSA's damping
    ({"method1": {"layers": ["fc1"]}}, "Method 1", "method1.layers"),                  # Method 1's layers
    ({"window": 1, "window_unit": "epochs"}, "Method 3", "recipe.window"),  # the attribution window
    ({"logit_scale": 0.1}, "Method 2", "recipe.logit_scale"),                         # the network's logits
    ({"seed": 3}, "Method 1", "recipe.seed"),                                         # another run
    ({"method3": {"target": "margin"}}, "Method 3", "method3.target"),                # another test target
])
def test_a_run_with_another_setting_is_told_not_measured_and_which_key(tmp_path, fixture_table, capsys, change,
                                                                        method, key):
    settings = small_settings(tmp_path, **opt.deep_merge(BASE, change))
    trust = question.measured_lds(settings, _methods(settings), fixture_table)
    lines = question.trust_lines(_methods(settings), trust)
    print("\n".join(lines))
    found = trust[method]
    assert found["source"] == question.NOT_MEASURED and found["single_model"] == {}
    assert any(d.startswith(key + " ") for d in found["differs"]), found["differs"]
    said = next(line for line in lines if line.startswith(f"  {method}: {question.NOT_MEASURED}"))
    assert key in said and f"{FIXTURE[dict((t, r) for t, r, _ in _methods(settings))[method]]:+.3f}" in said
    assert "-" == _row("\n".join(lines), method).split()[-1]  # no number in the table's own columns


def test_the_shipped_table_answers_for_the_reports_model_and_says_which():
    report = opt.load_settings(profile="report")
    methods = _methods(report)
    trust = question.measured_lds(report, methods)
    assert "docs/results.md" in trust["Method 2"]["source"]
    assert trust["Method 2"]["algorithm"] == 0.067 and trust["Method 3"]["single_model"] == {0.05: 0.024}
    assert question.lds_row("method1", report) == "m1_batch_raw" and question.lds_row("method2", report) == "if_lissa"
    quick = opt.load_settings(profile="quick")
    found = question.measured_lds(quick, _methods(quick))["Method 1"]
    assert found["source"] == question.NOT_MEASURED and any(d.startswith("recipe.epoch") for d in found["differs"])
    attributable = opt.load_settings(profile="report", assignments=["mnist.recipe=attributable"])
    trust = question.measured_lds(attributable, _methods(attributable))
    assert trust["Method 3"]["single_model"] == {0.01: 0.974, 0.05: 0.993}
    assert trust["question"] == "removing images from the last epoch (steps 8,912-9,380)"


def test_one_step_for_one_denoiser_pixel(tmp_path, two_test_images, two_train_images, capsys):
    from ffdnet_test import question as ffdnet_question
    from ffdnet_test import run_pipeline as ffdnet_pipeline
    settings = opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {
            "train_dir": str(two_train_images), "max_patches": 40, "patch_size": 32, "stride": 32, "epoch": 1,
            "batch_size": 8, "val_dir": str(two_test_images), "test_dir": str(two_test_images),
            "attribution": {"vis_num": 3}, "method2": {"chunk_size": 16}}},
        assignments=['ffdnet.attribution.images=["01"]', "ffdnet.attribution.points=[[64,64]]"])
    out = ffdnet_pipeline.main(settings)
    printed = capsys.readouterr().out
    assert len(out["figures"]) == 1 and os.path.isfile(out["figures"][0]) and "ekfac" in out["figures"][0]
    assert "01 point 64,64: not measured for these settings" in printed
    # before attributing, the model is checked against its own noisy input; one epoch on 40 patches does not denoise
    from ffdnet_test import common as fcommon
    check = ffdnet_question.denoising_check(settings, fcommon.load_model(settings, "cpu")[0], "01", "cpu")
    assert "dB against its noisy input's" in printed and abs(check["gain"] - (check["psnr"] - check["psnr_noisy"])) < 1e-9
    assert (not check["denoises"]) == any(c.startswith("WARNING: 01: the denoiser") for c in out["caveats"])
    assert not check["denoises"] and "WARNING: 01: the denoiser gives" in printed
    record = opt.read_json(out["files"]["01"], "m2_Test")
    assert len(record["entries"]["point 64,64"]["influence"]) == 40  # all patches, not the first max_train_points
    # the maps sum to each patch's influence (the per-position split is exact)
    best = ffdnet_question.best_settings(settings)
    top = record["entries"]["point 64,64"]["helpful"][:3]
    maps = ffdnet_question.point_maps(best, "01", [64, 64], top, "cpu")
    totals = (maps.sum((1, 2)) / 4).tolist()  # upsampled 2x2
    expected = [record["entries"]["point 64,64"]["influence"][i] for i in top]
    assert np.allclose(totals, expected, rtol=1e-3), (totals, expected)


def test_the_denoisers_trust_line_quotes_a_study_only_for_its_settings(tmp_path):
    """ffdnet_test/question.counterfactual_trust: an expTest report of the same model and ranking is
    quoted; one made with another pixel window (or another solver) is not, and the key is named."""
    from ffdnet_test import question as ffdnet_question
    settings = opt.load_settings(overrides={"output_dir": str(tmp_path / "results")})
    best = ffdnet_question.best_settings(settings)
    report = {"settings": opt.as_dict(best.ffdnet), "table": [{"k": 500}],
              "effects": [{"ranking": "m2_window", "manipulation": "remove", "k": 500, "target": "01 point 64,64",
                           "own": 0.0123},
                          {"ranking": "random", "manipulation": "remove", "k": 500, "target": "01 whole", "own": 0.001}],
              "predictions": [{"predictor": "m2", "over": "01 point 64,64", "pearson": 0.42}]}
    path = opt.output_path(settings, "test", "ffdnet_expTest_fixture.json")
    opt.write_json(path, report)
    lines, differs = ffdnet_question.counterfactual_trust(best)
    assert differs == [] and "raised this window's loss by 0.0123" in lines["01 point 64,64"]
    assert "Pearson 0.42" in lines["01 point 64,64"]
    other = opt.with_values(best, {"ffdnet": {"method2": {"window": 2}}})
    lines, differs = ffdnet_question.counterfactual_trust(other)
    assert lines == {} and any(d.startswith("method2.window (2 here, 1 measured)") for d in differs), differs
