"""Shared fixtures: the repo on sys.path, real MNIST (fetched once), small settings in a temp dir.

The tests never write into the clone's data/: MNIST and the downloaded wheels go to
$TOOLKIT_DATA_DIR, a folder of the system's temporary directory unless set (kept between runs, so
that MNIST is fetched once per machine)."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEST_DATA = os.environ.setdefault("TOOLKIT_DATA_DIR", os.path.join(tempfile.gettempdir(), "toolkit-test-data"))

import utils_option as opt  # noqa: E402


@pytest.fixture(scope="session")
def mnist_raw():
    from data.mnist_data import ensure_mnist
    return ensure_mnist(TEST_DATA)


@pytest.fixture(scope="session")
def mnist_train(mnist_raw):
    from mnist_test.datasets import load_mnist
    return load_mnist(TEST_DATA, train=True)


SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture(scope="session")
def skimage_wheel():
    """The scikit-image wheel, fetched from PyPI by the project's own data script (cached in
    data/downloads): the real photographs the FFDNet tests use, so that they stand on the
    repository and the registry alone (never on ../shared)."""
    from data.ffdnet_data import _pip_download
    wheel = _pip_download("scikit-image", os.path.join(TEST_DATA, "downloads"), lambda *_: None)
    if wheel is None:
        pytest.skip("PyPI not reachable: the FFDNet tests need the scikit-image wheel's photographs")
    return wheel


def _photo_crops(wheel, folder, names_and_targets, size):
    """Gray centre crops (size x size) of the wheel's photographs, saved under new names."""
    import io
    import zipfile
    from PIL import Image
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for photo, target in names_and_targets:
            image = Image.open(io.BytesIO(z.read(f"skimage/data/{photo}"))).convert("L")
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            image.crop((left, top, left + size, top + size)).save(folder / target)
    return folder


@pytest.fixture
def two_test_images(tmp_path, skimage_wheel):
    """Two 256 x 256 gray test photographs named like Set12's (01.png, 02.png)."""
    return _photo_crops(skimage_wheel, tmp_path / "two", [("camera.png", "01.png"), ("coins.png", "02.png")], 256)


@pytest.fixture
def two_train_images(tmp_path, skimage_wheel):
    """Two 180 x 180 gray training photographs named like Train400's (test_001.png, test_002.png)."""
    return _photo_crops(skimage_wheel, tmp_path / "train",
                        [("astronaut.png", "test_001.png"), ("chelsea.png", "test_002.png")], 180)


def central_differences(targets_at, n: int, eps: float = 1e-6):
    """(k, n) central finite differences of ``targets_at(w)`` ((k,) targets of a run made with data
    weights w, float64) in each of the n weights around w = 1: Method 3's independent check."""
    import torch
    columns = []
    for i in range(n):
        values = []
        for sign in (1, -1):
            w = torch.ones(n, dtype=torch.float64)
            w[i] += sign * eps
            values.append(targets_at(w))
        columns.append((values[0] - values[1]) / (2 * eps))
    return torch.stack(columns, dim=1)


def small_settings(tmp_path, **mnist_overrides) -> dict:
    """The repo's settings with a temp output_dir and a small, fast MNIST configuration."""
    base = {"epoch": 1, "train_subset": 600, "test_ids": [0, 1, 2], "test_num": 3,
            "method2": {"recursion_depth": 50, "repeats": 2, "chunk_size": 256,
                        "test_sample_num": 3}}
    merged = opt.deep_merge(base, mnist_overrides)
    return opt.load_settings(overrides={"output_dir": str(tmp_path / "results"), "mnist": merged})
