"""Prompts derived from a binary mask (the previous slice's result during volumetric propagation).

Coordinates follow docs/coordinates.md: masks are ``(H, W)`` arrays ``mask[row, column]``, points are ``(x, y)``
= ``(column, row)``, boxes ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``.

Projection modes (which prompts are derived from the previous slice's mask), as in micro-sam:

* ``"box"``: box;
* ``"mask"``: box + mask;
* ``"points"``: positive + negative points;
* ``"points_and_mask"``: mask + positive + negative points;
* ``"single_point"``: one positive point (the deepest point of the mask);
* a dict ``{"use_box": bool, "use_mask": bool, "use_points": bool}``: any combination (points = positives +
  negatives).

Only numpy and scipy are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from .prompts import Prompt, box_from_mask

PROJECTION_MODES = ("box", "mask", "points", "points_and_mask", "single_point")

#: Chebyshev distance (pixels) between positive / negative points derived from a mask (micro-sam's values).
POSITIVE_MIN_DISTANCE = 3
NEGATIVE_MIN_DISTANCE = 5


@dataclass(frozen=True)
class Projection:
    """Which prompts to derive from a mask. Build it with :func:`parse_projection`."""

    use_box: bool
    use_mask: bool
    use_points: bool
    single_point: bool = False

    @property
    def key(self) -> Tuple[bool, bool, bool, bool]:
        return (self.use_box, self.use_mask, self.use_points, self.single_point)


def parse_projection(projection: Union[str, Mapping[str, bool], Projection]) -> Projection:
    """Turn a projection mode (name, ``{"use_box", "use_mask", "use_points"}`` dict) into a :class:`Projection`."""
    if isinstance(projection, Projection):
        return projection
    if isinstance(projection, str):
        table = {
            "box": Projection(True, False, False),
            "mask": Projection(True, True, False),
            "points": Projection(False, False, True),
            "points_and_mask": Projection(False, True, True),
            "single_point": Projection(False, False, True, True),
        }
        if projection not in table:
            raise ValueError(
                f"unknown projection {projection!r}: choose one of {', '.join(PROJECTION_MODES)} "
                "or a dict with keys use_box, use_mask, use_points")
        return table[projection]
    if isinstance(projection, Mapping):
        keys = {"use_box", "use_mask", "use_points"}
        if set(projection) != keys:
            raise ValueError(
                f"a projection dict needs exactly the keys use_box, use_mask, use_points; got {sorted(projection)}")
        result = Projection(bool(projection["use_box"]), bool(projection["use_mask"]),
                            bool(projection["use_points"]))
        if not (result.use_box or result.use_mask or result.use_points):
            raise ValueError("the projection dict enables no prompt: set at least one of use_box, use_mask, "
                             "use_points to True")
        return result
    raise ValueError(f"{projection!r} is not a projection: give a mode name or a dict")


def peak_local_max(image: np.ndarray, min_distance: int = 1) -> np.ndarray:
    """Local maxima of a 2D image as ``(N, 2)`` ``(row, column)`` indices, highest first.

    Same rule as ``skimage.feature.peak_local_max(image, min_distance=d, exclude_border=False)``: a pixel is
    a candidate if it equals the maximum of its ``(2d+1) x (2d+1)`` neighbourhood (edge pixels repeated) and
    is above the image minimum; a constant image has no peak. Candidates are visited by decreasing value
    (ties in row-major order) and kept unless a kept peak lies at Chebyshev distance ``< d``.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    threshold = image.min()
    if image.size == 1 or min_distance < 1:
        candidates = image > threshold
    else:
        size = 2 * int(min_distance) + 1
        candidates = image == ndimage.maximum_filter(image, size=size, mode="nearest")
        if candidates.all():
            return np.zeros((0, 2), dtype=np.int64)
        candidates &= image > threshold
    coords = np.argwhere(candidates)
    order = np.argsort(-image[candidates], kind="stable")
    coords = coords[order]
    if min_distance <= 1 or len(coords) < 2:
        return coords.astype(np.int64)
    kept = []
    for c in coords:
        if not kept or np.abs(np.asarray(kept) - c).max(axis=1).min() >= min_distance:
            kept.append(c)
    return np.asarray(kept, dtype=np.int64).reshape(-1, 2)


def _distance_maps(crop: np.ndarray) -> np.ndarray:
    """Smoothed distance of every pixel of ``crop`` to the object's outer boundary.

    The outer boundary is the set of background pixels 4-adjacent to the object (skimage's
    ``find_boundaries(mode="outer")`` for one object); the crop is padded with one background pixel so that
    the crop's edge counts as outside the object.
    """
    padded = np.pad(crop, 1, mode="constant", constant_values=False)
    boundary = ndimage.binary_dilation(padded, structure=ndimage.generate_binary_structure(2, 1)) & ~padded
    distances = ndimage.distance_transform_edt(~boundary)
    distances = ndimage.gaussian_filter(distances, sigma=1.0, mode="nearest")
    return distances[1:-1, 1:-1]


def points_from_mask(mask: np.ndarray, box_extension: float = 0.0,
                     single_point: bool = False) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Point prompts ``(points (N, 2) as (x, y), labels (N,))`` for a 2D mask, or ``(None, None)`` if empty.

    The mask is cropped to its box (extended by ``box_extension``, see :func:`box_from_mask`); the distance
    to the object's boundary is Gaussian-smoothed (sigma 1). Positives (label 1) are the local maxima of
    that distance inside the object (min distance 3), negatives (label 0) the local maxima outside the
    object within the box (min distance 5); positives come first, each group highest first.
    ``single_point=True`` gives only the global maximum inside the object (the deepest point, first in
    row-major order on ties) as one positive point. There is always at least one positive point: if the
    inside distance has no local maximum (e.g. a one-pixel object) the deepest point is used.
    """
    mask = np.asarray(mask).astype(bool)
    box = box_from_mask(mask, box_extension)
    if box is None:
        return None, None
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = mask[y0:y1, x0:x1]
    distances = _distance_maps(crop)
    inner = np.where(crop, distances, 0.0)
    offset = np.array([y0, x0])
    if single_point:
        peak = np.array(np.unravel_index(int(np.argmax(inner)), inner.shape)) + offset
        return peak[None, ::-1].astype(np.float64), np.ones(1, dtype=np.int64)
    outer = np.where(crop, 0.0, distances)
    positives = peak_local_max(inner, POSITIVE_MIN_DISTANCE)
    if len(positives) == 0:  # e.g. a one-pixel object: no local maximum, use the deepest point
        positives = np.array(np.unravel_index(int(np.argmax(inner)), inner.shape))[None]
    negatives = peak_local_max(outer, NEGATIVE_MIN_DISTANCE)
    rows_cols = np.concatenate([positives, negatives]).reshape(-1, 2) + offset
    labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
    return rows_cols[:, ::-1].astype(np.float64), labels


def prompt_from_mask(mask: np.ndarray, projection: Union[str, Mapping[str, bool], Projection] = "mask",
                     box_extension: float = 0.0) -> Prompt:
    """The :class:`Prompt` that ``projection`` derives from a 2D binary mask (a fresh copy of everything).

    * box: the mask's tight box (exclusive max) extended by ``box_extension`` (``>= 1``: pixels on each
      side, ``0 < e < 1``: that fraction of the box width/height on each side), clipped to the image;
    * mask: the mask itself (``Prompt.mask``; the predictor converts it to the model frame);
    * points: see :func:`points_from_mask`.

    An empty mask gives no box and no points (the mask prompt is still set if enabled).
    """
    proj = parse_projection(projection)
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask prompt source must be 2D (H, W), got shape {mask.shape}")
    box = box_from_mask(mask, box_extension) if proj.use_box else None
    points = labels = None
    if proj.use_points:
        points, labels = points_from_mask(mask, box_extension, proj.single_point)
    return Prompt(points=points, labels=labels, box=box, mask=mask.copy() if proj.use_mask else None)
