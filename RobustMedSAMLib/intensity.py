"""Intensity normalisation of medical volumes to uint8.

* CT: a window (level/width in Hounsfield units) clips to ``[level - width/2, level + width/2]`` and maps that
  fixed range linearly to 0..255, as a display window does. MedSAM's CT preprocessing (``pre_CT_MR.py``)
  differs in one respect: after clipping it min-max scales the *clipped volume's own* range to 0..255. The two
  agree whenever the volume reaches both window edges (any CT with air and bone for the soft-tissue and bone
  windows); for a volume inside the window ours keeps the grey levels a viewer shows, MedSAM's stretches them.
* MR and other modalities: clip to the 0.5 and 99.5 percentiles of the non-zero voxels and map that range to
  0..255; voxels that are exactly 0 (background) stay 0. MedSAM does the same over the positive voxels, which
  is the same set for the non-negative intensities of MR.
* Values are truncated to integers like MedSAM's ``np.uint8(...)`` cast, so the window's lower edge gives 0
  and its upper edge exactly 255.

Window presets (level/width, HU): ``wide`` 0/2000 (-1000..1000 HU: air to dense bone, the CT default) and
the standard radiology values listed in Radiopaedia's "Windowing (CT)" article: soft tissue 40/400, lung
-600/1500, bone 400/1800, brain 40/80.

Why ``wide`` by default: with LiteMedSAM on the sample chest CT, a reference box on every axial slice gives a
mean 3D Dice over both lungs and the thoracic and lumbar vertebral columns of 0.807 in the wide window,
against 0.743 (lung), 0.678 (bone) and 0.602 (soft tissue), and propagation keeps the shapes far better in
it (README, "Windows"). A window whose lower edge sits below air (-1500 HU) loses 0.07; what matters most is
that air maps to 0.

The mapping is computed once per volume (:func:`intensity_mapping`) and can then be applied to the whole
volume or to single slices, so that every slice of a propagation sees the same grey levels.
No torch, Qt or Slicer import here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np


class IntensityError(ValueError):
    """The intensities cannot be normalised (constant, NaN/inf, unknown modality or window)."""


@dataclass(frozen=True)
class Window:
    """A CT display window: ``level`` (centre) and ``width`` in HU."""

    level: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.level) and np.isfinite(self.width)) or self.width <= 0:
            raise IntensityError(f"a window needs a finite level and a width > 0, got level={self.level}, "
                                 f"width={self.width}")

    @property
    def lower(self) -> float:
        return float(self.level) - float(self.width) / 2.0

    @property
    def upper(self) -> float:
        return float(self.level) + float(self.width) / 2.0


WINDOW_PRESETS = {
    "wide": Window(0, 2000),
    "soft_tissue": Window(40, 400),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
}
DEFAULT_CT_WINDOW = WINDOW_PRESETS["wide"]
PERCENTILES = (0.5, 99.5)
MODALITIES = ("CT", "MR", "other")

WindowLike = Union[Window, str, Tuple[float, float]]


def get_window(window: WindowLike) -> Window:
    """A :class:`Window` from a preset name (``"wide"``, ``"soft_tissue"``, ``"lung"``, ``"bone"``, ``"brain"``; case,
    spaces and dashes ignored), ``"LEVEL,WIDTH"`` (the command lines' form), a ``(level, width)`` pair or a
    :class:`Window`."""
    if isinstance(window, Window):
        return window
    if isinstance(window, str) and "," in window:
        try:
            level, width = (float(v) for v in window.split(","))
        except ValueError:
            raise IntensityError(f"window {window!r}: give a preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH "
                                 f"(two numbers, e.g. 40,400)") from None
        return Window(level, width)
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        key = {"soft": "soft_tissue", "softtissue": "soft_tissue", "lungs": "lung"}.get(key, key)
        if key not in WINDOW_PRESETS:
            raise IntensityError(f"unknown window preset {window!r}; use one of {', '.join(WINDOW_PRESETS)} or a "
                                 "(level, width) pair")
        return WINDOW_PRESETS[key]
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise IntensityError(f"a window is a preset name or (level, width), got {window!r}") from None
    return Window(level, width)


def _normalise_modality(modality: str) -> str:
    key = str(modality).strip().lower()
    if key == "ct":
        return "CT"
    if key in ("mr", "mri"):
        return "MR"
    if key in ("other", "pet", "us", "spect", "xa", "cbct_raw"):
        return "other"
    raise IntensityError(f"unknown modality {modality!r}; use 'CT' (window in HU) or 'MR'/'other' (percentiles)")


def _values(array) -> np.ndarray:
    a = np.asarray(getattr(array, "array", array))  # a Volume or an array
    if a.size == 0:
        raise IntensityError("the image is empty")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "iuf":
        raise IntensityError(f"intensities of type {a.dtype} cannot be normalised; a real-valued image is needed")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise IntensityError("the image contains NaN or infinite values; replace them before normalising")
    return a


def _sample(a: np.ndarray, max_count: int = 2_000_000) -> np.ndarray:
    flat = a.reshape(-1)
    step = max(1, flat.size // max_count)
    return flat[::step]


def guess_modality(volume_array) -> str:
    """``"CT"`` or ``"other"`` (MR, PET, ultrasound...) from intensity statistics; callers can always override.

    Rule: CT if the values look like Hounsfield units with air: at least 1 % of voxels in -1100..-900 (air,
    lung) or at least 5 % at or below -1000 (air/padding outside the field of view, e.g. -1024, -2048, -3024),
    and the 99th percentile is at most 4000 HU. MR and most other modalities have no such negative values. A
    CT cropped inside the body without any air is reported as "other": pass ``modality="CT"`` then.
    """
    v = _sample(_values(volume_array)).astype(np.float64)
    frac_air = np.mean((v >= -1100) & (v <= -900))
    frac_low = np.mean(v <= -1000)
    p99 = np.percentile(v, 99)
    return "CT" if (frac_air >= 0.01 or frac_low >= 0.05) and p99 <= 4000 else "other"


def percentile_range(array, low: float = PERCENTILES[0], high: float = PERCENTILES[1]) -> Tuple[float, float]:
    """``(lower, upper)`` percentiles of the non-zero voxels (MedSAM's MR/other convention)."""
    a = _values(array)
    nz = a[a != 0]
    if nz.size == 0:
        raise IntensityError("all voxels are 0; the image holds no structure to segment")
    lo, hi = np.percentile(nz, [low, high])
    return float(lo), float(hi)


@dataclass(frozen=True)
class IntensityMapping:
    """A volume's intensity mapping to uint8: clip to ``[lower, upper]``, scale to 0..255, truncate.

    ``zero_background``: voxels equal to 0 map to 0 (percentile mode). ``modality`` and ``window`` record how
    the mapping was chosen.
    """

    lower: float
    upper: float
    zero_background: bool = False
    modality: str = "CT"
    window: Optional[Window] = None

    @property
    def description(self) -> str:
        """E.g. ``CT window 40/400 (-160..240)`` or ``other: percentiles 0.5-99.5 -> 12..873``."""
        if self.window is not None:
            return f"{self.modality} window {self.window.level:g}/{self.window.width:g} ({self.lower:g}..{self.upper:g})"
        return f"{self.modality}: non-zero percentiles {PERCENTILES[0]}-{PERCENTILES[1]} -> {self.lower:g}..{self.upper:g}"

    def apply(self, array, chunk_voxels: int = 1 << 23) -> np.ndarray:
        """uint8 array of the same shape (whole volume or any slice of it); float64 maths in chunks."""
        a = np.asarray(getattr(array, "array", array))
        if a.dtype == bool:
            a = a.astype(np.uint8)
        out = np.empty(a.shape, dtype=np.uint8)
        lo, hi = float(self.lower), float(self.upper)
        span = hi - lo
        if a.ndim == 0:
            return self.apply(a.reshape(1))[0]
        rows = max(1, chunk_voxels // max(1, int(np.prod(a.shape[1:]))))
        for start in range(0, a.shape[0], rows):
            x = a[start:start + rows].astype(np.float64)
            np.clip(x, lo, hi, out=x)
            x -= lo
            x *= 255.0      # multiply first, then divide: integer results come out exact
            x /= span
            np.clip(x, 0.0, 255.0, out=x)
            chunk = x.astype(np.uint8)  # truncation, as MedSAM's np.uint8 cast
            if self.zero_background:
                chunk[a[start:start + rows] == 0] = 0
            out[start:start + rows] = chunk
        return out


def intensity_mapping(array, modality: Optional[str] = None, window: Optional[WindowLike] = None,
                      percentiles: Tuple[float, float] = PERCENTILES) -> IntensityMapping:
    """Compute the uint8 mapping of a whole volume once.

    Args:
        array: the volume's intensities (``(K, J, I)`` or any shape) or a ``Volume``.
        modality: ``"CT"``, ``"MR"`` or ``"other"``; ``None`` guesses (:func:`guess_modality`).
        window: CT window (preset name, ``(level, width)`` or :class:`Window`); implies CT. Default for CT:
            ``wide`` 0/2000 (:data:`DEFAULT_CT_WINDOW`).
        percentiles: lower/upper percentiles of the non-zero voxels for MR/other.

    Raises:
        IntensityError: constant or NaN/inf intensities, unknown modality or window.
    """
    a = _values(array)
    lo_all, hi_all = a.min(), a.max()
    if lo_all == hi_all:
        raise IntensityError(f"all voxels have the same intensity ({lo_all}); nothing to normalise")
    if window is not None:
        w = get_window(window)
        return IntensityMapping(w.lower, w.upper, False, "CT" if modality is None else _normalise_modality(modality), w)
    mod = guess_modality(a) if modality is None else _normalise_modality(modality)
    if mod == "CT":
        w = DEFAULT_CT_WINDOW
        return IntensityMapping(w.lower, w.upper, False, "CT", w)
    lo, hi = percentile_range(a, *percentiles)
    if hi <= lo:  # e.g. a binary-like image: fall back to the full range
        lo, hi = float(lo_all), float(hi_all)
    return IntensityMapping(lo, hi, True, mod, None)


def to_uint8(array, modality: Optional[str] = None, window: Optional[WindowLike] = None) -> np.ndarray:
    """Normalise a volume (or image) to uint8 of the same shape; see :func:`intensity_mapping`."""
    return intensity_mapping(array, modality, window).apply(array)


def slice_to_rgb(slice_uint8: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 slice -> ``(H, W, 3)`` uint8 (grey repeated, as MedSAM)."""
    s = np.asarray(slice_uint8)
    if s.dtype != np.uint8:
        raise IntensityError(f"expected a uint8 slice, got {s.dtype}; normalise it with to_uint8 first")
    if s.ndim != 2:
        raise IntensityError(f"expected a 2D (H, W) slice, got shape {s.shape}")
    return np.repeat(s[:, :, None], 3, axis=2)
