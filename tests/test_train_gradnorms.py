"""Method-1 gradient norms from training equal a brute-force per-sample loop; file naming."""
import torch
import torch.nn.functional as F

import utils_option as opt
from mnist_test.model import mnist_model
from mnist_test.training import train_model
from tests.conftest import small_settings

CFG = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 8, "epoch": 2}


def brute_force_norms(data, seed, grad_mode, skip_first_epoch):
    """Re-train independently, one autograd call per image, and accumulate the row norms."""
    torch.manual_seed(seed)
    model = mnist_model()
    opt_sgd = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9, weight_decay=0.001)
    gen = torch.Generator().manual_seed(seed)
    weights = [model.main[0].weight, model.main[2].weight, model.main[4].weight]
    acc = [torch.zeros(len(data), w.shape[0], dtype=torch.float64) for w in weights]
    for epoch in range(CFG["epoch"]):
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(data), 8):
            idx = order[s:s + 8]
            x, y = data.images[idx], data.labels[idx]
            if epoch >= 1 or not skip_first_epoch:
                for j, i in enumerate(idx.tolist()):
                    if grad_mode == "per_sample":
                        loss_i = F.nll_loss(model(x[j:j + 1]), y[j:j + 1])
                        grads = torch.autograd.grad(loss_i, weights)
                    else:
                        grads = torch.autograd.grad(F.nll_loss(model(x), y), weights)
                    for a, g in zip(acc, grads):
                        a[i] += torch.linalg.vector_norm(g.double(), dim=1)
            opt_sgd.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt_sgd.step()
    return acc


def check_mode(data, grad_mode, skip):
    model, norms = train_model(data, {**CFG, "seed": 3}, device=torch.device("cpu"), grad_mode=grad_mode,
                               skip_first_epoch=skip, show_progress=False)
    reference = brute_force_norms(data, 3, grad_mode, skip)
    assert not any(t.requires_grad for t in norms.values())  # no autograd graph accumulated
    for name, ref in zip(("fc1", "fc2", "fc3"), reference):
        rel = ((norms[name] - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, (grad_mode, name, rel)
        assert ref.abs().sum() > 0
    return norms


def test_batch_mode_equals_brute_force(mnist_train):
    norms = check_mode(mnist_train.subset(36), "batch", skip=True)
    # in batch mode every member of a batch gets the same vector each epoch
    assert norms["fc3"].shape == (36, 10)


def test_per_sample_mode_equals_brute_force(mnist_train):
    norms = check_mode(mnist_train.subset(36), "per_sample", skip=False)
    assert norms["fc1"].shape == (36, 128) and norms["fc2"].shape == (36, 64)


def test_seeded_training_is_reproducible(mnist_train):
    data = mnist_train.subset(64)
    a, _ = train_model(data, {**CFG, "seed": 5}, torch.device("cpu"), show_progress=False)
    b, _ = train_model(data, {**CFG, "seed": 5}, torch.device("cpu"), show_progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_train_script_files_and_replacement_log(tmp_path, mnist_raw):
    from mnist_test import Train
    settings = small_settings(tmp_path, train_subset=200)
    first = Train.main(settings)
    other = Train.main(small_settings(tmp_path, train_subset=200,
                                      method1={"grad_mode": "per_sample"}))
    seeded = Train.main(small_settings(tmp_path, train_subset=200, seed=1))
    assert len({first["grad_norm"], other["grad_norm"], seeded["grad_norm"]}) == 3
    assert first["model"] != seeded["model"]
    record = opt.read_json(first["grad_norm"], "Train.py")
    assert record["meta"]["n_train"] == 200 and len(record["arrays"]["fc1"]) == 200
    assert len(record["arrays"]["fc3"][0]) == 10
    again = Train.main(settings)  # same settings again: the log must say it replaces the earlier files
    text = open(again["log"]).read()
    assert f"replacing the earlier result {first['grad_norm']}" in text
    assert f"replacing the earlier result {first['model']}" in text
    assert "replacing" not in open(first["log"]).read()
