"""The MNIST scripts end to end on a small real configuration: Method-1 scores against a brute-force
loop, the JSON schemas, and figures that are real pictures (not blank)."""
import numpy as np
import pytest
import torch

import utils_if
import utils_option as opt
from mnist_test import Test, Train, common, m1_Test, m2_Test, vis_m1, vis_m1_grad, vis_m2
from tests.conftest import small_settings


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mnist_raw):
    tmp = tmp_path_factory.mktemp("pipe")
    settings = small_settings(tmp, train_subset=400, test_ids="loss_rank", test_num=4,
                              test_rank_step=50, method2={"chunk_size": 150, "test_sample_num": 3})
    outputs = {m.__name__: m.main(settings) for m in (Train, Test, m1_Test, m2_Test)}
    return settings, outputs


def test_method1_scores_equal_brute_force_loop(pipeline):
    settings, outputs = pipeline
    record = opt.read_json(outputs["mnist_test.m1_Test"]["act_grad_file"], "m1_Test")
    model, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    norms, _ = common.load_grad_norms(settings)
    test = common.load_test_data(settings, torch.device("cpu"))
    entry = record["0"]
    x = test.images[entry["test_id_num"]]
    with torch.no_grad():
        h1 = torch.relu(model.main[0](x))
        h2 = torch.relu(model.main[2](h1))
    expected = [float(h1.double() @ norms["fc1"][i] + h2.double() @ norms["fc2"][i])
                for i in range(len(entry["scores"]))]
    assert np.allclose(entry["scores"], expected, rtol=1e-6)
    assert entry["top"][:10] == list(np.argsort(-np.array(expected), kind="stable")[:10])


def test_method1_scores_function_is_a_sum_of_dots():
    torch.manual_seed(0)
    acts = {"a": torch.randn(3, 4), "b": torch.randn(3, 2)}
    norms = {"a": torch.rand(7, 4, dtype=torch.float64), "b": torch.rand(7, 2, dtype=torch.float64)}
    scores = utils_if.method1_scores(acts, norms)
    for t in range(3):
        for i in range(7):
            expected = sum(float(acts[k][t].double() @ norms[k][i]) for k in acts)
            assert abs(scores[t, i].item() - expected) < 1e-9


def test_test_ids_follow_loss_rank(pipeline):
    settings, outputs = pipeline
    record = opt.read_json(outputs["mnist_test.Test"]["test_file"], "Test")
    assert [r["loss_rank"] for r in record["images"]] == [0, 50, 100, 150]
    losses = [r["loss"] for r in record["images"]]
    assert losses == sorted(losses, reverse=True)


def test_influence_file_schema(pipeline):
    settings, outputs = pipeline
    record = opt.read_json(outputs["mnist_test.m2_Test"]["if_file"], "m2_Test")
    assert record["meta"]["n_train"] == 400 and "positive" in record["meta"]["sign_convention"]
    for key in ("0", "1", "2"):
        entry = record[key]
        influence = np.array(entry["influence"])
        assert influence.shape == (400,) and np.isfinite(influence).all()
        assert entry["helpful"][0] == int(influence.argmax())
        assert entry["harmful"][0] == int(influence.argmin())
        assert {"test_id_num", "label", "prediction", "loss"} <= set(entry)


def _assert_real_picture(path):
    import matplotlib.image as mpimg
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.1  # digits on white: far from blank


def test_vis_scripts_write_real_pngs(pipeline):
    settings, _ = pipeline
    _assert_real_picture(vis_m1_grad.main(settings)["figure"])
    _assert_real_picture(vis_m1.main(settings)["figure"])
    figures = vis_m2.main(settings)["figures"]
    assert set(figures) == {"helpful", "harmful"}
    for path in figures.values():
        _assert_real_picture(path)
