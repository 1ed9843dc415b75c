"""Shared fixtures: the repo on sys.path, real MNIST (fetched once), small settings in a temp dir."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils_option as opt  # noqa: E402


@pytest.fixture(scope="session")
def mnist_raw():
    from data.mnist_data import ensure_mnist
    return ensure_mnist(os.path.join(ROOT, "data"))


@pytest.fixture(scope="session")
def mnist_train(mnist_raw):
    from mnist_test.datasets import load_mnist
    return load_mnist(os.path.join(ROOT, "data"), train=True)


SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture
def two_test_images(tmp_path):
    """A folder with Set12's 01.png and 02.png (from ../shared/data)."""
    import shutil
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data not beside the repo")
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("01.png", "02.png"):
        shutil.copy(os.path.join(SHARED, "ffdnet", "Set12", name), folder)
    return folder


def small_settings(tmp_path, **mnist_overrides) -> dict:
    """The repo's settings with a temp output_dir and a small, fast MNIST configuration."""
    base = {"epoch": 1, "train_subset": 600, "test_ids": [0, 1, 2], "test_num": 3,
            "method2": {"training_points": 50, "recursion_nums": 2, "chunk_size": 256,
                        "test_sample_num": 3}}
    merged = opt.deep_merge(base, mnist_overrides)
    return opt.load_settings(overrides={"output_dir": str(tmp_path / "results"), "mnist": merged})
