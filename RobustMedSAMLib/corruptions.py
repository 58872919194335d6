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
"""
from __future__ import annotations

import functools
import io
import math
import numbers
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

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


# ============================================================================================ helpers
def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to nearest and clip to 0..255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _per_channel(image: np.ndarray, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    if image.ndim == 2:
        return function(image)
    return np.stack([function(image[..., c]) for c in range(image.shape[2])], axis=-1)


# ============================================================================================ corruptions
_GAUSSIAN_SIGMA = (4.0, 8.0, 16.0, 24.0, 32.0)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _GAUSSIAN_SIGMA[severity - 1]
    return _to_uint8(_float(image) + rng.normal(0.0, sigma, image.shape))


_BLUR_KSIZES = ((3,), (5,), (7, 9, 11, 13), (15, 17, 19), (21, 23, 25))
# OpenCV's fixed kernels for odd sizes <= 7 when sigma <= 0 (getGaussianKernel)
_SMALL_GAUSSIAN = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def opencv_sigma(ksize: int) -> float:
    """The sigma OpenCV derives from an odd kernel size when it is given sigma 0."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def gaussian_kernel(ksize: int) -> np.ndarray:
    """The normalised 1-D kernel of OpenCV's ``GaussianBlur`` with kernel size ``ksize`` and sigma 0."""
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"the kernel size must be a positive odd integer, got {ksize}")
    if ksize in _SMALL_GAUSSIAN:
        kernel = np.array(_SMALL_GAUSSIAN[ksize], dtype=np.float64)
    else:
        sigma = opencv_sigma(ksize)
        x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
        kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    choices = _BLUR_KSIZES[severity - 1]
    ksize = int(choices[int(rng.integers(len(choices)))])
    kernel = gaussian_kernel(ksize)
    out = _float(image)
    for axis in (0, 1):  # scipy's "mirror" is d c b | a b c d | c b a, i.e. OpenCV's BORDER_REFLECT_101
        out = ndimage.correlate1d(out, kernel, axis=axis, mode="mirror")
    return _to_uint8(out)


_CONTRAST = ((1.15, 1.25), (1.35, 1.45), (1.6, 1.7), (1.9, 2.0), (2.2, 2.4))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(*_CONTRAST[severity - 1])
    return _to_uint8((_float(image) - 128.0) * factor + 128.0)


_BRIGHTNESS = ((0.9, 0.95), (0.8, 0.9), (0.6, 0.8), (0.45, 0.6), (0.3, 0.45))


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(*_BRIGHTNESS[severity - 1])
    return _to_uint8(_float(image) * factor)


_JPEG_QUALITY = ((30, 40), (15, 25), (5, 10), (2, 3), (1, 1))
_JPEG_BASELINE = (True, True, True, False, False)


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


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    low, high = _JPEG_QUALITY[severity - 1]
    return jpeg_roundtrip(image, int(rng.integers(low, high + 1)), baseline=_JPEG_BASELINE[severity - 1])


_JITTER_SCALE = (0.25, 0.5, 1.0, 1.2, 1.4)
_JITTER_PAPER = {"brightness": 0.7, "contrast": 0.3, "saturation": 0.7, "hue": 0.7}


def _rgb_to_hsv(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float RGB in 0..1 -> hue (fraction of a turn, 0..1), saturation, value."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax = rgb.max(axis=-1)
    delta = vmax - rgb.min(axis=-1)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(vmax == r, np.mod((g - b) / safe, 6.0),
                   np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue / 6.0, 0.0)
    sat = np.where(vmax > 0, delta / np.where(vmax > 0, vmax, 1.0), 0.0)
    return hue, sat, vmax


def _hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    h6 = np.mod(hue, 1.0) * 6.0
    sector = np.floor(h6)
    frac = h6 - sector
    sector = sector.astype(np.int64) % 6
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    r = np.choose(sector, [val, q, p, p, t, val])
    g = np.choose(sector, [t, val, val, q, p, p])
    b = np.choose(sector, [p, p, t, val, val, q])
    return np.stack([r, g, b], axis=-1)


def rotate_hue(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Float RGB (0..255) with its HSV hue rotated by ``turns`` of a full turn (modulo one turn)."""
    hue, sat, val = _rgb_to_hsv(rgb / 255.0)
    return _hsv_to_rgb(hue + turns, sat, val) * 255.0


def color_jitter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    m = _JITTER_SCALE[severity - 1]
    b_range = _JITTER_PAPER["brightness"] * m
    c_range = _JITTER_PAPER["contrast"] * m
    s_range = _JITTER_PAPER["saturation"] * m
    h_range = min(_JITTER_PAPER["hue"], _JITTER_PAPER["hue"] * m)
    factors = {
        "brightness": rng.uniform(1.0 - b_range, 1.0 + b_range),
        "contrast": rng.uniform(1.0 - c_range, 1.0 + c_range),
        "saturation": rng.uniform(1.0 - s_range, 1.0 + s_range),
        "hue": rng.uniform(-h_range, h_range),
    }
    order = [("brightness", "contrast", "saturation", "hue")[i] for i in rng.permutation(4)]
    rgb = image.ndim == 3
    out = _float(image)
    for op in order:
        f = factors[op]
        if op == "brightness":
            out = out * f
        elif op == "contrast":
            mean = float(_luma(out).mean()) if rgb else float(out.mean())
            out = out * f + mean * (1.0 - f)
        elif not rgb:
            continue  # saturation and hue leave grey images unchanged
        elif op == "saturation":
            out = out * f + _luma(out)[..., None] * (1.0 - f)
        else:
            out = rotate_hue(out, f)
        out = np.clip(out, 0.0, 255.0)
    return _to_uint8(out)


_POISSON_PHOTONS = (200.0, 80.0, 25.0, 10.0, 5.0)


def poisson_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = _POISSON_PHOTONS[severity - 1]
    counts = rng.poisson(_float(image) / 255.0 * photons)
    return _to_uint8(counts / photons * 255.0)


_SPECKLE_STD = (0.15, 0.3, 0.5, 0.7, 1.0)


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _float(image)
    return _to_uint8(x + x * rng.normal(0.0, _SPECKLE_STD[severity - 1], image.shape))


_SALT_PEPPER_FRACTION = (0.02, 0.05, 0.10, 0.20, 0.30)


def salt_pepper_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    count = int(round(_SALT_PEPPER_FRACTION[severity - 1] * h * w))
    chosen = rng.choice(h * w, size=count, replace=False)
    out = image.copy()
    flat = out.reshape(h * w, -1)  # a view: one row per pixel, all channels together
    n_salt = count // 2
    flat[chosen[:n_salt]] = 255
    flat[chosen[n_salt:]] = 0
    return out


_RICIAN_SIGMA = (8.0, 15.0, 25.0, 35.0, 50.0)


def rician_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _RICIAN_SIGMA[severity - 1]
    real = _float(image) + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return _to_uint8(np.hypot(real, imag))


_RAYLEIGH_SCALE = (10.0, 20.0, 40.0, 55.0, 70.0)


def rayleigh_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale = _RAYLEIGH_SCALE[severity - 1]
    noise = rng.rayleigh(scale, image.shape) - scale * math.sqrt(math.pi / 2.0)
    return _to_uint8(_float(image) + noise)


_MOTION_SHIFT = (2, 3, 5, 8, 12)


def step_motion_channel(channel: np.ndarray, shift: float) -> np.ndarray:
    """One 2-D channel (float) ghosted by moving the lower half of centred k-space by ``shift`` rows."""
    rows = channel.shape[0]
    kspace = np.fft.fftshift(np.fft.fft2(channel))
    half = rows // 2                                   # index of the zero row frequency after fftshift
    freq = np.arange(rows - half, dtype=np.float64)    # frequencies of rows half..rows-1: 0, 1, ...
    ramp = np.exp(-2j * np.pi * freq * shift / rows)
    kspace[half:, :] *= ramp[:, None]
    return np.abs(np.fft.ifft2(np.fft.ifftshift(kspace)))


def step_motion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    shift = _MOTION_SHIFT[severity - 1]
    return _to_uint8(_per_channel(_float(image), lambda c: step_motion_channel(c, shift)))


# ============================================================================================ registry
def _entry(name: str, function: CorruptionFunction, group: str, description: str,
           modalities: Sequence[str], severity_parameters: Sequence[str]) -> Corruption:
    return Corruption(name, function, group, description, tuple(modalities), tuple(severity_parameters))


_RGB_MODALITIES = ("endoscopy", "dermoscopy", "fundus", "histopathology")

CORRUPTIONS: Dict[str, Corruption] = {c.name: c for c in (
    _entry("gaussian_noise", gaussian_noise, MODALITY_AGNOSTIC,
           "additive Gaussian noise (electronic/thermal noise of any detector)", ("all",),
           [f"sigma {s:g}" for s in _GAUSSIAN_SIGMA]),
    _entry("gaussian_blur", gaussian_blur, MODALITY_AGNOSTIC,
           "Gaussian blur (defocus, low resolution, patient motion during a long exposure)", ("all",),
           ["kernel " + "/".join(str(k) for k in ks) for ks in _BLUR_KSIZES]),
    _entry("contrast", contrast, MODALITY_AGNOSTIC,
           "contrast increased around mid-grey (over-stretched window/level)", ("all",),
           [f"factor U({lo:g}, {hi:g})" for lo, hi in _CONTRAST]),
    _entry("brightness", brightness, MODALITY_AGNOSTIC,
           "image darkened by a factor (under-exposure, low gain)", ("all",),
           [f"factor U({lo:g}, {hi:g})" for lo, hi in _BRIGHTNESS]),
    _entry("jpeg_compression", jpeg_compression, MODALITY_SPECIFIC,
           "JPEG compression artefacts (lossy storage or transmission)", _RGB_MODALITIES,
           [(f"quality {lo}..{hi}" if hi > lo else f"quality {lo}") + ("" if base else ", tables not clipped at 255")
            for (lo, hi), base in zip(_JPEG_QUALITY, _JPEG_BASELINE)]),
    _entry("color_jitter", color_jitter, MODALITY_SPECIFIC,
           "random brightness, contrast, saturation and hue (white balance, illumination, staining)",
           _RGB_MODALITIES,
           [f"brightness {0.7 * m:.3g}, contrast {0.3 * m:.3g}, saturation {0.7 * m:.3g}, "
            f"hue {min(0.7, 0.7 * m):.3g} turn" for m in _JITTER_SCALE]),
    _entry("poisson_noise", poisson_noise, MODALITY_SPECIFIC,
           "Poisson (photon-count, quantum) noise of low-dose imaging", ("CT", "X-ray", "microscopy"),
           [f"{p:g} photons at full scale" for p in _POISSON_PHOTONS]),
    _entry("speckle_noise", speckle_noise, MODALITY_SPECIFIC,
           "multiplicative speckle noise (coherent imaging)", ("ultrasound",),
           [f"std {s:g}" for s in _SPECKLE_STD]),
    _entry("salt_pepper_noise", salt_pepper_noise, MODALITY_SPECIFIC,
           "impulse noise: pixels set to 0 or 255 (dead/saturated elements, transmission errors)",
           ("ultrasound",), [f"{f:.0%} of pixels" for f in _SALT_PEPPER_FRACTION]),
    _entry("rician_noise", rician_noise, MODALITY_SPECIFIC,
           "Rician noise of magnitude MR images (biased upwards, most visible in dark regions)", ("MRI",),
           [f"sigma {s:g}" for s in _RICIAN_SIGMA]),
    _entry("rayleigh_noise", rayleigh_noise, MODALITY_SPECIFIC,
           "zero-mean Rayleigh-distributed noise (skewed, heavy bright tail)", ("MRI",),
           [f"scale {s:g}" for s in _RAYLEIGH_SCALE]),
    _entry("step_motion", step_motion, MODALITY_SPECIFIC,
           "MRI motion ghosting: half of k-space acquired after the object moved", ("MRI",),
           [f"{d} px shift" for d in _MOTION_SHIFT]),
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
