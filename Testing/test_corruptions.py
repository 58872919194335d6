"""The 12 RobustMedSAM degradations through the public API: the registry, shapes and dtypes, seeding, the
volume helper and input validation (what each one measurably does: test_corruption_functions.py)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from RobustMedSAMLib import corruptions as C
from corruption_images import constant, residual, textured

NAMES = [
    "gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg_compression", "color_jitter",
    "poisson_noise", "speckle_noise", "salt_pepper_noise", "rician_noise", "rayleigh_noise", "step_motion",
]
NOISE = ["gaussian_noise", "poisson_noise", "speckle_noise", "salt_pepper_noise", "rician_noise",
         "rayleigh_noise"]


# ============================================================================================ registry, API
def test_registry_names_groups_and_metadata():
    assert C.names() == NAMES
    assert C.names(include_clear=True) == ["clear"] + NAMES
    assert set(C.CORRUPTIONS) == set(NAMES)
    assert C.groups() == {
        "modality-agnostic": ["gaussian_noise", "gaussian_blur", "contrast", "brightness"],
        "modality-specific": NAMES[4:],
    }
    mods = {n: C.CORRUPTIONS[n].modalities for n in NAMES}
    assert mods["speckle_noise"] == mods["salt_pepper_noise"] == ("ultrasound",)
    assert mods["rician_noise"] == mods["rayleigh_noise"] == mods["step_motion"] == ("MRI",)
    assert set(mods["poisson_noise"]) == {"CT", "X-ray", "microscopy"}
    for name, c in C.CORRUPTIONS.items():
        assert c.name == name and callable(c.function) and c.description
        assert len(c.severity_parameters) == 5 and len(set(c.severity_parameters)) == 5
    img = textured()
    assert np.array_equal(C.CORRUPTIONS["rician_noise"](img, severity=2, seed=4),
                          C.corrupt(img, "rician_noise", severity=2, seed=4))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_grey_and_rgb_input_untouched(name):
    for image in (textured((37, 53)), textured((37, 53, 3)), textured((64, 48, 3))[:, ::2]):  # odd, strided
        before = image.copy()
        for severity in (1, 2, 3, 4, 5):
            out = C.corrupt(image, name, severity=severity, seed=severity)
            assert out.dtype == np.uint8 and out.shape == image.shape
            assert not np.shares_memory(out, image)
        assert np.array_equal(image, before)
        assert not np.array_equal(C.corrupt(image, name), image)


def test_clear_is_identity_copy():
    img = textured()
    out = C.corrupt(img, "clear", severity=5, seed=3)
    assert np.array_equal(out, img) and out is not img
    vol = np.stack([textured((20, 24))] * 3)
    assert np.array_equal(C.corrupt_volume(vol, "clear"), vol)


# ============================================================================================ seeding
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output_and_generators(name):
    img = textured()
    a = C.corrupt(img, name, severity=3, seed=11)
    assert np.array_equal(a, C.corrupt(img, name, severity=3, seed=11))
    assert np.array_equal(a, C.corrupt(img, name, severity=3, seed=np.int64(11)))
    rng = np.random.default_rng([11, zlib.crc32(name.encode())])  # the documented stream
    assert np.array_equal(a, C.corrupt(img, name, severity=3, seed=rng))


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_give_different_output(name):
    img = textured()
    outs = [C.corrupt(img, name, severity=3, seed=s).tobytes() for s in range(12)]
    if name == "step_motion":  # documented: no random part
        assert len(set(outs)) == 1
    elif name in NOISE:
        assert len(set(outs)) == 12
    else:  # a random parameter (factor, kernel, quality) drawn from a range
        assert len(set(outs)) >= 3


def test_corruptions_with_the_same_seed_draw_independent_noise():
    img = constant(128)
    a = residual(C.corrupt(img, "gaussian_noise", seed=0), 128)
    b = residual(C.corrupt(img, "speckle_noise", severity=3, seed=0), 128)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02


# ============================================================================================ volumes
def test_corrupt_volume_slicewise_with_per_slice_seeds():
    vol = np.full((6, 32, 40), 128, np.uint8)
    out = C.corrupt_volume(vol, "gaussian_noise", severity=3, seed=7, axis=0)
    assert out.shape == vol.shape and out.dtype == np.uint8
    for k in range(6):
        expected = C.corrupt(vol[k], "gaussian_noise", 3, seed=C.slice_rng(7, "gaussian_noise", k))
        assert np.array_equal(out[k], expected)
    r = residual(out, 128)
    assert r.std() == pytest.approx(16, rel=0.03)
    corr = np.corrcoef(r.reshape(6, -1))
    assert np.abs(corr - np.eye(6)).max() < 0.06  # different noise in every slice
    assert np.array_equal(out, C.corrupt_volume(vol, "gaussian_noise", severity=3, seed=7))
    assert not np.array_equal(out, C.corrupt_volume(vol, "gaussian_noise", severity=3, seed=8))
    # generator seeds work and advance
    g = np.random.default_rng(0)
    first = C.corrupt_volume(vol, "rician_noise", seed=g)
    assert not np.array_equal(first, C.corrupt_volume(vol, "rician_noise", seed=g))


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_corrupt_volume_other_axes(axis):
    vol = np.stack([textured((20, 24), seed=s) for s in range(5)])  # (5, 20, 24)
    for name in ("speckle_noise", "step_motion", "gaussian_blur"):
        out = C.corrupt_volume(vol, name, severity=3, seed=1, axis=axis)
        assert out.shape == vol.shape
        a = axis % 3
        for k in range(vol.shape[a]):
            expected = C.corrupt(np.take(vol, k, axis=a), name, 3, seed=C.slice_rng(1, name, k))
            assert np.array_equal(np.take(out, k, axis=a), expected)
    assert not np.array_equal(C.corrupt_volume(vol, "step_motion", axis=0),
                              C.corrupt_volume(vol, "step_motion", axis=axis))


# ============================================================================================ validation
def test_validation_errors_are_clear():
    img = textured((16, 16, 3))
    with pytest.raises(ValueError, match=r"uint8.*float64.*astype\(np.uint8\)"):
        C.corrupt(img.astype(np.float64), "gaussian_noise")
    with pytest.raises(ValueError, match=r"uint8.*int16.*intensity.to_uint8"):
        C.corrupt(img.astype(np.int16), "gaussian_noise")
    with pytest.raises(ValueError, match=r"numpy array.*np.asarray"):
        C.corrupt(img.tolist(), "gaussian_noise")
    with pytest.raises(ValueError, match=r"\(16, 16, 4\).*alpha.*\[\.\.\., :3\]"):
        C.corrupt(np.zeros((16, 16, 4), np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"1 channels.*image\[\.\.\., 0\]"):
        C.corrupt(np.zeros((16, 16, 1), np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"np.moveaxis"):
        C.corrupt(np.zeros((3, 16, 16), np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"1 dimensions"):
        C.corrupt(np.zeros(16, np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"4 dimensions"):
        C.corrupt(np.zeros((2, 16, 16, 3), np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"empty"):
        C.corrupt(np.zeros((0, 16), np.uint8), "gaussian_noise")
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'.*clear, gaussian_noise.*step_motion"):
        C.corrupt(img, "fog")
    for bad in (0, 6, -1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=r"severity must be an integer from 1 to 5"):
            C.corrupt(img, "gaussian_noise", severity=bad)
    for bad in (-1, 1.5, "0"):
        with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
            C.corrupt(img, "gaussian_noise", seed=bad)
    vol = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"\(K, J, I\).*2 dimensions.*use corrupt"):
        C.corrupt_volume(img[..., 0], "gaussian_noise")
    with pytest.raises(ValueError, match=r"uint8 volume.*float32"):
        C.corrupt_volume(vol.astype(np.float32), "gaussian_noise")
    with pytest.raises(ValueError, match=r"axis must be"):
        C.corrupt_volume(vol, "gaussian_noise", axis=3)
    with pytest.raises(ValueError, match=r"unknown corruption"):
        C.corrupt_volume(vol, "blur")
    with pytest.raises(ValueError, match=r"severity"):
        C.corrupt_volume(vol, "gaussian_noise", severity=7)
