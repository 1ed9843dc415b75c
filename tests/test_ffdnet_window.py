"""The denoiser's final window (ffdnet.recipe "attributable"): Method 3 through it against finite
differences, its reruns against the trained run (bitwise), and ffdnet_test/ldsTest.py end to end on
a tiny real configuration (two photographs, 24 patches)."""
import copy
import os

import numpy as np
import pytest
import torch

import utils_if as U
import utils_option as opt
from conftest import central_differences
from ffdnet_test import attribution, explain, lds, window
from ffdnet_test.model import FFDNet, PackedInput
from options.blocks import FfdnetWindow


def tiny_softplus_ffdnet() -> FFDNet:
    torch.manual_seed(0)
    model = FFDNet(is_gray=True, layout="bn", num_layers=3, channels=4, residual=True, activation="softplus")
    model = model.double().eval()
    model.main[3].running_mean.uniform_(-0.2, 0.2)
    model.main[3].running_var.uniform_(0.5, 2.0)
    return model


def tiny_patches(n: int = 6):
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * 0.3
    return clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=g, dtype=torch.float64), clean, sigma


@pytest.mark.parametrize("optimizer,eps_root", [("adam", 0.0), ("adam", 1e-6), ("sgd", 0.0)])
def test_window_replay_equals_finite_differences(optimizer, eps_root):
    """The window's schedule decays the learning rate to 0; Method 3 through it (Adam, Adam with
    eps_root, SGD with momentum) equals central finite differences of the window in every weight."""
    schedule = FfdnetWindow(epochs=2, learning_rate=0.01 if optimizer != "sgd" else 0.05, batch_size=3,
                            optimizer=optimizer, eps_root=eps_root, lr_schedule="linear")
    base = tiny_softplus_ffdnet()
    noisy, clean, sigma = tiny_patches()
    run = explain.finetune_run(schedule, 6, seed=0)
    assert run.lr(0) == schedule.learning_rate and 0 < run.lr(run.num_steps - 1) < schedule.learning_rate / 3
    replay = explain.method3_replay(base, run, noisy, sigma, clean)
    tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
    _, error, _ = U.forward_checked(replay, tuned, 2, 1e-10)
    g = torch.Generator().manual_seed(3)
    probe_clean = torch.rand(1, 1, 12, 12, generator=g, dtype=torch.float64)
    probe = PackedInput.pack(probe_clean + 0.1 * torch.randn(probe_clean.shape, generator=g, dtype=torch.float64),
                             torch.tensor([0.1], dtype=torch.float64))
    mask = attribution.window_mask((1, 12, 12), [5, 6], 1).double()
    problem = U.InfluenceProblem(PackedInput(tuned).eval(), U.mse_sample_loss, ["net." + n for n in replay.names])
    grads = torch.cat([problem.sample_grads(probe, probe_clean),
                       problem.sample_grads(probe, probe_clean, loss=U.masked_mse_sample_loss(mask))])
    mine = replay.metagradient(grads)

    def targets_at(w):
        model = explain.finetune(copy.deepcopy(base), noisy, clean, sigma,
                                 explain.finetune_run(schedule, 6, 0, weights=w))
        out = PackedInput(model)(probe)
        return torch.stack([U.mse_sample_loss(out, probe_clean)[0], U.masked_mse_sample_loss(mask)(out, probe_clean)[0]])
    numeric = central_differences(targets_at, 6)
    assert mine.abs().max() > 1e-6
    assert torch.allclose(mine, numeric, rtol=1e-4, atol=1e-9), (mine, numeric)


def small_window_settings(tmp_path, train_dir, test_dir, **lds_values) -> opt.Settings:
    return opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {
            "recipe": "attributable", "train_dir": str(train_dir), "val_dir": str(test_dir), "test_dir": str(test_dir),
            "max_patches": 24, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8, "residual": True,
            "window": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001},
            "attribution": {"images": ["01"], "points": [[40, 40], [100, 120]]},
            "method1": {"layers": [1, 11]}, "explain": {"m1_layer": 11},
            "method2": {"recursion_depth": 5, "chunk_size": 8, "scale": 1000},
            "lds": {"num_subsets": 4, "test_images": 1, "methods": ["m3", "ekfac", "m1"], "top_k": 3,
                    "bootstrap": 50, **lds_values}}})


def test_ldstest_small(tmp_path, two_test_images, two_train_images):
    """ffdnet_test/ldsTest.py on 24 patches: it trains the model with its window, reruns the window
    (the control reproduces the trained model bitwise, or it refuses), and scores Method 3, EK-FAC and
    Method 1 at every target with an interval; resumable (a second run reruns nothing); the removal
    reruns start from the one saved window start."""
    from ffdnet_test import ldsTest
    settings = small_window_settings(tmp_path, two_train_images, two_test_images)
    assert settings.ffdnet.activation == "softplus" and "ffdnet.window.epochs" not in settings.source.recipe_changed
    result = ldsTest.main(settings)
    rows = result["rows"]
    labels = ["01 whole", "01 40,40", "01 100,120"]
    for method in ("m3", "ekfac"):
        for fraction in (0.01, 0.05):
            mine = {r["target"]: r for r in rows if r["method"] == method and r["fraction"] == fraction and "low" in r}
            assert set(mine) == set(labels)
            assert all(-1 <= r["lds"] <= 1 and r["subsets"] == 4 for r in mine.values())
    assert {r["target"] for r in rows if r["method"] == "m1" and "low" in r} == set(labels[1:])  # no whole-image score
    assert len(result["top_k"]) == 3 and all(np.isfinite(r["measured"]) for r in result["top_k"])
    # the trained model ends where its window's replay ends, and Method 3 saw every target
    assert result["meta"]["method3"]["replay_relative_error"] < 1e-4 and result["meta"]["method3"]["targets"] == 3
    # Method 3 ranks these removals: on 24 patches, a 3-step window, it should predict them closely
    m3 = [r["lds"] for r in rows if r["method"] == "m3" and "low" in r]
    assert np.mean(m3) > 0.5, m3
    again = ldsTest.main(settings)
    assert again["runs"] == 0 and again["rows"] == rows
    # every rerun started from the same saved state: the 1% subsets (one patch each) and a rerun of the
    # control made by hand from the window start give the recorded losses to the bit
    start = window.load_start(settings, "cpu")
    data = attribution.training_triples(settings, "cpu")[:3]
    folder = lds.study_folder(settings)
    jobs = lds.plan(settings, 24, folder)
    by_hand = lds.run_job(jobs[1], start, data, *_tests(settings), settings)
    recorded = opt.read_json(jobs[1]["path"], "ldsTest")
    assert by_hand["losses"] == recorded["losses"]
    assert os.path.isfile(result["figure"])


def _tests(settings):
    return (attribution.model_order_pairs(settings, ["01"]),
            explain.point_targets(["01"], settings.ffdnet.attribution.points))


def test_question_ranks_by_method3_and_quotes_the_measured_lds(tmp_path, two_test_images, two_train_images):
    """With the attributable preset the one-step answer ranks by Method 3 through the window and quotes
    the LDS ldsTest measured for exactly these settings; with another pixel window it does not, and
    names the key; with the report's recipe it says no answer has been measured and how to measure one."""
    from ffdnet_test import ldsTest, run_pipeline
    settings = small_window_settings(tmp_path, two_train_images, two_test_images, methods=["m3"], top_k=0)
    settings = opt.with_values(settings, {"ffdnet": {"attribution": {"points": [[40, 40]]}}})
    ldsTest.main(settings)
    answer = run_pipeline.main(settings)
    assert answer["ranking"].startswith("Method 3 through the final window (3 steps)")
    pixel = answer["trust"][0]
    assert "pixel windows: single-model LDS" in pixel and "ldsTest in this output folder" in pixel, pixel
    record = opt.read_json(answer["files"]["01"], "run_pipeline")
    assert len(record["entries"]["point 40,40"]["influence"]) == 24
    other = run_pipeline.main(opt.with_values(settings, {"ffdnet": {"method2": {"window": 2}}}))
    assert "not measured for these settings" in other["trust"][0] and "pixel_window (2 here, 1 measured)" in other["trust"][0]
    report = opt.with_values(settings, {"ffdnet": {"window": {"epochs": 0.0}, "activation": "relu",
                                                   "question": {"best_solver": "ekfac"}}})
    plain = run_pipeline.main(report)
    assert "no method's answer has been measured for this recipe" in plain["trust"][0]
    assert 'ffdnet.recipe = "attributable"' in plain["trust"][0] and "ffdnet_test/ldsTest.py" in plain["trust"][0]


def test_window_reruns_are_the_window_and_nothing_else(tmp_path, two_test_images, two_train_images):
    """The ground truth reruns the window, not the training: a half-epoch window reaches 12 of 24
    patches; every subset removes only those; removing patches the window never reaches leaves every
    target's loss unchanged to the bit; all weights 1 is the trained run to the bit; and the window's
    rerun starts from the saved start, so it reproduces the trained model (the control)."""
    from ffdnet_test import FFDNet_Train, common
    settings = small_window_settings(tmp_path, two_train_images, two_test_images)
    settings = opt.with_values(settings, {"ffdnet": {"window": {"epochs": 0.5}}})
    FFDNet_Train.main(settings)
    cfg = settings.ffdnet
    reached = window.patches_reached(cfg, 24)
    assert len(reached) == 16
    jobs = lds.plan(settings, 24, str(tmp_path / "plan"))
    assert all(set(j["removed"].tolist()) <= set(reached.tolist()) for j in jobs)
    assert {len(j["removed"]) for j in jobs if j["fraction"] == 0.05} == {1}  # 5% of 16 patches, at least one
    start = window.load_start(settings, "cpu")
    noisy, clean, sigma, _ = attribution.training_triples(settings, "cpu")
    trained, _ = common.load_model(settings, "cpu")
    control = window.rerun(start, noisy, clean, sigma, cfg, None)
    ones = window.train_window(copy.deepcopy(start), noisy, clean, sigma, cfg, weights=torch.ones(24))
    for a, b, c in zip(trained.state_dict().values(), control.state_dict().values(), ones.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    unreached = torch.tensor(sorted(set(range(24)) - set(reached.tolist())))
    away = window.rerun(start, noisy, clean, sigma, cfg, unreached[:5])
    assert all(torch.equal(a, b) for a, b in zip(away.state_dict().values(), trained.state_dict().values()))
    one = window.rerun(start, noisy, clean, sigma, cfg, reached[:1])
    assert not all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), trained.state_dict().values()))
    # and the window's start is not the trained model: the reruns do not begin at the end
    assert not all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))


def test_attributable_preset_keeps_your_values_and_names_the_window(tmp_path):
    """ffdnet.recipe "attributable" sets the activation and the window, keeps a value you set and says so;
    the model file names the window (results with other settings never overwrite each other)."""
    from ffdnet_test import common
    settings = opt.load_settings(overrides={"output_dir": str(tmp_path), "ffdnet": {"recipe": "attributable",
                                                                                     "window": {"epochs": 2}}})
    preset = opt.preset_values("attributable", "ffdnet")
    assert settings.ffdnet.activation == preset["ffdnet.activation"]
    assert settings.ffdnet.window.epochs == 2 and any(k.startswith("ffdnet.window.epochs = 2") for k in
                                                     settings.source.recipe_kept)
    report = opt.load_settings(overrides={"output_dir": str(tmp_path)})
    assert report.ffdnet.window.epochs == 0 and report.ffdnet.activation == "relu"
    assert common.model_file(settings) != common.model_file(report)
    assert common.window_part(settings.ffdnet.window) in common.model_file(settings)
