"""Image preprocessing conventions and the geometry between an image and the model frame.

Three conventions exist among the checkpoints we load (shared/REFERENCE.md sections 2, 4 and 10):

* ``"sam"`` (SAM, RobustSAM, RobustMedSAM): resize the longest side to S = 1024 (bilinear, antialiased:
  RobustSAM's/RobustMedSAM's ``apply_image_torch``), normalise 0-255 RGB with SAM's pixel mean/std, zero-pad
  bottom/right to S x S. Prompts are scaled by ``new_size / old_size``. Logits are upsampled to S, cropped to
  the resized image and resized to the original size (SAM's ``postprocess_masks``).
* ``"medsam"`` (MedSAM): resize directly to S x S (aspect ratio not kept; cubic, antialiased, approximating
  MedSAM's skimage cubic-spline resize), min-max normalise to [0, 1], no mean/std. Prompts are scaled by
  ``S / W`` and ``S / H``. Logits are resized straight to the original size (MedSAM's inference).
* ``"litemedsam"`` (LiteMedSAM, the official ``CVPR24_LiteMedSAM_infer.py`` recipe): resize the longest side
  to S = 256 with area interpolation (each output pixel the mean of the input over its footprint, as
  ``cv2.INTER_AREA``; rounded back to uint8 as cv2 does for uint8 images), min-max normalise the *resized*
  image to [0, 1], zero-pad bottom/right to S x S. A box ``(x0, y0, x1, y1)`` (exclusive max) becomes
  ``int(v * S / max(H, W))`` of ``(x0, y0, x1 - 1, y1 - 1)`` (the official boxes use inclusive max pixel
  indices); points are scaled by ``S / max(H, W)``. The low-resolution logits are S x S, the same frame as
  the input (SAM's are S / 4): cropped to the resized image, bilinear to the original size.

Images are ``(H, W)`` or ``(H, W, 3)`` uint8 (0-255). Points/boxes follow ``prompts.py``'s (x, y) convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .model_specs import STYLES, Preprocessing  # noqa: F401 (re-exported)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
#: input side / low-resolution logits side of each style
_MASK_DIVISOR = {"sam": 4, "medsam": 4, "litemedsam": 1}
MASK_PROMPT_EPS = 1e-3  # mask prompts become logits of +-log((1 - eps) / eps), as micro-sam


def longest_side_shape(h: int, w: int, target: int) -> Tuple[int, int]:
    """SAM's ``ResizeLongestSide`` output shape ``(h', w')`` for an ``(h, w)`` image."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass(frozen=True)
class Frame:
    """Geometry between an image of ``original_size`` (H, W) and the model's S x S input.

    ``resized_size`` is the (h, w) of the image content inside the input (top-left aligned); ``mask_size``
    the side of the low-resolution logits (S / 4 for SAM and MedSAM, S for LiteMedSAM).
    """

    original_size: Tuple[int, int]
    resized_size: Tuple[int, int]
    image_size: int
    style: str

    @property
    def mask_size(self) -> int:
        return self.image_size // _MASK_DIVISOR[self.style]

    @property
    def scale_xy(self) -> np.ndarray:
        """Per-axis factors ``(w'/W, h'/H)`` from image (x, y) to model input (x, y)."""
        return np.array([self.resized_size[1] / self.original_size[1],
                         self.resized_size[0] / self.original_size[0]])

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """``(..., 2)`` image (x, y) -> model-input (x, y)."""
        if self.style == "litemedsam":
            return np.asarray(points, dtype=np.float64) * (self.image_size / max(self.original_size))
        return np.asarray(points, dtype=np.float64) * self.scale_xy

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """``(..., 4)`` image XYXY (exclusive max) -> model-input XYXY."""
        boxes = np.asarray(boxes, dtype=np.float64)
        if self.style == "litemedsam":  # official: int(v * 256 / max(H, W)) of inclusive max indices
            inclusive = boxes - np.array([0.0, 0.0, 1.0, 1.0])
            return np.floor(np.maximum(inclusive, 0.0) * (self.image_size / max(self.original_size)))
        return boxes * np.tile(self.scale_xy, 2)

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits ``(B, C, m, m)`` -> ``(B, C, H, W)`` at the original image size."""
        if self.style == "medsam":
            return F.interpolate(logits, self.original_size, mode="bilinear", align_corners=False)
        if self.style == "litemedsam":  # the logits are already in the input frame
            x = logits[..., : self.resized_size[0], : self.resized_size[1]]
            return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)
        s = self.image_size
        x = F.interpolate(logits, (s, s), mode="bilinear", align_corners=False)
        x = x[..., : self.resized_size[0], : self.resized_size[1]]
        return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)

    def mask_to_logits(self, mask: np.ndarray) -> torch.Tensor:
        """A binary ``(H, W)`` mask -> ``(1, 1, m, m)`` mask-prompt logits in the model's mask frame."""
        m = self.mask_size
        if self.style == "medsam":
            target = (m, m)
        else:
            target = longest_side_shape(*self.original_size, m)
        x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        x = F.interpolate(x, target, mode="bilinear", align_corners=False, antialias=True) > 0.5
        value = math.log((1 - MASK_PROMPT_EPS) / MASK_PROMPT_EPS)
        out = torch.full((1, 1, m, m), -value, dtype=torch.float32)  # padding is background
        out[..., : target[0], : target[1]] = torch.where(x, value, -value)
        return out


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` grey, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped) uint8 -> ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got {image.dtype}; rescale it first "
                         "(intensity.to_uint8 for medical data)")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of area interpolation along one axis: row ``o`` holds the share of
    each input pixel ``[i, i + 1)`` in the output pixel's footprint ``[o * n_in / n_out, (o + 1) * n_in / n_out)``
    (rows sum to 1). Shrinking averages whole and partial pixels; enlarging by an integer factor repeats
    pixels, by other factors blends the two pixels an output pixel straddles."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    i = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resize_uint8(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(h, w, C)`` uint8 by area interpolation (:func:`area_weights`), rounded to the
    nearest integer as ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` rounds uint8: halves to even, except
    for an exact 2 x shrink on both axes (e.g. a 512 x 512 CT slice to 256), where cv2's 2 x 2 fast path
    computes ``(a + b + c + d + 2) >> 2`` (halves up). Checked against opencv-python-headless 4.14 on random
    images: identical for 2x, 3x and 4x shrinks, integer enlargements and 1.5x; within 1 grey level on a few
    pixels for other factors (cv2's float32 weights, and its fixed-point linear kernel when enlarging)."""
    wy = area_weights(image.shape[0], size[0])
    wx = area_weights(image.shape[1], size[1])
    out = np.einsum("oh,hwc,pw->opc", wy, image.astype(np.float64), wx, optimize=True)
    if image.shape[0] == 2 * size[0] and image.shape[1] == 2 * size[1]:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)  # quarters of integers: exact
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prepare_image(image: np.ndarray, prep: Preprocessing, device=None) -> Tuple[torch.Tensor, Frame]:
    """uint8 image ``(H, W[, C])`` -> model input ``(1, 3, S, S)`` float32 and its :class:`Frame`."""
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    if h < 2 or w < 2:
        raise ValueError(f"image of {w} x {h} pixels is too small")
    s = prep.image_size
    if prep.style == "litemedsam":
        size = longest_side_shape(h, w, s)
        small = area_resize_uint8(rgb, size).astype(np.float64)
        lo, hi = small.min(), small.max()
        small = (small - lo) / max(hi - lo, 1e-8)
        x = torch.from_numpy(small.astype(np.float32)).to(device=device).permute(2, 0, 1)[None]
        return F.pad(x, (0, s - size[1], 0, s - size[0])), Frame((h, w), size, s, "litemedsam")
    x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device=device).permute(2, 0, 1)[None].float()
    if prep.style == "medsam":
        x = F.interpolate(x, (s, s), mode="bicubic", align_corners=False, antialias=True)
        lo, hi = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        return x, Frame((h, w), (s, s), s, "medsam")
    size = longest_side_shape(h, w, s)
    x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    x = F.pad((x - mean) / std, (0, s - size[1], 0, s - size[0]))
    return x, Frame((h, w), size, s, "sam")


def model_frame(original_size: Tuple[int, int], prep: Preprocessing) -> Frame:
    """The :class:`Frame` for an image size without preparing an image."""
    h, w = original_size
    if prep.style == "medsam":
        return Frame((h, w), (prep.image_size, prep.image_size), prep.image_size, "medsam")
    return Frame((h, w), longest_side_shape(h, w, prep.image_size), prep.image_size, prep.style)

