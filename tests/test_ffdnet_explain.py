"""The denoiser's explainability test: manipulation rules, paired fine-tuning orders, the effect
tables by hand, and the script end to end on a tiny model (resume, maps summing to the influence)."""
import os

import numpy as np
import pytest
import torch

import utils_option as opt
from ffdnet_test import explain
from options.blocks import Finetune

TARGETS = [{"image": "01", "point": [1, 1], "label": "01 1,1"}, {"image": "01", "point": [5, 5], "label": "01 5,5"}]


def test_manipulated_patches_are_exactly_k_distinct_and_seeded():
    ranked = {"m2_window|01 1,1": np.array([7, 3, 9, 1, 0, 2, 4, 5, 6, 8])}
    job = {"ranking": "m2_window", "target": "01 1,1", "k": 4, "seed": 0}
    assert explain.chosen_patches(job, ranked, 10, ["01"]).tolist() == [7, 3, 9, 1]
    first = explain.chosen_patches({"ranking": "random", "target": "01", "k": 300, "seed": 3}, {}, 1000, ["01"])
    again = explain.chosen_patches({"ranking": "random", "target": "01", "k": 300, "seed": 3}, {}, 1000, ["01"])
    other = explain.chosen_patches({"ranking": "random", "target": "01", "k": 300, "seed": 4}, {}, 1000, ["01"])
    assert len(set(first.tolist())) == 300 and first.tolist() == again.tolist() and first.tolist() != other.tolist()
    assert explain.chosen_patches({"ranking": None, "k": 0, "seed": 0}, {}, 10, ["01"]).tolist() == []


def test_finetune_runs_are_paired_and_removal_is_weight_zero_in_place():
    control = explain.finetune_run(Finetune(epochs=1.6, learning_rate=1e-3, batch_size=4), 50, seed=5)
    assert control.orders.shape == (20, 4) and control.data_weights is None
    removed = np.array([0, 7, 13, 21, 49])
    weights = explain.removal_weights(50, removed)
    run = explain.finetune_run(Finetune(epochs=1.6, learning_rate=1e-3, batch_size=4), 50, seed=5, weights=weights)
    # the same order (seeded permutations, the second one cut), the removed patches weighted 0 where they stand
    generator = torch.Generator().manual_seed(5)
    perms = torch.cat([torch.randperm(50, generator=generator) for _ in range(2)]).tolist()
    assert run.orders.reshape(-1).tolist() == control.orders.reshape(-1).tolist() == perms[:80]
    assert weights[removed].sum() == 0 and weights.sum() == 45
    assert explain.removal_weights(50, np.zeros(0, dtype=np.int64)) is None
    assert explain.finetune_steps(22806, 0.5, 32) == 357
    with pytest.raises(ValueError, match="every training patch"):
        explain.removal_weights(3, np.arange(3))


def test_effects_summary_and_specificity_by_hand():
    def run(name, ranking, target, loss_a, loss_b, seed=0, psnr=30.0, mse=0.01):
        return {"job": {"name": name, "ranking": ranking, "target": target, "manipulation": "remove", "k": 5,
                        "seed": seed},
                "outcome": {"window_loss": {"01 1,1": loss_a, "01 5,5": loss_b}, "psnr": {"01": psnr}, "mse": {"01": mse}},
                "chosen": [0, 1] if ranking == "m2_window" else [2, 3]}
    runs = {"control_s0": run("control_s0", None, None, 1.0, 2.0),
            "a": run("a", "m2_window", "01 1,1", 1.6, 2.1, psnr=29.5, mse=0.03),
            "b": run("b", "m2_window", "01 5,5", 1.1, 2.4, psnr=29.0, mse=0.02),
            "r": run("r", "random", "01", 1.1, 2.1, psnr=29.9, mse=0.04)}
    m2 = {(None, "01 1,1"): np.array([1.0, 2.0, 3.0, 4.0]), (None, "01 5,5"): np.array([0.0, 4.0, -4.0, 0.0])}
    m3 = {(0, "01 1,1"): np.array([4.0, 0.0, 0.0, 0.0]), (1, "01 1,1"): np.array([9.0, 9.0, 9.0, 9.0]),
          (0, "01"): np.array([0.0, 0.0, 0.4, 0.0])}  # seed 1 must not be used for seed-0 runs
    rows = explain.effects(runs, TARGETS, {"m2": m2, "m3": m3})
    assert len(rows) == 3
    a = next(r for r in rows if r["target"] == "01 1,1")
    assert a["predicted"]["m2"] == {"01 1,1": (1 + 2) / 4, "01 5,5": (0 + 4) / 4}  # removed 0, 1: sum / n
    assert a["predicted"]["m3"] == {"01 1,1": 1.0, "01": 0.0}
    assert a["mse_change"]["01"] == pytest.approx(0.02)
    predicted, measured = explain.prediction_pairs(rows, "m2")
    assert predicted.tolist() == [0.75, 1.0, 0.75, 1.0, 1.75, -1.0]
    assert measured.tolist() == pytest.approx([0.6, 0.1, 0.1, 0.4, 0.1, 0.1])
    agreement = explain.prediction_agreement(predicted, measured)
    assert agreement["pairs"] == 6
    assert agreement["pearson"] == pytest.approx(np.corrcoef(predicted, measured)[0, 1])
    assert agreement["size_ratio"] == pytest.approx(np.linalg.norm(measured) / np.linalg.norm(predicted))
    table = {(r["predictor"], r["over"]): r for r in explain.prediction_table(rows, TARGETS)}
    assert table[("m2", "all windows")]["pairs"] == 6 and table[("m2", "ranking m2_window")]["pairs"] == 4
    assert table[("m3", "01 1,1")]["pairs"] == 3 and table[("m3", "01 whole image")]["pairs"] == 3
    whole = explain.prediction_pairs(rows, "m3", label="01")
    assert whole[0].tolist() == [0.0, 0.0, 0.1] and whole[1].tolist() == pytest.approx([0.02, 0.01, 0.03])
    per_point = explain.own_over_random_per_target(rows, TARGETS, "m2_window", "remove", 5)
    assert per_point == pytest.approx({"01 1,1": 0.6 / 0.1, "01 5,5": 0.4 / 0.1})
    table = {r["ranking"]: r for r in explain.summary_table(rows, TARGETS)}
    window, rand = table["m2_window"], table["random"]
    assert window["own"] == pytest.approx((0.6 + 0.4) / 2)        # each list at its own target
    assert window["others"] == pytest.approx((0.1 + 0.1) / 2)     # and at the other one
    assert rand["own"] == pytest.approx(0.1) and np.isnan(rand["others"])
    assert window["own_over_random"] == pytest.approx(5.0) and window["own_over_others"] == pytest.approx(5.0)
    assert window["psnr_change"] == pytest.approx(-0.75)
    matrix = explain.specificity_matrix(rows, TARGETS, "m2_window", "remove", 5)
    assert np.allclose(matrix, [[0.6, 0.1], [0.1, 0.4]])


def test_explain_script_small_resumes_and_maps_sum_to_the_influence(tmp_path, two_test_images, two_train_images):
    from ffdnet_test import expTest
    settings = opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {
            "train_dir": str(two_train_images), "val_dir": str(two_test_images), "test_dir": str(two_test_images),
            "max_patches": 40, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8,
            "attribution": {"images": ["01"], "points": [[40, 40], [200, 200]]},
            "method2": {"solver": "ekfac", "max_train_points": 0, "chunk_size": 16}, "method3": {"smoothness_directions": 2},
            "explain": {"k_values": [5], "seeds": 1, "m1_layer": 5, "maps": 3,
                        "finetune": {"epochs": 0.5, "learning_rate": 1e-3, "batch_size": 8}}}})
    result = expTest.main(settings)  # the whole study: trains, runs m1/m2/m3_Test, then the runs
    from ffdnet_test import common
    m2_files = {"01": common.m2_result_file(settings, "01")}
    assert os.path.isfile(common.m1_result_file(settings, "01")) and os.path.isfile(common.m3_result_file(settings, "01", 0))
    smooth = opt.read_json(common.m3_result_file(settings, "01", 0), "m3_Test")["meta"]["solver_info"]["metasmoothness"]
    assert smooth["trainings"] == 5 and -1 <= smooth["s_hat"] <= 1 and smooth["h"] == 0.1
    assert smooth["decision"] in ("yes", "no", "unsure")  # measured whatever it says: the study replays anyway
    # control + (m3_window, m2_window, m1: 2 targets; m3_whole, m2_whole, random: the image) x 2 manipulations
    assert result["jobs"] == 1 + (2 + 2 + 2 + 1 + 1 + 1) * 2 and result["runs"] == result["jobs"]
    assert {r["ranking"] for r in result["table"]} == {"m3_window", "m3_whole", "m2_window", "m2_whole", "m1", "random"}
    effects = [r["window_effect"]["01 40,40"] for r in result["effects"]]
    assert any(abs(e) > 0 for e in effects)  # manipulations change the fine-tuned model
    assert sum("hypothesis" in v for v in result["verdicts"]) == 4           # m3_window, m2_window x 2 manipulations
    assert sum("more than any other" in v for v in result["verdicts"]) == 6  # m3_window, m2_window, m1 x 2 manipulations
    predictions = {(r["predictor"], r["over"]): r for r in result["predictions"]}
    m3_all = predictions[("m3", "all windows")]
    assert m3_all["pairs"] == 9 * 2  # 9 removal runs x 2 windows
    print("tiny study, Method 3 predicted vs measured:", m3_all)
    import matplotlib.image as mpimg
    assert len(result["figures"]) == 3 and all(mpimg.imread(p).std() > 0.02 for p in result["figures"])
    # the per-position maps sum to the influence m2_Test wrote for those patches
    entries = opt.read_json(m2_files["01"], "m2_Test")["entries"]
    for row in result["maps"]:
        written = np.asarray(entries["point " + row["target"].split(" ")[1]]["influence"])[row["top"]]
        assert np.allclose(row["totals"], written, rtol=1e-3, atol=1e-6 * np.abs(written).max())
    # resume: a deleted run is the only one redone, with the same outcome (seeded, paired)
    folder = os.path.join(settings.output_dir, "test", "ffdnet_expTest", result["study"])
    victim = os.path.join(folder, "m2_window_01_40-40_corrupt_k5_s0.json")
    before = opt.read_json(victim, "expTest")
    os.remove(victim)
    again = expTest.main(settings)
    assert again["runs"] == 1
    after = opt.read_json(victim, "expTest")
    assert after["chosen"] == before["chosen"] and len(set(after["chosen"])) == 5
    assert after["outcome"]["window_loss"] == pytest.approx(before["outcome"]["window_loss"], rel=1e-5)
