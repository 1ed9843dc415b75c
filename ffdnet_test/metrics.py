"""PSNR and SSIM on 8-bit images, as KAIR and the original code compute them."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8 (clamped, rounded)."""
    return (image.detach().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB of two uint8 (H, W[, C]) images, ``border`` pixels cropped."""
    h, w = a.shape[:2]
    a = a[border:h - border, border:w - border].astype(np.float64)
    b = b[border:h - border, border:w - border].astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 20 * np.log10(255.0 / np.sqrt(mse))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = np.arange(11) - 5
    g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    window = np.outer(g, g)

    def filt(img: np.ndarray) -> np.ndarray:  # "valid" 2-D correlation with the 11x11 Gaussian
        t = torch.from_numpy(img)[None, None]
        k = torch.from_numpy(window)[None, None]
        return torch.nn.functional.conv2d(t, k).numpy()[0, 0]
    mu1, mu2 = filt(a), filt(b)
    s11, s22, s12 = filt(a * a) - mu1 ** 2, filt(b * b) - mu2 ** 2, filt(a * b) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM (11x11 Gaussian window, sigma 1.5, valid region), averaged over channels."""
    h, w = a.shape[:2]
    a = a[border:h - border, border:w - border].astype(np.float64)
    b = b[border:h - border, border:w - border].astype(np.float64)
    if a.ndim == 2:
        return _ssim_channel(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))
