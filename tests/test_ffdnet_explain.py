"""The denoiser's explainability test: manipulation rules, paired fine-tuning orders, the effect
tables by hand, and the script end to end on a tiny model (resume, maps summing to the influence)."""
import os

import numpy as np
import pytest
import torch

import utils_option as opt
from ffdnet_test import explain

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


def test_finetune_orders_are_paired_and_skip_removed_patches():
    control = explain.finetune_order(50, np.array([], dtype=np.int64), steps=20, batch=4, seed=5)
    assert control.shape == (20, 4)
    removed = np.array([0, 7, 13, 21, 49])
    order = explain.finetune_order(50, removed, steps=20, batch=4, seed=5)
    assert not np.isin(order.numpy(), removed).any()
    # the same permutations with the removed patches skipped: a paired run
    flat = control.reshape(-1).tolist()
    generator = torch.Generator().manual_seed(5)
    perms = torch.cat([torch.randperm(50, generator=generator) for _ in range(3)]).tolist()
    assert flat == perms[:80]
    assert order.reshape(-1).tolist() == [i for i in perms if i not in set(removed.tolist())][:80]
    assert explain.finetune_steps(22806, 0.5, 32) == 357
    with pytest.raises(ValueError, match="every training patch"):
        explain.finetune_order(3, np.arange(3), 1, 1, 0)


def test_effects_summary_and_specificity_by_hand():
    def run(name, ranking, target, loss_a, loss_b, seed=0, psnr=30.0):
        return {"job": {"name": name, "ranking": ranking, "target": target, "manipulation": "remove", "k": 5,
                        "seed": seed},
                "outcome": {"window_loss": {"01 1,1": loss_a, "01 5,5": loss_b}, "psnr": {"01": psnr}},
                "chosen": [0, 1] if ranking == "m2_window" else [2, 3]}
    runs = {"control_s0": run("control_s0", None, None, 1.0, 2.0),
            "a": run("a", "m2_window", "01 1,1", 1.6, 2.1, psnr=29.5),
            "b": run("b", "m2_window", "01 5,5", 1.1, 2.4, psnr=29.0),
            "r": run("r", "random", "01", 1.1, 2.1, psnr=29.9)}
    influence = {"01 1,1": np.array([1.0, 2.0, 3.0, 4.0]), "01 5,5": np.array([0.0, 4.0, -4.0, 0.0])}
    rows = explain.effects(runs, TARGETS, influence)
    assert len(rows) == 3
    a = next(r for r in rows if r["target"] == "01 1,1")
    assert a["predicted_effect"] == {"01 1,1": (1 + 2) / 4, "01 5,5": (0 + 4) / 4}  # removed 0, 1: sum / n
    agreement = explain.prediction_agreement(rows)
    assert agreement["pairs"] == 6
    predicted = [0.75, 1.0, 0.75, 1.0, 1.75, -1.0]
    measured = [0.6, 0.1, 0.1, 0.4, 0.1, 0.1]
    assert agreement["pearson"] == pytest.approx(np.corrcoef(predicted, measured)[0, 1])
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
    from ffdnet_test import FFDNet_Train, expTest, m1_Test, m2_Test
    settings = opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {
            "train_dir": str(two_train_images), "val_dir": str(two_test_images), "test_dir": str(two_test_images),
            "max_patches": 40, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8,
            "attribution": {"images": ["01"], "points": [[40, 40], [200, 200]]},
            "method2": {"solver": "ekfac", "max_train_points": 0, "chunk_size": 16},
            "explain": {"k_values": [5], "seeds": 1, "m1_layer": 5, "maps": 3,
                        "finetune": {"epochs": 0.5, "learning_rate": 1e-3, "batch_size": 8}}}})
    FFDNet_Train.main(settings)
    m1_Test.main(settings)
    m2_files = m2_Test.main(settings)["files"]
    result = expTest.main(settings)
    # control + (m2_window, m1: 2 targets; m2_whole, random: the image) x 2 manipulations
    assert result["jobs"] == 1 + (2 + 2 + 1 + 1) * 2 and result["runs"] == result["jobs"]
    assert {r["ranking"] for r in result["table"]} == {"m2_window", "m2_whole", "m1", "random"}
    effects = [r["window_effect"]["01 40,40"] for r in result["effects"]]
    assert any(abs(e) > 0 for e in effects)  # manipulations change the fine-tuned model
    assert sum("hypothesis" in v for v in result["verdicts"]) == 2           # one per manipulation
    assert sum("more than any other" in v for v in result["verdicts"]) == 4  # m2_window, m1 x 2 manipulations
    import matplotlib.image as mpimg
    assert len(result["figures"]) == 3 and all(mpimg.imread(p).std() > 0.02 for p in result["figures"])
    # the per-position maps sum to the influence m2_Test wrote for those patches
    entries = opt.read_json(m2_files["01"], "m2_Test")["entries"]
    for row in result["maps"]:
        written = np.asarray(entries["point " + row["target"].split(" ")[1]]["influence"])[row["top"]]
        assert np.allclose(row["totals"], written, rtol=1e-3, atol=1e-6 * np.abs(written).max())
    # resume: a deleted run is the only one redone, with the same outcome (seeded, paired)
    folder = os.path.join(settings["output_dir"], "test", "ffdnet_expTest", result["study"])
    victim = os.path.join(folder, "m2_window_01_40-40_corrupt_k5_s0.json")
    before = opt.read_json(victim, "expTest")
    os.remove(victim)
    again = expTest.main(settings)
    assert again["runs"] == 1
    after = opt.read_json(victim, "expTest")
    assert after["chosen"] == before["chosen"] and len(set(after["chosen"])) == 5
    assert after["outcome"]["window_loss"] == pytest.approx(before["outcome"]["window_loss"], rel=1e-5)
