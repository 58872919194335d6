"""Prompts and predictions on one 2D image (an image file or one slice of a volume).

Coordinate convention (used everywhere in RobustMedSAMLib, see docs/coordinates.md):

* A 2D image is an array indexed ``image[row, column]`` (numpy order), shape ``(H, W)`` or ``(H, W, C)``.
* Points are ``(x, y)`` = ``(column, row)`` pixel indices of that image, as in SAM. Pixel ``(x, y)`` is the
  pixel ``image[y, x]``; fractional values are allowed.
* Boxes are ``(x0, y0, x1, y1)``: ``x0, y0`` the first column/row inside the box, ``x1, y1`` one past the
  last column/row (exclusive), so the box around a mask is ``(cols.min(), rows.min(), cols.max()+1,
  rows.max()+1)``. This is micro-sam's and SAM's convention.
* For a slice of a volume, see :mod:`RobustMedSAMLib.volume_io` for which voxel axes become rows/columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np


class PromptError(ValueError):
    """A prompt is unusable (outside the image, empty box, no prompt at all...)."""


@dataclass
class Prompt:
    """Prompts for one object on one 2D image of shape ``(H, W)``.

    Attributes:
        points: ``(N, 2)`` float array of ``(x, y)`` pixel coordinates, or ``None``.
        labels: ``(N,)`` int array, 1 = positive (object), 0 = negative (background).
        box: ``(4,)`` float array ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``, or ``None``.
        mask: ``(H, W)`` bool array: a mask of this object used as dense prompt (e.g. the neighbouring
            slice's result); converted by the predictor to the model's low-resolution logits frame.
        logits: ``(256, 256)`` float array of low-resolution logits from an earlier prediction of the
            same model and image (SAM's ``mask_input``). Takes precedence over ``mask``.
    """

    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
            if self.labels is None:
                self.labels = np.ones(len(self.points), dtype=np.int64)
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
            if len(self.labels) != len(self.points):
                raise PromptError(f"{len(self.points)} points but {len(self.labels)} labels")
            if len(self.points) == 0:
                self.points, self.labels = None, None
        elif self.labels is not None and len(np.atleast_1d(self.labels)) > 0:
            raise PromptError("labels given without points")
        else:
            self.labels = None
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(-1)
            if self.box.shape != (4,):
                raise PromptError(f"a box needs 4 numbers (x0 y0 x1 y1), got {self.box.size}")
        if self.mask is not None:
            self.mask = np.asarray(self.mask).astype(bool)

    @property
    def is_empty(self) -> bool:
        """True if the prompt has no point, box, mask or logits."""
        return self.points is None and self.box is None and self.mask is None and self.logits is None

    def validate(self, image_shape: Sequence[int]) -> None:
        """Raise :class:`PromptError` naming the problem if the prompt does not fit an image of ``(H, W)``."""
        h, w = int(image_shape[0]), int(image_shape[1])
        if self.is_empty:
            raise PromptError("no prompt given: add a point (--point X Y), a box (--box X0 Y0 X1 Y1) or a mask")
        if self.points is not None:
            if not np.all(np.isfinite(self.points)):
                raise PromptError("point coordinates must be finite numbers")
            bad = (self.points[:, 0] < 0) | (self.points[:, 0] > w - 1) | (self.points[:, 1] < 0) | (
                self.points[:, 1] > h - 1)
            if bad.any():
                x, y = self.points[np.argmax(bad)]
                raise PromptError(
                    f"point (x={x:g}, y={y:g}) is outside the image (x in 0..{w - 1}, y in 0..{h - 1}; "
                    "x is the column, y the row)")
            if not np.isin(self.labels, (0, 1)).all():
                raise PromptError("point labels must be 1 (positive) or 0 (negative)")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not np.all(np.isfinite(self.box)):
                raise PromptError("box coordinates must be finite numbers")
            if x1 <= x0 or y1 <= y0:
                raise PromptError(
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or inverted: give X0 Y0 X1 Y1 with "
                    "X0 < X1 and Y0 < Y1 (top-left corner first)")
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise PromptError(
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the image of {w} x {h} pixels")
        if self.mask is not None and self.mask.shape != (h, w):
            raise PromptError(f"mask prompt has shape {self.mask.shape}, the image has {(h, w)}")


def box_from_mask(mask: np.ndarray, extension: float = 0.0) -> Optional[np.ndarray]:
    """Bounding box ``(x0, y0, x1, y1)`` (exclusive ``x1, y1``) of a 2D mask, or ``None`` if empty.

    ``extension`` enlarges the box on every side: ``>= 1`` means that many pixels, ``0 < e < 1`` a fraction
    of the box height/width (micro-sam's ``box_extension``). Edges are rounded to the nearest integer with
    halves up (``floor(v + 0.5)``, docs/coordinates.md) and clipped to the image.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = rows[0], rows[-1] + 1
    x0, x1 = cols[0], cols[-1] + 1
    if extension >= 1:
        ex = ey = float(extension)
    else:
        ex, ey = extension * (x1 - x0), extension * (y1 - y0)
    h, w = mask.shape
    edges = np.floor(np.array([x0 - ex, y0 - ey, x1 + ex, y1 + ey], dtype=np.float64) + 0.5)  # halves up
    return np.clip(edges, 0, [w, h, w, h]).astype(np.float64)


@dataclass
class Prediction:
    """Model output for one prompt on one image of shape ``(H, W)``.

    Attributes:
        masks: ``(C, H, W)`` bool, C = 1 (single mask) or 3 (multimask).
        logits: ``(C, H, W)`` float32 logits at the image's resolution (``sigmoid`` gives probabilities).
        iou: ``(C,)`` float32 predicted IoU of each mask.
        low_res_logits: ``(C, 256, 256)`` float32 logits in the model's mask frame; pass one back as
            ``Prompt.logits`` to refine.
    """

    masks: np.ndarray
    logits: np.ndarray
    iou: np.ndarray
    low_res_logits: np.ndarray = field(repr=False)

    @property
    def best(self) -> int:
        """Index of the mask with the highest predicted IoU."""
        return int(np.argmax(self.iou))

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` bool: the mask with the highest predicted IoU."""
        return self.masks[self.best]

    @property
    def score(self) -> float:
        """Predicted IoU of :attr:`mask`."""
        return float(self.iou[self.best])

    def select(self, index: int) -> "Prediction":
        """A single-mask Prediction holding output ``index``."""
        s = slice(index, index + 1)
        return Prediction(self.masks[s], self.logits[s], self.iou[s], self.low_res_logits[s])


def as_points(points: Sequence[Tuple[float, float]], negative: Sequence[Tuple[float, float]] = ()):
    """Helper: positive and negative ``(x, y)`` lists -> ``(points (N,2), labels (N,))`` or ``(None, None)``."""
    pts = list(points) + list(negative)
    if not pts:
        return None, None
    labels = [1] * len(points) + [0] * len(negative)
    return np.asarray(pts, dtype=np.float64), np.asarray(labels, dtype=np.int64)
