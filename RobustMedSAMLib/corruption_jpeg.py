"""JPEG round trip through Pillow, and libjpeg's quality scaling of the quantisation tables.

Used by the ``jpeg_compression`` corruption (:mod:`RobustMedSAMLib.corruptions`): severities 4 and 5 need
tables that are not clipped at 255, which Pillow's ``quality`` argument cannot give.
"""
from __future__ import annotations

import functools
import io
from typing import List, Tuple

import numpy as np


def jpeg_roundtrip(image: np.ndarray, quality: int, baseline: bool = True) -> np.ndarray:
    """``image`` (uint8 grey or RGB) encoded as JPEG by Pillow at ``quality`` and decoded again.

    ``baseline=False`` scales the standard tables like libjpeg without clipping them at 255 (what
    ``cjpeg -quality`` does without ``-baseline``), written as a progressive JPEG.
    """
    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if baseline:
        pil.save(buffer, format="JPEG", quality=int(quality))
    else:  # progressive: libjpeg would print a warning for 16-bit tables in a sequential file
        pil.save(buffer, format="JPEG", qtables=jpeg_tables(pil.mode, quality, baseline=False), progressive=True)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L" if image.ndim == 2 else "RGB"), dtype=np.uint8).copy()


@functools.lru_cache(maxsize=None)
def _standard_tables(mode: str) -> Tuple[Tuple[int, ...], ...]:
    """The encoder's unscaled quantisation tables (those of quality 50), natural order, luma first."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (8, 8)).save(buffer, format="JPEG", quality=50)
    buffer.seek(0)
    with Image.open(buffer) as probe:
        tables = probe.quantization
    return tuple(tuple(int(v) for v in tables[k]) for k in sorted(tables))


def jpeg_tables(mode: str, quality: int, baseline: bool = True) -> List[List[int]]:
    """libjpeg's quantisation tables for ``quality`` (``jpeg_quality_scaling``); values are clipped to
    1..255 for baseline JPEG, to 1..32767 otherwise."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    top = 255 if baseline else 32767
    return [[min(max((v * scale + 50) // 100, 1), top) for v in table] for table in _standard_tables(mode)]
