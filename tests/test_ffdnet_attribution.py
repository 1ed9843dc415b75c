"""FFDNet attribution: point mapping, Method-1 scores, pixel-level loss gradients, the scripts."""
import os

import numpy as np
import torch

import utils_if
import utils_option as opt
from ffdnet_test import attribution
from ffdnet_test.attribution import window_mask
from ffdnet_test.model import FFDNet, PackedInput, feature_position



def test_point_to_feature_map_mapping():
    assert feature_position(100, 200) == (50, 100)
    assert feature_position(101, 201) == (50, 100)  # the 2x2 block of a feature position
    net = FFDNet(True, "plain", num_layers=3, channels=4)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 5, 2] = 1.0  # pixel (row 5, col 2) -> feature position (2, 1), unshuffle channel 2*1+0
    head = net.head(x, torch.tensor([0.0]))
    assert head[0, :4].nonzero().tolist() == [[2, 2, 1]]


def test_activation_at_point_reads_row_then_column():
    torch.manual_seed(0)
    net = FFDNet(True, "plain", num_layers=3, channels=4).eval()
    noisy = torch.rand(1, 12, 16)
    acts = attribution.activations_at(net, noisy, 0.1, [2], [[6, 10], [10, 6]], "block")
    store = {}
    net.main[3].register_forward_hook(lambda m, i, o: store.update(o=o))
    net(noisy[None], torch.tensor([0.1]))
    assert torch.equal(acts[2][0], store["o"][0, :, 3, 5]) and torch.equal(acts[2][1], store["o"][0, :, 5, 3])


def test_method1_modes_equal_brute_force_loop():
    torch.manual_seed(0)
    act = torch.rand(2, 6)
    norms = torch.rand(9, 6, dtype=torch.float64) * 3
    for mode in ("raw", "normalized", "remove_out"):
        scores = attribution.mode_scores(act, norms, mode, outlim=9.0)
        for p in range(2):
            for i in range(9):
                g = norms[i] / norms[i].sum() if mode == "normalized" else norms[i]
                expected = float(act[p].double() @ g)
                if mode == "remove_out" and norms[i].sum() > 9.0:
                    assert scores[p, i] == float("-inf")
                else:
                    assert abs(scores[p, i].item() - expected) < 1e-9


def test_pixel_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = PackedInput(FFDNet(True, "plain", num_layers=3, channels=3)).double().eval()
    problem = utils_if.InfluenceProblem(net, utils_if.mse_sample_loss, utils_if.select_parameters(net))
    clean = torch.rand(1, 1, 10, 10, dtype=torch.float64)
    x = PackedInput.pack(clean + 0.1 * torch.randn_like(clean), torch.tensor([0.1], dtype=torch.float64))
    loss = utils_if.masked_mse_sample_loss(window_mask((1, 10, 10), [4, 7], 1).double())
    g = problem.sample_grads(x, clean, loss=loss)[0]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    direction = torch.randn_like(flat)
    eps = 1e-6

    def value(theta):
        torch.nn.utils.vector_to_parameters(theta, net.parameters())
        with torch.no_grad():
            return loss(net(x), clean).item()
    numeric = (value(flat + eps * direction) - value(flat - eps * direction)) / (2 * eps)
    torch.nn.utils.vector_to_parameters(flat, net.parameters())
    assert abs(numeric - float(g @ direction)) < 1e-6 * max(1.0, abs(numeric))
    # and the window loss only sees the window: changing a far pixel's target changes nothing
    far = clean.clone()
    far[0, 0, 0, 0] += 0.5
    assert torch.equal(loss(net(x), clean), loss(net(x), far))


def test_attribution_scripts_small(tmp_path, two_test_images, two_train_images):
    from ffdnet_test import FFDNet_Train, diagnose, m1_PatchImg, m1_Test, m1_vis, m2_Test, m2_vis
    test_dir = two_test_images
    settings = opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {"train_dir": str(two_train_images),
            "max_patches": 40, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8,
            "val_dir": str(test_dir), "test_dir": str(test_dir),
            "attribution": {"images": ["01", "02"], "points": [[20, 30], [200, 220]], "vis_num": 3},
            "method2": {"recursion_depth": 5, "max_train_points": 40, "chunk_size": 16, "scale": 1000}}})
    FFDNet_Train.main(settings)
    m1 = m1_Test.main(settings)["files"]
    record = opt.read_json(m1["01"], "m1_Test")
    assert len(record["entries"]) == 3 * 3 * 2  # layers x modes x points
    assert all(len(e["scores"]) == 40 and len(e["top"]) == 40 for e in record["entries"])
    m2 = m2_Test.main(settings)
    entries = opt.read_json(m2["files"]["02"], "m2_Test")["entries"]
    assert set(entries) == {"whole", "point 20,30", "point 200,220"}
    assert all(np.isfinite(e["influence"]).all() and len(e["influence"]) == 40 for e in entries.values())
    ekfac = opt.with_values(settings, {"ffdnet": {"method2": {"solver": "ekfac"}}})
    fast = m2_Test.main(ekfac)
    assert fast["files"]["02"] != m2["files"]["02"] and fast["info"]["fisher"] == "empirical"
    fast_entries = opt.read_json(fast["files"]["02"], "m2_Test")["entries"]
    assert all(np.isfinite(e["influence"]).all() and len(e["influence"]) == 40 for e in fast_entries.values())
    assert os.path.isfile(fast["info"]["factor_file"])  # written once, reused by the next run
    table = diagnose.main(settings)["rows"]
    assert any(name.startswith("Method 2, pixel") for name, *_ in table)
    for name, within, across in table:
        assert np.isnan(within) or 0 <= within <= 100
    import matplotlib.image as mpimg
    for path in m1_vis.main(settings)["figures"] + m2_vis.main(settings)["figures"]:
        assert mpimg.imread(path).std() > 0.02
    where = m1_PatchImg.main(settings, [0, 39])
    # 180x180 images hold 5 x 5 patches of 32: patch 39 is image 2's patch 14 (row 2, col 4)
    assert where[0]["row"] == 0 and os.path.basename(where[39]["file"]) == "test_002.png"
    assert (where[39]["row"], where[39]["col"]) == (64, 128)
