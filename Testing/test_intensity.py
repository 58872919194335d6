"""Intensity normalisation: CT windows, percentile normalisation, modality guess (real chest CT)."""
from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import slicerio

from RobustMedSAMLib.intensity import (DEFAULT_CT_WINDOW, WINDOW_PRESETS, IntensityError, Window, get_window,
                                       guess_modality, intensity_mapping, percentile_range, slice_to_rgb,
                                       to_uint8)
from RobustMedSAMLib.volume_io import read_volume

CT_PATH = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT_PATH)


@pytest.fixture(scope="module")
def mr_like():
    """MR-like volume: zero background, a bright ellipsoid 'body' with two tissues, Rician-like noise."""
    rng = np.random.default_rng(7)
    k, j, i = np.mgrid[:24, :80, :96]
    body = ((i - 48) / 40.0) ** 2 + ((j - 40) / 32.0) ** 2 + ((k - 12) / 11.0) ** 2 < 1
    organ = ((i - 55) / 12.0) ** 2 + ((j - 40) / 10.0) ** 2 + ((k - 12) / 6.0) ** 2 < 1
    signal = np.where(body, 400.0, 0.0) + np.where(organ, 500.0, 0.0)
    noisy = np.hypot(signal + rng.normal(0, 30, signal.shape), rng.normal(0, 30, signal.shape))
    out = np.where(body, noisy, 0.0).round().astype(np.uint16)
    return out


def _exact_window(values, lower, upper):
    """floor(255 * (clip(v) - lower) / (upper - lower)) in exact rational arithmetic."""
    lo, hi = Fraction(lower), Fraction(upper)
    out = []
    for v in values:
        c = min(max(Fraction(int(v)), lo), hi)
        out.append(math.floor(255 * (c - lo) / (hi - lo)))
    return np.array(out)


def test_presets_and_window_edges_exact():
    assert (WINDOW_PRESETS["soft_tissue"].level, WINDOW_PRESETS["soft_tissue"].width) == (40, 400)
    assert (WINDOW_PRESETS["lung"].level, WINDOW_PRESETS["lung"].width) == (-600, 1500)
    assert (WINDOW_PRESETS["bone"].level, WINDOW_PRESETS["bone"].width) == (400, 1800)
    assert (WINDOW_PRESETS["brain"].level, WINDOW_PRESETS["brain"].width) == (40, 80)
    assert (WINDOW_PRESETS["wide"].lower, WINDOW_PRESETS["wide"].upper) == (-1000, 1000)
    assert DEFAULT_CT_WINDOW == WINDOW_PRESETS["wide"]  # chosen from the LiteMedSAM field evaluation
    assert (Window(40, 400).lower, Window(40, 400).upper) == (-160, 240)
    hu = np.arange(-3024, 3071, dtype=np.int16)
    for name, w in list(WINDOW_PRESETS.items()) + [("custom", Window(-57, 333))]:
        out = to_uint8(hu, window=w if name == "custom" else name)
        assert out.dtype == np.uint8 and out.shape == hu.shape
        np.testing.assert_array_equal(out, _exact_window(hu, w.lower, w.upper), err_msg=name)
        lo_i = np.searchsorted(hu, math.ceil(w.lower))
        assert out[hu <= w.lower].max() == 0 and out[hu >= w.upper].min() == 255
        assert out[lo_i] == _exact_window([hu[lo_i]], w.lower, w.upper)[0]
    # exactly at the edges of the soft-tissue window; the level maps to floor(127.5)
    np.testing.assert_array_equal(to_uint8(np.array([-1000, -160, 40, 239, 240, 3000]), window="soft tissue"),
                                  [0, 0, 127, 254, 255, 255])
    assert get_window((50, 350)) == Window(50, 350) and get_window("Soft-Tissue") == Window(40, 400)
    with pytest.raises(IntensityError, match="unknown window preset 'liver'"):
        get_window("liver")
    with pytest.raises(IntensityError, match="width > 0"):
        Window(40, 0)


def test_ct_volume_guess_and_default_window(ct):
    assert guess_modality(ct.array) == "CT"
    assert guess_modality(ct) == "CT"
    out = to_uint8(ct)
    assert out.shape == ct.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, to_uint8(ct.array, modality="CT", window="wide"))
    # all-HU check: air is black, dense bone white
    assert out[ct.array <= -1000].max() == 0 and out[ct.array >= 1000].min() == 255
    lung = to_uint8(ct, window="lung")
    assert not np.array_equal(lung, out)
    # modality override: CT normalised as "other" uses percentiles instead of the HU window
    as_mr = intensity_mapping(ct.array, modality="MR")
    assert as_mr.window is None and as_mr.zero_background and as_mr.lower < -900


def test_percentile_normalisation_mr_like(mr_like):
    assert guess_modality(mr_like) == "other"
    z_scored = (mr_like - mr_like.mean()) / mr_like.std()
    assert guess_modality(z_scored) == "other"
    nz = mr_like[mr_like != 0].astype(float)
    lo, hi = percentile_range(mr_like)
    assert (lo, hi) == tuple(np.percentile(nz, [0.5, 99.5]))
    mapping = intensity_mapping(mr_like)
    assert (mapping.lower, mapping.upper, mapping.zero_background, mapping.modality) == (lo, hi, True, "other")
    out = to_uint8(mr_like)
    assert out.dtype == np.uint8 and out.shape == mr_like.shape
    assert (out[mr_like == 0] == 0).all()                    # background kept zero
    assert (out[(mr_like >= hi)] == 255).all() and (out[(mr_like != 0) & (mr_like <= lo)] == 0).all()
    frac_white = np.mean(out[mr_like != 0] == 255)
    assert 0.003 < frac_white < 0.007                        # ~0.5 % of foreground above the 99.5th percentile
    # MedSAM's formula (clip, min-max of the clipped volume, zero background) gives the same image
    clipped = np.clip(mr_like.astype(float), lo, hi)
    medsam = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0
    medsam[mr_like == 0] = 0
    diff = np.abs(out.astype(int) - np.uint8(medsam).astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999


def test_mapping_is_per_volume_not_per_slice(mr_like):
    mapping = intensity_mapping(mr_like)
    whole = mapping.apply(mr_like)
    for k in (2, 12, 21):
        np.testing.assert_array_equal(mapping.apply(mr_like[k]), whole[k])
    # a per-slice normalisation would differ on an edge slice (fewer bright voxels there)
    per_slice = to_uint8(mr_like[2])
    assert not np.array_equal(per_slice, whole[2])
    # chunked application gives the same result as one chunk
    np.testing.assert_array_equal(mapping.apply(mr_like, chunk_voxels=1000), whole)


def test_errors_and_rgb(ct):
    with pytest.raises(IntensityError, match="same intensity"):
        to_uint8(np.full((3, 4, 5), 12.0))
    with pytest.raises(IntensityError, match="all voxels are 0"):
        percentile_range(np.zeros((2, 3, 4)))
    nan = ct.array.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(IntensityError, match="NaN or infinite"):
        to_uint8(nan)
    with pytest.raises(IntensityError, match="unknown modality 'XR'"):
        to_uint8(ct.array, modality="XR")
    s = to_uint8(ct)[17]
    rgb = slice_to_rgb(s)
    assert rgb.shape == s.shape + (3,) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], s)
    with pytest.raises(IntensityError, match="uint8"):
        slice_to_rgb(ct.array[0])
    with pytest.raises(IntensityError, match="2D"):
        slice_to_rgb(to_uint8(ct))


def test_get_window_reads_the_command_line_form():
    """"LEVEL,WIDTH" is read in one place for every face (CLI, training CLI, batch CSV, prompt files)."""
    assert get_window("40,400") == Window(40.0, 400.0) and get_window(" -600 , 1500") == Window(-600.0, 1500.0)
    for bad, message in (("40,abc", "LEVEL,WIDTH"), ("1,2,3", "LEVEL,WIDTH"), ("40,-5", "width > 0")):
        with pytest.raises(IntensityError, match=message):
            get_window(bad)
