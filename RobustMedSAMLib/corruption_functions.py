"""The 12 corruption functions ``f(image, severity, rng)`` and their per-severity parameter tables.

Each receives a validated uint8 image ``(H, W)`` or ``(H, W, 3)``, a severity 1..5 and a
``numpy.random.Generator``, and returns a new uint8 image of the same shape. The definitions, the severity
table and the seeding are documented in :mod:`RobustMedSAMLib.corruptions`, which registers these functions
and validates their input; call them through :func:`~RobustMedSAMLib.corruptions.corrupt`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage

from .corruption_colour import luma, rotate_hue
from .corruption_jpeg import jpeg_roundtrip


# ============================================================================================ helpers
def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to nearest and clip to 0..255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64)


def _per_channel(image: np.ndarray, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    if image.ndim == 2:
        return function(image)
    return np.stack([function(image[..., c]) for c in range(image.shape[2])], axis=-1)


# ============================================================================================ corruptions
GAUSSIAN_SIGMA = (4.0, 8.0, 16.0, 24.0, 32.0)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = GAUSSIAN_SIGMA[severity - 1]
    return _to_uint8(_float(image) + rng.normal(0.0, sigma, image.shape))


BLUR_KSIZES = ((3,), (5,), (7, 9, 11, 13), (15, 17, 19), (21, 23, 25))
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
    choices = BLUR_KSIZES[severity - 1]
    ksize = int(choices[int(rng.integers(len(choices)))])
    kernel = gaussian_kernel(ksize)
    out = _float(image)
    for axis in (0, 1):  # scipy's "mirror" is d c b | a b c d | c b a, i.e. OpenCV's BORDER_REFLECT_101
        out = ndimage.correlate1d(out, kernel, axis=axis, mode="mirror")
    return _to_uint8(out)


CONTRAST = ((1.15, 1.25), (1.35, 1.45), (1.6, 1.7), (1.9, 2.0), (2.2, 2.4))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(*CONTRAST[severity - 1])
    return _to_uint8((_float(image) - 128.0) * factor + 128.0)


BRIGHTNESS = ((0.9, 0.95), (0.8, 0.9), (0.6, 0.8), (0.45, 0.6), (0.3, 0.45))


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(*BRIGHTNESS[severity - 1])
    return _to_uint8(_float(image) * factor)


JPEG_QUALITY = ((30, 40), (15, 25), (5, 10), (2, 3), (1, 1))
JPEG_BASELINE = (True, True, True, False, False)

def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    low, high = JPEG_QUALITY[severity - 1]
    return jpeg_roundtrip(image, int(rng.integers(low, high + 1)), baseline=JPEG_BASELINE[severity - 1])


JITTER_SCALE = (0.25, 0.5, 1.0, 1.2, 1.4)
_JITTER_PAPER = {"brightness": 0.7, "contrast": 0.3, "saturation": 0.7, "hue": 0.7}

def color_jitter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    m = JITTER_SCALE[severity - 1]
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
            mean = float(luma(out).mean()) if rgb else float(out.mean())
            out = out * f + mean * (1.0 - f)
        elif not rgb:
            continue  # saturation and hue leave grey images unchanged
        elif op == "saturation":
            out = out * f + luma(out)[..., None] * (1.0 - f)
        else:
            out = rotate_hue(out, f)
        out = np.clip(out, 0.0, 255.0)
    return _to_uint8(out)


POISSON_PHOTONS = (200.0, 80.0, 25.0, 10.0, 5.0)


def poisson_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = POISSON_PHOTONS[severity - 1]
    counts = rng.poisson(_float(image) / 255.0 * photons)
    return _to_uint8(counts / photons * 255.0)


SPECKLE_STD = (0.15, 0.3, 0.5, 0.7, 1.0)


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _float(image)
    return _to_uint8(x + x * rng.normal(0.0, SPECKLE_STD[severity - 1], image.shape))


SALT_PEPPER_FRACTION = (0.02, 0.05, 0.10, 0.20, 0.30)


def salt_pepper_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    count = int(round(SALT_PEPPER_FRACTION[severity - 1] * h * w))
    chosen = rng.choice(h * w, size=count, replace=False)
    out = image.copy()
    flat = out.reshape(h * w, -1)  # a view: one row per pixel, all channels together
    n_salt = count // 2
    flat[chosen[:n_salt]] = 255
    flat[chosen[n_salt:]] = 0
    return out


RICIAN_SIGMA = (8.0, 15.0, 25.0, 35.0, 50.0)


def rician_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = RICIAN_SIGMA[severity - 1]
    real = _float(image) + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return _to_uint8(np.hypot(real, imag))


RAYLEIGH_SCALE = (10.0, 20.0, 40.0, 55.0, 70.0)


def rayleigh_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale = RAYLEIGH_SCALE[severity - 1]
    noise = rng.rayleigh(scale, image.shape) - scale * math.sqrt(math.pi / 2.0)
    return _to_uint8(_float(image) + noise)


MOTION_SHIFT = (2, 3, 5, 8, 12)


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
    shift = MOTION_SHIFT[severity - 1]
    return _to_uint8(_per_channel(_float(image), lambda c: step_motion_channel(c, shift)))

