"""Test images shared by the corruption tests (test_corruptions.py, test_corruption_functions.py)."""
from __future__ import annotations

import numpy as np


def constant(value, shape=(256, 256)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def textured(shape=(96, 128, 3), seed=0) -> np.ndarray:
    """Smooth coloured blobs plus fine noise: something for JPEG, blur and colour to act on."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3)) + [60.0, 50.0, 40.0]
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(20, 90, 3)
    img += rng.normal(0, 6, img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img if len(shape) == 3 else img[..., 1].copy()


def residual(out: np.ndarray, value) -> np.ndarray:
    return out.astype(np.float64) - value
