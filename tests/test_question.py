"""The question in one step: run_pipeline for one test image writes its figure and a trust table
whose numbers are the measured LDS of the same recipe (an ldsTest study in the output folder, else
the project's measured table), and says "not measured for this recipe" otherwise."""
import os

import numpy as np

import utils_option as opt
from mnist_test import common, ldsTest, question, run_pipeline
from tests.conftest import small_settings

SMALL = {"train_subset": 300, "epoch": 2, "test_ids": [42], "method3": {"test_sample_num": 1},
         "method2": {"chunk_size": 150}}


def _real_picture(path):
    import matplotlib.image as mpimg
    pixels = mpimg.imread(path)
    return pixels.ndim == 3 and pixels.shape[0] > 500 and pixels[..., :3].std() > 0.1


def test_one_step_for_one_test_image_with_the_trust_of_an_ldstest_study_of_the_same_recipe(tmp_path, mnist_raw,
                                                                                         capsys):
    settings = small_settings(tmp_path, **SMALL)
    first = run_pipeline.main(settings)
    printed = capsys.readouterr().out
    assert first["test_ids"] == [42] and len(first["figures"]) == 1 and _real_picture(first["figures"][0])
    titles = [title for title, _, _ in first["methods"]]
    assert titles == ["Method 1 (the report's)", "Method 2 (lissa)", "Method 2 (kfac_factored)",
                      "Method 3 (exact, this run)"]
    assert question.NOT_MEASURED in printed and all(t in printed for t in titles)
    # an ldsTest study of this very recipe (same size, epochs, optimiser) in the output folder
    lds = {"train_subset": 300, "epoch": 2, "test_ids": 4, "num_subsets": 4, "seeds_per_subset": 1,
           "group_size": 4, "methods": ["m1_batch_raw", "if_kfac_factored", "if_lissa"], "ensemble_seeds": [0],
           "solver_test_num": 4, "bootstrap": 20, "ekfac_damp_factors": [], "kfac_factored_damp_factors": [],
           "loo": {"test_num": 0}}
    table = {row["method"]: row["lds"] for row in ldsTest.main(small_settings(tmp_path, **SMALL, lds=lds))["rows"]}
    again = run_pipeline.main(settings)
    printed = capsys.readouterr().out
    assert "ldsTest in this output folder" in again["trust"]["source"]
    for title, row in (("Method 1 (the report's)", "m1_batch_raw"), ("Method 2 (kfac_factored)", "if_kfac_factored"),
                       ("Method 2 (lissa)", "if_lissa")):
        line = next(line for line in printed.splitlines() if line.startswith("  " + title))  # the trust table's row
        assert np.isclose(float(line.split()[-2]), table[row], atol=5e-4), (line, table[row])
    name = f"question_{common.run_tag(settings)}_{common.test_selection_part(settings)}.json"
    record = opt.read_json(opt.output_path(settings, "test", name), "mnist_test/run_pipeline.py")
    kept = {m["lds_row"]: m["lds_algorithm"] for m in record["methods"]}
    assert kept["if_kfac_factored"] == table["if_kfac_factored"] and record["test_ids"] == [42]


def test_the_shipped_table_answers_for_the_reports_model_and_says_which():
    report = opt.load_settings(profile="report")
    trust = question.measured_lds(report)
    assert "docs/results.md" in trust["source"] and "60,000" in trust["recipe"]
    assert trust["algorithm"]["if_kfac_factored"] == 0.160 and trust["single_model"]["m3_replay"] == 0.024
    assert question.lds_row("method1", report) == "m1_batch_raw" and question.lds_row("method2", report) == "if_lissa"
    quick = opt.load_settings(profile="quick")
    assert question.measured_lds(quick)["source"] == question.NOT_MEASURED  # 5 epochs: not measured


def test_one_step_for_one_denoiser_pixel(tmp_path, two_test_images, two_train_images, capsys):
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
    assert "01 point 64,64: not measured for this recipe" in printed
    record = opt.read_json(out["files"]["01"], "m2_Test")
    assert len(record["entries"]["point 64,64"]["influence"]) == 40  # all patches, not the first max_train_points
    # the maps sum to each patch's influence (the per-position split is exact)
    from ffdnet_test import question as ffdnet_question
    best = ffdnet_question.best_settings(settings)
    top = record["entries"]["point 64,64"]["helpful"][:3]
    maps = ffdnet_question.point_maps(best, "01", [64, 64], top, "cpu")
    totals = (maps.sum((1, 2)) / 4).tolist()  # upsampled 2x2
    expected = [record["entries"]["point 64,64"]["influence"][i] for i in top]
    assert np.allclose(totals, expected, rtol=1e-3), (totals, expected)
