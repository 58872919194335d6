"""Results of volumetric segmentation, and the one intensity mapping per volume: torch-free.

:class:`ObjectResult` / :class:`VolumeResult` are what ``volume_segmentation.segment_volume`` returns (and what
the engine worker sends to the Slicer process, which never imports torch); :func:`uint8_volume` maps a whole
volume to uint8 once. Arrays are ``(K, J, I)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .intensity import WindowLike, intensity_mapping
from .prompts import Prediction
from .propagation_types import PropagationResult
from .segmentation_io import SegmentInfo, write_segment_masks
from .volume_io import Volume


class SeedError(ValueError):
    """A prompt gave an empty mask on its own slice: nothing to propagate."""


@dataclass
class ObjectResult:
    """One object: ``mask`` ``(K, J, I)`` bool, the propagation record, and each seed slice's prediction."""

    name: str
    color: Tuple[float, float, float]
    mask: np.ndarray
    propagation: Optional[PropagationResult]
    seeds: Dict[int, Prediction] = field(default_factory=dict)


@dataclass
class VolumeResult:
    """All objects of one run. ``labels()`` merges them (later objects win where they overlap)."""

    objects: List[ObjectResult]
    axis: int

    def segments(self) -> List[SegmentInfo]:
        """Segment descriptions: object n -> label value n."""
        return [SegmentInfo(o.name, tuple(o.color), n) for n, o in enumerate(self.objects, start=1)]

    def labels(self) -> Tuple[np.ndarray, List[SegmentInfo]]:
        """``(K, J, I)`` label array (object n -> label n; later objects win where objects overlap) and the
        matching segment descriptions. :meth:`write` keeps overlaps in ``.seg.nrrd`` files."""
        labels = np.zeros(self.objects[0].mask.shape, dtype=np.uint8 if len(self.objects) < 256 else np.uint16)
        for n, obj in enumerate(self.objects, start=1):
            labels[obj.mask] = n
        return labels, self.segments()

    def write(self, path, reference: Volume):
        """Write all objects on ``reference``'s grid: ``.seg.nrrd`` (overlaps kept in layers) or a label volume."""
        return write_segment_masks(path, [o.mask for o in self.objects], reference, self.segments())

    def report(self) -> List[dict]:
        """JSON-able per-object summary with per-slice predicted IoU and inter-slice IoU."""
        out = []
        for obj in self.objects:
            entry = {"name": obj.name, "voxels": int(obj.mask.sum()),
                     "seeds": {int(k): float(v.score) for k, v in obj.seeds.items()}}
            if obj.propagation is not None:
                entry["slices"] = obj.propagation.report()
                entry["stops"] = {k: vars(v) for k, v in obj.propagation.stops.items()}
            out.append(entry)
        return out


def uint8_volume(volume: Volume, modality: Optional[str] = None, window: Optional[WindowLike] = None
                 ) -> np.ndarray:
    """The whole volume mapped to uint8 once (CT window or percentiles; modality guessed if not given)."""
    return intensity_mapping(volume.array, modality=modality, window=window).apply(volume.array)
