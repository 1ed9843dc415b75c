"""MNIST held in memory as one tensor, with each item's original index kept through every change.

Images are normalised like the original (ToTensor then Normalize(0.5, 0.5): pixels in [-1, 1]) and
flattened to 784 values. ``relabel`` and ``remove`` return new datasets whose ``indices`` still name
the original training images (0..59,999), which the explainability test needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from data.mnist_data import ensure_mnist, read_idx


@dataclass(frozen=True)
class MnistData:
    images: torch.Tensor   # (n, 784) float32 in [-1, 1]
    labels: torch.Tensor   # (n,) int64
    indices: torch.Tensor  # (n,) int64: original index of each item

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "MnistData":
        return MnistData(self.images.to(device), self.labels.to(device), self.indices.to(device))

    def positions_of(self, original: torch.Tensor | list[int]) -> torch.Tensor:
        """Positions of the given original indices in this dataset (error if one is missing)."""
        original = torch.as_tensor(original, dtype=torch.int64).cpu()
        lookup = torch.full((int(self.indices.max()) + 1 if len(self) else 1,), -1, dtype=torch.int64)
        lookup[self.indices.cpu()] = torch.arange(len(self))
        if len(original) and (original.max() >= len(lookup) or (lookup[original] < 0).any()):
            raise KeyError("some original indices are not in this dataset")
        return lookup[original]

    def relabel(self, original: torch.Tensor | list[int], new_labels: torch.Tensor | int) -> "MnistData":
        """A copy with the items of the given original indices relabelled."""
        labels = self.labels.clone()
        labels[self.positions_of(original).to(labels.device)] = torch.as_tensor(
            new_labels, dtype=labels.dtype, device=labels.device)
        return MnistData(self.images, labels, self.indices)

    def remove(self, original: torch.Tensor | list[int]) -> "MnistData":
        """A copy without the given original indices (duplicates harmless); order is kept."""
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[self.positions_of(original)] = False
        keep = keep.to(self.labels.device)
        return MnistData(self.images[keep], self.labels[keep], self.indices[keep])

    def subset(self, n: int) -> "MnistData":
        """The first ``n`` items (``n`` = 0 keeps everything)."""
        if n <= 0 or n >= len(self):
            return self
        return MnistData(self.images[:n], self.labels[:n], self.indices[:n])


def normalise(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 784) in [-1, 1], exactly ToTensor + Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.array(images_uint8, dtype=np.uint8)).reshape(len(images_uint8), -1)
    return (x.to(torch.float32) / 255.0 - 0.5) / 0.5


def load_mnist(data_dir: str, train: bool, log=print) -> MnistData:
    """All of the MNIST train (60,000) or test (10,000) split, fetching the files on first use."""
    raw = ensure_mnist(data_dir, log)
    prefix = "train" if train else "t10k"
    images = read_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"))
    return MnistData(normalise(images), torch.from_numpy(labels.astype(np.int64)),
                     torch.arange(len(labels), dtype=torch.int64))
