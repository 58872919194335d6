"""Small synthetic segmentation data with known masks (for smoke runs and tests).

Each image is a noisy textured background with one bright ellipse or rectangle (the labelled object)
and optionally a smaller distractor object of the same kind that is labelled too (so the "largest
object" rule matters). Everything is generated from ``numpy.random.default_rng([seed, index])``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np


def shape_sample(size: int = 64, seed: int = 0, index: int = 0, rgb: bool = False,
                 distractor: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (size, size[, 3]), label uint8 (size, size) in {0, 1})``."""
    rng = np.random.default_rng([int(seed), int(index)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.zeros((size, size), dtype=np.uint8)

    def draw(scale: float) -> np.ndarray:
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        ry, rx = rng.uniform(0.12, 0.22, size=2) * size * scale
        if rng.random() < 0.5:
            return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)

    main = draw(1.0)
    label[main] = 1
    if distractor:
        corner = np.zeros_like(main)
        r = max(2, size // 12)
        cy, cx = rng.integers(r, size // 5, size=2)
        corner[cy - r:cy + r, cx - r:cx + r] = True
        label[corner & ~main] = 1
    background = 60 + 25 * np.sin(xx / rng.uniform(3, 7)) * np.cos(yy / rng.uniform(3, 7))
    image = background + rng.normal(0, 8, size=(size, size)) + 110 * (label > 0)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if rgb:
        tint = rng.uniform(0.7, 1.0, size=3)
        image = np.clip(image[:, :, None] * tint, 0, 255).astype(np.uint8)
    return image, label


def shape_arrays(n: int, size: int = 64, seed: int = 0, rgb: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    pairs = [shape_sample(size, seed, i, rgb) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def write_medsegbench_npz(path: os.PathLike, counts=(8, 2, 4), size: int = 64, seed: int = 0,
                          rgb: bool = False) -> Path:
    """A MedSegBench-style ``.npz`` with ``{train,val,test}_images`` / ``{train,val,test}_label``."""
    arrays = {}
    for n, split in enumerate(("train", "val", "test")):
        images, labels = shape_arrays(counts[n], size, seed * 1000 + n, rgb)
        arrays[f"{split}_images"], arrays[f"{split}_label"] = images, labels
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def write_folder(root: os.PathLike, n: int = 6, size: int = 64, seed: int = 0, ext: str = ".png") -> Tuple[Path, Path]:
    """``root/images/case{i}{ext}`` and ``root/masks/case{i}.png`` (mask values 0/255)."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = shape_sample(size, seed, i)
        Image.fromarray(image).save(root / "images" / f"case{i}{ext}")
        Image.fromarray(label * 255).save(root / "masks" / f"case{i}.png")
    return root / "images", root / "masks"
