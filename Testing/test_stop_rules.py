"""The consistency stop rule (the default) and the rule options, on stand-in segmenters with known answers.
micro-sam's rule is pinned by test_propagation.py."""
from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.propagation import propagate, repropagate
from RobustMedSAMLib.prompts import Prediction
from RobustMedSAMLib.stop_rules import StopRule, make_rule, verdict


class Squares:
    """Slices 0..11 of 32 x 32; on every slice a square (rows/cols 8..23) that the segmenter returns whatever
    the prompt (as a model does when a box sits on a neighbouring structure). ``grey[z]`` is its grey level,
    ``look[z]`` the descriptor of its appearance, ``size[z]`` its half side (default 8)."""

    def __init__(self, grey, look=None, size=None):
        self.num_slices, self.slice_shape = len(grey), (32, 32)
        self.grey, self.look = list(grey), look
        self.size = size or [8] * len(grey)
        self.asked = []

    def mask(self, z):
        m = np.zeros(self.slice_shape, bool)
        h = self.size[z]
        m[16 - h:16 + h, 16 - h:16 + h] = True
        return m

    def predict_slice(self, index, prompt):
        self.asked.append(index)
        m = self.mask(index)[None]
        return Prediction(m, np.where(m, 5.0, -5.0).astype(np.float32), np.array([0.9], np.float32),
                          np.zeros((1, 4, 4), np.float32))

    def slice_values(self, index, mask):
        return np.full(int(mask.sum()), self.grey[index], dtype=np.uint8)

    def slice_descriptor(self, index, mask):
        return None if self.look is None else np.asarray(self.look[index], float)


GREY = [50, 50, 50, 200, 200, 200, 200, 200, 200, 50, 50, 50]  # the object: slices 3..8


def test_intensity_change_stops_both_directions_where_the_object_ends():
    seg = Squares(GREY)
    res = propagate(seg, {5: seg.mask(5)})
    assert res.z_range == (3, 8)
    assert res.stops["lower"].reason == "intensity_changed" and res.stops["lower"].at_index == 2
    assert res.stops["upper"].reason == "intensity_changed" and res.stops["upper"].at_index == 9
    assert res.stops["upper"].measures["intensity_fraction"] == 0.0
    assert res.slices[8].measures["intensity_fraction"] == 1.0 and res.report()[0]["measures"] is not None
    # micro-sam's rule (IoU of consecutive masks only) runs to the volume's ends on the same answers
    old = propagate(seg, {5: seg.mask(5)}, stop_rule="micro-sam")
    assert old.z_range == (0, 11) and old.stops["upper"].reason == "volume_bound"
    assert old.options["stop_rule"] == {"name": "micro-sam"} and old.options["iou_threshold"] == 0.5


def test_appearance_change_and_area_jump():
    look = [[0, 1]] * 3 + [[1, 0]] * 6 + [[0.6, 0.8]] * 3  # cos 0.6 beyond slice 8 (below the 0.8 default)
    seg = Squares([200] * 12, look)
    res = propagate(seg, {5: seg.mask(5)})
    assert res.z_range == (3, 8) and res.stops["upper"].reason == "appearance_changed"
    assert res.stops["upper"].measures["similarity"] == pytest.approx(0.6)
    assert propagate(seg, {5: seg.mask(5)}, stop_rule={"name": "consistency", "min_similarity": 0.5}).z_range == (3, 11)
    grows = Squares([200] * 12, size=[8] * 8 + [12, 14, 15, 15])  # 24^2 / 16^2 = 2.25 x on slice 8
    res = propagate(grows, {5: grows.mask(5)})
    assert res.stops["upper"].reason == "area_jump" and res.stops["upper"].at_index == 8
    assert res.stops["upper"].measures["growth"] == pytest.approx(2.25)


def test_gap_is_walked_from_the_larger_seed_and_stops_there_too():
    size = [3, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8]
    seg = Squares(GREY, size=size)
    res = propagate(seg, {3: seg.mask(3), 8: seg.mask(8)})
    # below 3 and above 8 first (each rejected at once), then the gap from slice 8, the larger seed, down
    assert seg.asked == [2, 9, 7, 6, 5, 4] and res.z_range == (3, 8)
    assert all(res.slices[z].from_index == z + 1 for z in range(4, 8))  # no union prompt in the middle
    flipped = Squares(GREY, size=size[::-1])
    propagate(flipped, {3: flipped.mask(3), 8: flipped.mask(8)})
    assert flipped.asked[2:] == [4, 5, 6, 7]
    # a gap whose far side is a different structure: the walk from the larger seed stops, the other fills
    grey = [200, 200, 200, 200, 200, 50, 50, 200, 200, 200, 200, 200]
    seg = Squares(grey, size=[8] * 12)
    res = propagate(seg, {2: seg.mask(2), 9: seg.mask(9)})
    assert [(s.reason, s.at_index) for s in res.gap_stops] == [("intensity_changed", 5), ("intensity_changed", 6)]
    assert sorted(res.slices) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]  # 5 and 6 rejected from both sides


def test_repropagate_keeps_the_rule_and_equals_a_fresh_run():
    seg = Squares(GREY)
    first = propagate(seg, {5: seg.mask(5)})
    again = repropagate(seg, first, 7, seg.mask(7))
    fresh = propagate(seg, {5: seg.mask(5), 7: seg.mask(7)})
    np.testing.assert_array_equal(again.masks, fresh.masks)
    assert again.options == fresh.options and again.options["stop_rule"]["name"] == "consistency"
    switched = repropagate(seg, first, 7, seg.mask(7), stop_rule="micro-sam")
    assert switched.z_range == (0, 11) and switched.options["iou_threshold"] == 0.5


def test_rule_options_and_errors():
    assert make_rule(None, None) == StopRule("consistency", 0.4)
    assert make_rule("micro_sam", None).iou_threshold == 0.5 and make_rule("micro-sam", 0.3).iou_threshold == 0.3
    assert make_rule({"name": "consistency", "min_similarity": 0.7}, 0.2) == StopRule("consistency", 0.2,
                                                                                      min_similarity=0.7)
    with pytest.raises(ValueError, match="unknown stop rule 'iou-only'"):
        make_rule("iou-only", None)
    with pytest.raises(ValueError, match="unknown stop rule option"):
        make_rule({"name": "consistency", "min_similarty": 0.7}, None)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        make_rule(None, 1.5)
    empty = np.zeros((4, 4), bool)
    assert verdict(StopRule(), empty, {"iou": 0.0, "growth": 0.0}) == "empty_prediction"
    full = np.ones((4, 4), bool)
    assert verdict(StopRule(), full, {"iou": 0.9, "growth": 1.0}) is None  # nothing else measured: accepted


def test_repropagate_recomputes_gaps_when_the_rule_changes():
    """A gap filled by micro-sam's rule (no stopping) must be walked again when repropagate switches to the
    consistency rule (or changes its thresholds): slices 5-6 are another structure."""
    grey = [200] * 5 + [50, 50] + [200] * 5
    seg = Squares(grey)
    seeds = {2: seg.mask(2), 9: seg.mask(9)}
    first = propagate(seg, seeds, stop_rule="micro-sam")
    assert sorted(first.slices) == list(range(12))
    again = repropagate(seg, first, 11, seg.mask(11), stop_rule="consistency")
    fresh = propagate(seg, {**seeds, 11: seg.mask(11)}, stop_rule="consistency")
    assert sorted(fresh.slices) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    np.testing.assert_array_equal(again.masks, fresh.masks)
    assert sorted(again.slices) == sorted(fresh.slices) and again.gap_stops == fresh.gap_stops
    # a threshold change of the consistency rule also reaches the gap
    loose = repropagate(seg, fresh, 11, seg.mask(11), stop_rule={"name": "consistency", "min_intensity_fraction": 0})
    assert sorted(loose.slices) == list(range(12))


def test_progress_ends_at_its_total_when_a_gap_is_walked_back():
    """The consistency rule walks a gap from the larger seed, and back from the other where it stops: the
    progress estimate must end equal to the slices predicted (it used to end at 10 of 6)."""
    seg = Squares([200] * 5 + [50, 50] + [200] * 5)
    calls = []
    res = propagate(seg, {2: seg.mask(2), 9: seg.mask(9)}, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, len(res.predicted) + 1))
    assert calls[-1][0] == calls[-1][1] == len(res.predicted) == 10
    assert all(c[0] <= c[1] for c in calls)
