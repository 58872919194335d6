"""Colour-space helpers of the ``color_jitter`` corruption: luma and an HSV hue rotation.

Float RGB arrays ``(..., 3)``; hue is a fraction of a full turn (0..1), as in :mod:`RobustMedSAMLib.corruptions`.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def luma(rgb: np.ndarray) -> np.ndarray:
    """``0.299 R + 0.587 G + 0.114 B`` of float RGB ``(..., 3)``."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _rgb_to_hsv(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float RGB in 0..1 -> hue (fraction of a turn, 0..1), saturation, value."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax = rgb.max(axis=-1)
    delta = vmax - rgb.min(axis=-1)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(vmax == r, np.mod((g - b) / safe, 6.0),
                   np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue / 6.0, 0.0)
    sat = np.where(vmax > 0, delta / np.where(vmax > 0, vmax, 1.0), 0.0)
    return hue, sat, vmax


def _hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    h6 = np.mod(hue, 1.0) * 6.0
    sector = np.floor(h6)
    frac = h6 - sector
    sector = sector.astype(np.int64) % 6
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    r = np.choose(sector, [val, q, p, p, t, val])
    g = np.choose(sector, [t, val, val, q, p, p])
    b = np.choose(sector, [p, p, t, val, val, q])
    return np.stack([r, g, b], axis=-1)


def rotate_hue(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Float RGB (0..255) with its HSV hue rotated by ``turns`` of a full turn (modulo one turn)."""
    hue, sat, val = _rgb_to_hsv(rgb / 255.0)
    return _hsv_to_rgb(hue + turns, sat, val) * 255.0
