"""Tests of RobustMedSAMLib.propagation / mask_prompts on hand-made volumes with known answers.

The segmenters here are deterministic stand-ins for the model:

* ``Oracle``: answers from a reference volume -- the reference inside the prompt's box if there is one, else
  the connected components of the reference under the positive points, else those overlapping the mask
  prompt. It records every (index, prompt) it was asked.
* ``Echo``: returns the reference slice whatever the prompt (to check who prompted whom).
Both can return a fixed predicted IoU per slice.

These tests pin micro-sam's algorithm (``stop_rule="micro-sam"``, micro-sam's own option defaults); the
consistency rule, the default, is tested in ``test_stop_rules.py``.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from RobustMedSAMLib.mask_prompts import (parse_projection, peak_local_max, points_from_mask,
                                          prompt_from_mask)
from RobustMedSAMLib.prompts import Prediction, box_from_mask
from RobustMedSAMLib import propagation as _propagation
from RobustMedSAMLib.propagation import PropagationCancelled, PropagationResult, SliceSegmenter, compute_iou

MICRO_SAM = {"stop_rule": "micro-sam", "projection": "mask"}


def propagate(segmenter, seeds, **kwargs):
    """micro-sam's rule and defaults (box + mask projection, IoU 0.5, box extension 0.025)."""
    return _propagation.propagate(segmenter, seeds, **{**MICRO_SAM, **kwargs})


def repropagate(segmenter, previous, index, new_mask, **kwargs):
    return _propagation.repropagate(segmenter, previous, index, new_mask, **kwargs)


# ------------------------------------------------------------------------------------------------------
# stand-in segmenters and volumes
# ------------------------------------------------------------------------------------------------------

def make_prediction(mask, iou=0.9):
    m = np.asarray(mask, dtype=bool)[None]
    return Prediction(masks=m, logits=np.where(m, 5.0, -5.0).astype(np.float32),
                      iou=np.array([iou], dtype=np.float32), low_res_logits=np.zeros((1, 4, 4), np.float32))


class Echo:
    def __init__(self, reference, score=None):
        self.reference = np.asarray(reference, dtype=bool)
        self.num_slices = self.reference.shape[0]
        self.slice_shape = self.reference.shape[1:]
        self.score = score
        self.calls = []

    @property
    def indices(self):
        return [i for i, _ in self.calls]

    def prompt_at(self, index):
        found = [p for i, p in self.calls if i == index]
        assert len(found) == 1, f"slice {index} predicted {len(found)} times"
        return found[0]

    def answer(self, index, prompt):
        return self.reference[index]

    def predict_slice(self, index, prompt):
        prompt.validate(self.slice_shape)
        self.calls.append((index, prompt))
        score = 0.9 if self.score is None else self.score(index)
        return make_prediction(self.answer(index, prompt), score)


class Oracle(Echo):
    def answer(self, index, prompt):
        ref = self.reference[index]
        if prompt.box is not None:
            x0, y0, x1, y1 = (int(v) for v in prompt.box)
            out = np.zeros_like(ref)
            out[y0:y1, x0:x1] = ref[y0:y1, x0:x1]
            return out
        labels, _ = ndimage.label(ref)
        if prompt.points is not None:
            ids = {labels[int(round(y)), int(round(x))]
                   for (x, y), lab in zip(prompt.points, prompt.labels) if lab == 1}
        else:
            ids = set(np.unique(labels[prompt.mask]).tolist())
        ids.discard(0)
        return np.isin(labels, sorted(ids))


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def sphere(z=24, hw=40, center=(12, 20, 20), r=8):
    zz, yy, xx = np.mgrid[0:z, 0:hw, 0:hw]
    return (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= r * r


def cylinder_with_step(z=22, hw=40):
    """Radius 10 on slices 3..12, radius 4 (same axis) on slices 13..18, empty elsewhere."""
    vol = np.zeros((z, hw, hw), dtype=bool)
    vol[3:13] = disk((hw, hw), 20, 20, 10)
    vol[13:19] = disk((hw, hw), 20, 20, 4)
    return vol


def drifting_disks(z=24, hw=48, r=8, drift=1.0):
    """A disk on every slice whose centre moves ``drift`` px per slice in x: every slice differs."""
    return np.stack([disk((hw, hw), 24, 12 + drift * k, r) for k in range(z)])


def expected_walk(reference, seed, step, threshold, limit):
    """(last written slice, stop reason, rejected slice) of an extrapolation when predictions == reference."""
    z = seed
    while z + step != limit + step:
        nxt = z + step
        if not reference[nxt].any():
            return z, "empty_prediction", nxt
        if compute_iou(reference[z], reference[nxt]) < threshold:
            return z, "iou_below_threshold", nxt
        z = nxt
    return z, "volume_bound", limit


def test_stand_ins_satisfy_protocol():
    assert isinstance(Oracle(sphere()), SliceSegmenter)


# ------------------------------------------------------------------------------------------------------
# extrapolation
# ------------------------------------------------------------------------------------------------------

def test_sphere_from_middle_reproduces_it_and_stops_at_its_ends():
    ref = sphere()  # slices 4..20 non-empty; slices 4 and 20 hold one pixel
    assert ref[4].sum() == 1 and ref[20].sum() == 1 and not ref[3].any() and not ref[21].any()
    seg = Oracle(ref)
    seeds = {12: ref[12].copy()}
    res = propagate(seg, seeds, iou_threshold=0.0, projection="box")
    assert np.array_equal(res.masks, ref)
    assert res.z_range == (4, 20)
    assert (res.stops["lower"].reason, res.stops["lower"].at_index) == ("empty_prediction", 3)
    assert (res.stops["upper"].reason, res.stops["upper"].at_index) == ("empty_prediction", 21)
    assert res.stops["upper"].iou == 0.0
    assert sorted(res.slices) == list(range(4, 21))
    assert res.slices[12].source == "seed" and res.slices[12].from_index is None
    assert res.slices[11].source == "extrapolated" and res.slices[11].from_index == 12
    assert res.slices[13].from_index == 12 and res.slices[14].from_index == 13
    # 3 and 21 were predicted (and rejected), nothing beyond
    assert seg.indices == list(range(11, 2, -1)) + list(range(13, 22))
    assert res.seeds == (12,) and res.predicted == tuple(seg.indices)


@pytest.mark.parametrize("projection", ["box", "mask", "points", "points_and_mask", "single_point",
                                        {"use_box": False, "use_mask": True, "use_points": False}])
def test_sphere_iou_rule_matches_reference_walk(projection):
    ref = sphere()
    res = propagate(Oracle(ref), {12: ref[12]}, iou_threshold=0.5, projection=projection)
    lo, lo_reason, lo_at = expected_walk(ref, 12, -1, 0.5, 0)
    hi, hi_reason, hi_at = expected_walk(ref, 12, 1, 0.5, ref.shape[0] - 1)
    assert lo_reason == hi_reason == "iou_below_threshold"  # the poles shrink too fast for 0.5
    assert 4 < lo < 12 < hi < 20
    assert res.z_range == (lo, hi)
    assert (res.stops["lower"].reason, res.stops["lower"].at_index) == (lo_reason, lo_at)
    assert (res.stops["upper"].reason, res.stops["upper"].at_index) == (hi_reason, hi_at)
    assert res.stops["lower"].iou == pytest.approx(compute_iou(ref[lo], ref[lo_at]))
    expected = np.zeros_like(ref)
    expected[lo:hi + 1] = ref[lo:hi + 1]
    assert np.array_equal(res.masks, expected)


def test_abrupt_change_stops_exactly_there_without_writing_it():
    ref = cylinder_with_step()
    res = propagate(Oracle(ref), {6: ref[6]}, iou_threshold=0.5, projection="box")
    up = res.stops["upper"]
    assert (up.reason, up.at_index) == ("iou_below_threshold", 13)
    assert up.iou == pytest.approx(ref[13].sum() / ref[12].sum())
    assert not res.masks[13:].any()
    assert np.array_equal(res.masks[:13], ref[:13])
    assert (res.stops["lower"].reason, res.stops["lower"].at_index) == ("empty_prediction", 2)
    assert res.z_range == (3, 12)
    # "below" is strict: a threshold equal to the IoU does not stop
    exact = compute_iou(ref[12], ref[13])
    res_eq = propagate(Oracle(ref), {6: ref[6]}, iou_threshold=exact, projection="box")
    assert res_eq.z_range == (3, 18) and res_eq.stops["upper"].reason == "empty_prediction"
    # a looser threshold walks through the step and stops where the object ends
    res2 = propagate(Oracle(ref), {6: ref[6]}, iou_threshold=0.1, projection="box")
    assert np.array_equal(res2.masks, ref)
    assert (res2.stops["upper"].reason, res2.stops["upper"].at_index) == ("empty_prediction", 19)


def test_volume_bound_and_slice_range():
    ref = np.stack([disk((32, 32), 16, 16, 8)] * 12)
    seg = Oracle(ref)
    res = propagate(seg, {5: ref[5]})
    assert np.array_equal(res.masks, ref)
    assert res.stops["lower"] == res.stops["lower"].__class__("volume_bound", 0, None)
    assert (res.stops["upper"].reason, res.stops["upper"].at_index) == ("volume_bound", 11)
    seg = Oracle(ref)
    res = propagate(seg, {5: ref[5]}, slice_range=(3, 8))
    assert sorted(seg.indices) == [3, 4, 6, 7, 8]
    assert (res.stops["lower"].reason, res.stops["lower"].at_index) == ("slice_range", 3)
    assert (res.stops["upper"].reason, res.stops["upper"].at_index) == ("slice_range", 8)
    assert np.array_equal(res.masks[3:9], ref[3:9])
    assert not res.masks[:3].any() and not res.masks[9:].any()
    assert res.z_range == (3, 8)
    # a range reaching the volume edge reports the volume bound; a seed on the limit predicts nothing
    seg = Oracle(ref)
    res = propagate(seg, {5: ref[5]}, slice_range=(5, 11))
    assert (res.stops["lower"].reason, res.stops["lower"].at_index) == ("slice_range", 5)
    assert (res.stops["upper"].reason, res.stops["upper"].at_index) == ("volume_bound", 11)
    assert 4 not in seg.indices
    with pytest.raises(ValueError, match="seed slice 2 lies outside"):
        propagate(Oracle(ref), {2: ref[2]}, slice_range=(3, 8))
    with pytest.raises(ValueError, match="slice_range"):
        propagate(Oracle(ref), {5: ref[5]}, slice_range=(3, 12))


# ------------------------------------------------------------------------------------------------------
# gaps between seeds
# ------------------------------------------------------------------------------------------------------

# gap size -> [(predicted slice, from_index)] in call order, for seeds 5 and 5 + gap
GAP_CASES = {
    1: [],
    2: [(6, (5, 7))],
    3: [(6, 5), (7, 8)],
    4: [(6, 5), (8, 9), (7, (6, 8))],
    5: [(6, 5), (7, 6), (9, 10), (8, 9)],
    6: [(6, 5), (7, 6), (10, 11), (9, 10), (8, (7, 9))],
}


@pytest.mark.parametrize("gap", sorted(GAP_CASES))
def test_gap_filling_order_sources_and_union_prompts(gap):
    ref = drifting_disks()
    seg = Echo(ref)
    a, b = 5, 5 + gap
    res = propagate(seg, {a: ref[a], b: ref[b]}, slice_range=(a, b), projection="mask", box_extension=2)
    expected = GAP_CASES[gap]
    assert seg.indices == [z for z, _ in expected]
    for z, src in expected:
        rec = res.slices[z]
        assert rec.source == "interpolated" and rec.from_index == src
        prompt = seg.prompt_at(z)
        source_mask = res.masks[src[0]] | res.masks[src[1]] if isinstance(src, tuple) else res.masks[src]
        assert np.array_equal(prompt.mask, source_mask)
        assert np.array_equal(prompt.box, box_from_mask(source_mask, 2))
        assert rec.interslice_iou == pytest.approx(compute_iou(source_mask, ref[z]))
    assert np.array_equal(res.masks[a:b + 1], ref[a:b + 1])
    assert res.stops["lower"].reason == res.stops["upper"].reason == "slice_range"


def test_gaps_have_no_iou_stopping_but_extrapolation_has():
    ref = drifting_disks(z=12, hw=96, drift=6.0)  # consecutive IoU ~ 0.36
    assert compute_iou(ref[5], ref[6]) < 0.5
    seg = Echo(ref)
    res = propagate(seg, {5: ref[5], 10: ref[10]}, iou_threshold=0.5)
    assert np.array_equal(res.masks[5:11], ref[5:11])
    assert res.stops["lower"].reason == "iou_below_threshold" and res.stops["lower"].at_index == 4
    assert res.stops["upper"].reason == "iou_below_threshold" and res.stops["upper"].at_index == 11
    assert res.z_range == (5, 10)


def test_seed_order_and_three_seeds():
    ref = drifting_disks()
    seg = Echo(ref)
    res = propagate(seg, {12: ref[12], 5: ref[5], 8: ref[8]}, slice_range=(3, 14))
    # lower extrapolation, upper extrapolation, then the gaps bottom to top
    assert seg.indices == [4, 3, 13, 14, 6, 7, 9, 11, 10]
    assert res.seeds == (5, 8, 12)
    assert res.slices[10].from_index == (9, 11) and res.slices[7].from_index == 8


def test_stop_lower_and_stop_upper():
    ref = drifting_disks(z=12)
    seg = Echo(ref)
    res = propagate(seg, {3: ref[3], 8: ref[8]}, stop_lower=True)
    assert seg.indices == [9, 10, 11, 7, 6, 5, 4]  # no slice below 3; the gap only from above
    assert [res.slices[z].from_index for z in (7, 6, 5, 4)] == [8, 7, 6, 5]
    assert res.stops["lower"].reason == "stop_flag" and res.stops["lower"].at_index == 3
    assert not res.masks[:3].any()

    seg = Echo(ref)
    res = propagate(seg, {3: ref[3], 8: ref[8]}, stop_upper=True)
    assert seg.indices == [2, 1, 0, 4, 5, 6, 7]
    assert res.stops["upper"] == res.stops["upper"].__class__("stop_flag", 8, None)
    assert not res.masks[9:].any()

    seg = Echo(ref)  # both: micro-sam checks stop_lower first
    propagate(seg, {3: ref[3], 8: ref[8]}, stop_lower=True, stop_upper=True)
    assert seg.indices == [7, 6, 5, 4]

    seg = Echo(ref)  # a gap of one next to a stop seed is filled from the other side, not the union
    res = propagate(seg, {3: ref[3], 5: ref[5]}, stop_lower=True, stop_upper=True)
    assert seg.indices == [4] and res.slices[4].from_index == 5


def test_empty_stop_seed_and_empty_seed_errors():
    ref = drifting_disks(z=12)
    empty = np.zeros_like(ref[0])
    seg = Echo(ref)
    res = propagate(seg, {3: empty, 8: ref[8]}, stop_lower=True)
    assert res.stops["lower"].reason == "no_seed_side" and res.stops["lower"].at_index == 3
    assert seg.indices == [9, 10, 11, 7, 6, 5, 4]
    assert not res.masks[3].any() and res.slices[3].source == "seed"
    with pytest.raises(ValueError, match="slice 3 is empty"):
        propagate(Echo(ref), {3: empty, 8: ref[8]})
    with pytest.raises(ValueError, match="slice 8 is empty"):
        propagate(Echo(ref), {3: ref[3], 5: ref[5], 8: empty})
    with pytest.raises(ValueError, match="slice 4 is empty"):
        propagate(Echo(ref), {4: empty})
    with pytest.raises(ValueError, match="shape"):
        propagate(Echo(ref), {4: ref[4][:-1]})


def test_seed_masks_may_be_uint8_or_nested_lists():
    ref = drifting_disks(z=6)
    seeds = {2: ref[2].astype(np.uint8) * 255, 4: ref[4].astype(int).tolist()}
    res = propagate(Echo(ref), seeds)
    assert res.masks.dtype == bool and np.array_equal(res.masks, ref)
    assert seeds[2].max() == 255 and isinstance(seeds[4], list)


def test_empty_prediction_inside_a_gap_ends_that_side():
    ref = drifting_disks(z=12)
    ref[5:8] = False  # the object vanishes on slices 5..7
    seg = Echo(ref)
    calls = []
    res = propagate(seg, {3: ref[3], 10: ref[10]}, slice_range=(3, 10), progress=lambda *a: calls.append(a))
    # odd gap of 7, middle 6: bottom side 4, 5 (empty: not written, 6 not tried); top side 9, 8, 7 (empty)
    assert seg.indices == [4, 5, 9, 8, 7]
    assert [(s.reason, s.at_index) for s in res.gap_stops] == [("empty_prediction", 5), ("empty_prediction", 7)]
    assert not {5, 6, 7} & set(res.slices)
    expected = np.zeros_like(ref)
    expected[3:11] = ref[3:11]
    assert np.array_equal(res.masks, expected)
    assert calls[0][1] == 6 and calls[-1][:2] == (5, 5)


# ------------------------------------------------------------------------------------------------------
# prompts derived from masks
# ------------------------------------------------------------------------------------------------------

def _one_step(projection, box_extension=0.025):
    """Propagate a disk (radius 10, centre row 20, column 22) from slice 0 to slice 1 only."""
    ref = np.stack([disk((48, 48), 20, 22, 10)] * 2)
    seg = Oracle(ref)
    propagate(seg, {0: ref[0]}, projection=projection, box_extension=box_extension)
    assert seg.indices == [1]
    return ref[0], seg.prompt_at(1)


@pytest.mark.parametrize("ext, box", [(0, (12, 10, 33, 31)), (0.025, (11, 9, 34, 32)), (3, (9, 7, 36, 34)),
                                      (0.2, (8, 6, 37, 35))])
def test_box_projection_box_is_extended_bbox(ext, box):
    seed, prompt = _one_step("box", ext)
    assert tuple(prompt.box) == box
    assert prompt.mask is None and prompt.points is None


def test_projection_mode_contents():
    seed, p = _one_step("mask")
    assert tuple(p.box) == (11, 9, 34, 32) and np.array_equal(p.mask, seed) and p.points is None

    seed, p = _one_step("points")
    assert p.box is None and p.mask is None
    pos, neg = p.points[p.labels == 1], p.points[p.labels == 0]
    assert len(pos) >= 1 and len(neg) >= 1
    x0, y0, x1, y1 = box_from_mask(seed, 0.025)
    for x, y in pos:
        assert seed[int(y), int(x)]
    for x, y in neg:
        assert not seed[int(y), int(x)] and x0 <= x < x1 and y0 <= y < y1

    seed, p = _one_step("points_and_mask")
    assert p.box is None and np.array_equal(p.mask, seed) and (p.labels == 0).any() and (p.labels == 1).any()

    seed, p = _one_step("single_point")
    assert p.box is None and p.mask is None
    assert p.points.tolist() == [[22.0, 20.0]] and p.labels.tolist() == [1]

    seed, p = _one_step({"use_box": False, "use_mask": True, "use_points": False})
    assert p.box is None and p.points is None and np.array_equal(p.mask, seed)

    seed, p = _one_step({"use_box": True, "use_mask": False, "use_points": True})
    assert p.box is not None and p.mask is None and p.points is not None


def test_invalid_projections():
    ref = np.stack([disk((16, 16), 8, 8, 4)] * 3)
    with pytest.raises(ValueError, match="unknown projection"):
        propagate(Echo(ref), {1: ref[1]}, projection="boxes")
    with pytest.raises(ValueError, match="exactly the keys"):
        propagate(Echo(ref), {1: ref[1]}, projection={"use_box": True})
    with pytest.raises(ValueError, match="no prompt"):
        parse_projection({"use_box": False, "use_mask": False, "use_points": False})
    with pytest.raises(ValueError, match="box_extension"):
        propagate(Echo(ref), {1: ref[1]}, box_extension=-1)
    with pytest.raises(ValueError, match="iou_threshold"):
        propagate(Echo(ref), {1: ref[1]}, iou_threshold=1.5)


def test_box_extension_pixels_fraction_and_clipping():
    m = np.zeros((50, 60), dtype=bool)
    m[10:20, 20:40] = True  # h = 10, w = 20
    assert tuple(prompt_from_mask(m, "box", 0).box) == (20, 10, 40, 20)
    assert tuple(prompt_from_mask(m, "box", 2).box) == (18, 8, 42, 22)
    assert tuple(prompt_from_mask(m, "box", 0.1).box) == (18, 9, 42, 21)  # 0.1 * w = 2, 0.1 * h = 1
    assert tuple(prompt_from_mask(m, "box", 1).box) == (19, 9, 41, 21)   # 1 means one pixel
    corner = np.zeros((50, 60), dtype=bool)
    corner[0:5, 55:60] = True
    assert tuple(prompt_from_mask(corner, "box", 3).box) == (52, 0, 60, 8)
    assert prompt_from_mask(np.zeros((8, 8), bool), "mask").box is None


def test_points_from_disk_and_dumbbell():
    d = disk((40, 40), 18, 21, 9)
    pts, labels = points_from_mask(d, 0.0, single_point=True)
    assert pts.tolist() == [[21.0, 18.0]] and labels.tolist() == [1]
    pts, labels = points_from_mask(d, 0.0)
    assert labels[0] == 1 and pts[0].tolist() == [21.0, 18.0]  # highest positive first
    assert all(d[int(y), int(x)] == bool(lab) for (x, y), lab in zip(pts, labels))
    # dumbbell: two disks joined by a thin bar -> one positive in each bulb
    db = disk((40, 60), 20, 14, 9) | disk((40, 60), 20, 45, 9)
    db[19:22, 14:46] = True
    pts, labels = points_from_mask(db, 0.1)
    pos = pts[labels == 1]
    assert any((x - 14) ** 2 + (y - 20) ** 2 <= 4 for x, y in pos)
    assert any((x - 45) ** 2 + (y - 20) ** 2 <= 4 for x, y in pos)
    neg = pts[labels == 0]
    x0, y0, x1, y1 = box_from_mask(db, 0.1)
    assert len(neg) > 0 and all(not db[int(y), int(x)] and x0 <= x < x1 and y0 <= y < y1 for x, y in neg)
    # positives at least 3 px apart (Chebyshev), negatives at least 5
    for group, dist in ((pos, 3), (neg, 5)):
        for i in range(len(group)):
            for j in range(i):
                assert np.abs(group[i] - group[j]).max() >= dist
    # one pixel: still one positive point, on it
    one = np.zeros((10, 10), bool)
    one[4, 7] = True
    pts, labels = points_from_mask(one)
    assert pts[labels == 1].tolist() == [[7.0, 4.0]]
    assert points_from_mask(np.zeros((5, 5), bool)) == (None, None)


def test_peak_finder_matches_skimage():
    feature = pytest.importorskip("skimage.feature")
    rng = np.random.default_rng(3)
    for trial in range(20):
        img = ndimage.gaussian_filter(rng.random((30 + trial, 40)), 1.5 + 0.1 * trial)
        if trial % 4 == 0:
            img[img < np.median(img)] = 0.0  # large flat zero areas, like the masked distance maps
        for d in (1, 3, 5):
            ours = peak_local_max(img, d)
            theirs = feature.peak_local_max(img, min_distance=d, exclude_border=False)
            assert np.array_equal(ours, theirs), (trial, d)
    assert peak_local_max(np.ones((5, 5)), 3).shape == (0, 2)
    # equal peaks exactly min_distance apart are both kept; closer ones are not
    img = np.zeros((12, 14))
    img[5, 5] = img[5, 8] = 1.0
    assert peak_local_max(img, 3).tolist() == [[5, 5], [5, 8]]
    img[5, 8], img[5, 7] = 0.0, 1.0
    assert peak_local_max(img, 3).tolist() == [[5, 5]]


# ------------------------------------------------------------------------------------------------------
# callbacks and ownership
# ------------------------------------------------------------------------------------------------------

def test_progress_callbacks():
    ref = sphere()
    calls = []
    res = propagate(Oracle(ref), {12: ref[12]}, iou_threshold=0.0, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, len(res.predicted) + 1))
    assert [c[2] for c in calls] == list(res.predicted)
    assert calls[0][1] == 12 + 11  # every slice below and above the seed
    assert calls[-1][0] == calls[-1][1] == len(res.predicted) == 18
    assert all(c[0] <= c[1] for c in calls)
    # with gaps and an early gap stop
    ref2 = drifting_disks(z=12)
    ref2[6:8] = False
    calls = []
    propagate(Echo(ref2), {3: ref2[3], 10: ref2[10]}, progress=lambda *a: calls.append(a))
    assert calls[0][1] == 3 + 1 + 6 and calls[-1][0] == calls[-1][1]


def test_cancel_mid_run_raises_and_leaves_inputs_unchanged():
    ref = sphere()
    seeds = {12: ref[12].copy(), 14: ref[14].copy()}
    before = {k: v.copy() for k, v in seeds.items()}
    seg = Oracle(ref)
    polled = []

    def cancel():
        polled.append(len(seg.calls))
        return len(seg.calls) >= 3

    with pytest.raises(PropagationCancelled):
        propagate(seg, seeds, cancel=cancel)
    assert len(seg.calls) == 3 and polled == [0, 1, 2, 3]
    assert seeds.keys() == before.keys() and all(np.array_equal(seeds[k], before[k]) for k in seeds)


def test_result_owns_its_arrays_and_report():
    ref = drifting_disks(z=10)
    seeds = {2: ref[2], 6: ref[6]}
    seg = Echo(ref, score=lambda i: 0.5 + i / 100)
    res = propagate(seg, seeds, slice_range=(1, 8))
    assert not np.shares_memory(res.masks, ref) and res.masks is not seeds[2]
    res.masks[2] = False
    assert ref[2].any()
    rows = res.report()
    json.dumps(rows)
    assert [r["index"] for r in rows] == list(range(1, 9))
    by = {r["index"]: r for r in rows}
    assert by[2]["source"] == "seed" and by[2]["predicted_iou"] is None
    assert by[7]["predicted_iou"] == pytest.approx(0.57) and by[7]["from_index"] == 6
    assert by[4]["from_index"] == [3, 5] and by[4]["source"] == "interpolated"
    assert by[1]["source"] == "extrapolated" and by[1]["area"] == int(ref[1].sum())


# ------------------------------------------------------------------------------------------------------
# repropagate
# ------------------------------------------------------------------------------------------------------

class Counting(Oracle):
    def counts(self):
        return Counter(self.indices)


def _assert_same(res_a: PropagationResult, res_b: PropagationResult):
    assert np.array_equal(res_a.masks, res_b.masks)
    assert res_a.slices == res_b.slices and res_a.stops == res_b.stops and res_a.seeds == res_b.seeds
    assert res_a.z_range == res_b.z_range and res_a.gap_stops == res_b.gap_stops


def _edited(mask, shift=2):
    return np.roll(mask, shift, axis=1)


@pytest.mark.parametrize("case", ["above", "below", "inside_gap", "replace_middle", "replace_top"])
def test_repropagate_touches_only_the_dependent_range(case):
    ref = drifting_disks(z=30, drift=0.5)
    seeds = {8: ref[8], 14: ref[14], 20: ref[20]}
    first = propagate(Counting(ref), seeds, iou_threshold=0.5, slice_range=(2, 27))
    assert first.z_range == (2, 27)
    index, dependent = {
        "above": (24, set(range(21, 24)) | set(range(25, 28))),
        "below": (4, set(range(2, 4)) | set(range(5, 8))),
        "inside_gap": (11, {9, 10, 12, 13}),
        "replace_middle": (14, set(range(9, 14)) | set(range(15, 20))),
        "replace_top": (20, set(range(15, 20)) | set(range(21, 28))),
    }[case]
    new_mask = _edited(ref[index])
    snapshot = first.masks.copy()

    # a *different* segmenter: any recomputed slice would change, kept slices must not
    other = Counting(np.roll(ref, 3, axis=2))
    res = repropagate(other, first, index, new_mask)
    assert set(other.counts()) == dependent and max(other.counts().values()) == 1
    assert set(res.predicted) == dependent
    untouched = [z for z in range(30) if z not in dependent and z != index]
    assert np.array_equal(res.masks[untouched], first.masks[untouched])
    assert all(res.slices.get(z) == first.slices.get(z) for z in untouched)
    assert np.array_equal(res.masks[index], new_mask) and res.slices[index].source == "seed"
    assert np.array_equal(first.masks, snapshot)  # previous result not modified
    assert index in res.seeds

    # with the same segmenter, it equals a fresh propagation with the new seed set
    same = Counting(ref)
    again = repropagate(same, first, index, new_mask)
    fresh = propagate(Oracle(ref), {**seeds, index: new_mask}, iou_threshold=0.5, slice_range=(2, 27))
    _assert_same(again, fresh)


def test_repropagate_with_stop_lower_recomputes_the_old_lowest_gap():
    ref = drifting_disks(z=20)
    seeds = {6: ref[6], 12: ref[12]}
    first = propagate(Oracle(ref), seeds, stop_lower=True)
    seg = Counting(ref)
    res = repropagate(seg, first, 3, ref[3])
    # the gap 6..12 was filled from above only; with 3 the lowest seed it is now filled from both sides
    assert set(seg.counts()) == {4, 5} | set(range(7, 12))
    assert 13 not in seg.counts()  # the upper extrapolation is kept
    _assert_same(res, propagate(Oracle(ref), {**seeds, 3: ref[3]}, stop_lower=True))
    assert res.stops["lower"].reason == "stop_flag" and res.stops["lower"].at_index == 3


def test_repropagate_option_change_and_cancel():
    ref = drifting_disks(z=20)
    seeds = {6: ref[6], 12: ref[12]}
    first = propagate(Oracle(ref), seeds, iou_threshold=0.5, box_extension=3)
    assert first.z_range == (0, 19)
    # a new threshold only redoes the extrapolations (and what depends on the edited seed)
    seg = Counting(ref)
    res = repropagate(seg, first, 12, ref[12], iou_threshold=0.7)
    assert set(seg.counts()) == set(range(0, 6)) | set(range(7, 12)) | set(range(13, 20))
    assert res.options["iou_threshold"] == 0.7
    seg = Counting(ref)
    repropagate(seg, first, 9, ref[9])
    assert set(seg.counts()) == {7, 8, 10, 11}
    # cancelling leaves the previous result as it was
    snapshot = first.masks.copy()
    seg = Counting(np.roll(ref, 4, axis=2))
    with pytest.raises(PropagationCancelled):
        repropagate(seg, first, 9, ref[9], cancel=lambda: len(seg.calls) >= 2)
    assert len(seg.calls) == 2 and np.array_equal(first.masks, snapshot)


def test_repropagate_erased_slice_beyond_the_seeds_ends_the_object():
    """The user erases a leaked slice above (below) the seeds: the object now ends before it."""
    ref = sphere(z=24, center=(12, 20, 20), r=8)  # object on slices 4..20
    first = propagate(Oracle(ref), {12: ref[12]}, iou_threshold=0.0)
    assert first.z_range == (4, 20)
    empty = np.zeros_like(ref[0])
    seg = Counting(ref)
    res = repropagate(seg, first, 17, empty)
    assert not res.masks[17:].any() and all(res.masks[z].any() for z in range(4, 17))
    assert set(seg.counts()) == set(range(13, 17))  # only the gap up to the erased slice is redone
    assert np.array_equal(res.masks[:17], first.masks[:17])
    assert res.options["stop_upper"] is True and res.stops["upper"].reason == "no_seed_side"
    _assert_same(res, propagate(Oracle(ref), {12: ref[12], 17: empty}, iou_threshold=0.0, stop_upper=True))
    # below the seeds likewise; the upper stop is remembered
    low = repropagate(Counting(ref), res, 6, empty)
    assert not low.masks[:7].any() and all(low.masks[z].any() for z in range(7, 17)) and not low.masks[17:].any()
    assert low.options["stop_lower"] is True and low.options["stop_upper"] is True
    # with an explicit "no stop" an empty extreme slice is still an error
    with pytest.raises(ValueError, match="empty"):
        repropagate(Oracle(ref), first, 17, empty, stop_upper=False)


def test_empty_seed_between_seeds_splits_the_gap():
    """An empty seed between two others: the object is absent there; each side is filled from its other seed
    only (no IoU stopping, as in any gap), nothing between two empty seeds."""
    ref = drifting_disks(z=14)
    empty = np.zeros_like(ref[0])
    seg = Echo(ref)
    res = propagate(seg, {2: ref[2], 6: empty, 11: ref[11]})
    # lower 1, 0; upper 12, 13; gap (2, 6) from 2 upwards; gap (6, 11) from 11 downwards
    assert seg.indices == [1, 0, 12, 13, 3, 4, 5, 10, 9, 8, 7]
    assert not res.masks[6].any() and res.slices[6].source == "seed"
    assert [res.slices[z].from_index for z in (3, 4, 5, 7, 8, 9, 10)] == [2, 3, 4, 8, 9, 10, 11]
    expected = ref.copy()
    expected[6] = False
    assert np.array_equal(res.masks, expected)
    # two empty seeds next to each other across a gap: nothing is predicted between them
    seg = Echo(ref)
    res = propagate(seg, {2: ref[2], 5: empty, 8: empty, 11: ref[11]}, stop_lower=True, stop_upper=True)
    assert seg.indices == [3, 4, 10, 9]
    assert not res.masks[5:9].any() and res.masks[9].any() and res.masks[4].any()


def test_repropagate_erased_slice_inside_a_gap():
    """The user erases a slice between two seeds: it stays empty and both sub-gaps are redone one-sided."""
    ref = sphere(z=24, center=(12, 20, 20), r=8)
    empty = np.zeros_like(ref[0])
    two = propagate(Oracle(ref), {8: ref[8], 16: ref[16]}, iou_threshold=0.0)
    seg = Counting(ref)
    res = repropagate(seg, two, 12, empty)
    assert set(seg.counts()) == {9, 10, 11, 13, 14, 15}  # only the two sub-gaps
    assert not res.masks[12].any() and all(res.masks[z].any() for z in range(4, 21) if z != 12)
    assert np.array_equal(res.masks[:9], two.masks[:9]) and np.array_equal(res.masks[16:], two.masks[16:])
    assert res.options["stop_lower"] is False and res.options["stop_upper"] is False
    _assert_same(res, propagate(Oracle(ref), {8: ref[8], 12: empty, 16: ref[16]}, iou_threshold=0.0))


def test_box_from_mask_rounds_halves_up():
    """docs/coordinates.md: floor(v + 0.5), not Python's round() (halves to even: round(2.5) == 2)."""
    mask = np.zeros((20, 20), bool)
    mask[4:14, 3:8] = True  # width 5, height 10: a 0.1 extension is 0.5 and 1 pixel
    np.testing.assert_array_equal(box_from_mask(mask, 0.1), [3, 3, 9, 15])  # 2.5 -> 3, 8.5 -> 9
    mask[:] = False
    mask[5:15, 4:9] = True
    np.testing.assert_array_equal(box_from_mask(mask, 0.1), [4, 4, 10, 16])  # 3.5 -> 4, 9.5 -> 10
