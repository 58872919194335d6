"""The 12 image degradations of RobustMedSAM, seeded, with five severities each.

Used to build clean/degraded training pairs, for the robustness evaluation and for the user-facing
robustness check. Every corruption takes a uint8 image ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) and returns
a new uint8 image of the same shape; the input is never modified. Noise is drawn independently for every
pixel and channel. Float results are rounded to the nearest integer and clipped to 0..255.

**Severity 3 uses the parameters of the RobustMedSAM paper** (its ``data/augment.py``); severities 1, 2, 4
and 5 are this module's own, monotone in the strength of the degradation:

=================  ===============  ===============  ========================  ================  ==============
name               1                2                3 (paper)                 4                 5
=================  ===============  ===============  ========================  ================  ==============
gaussian_noise     sigma 4          sigma 8          sigma 16                  sigma 24          sigma 32
gaussian_blur      k 3              k 5              k 7, 9, 11 or 13          k 15, 17 or 19    k 21, 23 or 25
contrast           a U(1.15, 1.25)  a U(1.35, 1.45)  a U(1.6, 1.7)             a U(1.9, 2.0)     a U(2.2, 2.4)
brightness         f U(0.9, 0.95)   f U(0.8, 0.9)    f U(0.6, 0.8)             f U(0.45, 0.6)    f U(0.3, 0.45)
jpeg_compression   q 30..40         q 15..25         q 5..10                   q 2..3 unclipped  q 1 unclipped
color_jitter       m 0.25           m 0.5            m 1: b .7 c .3 s .7 h .7  m 1.2             m 1.4
poisson_noise      200 photons      80 photons       25 photons                10 photons        5 photons
speckle_noise      std 0.15         std 0.3          std 0.5 (variance 0.25)   std 0.7           std 1.0
salt_pepper_noise  2 % of pixels    5 %              10 %                      20 %              30 %
rician_noise       sigma 8          sigma 15         sigma 25                  sigma 35          sigma 50
rayleigh_noise     scale 10         scale 20         scale 40                  scale 55          scale 70
step_motion        2 px             3 px             5 px                      8 px              12 px
=================  ===============  ===============  ========================  ================  ==============

Definitions (``I`` the input in 0..255, ``N(0, s)`` a normal draw of standard deviation ``s``):

* ``gaussian_noise``: ``I + N(0, sigma)``.
* ``gaussian_blur``: OpenCV's ``GaussianBlur(I, (k, k), 0)``: ``k`` is drawn uniformly from the set, the
  separable 1-D kernel is ``exp(-x^2 / (2 sigma^2))`` normalised, ``sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8``,
  except that for ``k <= 7`` OpenCV (sigma 0) uses its fixed binomial kernels ``[1/4, 1/2, 1/4]``,
  ``[1, 4, 6, 4, 1]/16`` and ``[1, 3.5, 7, 9, 7, 3.5, 1]/32``, which are used here too. The border is
  reflected without repeating the edge pixel (OpenCV's default ``BORDER_REFLECT_101``). Computed in
  float64; OpenCV's 8-bit fixed-point path can differ by 1 grey level on some pixels.
* ``contrast``: ``(I - 128) * a + 128``; ``brightness``: ``I * f``, one factor per image.
* ``jpeg_compression``: Pillow JPEG encode/decode at quality ``q`` (uniform integer), mode ``L`` or ``RGB``
  (Pillow's default 4:2:0 chroma subsampling). Baseline JPEG clips the scaled quantisation tables at 255, so
  below quality ~5 a lower quality hardly degrades more (quality 1 and 3 give nearly the same PSNR). Severities 4
  and 5 therefore use libjpeg's quality scaling without that clip (16-bit tables, as ``cjpeg -quality q``
  without ``-baseline``; written progressive, the same pixels as sequential but without libjpeg's warning),
  so quality 3, 2 and 1 keep getting coarser. Severity 5 is quality 1 only (no random part).
* ``color_jitter``: albumentations' ``ColorJitter(brightness=.7, contrast=.3, saturation=.7, hue=.7)``
  re-implemented: brightness ``I * b``, contrast ``I * c + mean(luma) * (1 - c)``, saturation
  ``I * s + luma * (1 - s)`` (luma ``0.299 R + 0.587 G + 0.114 B``), hue: the HSV hue rotated by ``h``.
  Factors ``b``, ``s`` ~ ``U(1 - 0.7 m, 1 + 0.7 m)``, ``c`` ~ ``U(1 - 0.3 m, 1 + 0.3 m)``,
  ``h`` ~ ``U(-h_max, h_max)`` with ``h_max = min(0.7, 0.7 m)``; the four are applied in a random order,
  clipping to 0..255 after each. *Hue choice*: albumentations (like torchvision) adds ``180 * h`` to OpenCV's
  8-bit hue, whose 180 units span 360 degrees, so ``h`` is a **fraction of a full turn**, applied modulo
  one turn (``h = 0.7`` is the same rotation as ``h = -0.3``). The hue range therefore stays at 0.7 for
  severities 4 and 5: ``h_max = 1/sqrt(2) ~ 0.707`` maximises the mean absolute rotation of a uniform draw
  (0.29 turn), so a wider range would not be stronger. The hue is rotated in continuous HSV, without
  OpenCV's 2-degree quantisation. Some albumentations releases reject ``|hue| > 0.5``; the paper's 0.7 is
  kept. Grey images get brightness and contrast only (saturation and hue do nothing to grey, as in
  albumentations), contrast around the image mean.
* ``poisson_noise``: ``Poisson(I / 255 * p) / p * 255``: photon-count noise with ``p`` photons at full scale.
* ``speckle_noise``: ``I + I * N(0, std)``, multiplicative.
* ``salt_pepper_noise``: exactly ``round(fraction * H * W)`` distinct pixels (all channels of a pixel
  together), half of them (rounded down) set to 255 and the rest to 0.
* ``rician_noise``: ``sqrt((I + N(0, sigma))^2 + N(0, sigma)^2)`` (the paper's ``N(0, 25)`` read as a
  standard deviation of 25, numpy's ``normal(0, 25)``), the magnitude of complex MR noise.
* ``rayleigh_noise``: ``I + Rayleigh(scale) - scale * sqrt(pi / 2)``, zero-mean.
* ``step_motion``: MRI motion ghosting, per channel: ``K = fftshift(fft2(I))``; the rows of the lower half
  of ``K`` (rows ``H // 2 ..``, the non-negative phase-encode frequencies ``f``) are multiplied by
  ``exp(-2 pi i f d / H)``, the phase ramp of a ``d``-pixel shift along the rows (towards larger row
  indices); then ``|ifft2(ifftshift(K))|``. Half of k-space comes from the object moved by ``d`` rows, which
  gives a half-intensity ghost ``d`` rows away. It has no random part: the seed is accepted and ignored.

Groups (metadata, ``Corruption.group`` and ``Corruption.modalities``): *modality-agnostic*: gaussian_noise,
gaussian_blur, contrast, brightness; *modality-specific*: speckle and salt-pepper noise (ultrasound),
rician noise, rayleigh noise and step motion (MRI), poisson noise (CT, X-ray, microscopy), JPEG compression
and colour jitter (RGB imaging: endoscopy, dermoscopy, fundus, histopathology).

Seeding: :func:`corrupt` takes an integer seed (random stream ``numpy.random.default_rng([seed,
crc32(name)])``, so different corruptions with the same seed draw independent values) or a
``numpy.random.Generator`` (used as is and advanced). :func:`corrupt_volume` gives slice ``k`` along
``axis`` the stream ``default_rng([seed, crc32(name), k])`` (see :func:`slice_rng`).

``"clear"`` is accepted everywhere as the identity. No torch, Qt or Slicer import here.

This module holds the registry (:data:`CORRUPTIONS`), validation, seeding and :func:`corrupt` /
:func:`corrupt_volume`; the functions themselves are in ``corruption_functions.py``, with the JPEG round trip in
``corruption_jpeg.py`` and the colour-space helpers in ``corruption_colour.py``.
"""
from __future__ import annotations

import numbers
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np

from .corruption_functions import (  # the registered functions and their severity tables
    BLUR_KSIZES, BRIGHTNESS, CONTRAST, GAUSSIAN_SIGMA, JITTER_SCALE, JPEG_BASELINE, JPEG_QUALITY, MOTION_SHIFT,
    POISSON_PHOTONS, RAYLEIGH_SCALE, RICIAN_SIGMA, SALT_PEPPER_FRACTION, SPECKLE_STD, brightness, color_jitter,
    contrast, gaussian_blur, gaussian_noise, jpeg_compression, poisson_noise, rayleigh_noise, rician_noise,
    salt_pepper_noise, speckle_noise, step_motion)

CLEAR = "clear"
SEVERITIES = (1, 2, 3, 4, 5)
MODALITY_AGNOSTIC = "modality-agnostic"
MODALITY_SPECIFIC = "modality-specific"

SeedLike = Union[int, np.integer, np.random.Generator]
CorruptionFunction = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Corruption:
    """One registered degradation.

    ``function(image, severity, rng)`` receives a validated uint8 image and returns uint8 of the same shape;
    call :meth:`__call__` (or :func:`corrupt`) to get the validation and seeding.
    """

    name: str
    function: CorruptionFunction
    group: str
    description: str
    modalities: Tuple[str, ...]
    severity_parameters: Tuple[str, ...]  # the parameters of severities 1..5, human-readable

    def __call__(self, image, severity: int = 3, seed: SeedLike = 0) -> np.ndarray:
        return corrupt(image, self.name, severity=severity, seed=seed)


# ============================================================================================ registry
def _entry(name: str, function: CorruptionFunction, group: str, description: str,
           modalities: Sequence[str], severity_parameters: Sequence[str]) -> Corruption:
    return Corruption(name, function, group, description, tuple(modalities), tuple(severity_parameters))


_RGB_MODALITIES = ("endoscopy", "dermoscopy", "fundus", "histopathology")

CORRUPTIONS: Dict[str, Corruption] = {c.name: c for c in (
    _entry("gaussian_noise", gaussian_noise, MODALITY_AGNOSTIC,
           "additive Gaussian noise (electronic/thermal noise of any detector)", ("all",),
           [f"sigma {s:g}" for s in GAUSSIAN_SIGMA]),
    _entry("gaussian_blur", gaussian_blur, MODALITY_AGNOSTIC,
           "Gaussian blur (defocus, low resolution, patient motion during a long exposure)", ("all",),
           ["kernel " + "/".join(str(k) for k in ks) for ks in BLUR_KSIZES]),
    _entry("contrast", contrast, MODALITY_AGNOSTIC,
           "contrast increased around mid-grey (over-stretched window/level)", ("all",),
           [f"factor U({lo:g}, {hi:g})" for lo, hi in CONTRAST]),
    _entry("brightness", brightness, MODALITY_AGNOSTIC,
           "image darkened by a factor (under-exposure, low gain)", ("all",),
           [f"factor U({lo:g}, {hi:g})" for lo, hi in BRIGHTNESS]),
    _entry("jpeg_compression", jpeg_compression, MODALITY_SPECIFIC,
           "JPEG compression artefacts (lossy storage or transmission)", _RGB_MODALITIES,
           [(f"quality {lo}..{hi}" if hi > lo else f"quality {lo}") + ("" if base else ", tables not clipped at 255")
            for (lo, hi), base in zip(JPEG_QUALITY, JPEG_BASELINE)]),
    _entry("color_jitter", color_jitter, MODALITY_SPECIFIC,
           "random brightness, contrast, saturation and hue (white balance, illumination, staining)",
           _RGB_MODALITIES,
           [f"brightness {0.7 * m:.3g}, contrast {0.3 * m:.3g}, saturation {0.7 * m:.3g}, "
            f"hue {min(0.7, 0.7 * m):.3g} turn" for m in JITTER_SCALE]),
    _entry("poisson_noise", poisson_noise, MODALITY_SPECIFIC,
           "Poisson (photon-count, quantum) noise of low-dose imaging", ("CT", "X-ray", "microscopy"),
           [f"{p:g} photons at full scale" for p in POISSON_PHOTONS]),
    _entry("speckle_noise", speckle_noise, MODALITY_SPECIFIC,
           "multiplicative speckle noise (coherent imaging)", ("ultrasound",),
           [f"std {s:g}" for s in SPECKLE_STD]),
    _entry("salt_pepper_noise", salt_pepper_noise, MODALITY_SPECIFIC,
           "impulse noise: pixels set to 0 or 255 (dead/saturated elements, transmission errors)",
           ("ultrasound",), [f"{f:.0%} of pixels" for f in SALT_PEPPER_FRACTION]),
    _entry("rician_noise", rician_noise, MODALITY_SPECIFIC,
           "Rician noise of magnitude MR images (biased upwards, most visible in dark regions)", ("MRI",),
           [f"sigma {s:g}" for s in RICIAN_SIGMA]),
    _entry("rayleigh_noise", rayleigh_noise, MODALITY_SPECIFIC,
           "zero-mean Rayleigh-distributed noise (skewed, heavy bright tail)", ("MRI",),
           [f"scale {s:g}" for s in RAYLEIGH_SCALE]),
    _entry("step_motion", step_motion, MODALITY_SPECIFIC,
           "MRI motion ghosting: half of k-space acquired after the object moved", ("MRI",),
           [f"{d} px shift" for d in MOTION_SHIFT]),
)}


def names(include_clear: bool = False) -> List[str]:
    """The registered corruption names in registry order (with ``"clear"`` first if asked)."""
    return ([CLEAR] if include_clear else []) + list(CORRUPTIONS)


def groups() -> Dict[str, List[str]]:
    """``{group: [names]}`` (``modality-agnostic`` and ``modality-specific``)."""
    out: Dict[str, List[str]] = {MODALITY_AGNOSTIC: [], MODALITY_SPECIFIC: []}
    for c in CORRUPTIONS.values():
        out[c.group].append(c.name)
    return out


# ============================================================================================ validation
def _check_name(name) -> str:
    if not isinstance(name, str) or (name != CLEAR and name not in CORRUPTIONS):
        raise ValueError(f"unknown corruption {name!r}; use one of: {', '.join(names(include_clear=True))}")
    return name


def _check_severity(severity) -> int:
    ok = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    if not ok and isinstance(severity, float) and severity.is_integer():
        ok = True
    if not ok or int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an integer from 1 to 5 (3 = the paper's parameters), "
                         f"got {severity!r}")
    return int(severity)


def _check_dtype(array: np.ndarray, what: str) -> None:
    if array.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 {what}, got dtype {array.dtype}; convert it first, e.g. "
            f"np.clip(np.rint(x), 0, 255).astype(np.uint8) for values already in 0..255, or "
            f"RobustMedSAMLib.intensity.to_uint8(x) to window/rescale medical intensities")


def check_image(image) -> np.ndarray:
    """``image`` as a uint8 ``(H, W)`` or ``(H, W, 3)`` array, or a ValueError saying what to fix."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}; use np.asarray(image)")
    _check_dtype(image, "image")
    shape = image.shape
    if image.ndim == 3 and shape[2] != 3:
        if shape[2] == 1:
            fix = "drop the channel axis with image[..., 0]"
        elif shape[2] == 4:
            fix = "drop the alpha channel with image[..., :3]"
        elif shape[0] in (1, 3):
            fix = "move the channel axis last with np.moveaxis(image, 0, -1)"
        else:
            fix = "pass one 2D slice at a time, or use corrupt_volume for a (K, J, I) volume"
        raise ValueError(f"expected an (H, W) grey or (H, W, 3) RGB image, got shape {shape} "
                         f"({shape[2]} channels); {fix}")
    if image.ndim not in (2, 3):
        fix = ("pass one (H, W) or (H, W, 3) slice at a time" if image.ndim > 3
               else "reshape it to (H, W)")
        raise ValueError(f"expected an (H, W) grey or (H, W, 3) RGB image, got {image.ndim} dimensions "
                         f"(shape {shape}); {fix}")
    if min(shape[:2]) < 1:
        raise ValueError(f"the image is empty (shape {shape}); it needs at least one pixel")
    return image


def _seed_int(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer or a numpy.random.Generator, got {seed!r}")
    return int(seed)


def make_rng(seed: SeedLike, name: str) -> np.random.Generator:
    """The random stream :func:`corrupt` uses: ``seed`` itself if it is a Generator, else
    ``default_rng([seed, crc32(name)])``."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng([_seed_int(seed), zlib.crc32(name.encode("utf-8"))])


def slice_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The random stream of slice ``index`` in :func:`corrupt_volume`: ``default_rng([seed, crc32(name),
    index])``."""
    return np.random.default_rng([_seed_int(seed), zlib.crc32(name.encode("utf-8")), int(index)])


# ============================================================================================ public API
def corrupt(image, name: str, severity: int = 3, seed: SeedLike = 0) -> np.ndarray:
    """``image`` (uint8 ``(H, W)`` or ``(H, W, 3)``) degraded by corruption ``name`` at ``severity`` 1..5.

    Returns a new uint8 array of the same shape; ``"clear"`` returns an unchanged copy. The same seed gives
    the same result.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    image = check_image(image)
    if name == CLEAR:
        return image.copy()
    rng = make_rng(seed, name)
    out = CORRUPTIONS[name].function(image, severity, rng)
    assert out.dtype == np.uint8 and out.shape == image.shape
    return out


def corrupt_volume(volume, name: str, severity: int = 3, seed: SeedLike = 0, axis: int = 0) -> np.ndarray:
    """A uint8 ``(K, J, I)`` volume degraded slice by slice along ``axis`` (0 = K).

    Slice ``k`` is corrupted with its own random stream :func:`slice_rng` ``(seed, name, k)``, so every slice
    gets different noise and the result depends only on ``seed``. A Generator ``seed`` is turned into an
    integer seed by one draw.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    if not isinstance(volume, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(volume).__name__}; use np.asarray(volume)")
    _check_dtype(volume, "volume")
    if volume.ndim != 3:
        fix = "use corrupt for a 2D image" if volume.ndim == 2 else "pass a single-component (K, J, I) volume"
        raise ValueError(f"expected a (K, J, I) volume, got {volume.ndim} dimensions (shape {volume.shape}); "
                         f"{fix}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -3 <= int(axis) <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 (or -3..-1), got {axis!r}")
    axis = int(axis) % 3
    if min(volume.shape) < 1:
        raise ValueError(f"the volume is empty (shape {volume.shape})")
    if name == CLEAR:
        return volume.copy()
    if isinstance(seed, np.random.Generator):
        base = int(seed.integers(0, 2 ** 63 - 1))
    else:
        base = _seed_int(seed)
    function = CORRUPTIONS[name].function
    moved = np.moveaxis(volume, axis, 0)
    out = np.empty_like(moved)
    for k in range(moved.shape[0]):
        out[k] = function(np.ascontiguousarray(moved[k]), severity, slice_rng(base, name, k))
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))
