"""2D image files (PNG, JPEG, TIFF, BMP): read as uint8 RGB for the model; write masks atomically.

Grey, grey+alpha, RGB and RGBA; 8- and 16-bit. Images with more than 8 bits (16-bit PNG/TIFF, float TIFF)
are rescaled to 0-255 by min-max, MedSAM's convention for 2D images (``utils/pre_grey_rgb.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np


class ImageError(ValueError):
    """An image file cannot be used (missing, unreadable, wrong kind)."""


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max rescale any numeric array to uint8 (uint8 input is returned unchanged)."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError("the image contains NaN or infinite values")
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def read_image(path: os.PathLike) -> np.ndarray:
    """Read a 2D image file -> ``(H, W, 3)`` uint8 RGB. Multi-frame files use the first frame."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode.startswith(("I", "F")):  # 16/32-bit integer or float grey
                array = to_uint8(np.asarray(im))
            else:
                array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path} is not a readable image (PNG, JPEG, TIFF, BMP): {e}") from None
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"{path}: unsupported image layout {array.shape}")
    if min(array.shape[:2]) < 2:
        raise ImageError(f"{path} is only {array.shape[1]} x {array.shape[0]} pixels")
    return np.ascontiguousarray(array, dtype=np.uint8)


def check_writable(path: os.PathLike) -> Path:
    """Fail early (before any computation) if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ImageError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ImageError(f"output folder {parent} is not writable")
    if path.is_dir():
        raise ImageError(f"output {path} is a folder; give a file name")
    return path


def _atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_mask(path: os.PathLike, mask: np.ndarray, value: int = 255) -> Path:
    """Write an ``(H, W)`` bool mask as an 8-bit PNG (0 / ``value``), atomically."""
    from PIL import Image

    path = check_writable(path)
    image = Image.fromarray(np.where(mask, value, 0).astype(np.uint8), mode="L")
    return _atomic(path, lambda p: image.save(p, format="PNG"))


def write_array(path: os.PathLike, array: np.ndarray, dtype: Optional[type] = np.float32) -> Path:
    """Write a numpy array (``.npy``) atomically."""
    path = check_writable(path)

    def save(p):
        with open(p, "wb") as f:
            np.save(f, array.astype(dtype) if dtype else array)

    return _atomic(path, save)


def write_text(path: os.PathLike, text: str) -> Path:
    """Write a text file (e.g. a JSON report) atomically."""
    path = check_writable(path)
    return _atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
