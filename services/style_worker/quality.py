"""Style-transfer quality measures of the concept paper (§9.6): SSIM, PSNR, style consistency.

SSIM and PSNR compare the *luminance* of the stylized image with the content
image: style transfer is supposed to change colours and texture, so what is
worth keeping — and measuring — is the structure. SSIM follows Wang et al.
(2004): 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from services.style_worker.engine import cosine

_K1, _K2, _L = 0.01, 0.03, 255.0
_SIGMA = 1.5
_TRUNCATE = 3.5  # radius 5 at sigma 1.5: the classic 11x11 window


def luminance(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """BT.601 luma (Pillow's "L") as float64, optionally resized first."""
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img.convert("L"), dtype=np.float64)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two same-shaped 2-D luminance arrays in 0..255."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return np.asarray(gaussian_filter(x, _SIGMA, truncate=_TRUNCATE))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, cap_db: float = 100.0) -> float:
    """Peak signal-to-noise ratio in dB (identical images are reported as ``cap_db``)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0:
        return cap_db
    return min(cap_db, 10.0 * math.log10(_L * _L / mse))


def content_scores(content: Image.Image, result: Image.Image) -> tuple[float, float]:
    """(SSIM, PSNR) between content and result luminance, at the result's size."""
    a = luminance(content, result.size)
    b = luminance(result)
    return ssim(a, b), psnr(a, b)


def style_consistency(result_vec: np.ndarray, content_vec: np.ndarray, style_vec: np.ndarray) -> tuple[float, float]:
    """(cos(result, style), gain over cos(content, style)) in style-embedding space."""
    consistency = cosine(result_vec, style_vec)
    return consistency, consistency - cosine(content_vec, style_vec)
