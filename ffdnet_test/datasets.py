"""FFDNet images and training patches.

Files are read in sorted name order (so that patch indices do not depend on the file system),
with PIL, as gray or RGB float32 in [0, 1], shape (C, H, W). Patches are cut on a grid of
``patch_size`` with ``stride`` (the original: 64 and 64), row-major within an image, images in
order; every patch has a stable index and knows its source file and position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """An empty/missing folder or an unreadable image; the message names it."""


def list_images(folder: str) -> list[str]:
    """Image files of ``folder`` in sorted name order; a clear error when there are none."""
    if not os.path.isdir(folder):
        raise ImageFolderError(f"image folder not found: {folder} (set the folder in the settings, "
                               f"or run python data/ffdnet_data.py)")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ImageFolderError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [os.path.join(folder, f) for f in files]


def read_image(path: str, gray: bool) -> torch.Tensor:
    """One image as float32 (C, H, W) in [0, 1], C = 1 (gray) or 3 (RGB)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            img = img.convert("L" if gray else "RGB")
            array = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as err:
        raise ImageFolderError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array[None] if gray else array.transpose(2, 0, 1).copy())


def read_folder(folder: str, gray: bool) -> tuple[list[str], list[torch.Tensor]]:
    paths = list_images(folder)
    return paths, [read_image(p, gray) for p in paths]


def grid_positions(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the patches of one image, row-major; none if the image is too small."""
    rows = range(0, height - patch_size + 1, stride)
    cols = range(0, width - patch_size + 1, stride)
    return [(r, c) for r in rows for c in cols]


@dataclass
class PatchSet:
    """All training patches in one tensor, with where each came from."""
    clean: torch.Tensor             # (P, C, ps, ps)
    image_index: torch.Tensor       # (P,) index into ``files``
    position: torch.Tensor          # (P, 2) (row, col) of the patch's top-left corner
    files: list[str]
    patch_size: int
    stride: int

    def __len__(self) -> int:
        return len(self.clean)

    @classmethod
    def from_folder(cls, folder: str, gray: bool, patch_size: int, stride: int,
                    max_patches: int = 0) -> "PatchSet":
        files, images = read_folder(folder, gray)
        return cls.from_images(files, images, patch_size, stride, max_patches)

    @classmethod
    def from_images(cls, files: list[str], images: list[torch.Tensor], patch_size: int, stride: int,
                    max_patches: int = 0) -> "PatchSet":
        patches, owners, corners = [], [], []
        for k, img in enumerate(images):
            for r, c in grid_positions(img.shape[1], img.shape[2], patch_size, stride):
                patches.append(img[:, r:r + patch_size, c:c + patch_size])
                owners.append(k)
                corners.append((r, c))
        if not patches:
            raise ImageFolderError(f"no {patch_size}x{patch_size} patch fits in any image of "
                                   f"{os.path.dirname(files[0]) if files else '?'}")
        if max_patches:
            patches, owners, corners = patches[:max_patches], owners[:max_patches], corners[:max_patches]
        return cls(torch.stack(patches), torch.tensor(owners), torch.tensor(corners), files,
                   patch_size, stride)

    def locate(self, index: int) -> dict:
        """Where patch ``index`` comes from: file, image index, (row, col) and size."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range 0..{len(self) - 1}")
        row, col = self.position[index].tolist()
        k = int(self.image_index[index])
        return {"patch": index, "image_index": k, "file": self.files[k], "row": row, "col": col,
                "size": self.patch_size}


def draw_noise(n: int, shape: tuple[int, ...], sigma_range: tuple[float, float], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """n noise levels sigma ~ U[min, max] (0-255 units) and Gaussian noise of those levels:
    (sigma/255 (n,), noise (n, *shape)), drawn in that order from ``generator``."""
    low, high = sigma_range
    sigma = (low + (high - low) * torch.rand(n, generator=generator)) / 255.0
    noise = torch.randn((n, *shape), generator=generator) * sigma.view(-1, *([1] * len(shape)))
    return sigma, noise


def fixed_noise(n: int, shape: tuple[int, ...], sigma_range: tuple[float, float], seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded draw per patch (the fixed_noise training set): (sigma/255 (n,), noise)."""
    return draw_noise(n, shape, sigma_range, torch.Generator().manual_seed(seed))
