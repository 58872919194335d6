"""Sample data shipped with the ``slicerio`` package: a small chest CT and its 7-segment segmentation.

``sample:chest-ct`` may be given wherever a volume path is expected (CLI, batch script).
"""
from __future__ import annotations

import os
from pathlib import Path

SAMPLES = {"chest-ct": "CTChest4.nrrd", "chest-ct-segmentation": "Segmentation.seg.nrrd"}
PREFIX = "sample:"


def sample_path(name: str) -> Path:
    """Path of a sample file (``chest-ct``, ``chest-ct-segmentation``)."""
    try:
        import slicerio
    except ImportError:  # pragma: no cover - slicerio is a dependency
        raise FileNotFoundError("the sample data come with the slicerio package: pip install slicerio") from None
    if name not in SAMPLES:
        raise FileNotFoundError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return Path(os.path.dirname(slicerio.__file__)) / "data" / SAMPLES[name]


def resolve(path_or_sample: os.PathLike) -> Path:
    """``sample:NAME`` -> the sample's path; anything else -> ``Path(value)``."""
    text = str(path_or_sample)
    return sample_path(text[len(PREFIX):]) if text.startswith(PREFIX) else Path(text)
