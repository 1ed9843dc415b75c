"""m2_Test with test_ids "all": streamed top-k lists, the optional .npy matrix, self-influence."""
import os
import numpy as np
import pytest
import torch

import utils_if
import utils_option as opt
from mnist_test import Train, common, m1_Test, m2_Test
from tests.conftest import small_settings


def test_all_pairs_matrix_topk_and_self_influence(tmp_path, mnist_raw):
    settings = small_settings(tmp_path, train_subset=200, epoch=2, test_ids="all",
                              method2={"solver": "ekfac", "save_matrix": "float32", "self_influence": True,
                                       "test_chunk": 3000, "top_k": 5, "params": ["main.2", "main.4"]})
    Train.main(settings)
    result = m2_Test.main(settings)
    assert "_all_" in result["if_file"]
    matrix = np.load(result["matrix"], mmap_mode="r")
    assert matrix.shape == (10000, 200) and matrix.dtype == np.float32
    record = opt.read_json(result["if_file"], "m2_Test")
    # rows equal a direct computation for a few test images; the lists are the rows' top-k
    model, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                        utils_if.select_parameters(model, ["main.2", "main.4"]), l2_reg=0.001)
    train = common.load_train_data(settings, torch.device("cpu"))
    test = common.load_test_data(settings, torch.device("cpu"))
    ids = [0, 2999, 3000, 9999]
    direct, _ = utils_if.compute_influences(problem, test.images[ids], test.labels[ids], train.images, train.labels,
                                            utils_if.solver_config("ekfac", seed=0), show_progress=False)
    assert np.allclose(matrix[ids], direct.numpy(), rtol=1e-4, atol=1e-6 * float(direct.abs().max()))
    for t in ids:
        assert record[str(t)]["helpful"] == np.argsort(-matrix[t], kind="stable")[:5].tolist()
        assert record[str(t)]["harmful"] == np.argsort(matrix[t], kind="stable")[:5].tolist()
    self_influence = np.array(record["self_influence"])
    assert self_influence.shape == (200,) and (self_influence > 0).all()
    # the factors were written once and are reused by a second run
    factors = common.factor_file(settings)
    assert os.path.isfile(factors)
    with pytest.raises(opt.SettingsError, match="600-million"):
        m1_Test.main(settings)
    trak = opt.with_values(settings, {"mnist": {"method2": {"solver": "trak", "proj_dim": 64, "save_matrix": "none"}}})
    trak_record = opt.read_json(m2_Test.main(trak)["if_file"], "m2_Test")
    scores = utils_if.Trak(problem, train.images, train.labels, 64, seed=0).scores(
        test.images[[7]], test.labels[[7]])[0]
    assert trak_record["7"]["helpful"] == utils_if.top_indices(scores, 5)
    leverage = np.array(trak_record["self_influence"])
    assert leverage.shape == (200,) and (leverage >= 0).all()
    bad = opt.with_values(settings, {"mnist": {"method2": {"solver": "lissa"}}})
    with pytest.raises(opt.SettingsError, match="fast solver"):
        m2_Test.main(bad)


def test_train_checkpoints_and_tracin_in_m2_test(tmp_path, mnist_raw):
    settings = small_settings(tmp_path, train_subset=200, epoch=2, checkpoint_every=1, test_ids=[0, 1],
                              method2={"solver": "tracin", "test_sample_num": 2})
    Train.main(settings)
    files = common.checkpoint_files(settings, "staTest0")
    assert len(files) == 2 and all(f.endswith(f"ep{e}.pth") for f, e in zip(files, (1, 2)))
    # the last checkpoint is the final model
    final, _ = common.load_model(settings, "staTest0", torch.device("cpu"))
    last = torch.load(files[-1], weights_only=True)["model"]
    assert all(torch.equal(last[k], v) for k, v in final.state_dict().items())
    record = opt.read_json(m2_Test.main(settings)["if_file"], "m2_Test")
    assert record["meta"]["solver_info"]["checkpoints"] == 2
    train = common.load_train_data(settings, torch.device("cpu"))
    test = common.load_test_data(settings, torch.device("cpu"))
    from mnist_test.model import mnist_model
    checkpoints = []
    for f in files:
        model = mnist_model()
        model.load_state_dict(torch.load(f, weights_only=True)["model"])
        checkpoints.append((utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                                      utils_if.select_parameters(model)), 0.003))
    direct = utils_if.tracin(checkpoints, test.images[[0, 1]], test.labels[[0, 1]], train.images, train.labels)
    assert np.allclose(record["0"]["influence"], direct[0].numpy(), rtol=1e-5, atol=1e-9)
    no_checkpoints = opt.with_values(settings, {"mnist": {"checkpoint_every": 0}})
    with pytest.raises(opt.SettingsError, match="checkpoint_every"):
        m2_Test.main(no_checkpoints)


def test_mislabel_study_small(tmp_path, mnist_raw):
    from mnist_test import mislabelTest
    labels = torch.arange(50) % 10
    new, mask = mislabelTest.flipped_labels(labels, 0.2, seed=3)
    assert mask.sum() == 10 and (new[torch.from_numpy(mask)] != labels[torch.from_numpy(mask)]).all()
    assert torch.equal(new[torch.from_numpy(~mask)], labels[torch.from_numpy(~mask)])
    assert torch.equal(new, mislabelTest.flipped_labels(labels, 0.2, seed=3)[0])
    settings = small_settings(tmp_path, mislabel={"train_subset": 1000, "epoch": 3, "fraction": 0.1})
    result = mislabelTest.main(settings)
    rows = {r["ranking"]: r for r in result["rows"]}
    assert set(rows) == {"EK-FAC self-influence", "K-FAC (factored damping) self-influence", "TracIn self-influence",
                         "TRAK self-influence", "Method 1 total gradient norm", "training loss", "random"}
    # real signal: every informed ranking beats chance clearly on 100 flipped labels; random does not
    for name in ("EK-FAC self-influence", "K-FAC (factored damping) self-influence", "TracIn self-influence",
                 "training loss"):
        assert rows[name]["roc_auc"] > 0.8 and rows[name]["found_top20%"] > 0.5
    assert 0.3 < rows["random"]["roc_auc"] < 0.7
    assert mislabelTest.main(settings)["rows"][0]["roc_auc"] == pytest.approx(rows["EK-FAC self-influence"]["roc_auc"])
