"""Field evaluation's bookkeeping on stand-in segmenters with known answers (no model): Dice, slice ranges,
empty boxes on the end slices, the Markdown summary and bad input. The real LiteMedSAM run is in
test_field_evaluation.py."""
from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.field_evaluation import FieldEvaluation, evaluate_segment, field_evaluation, to_markdown
from RobustMedSAMLib.prompts import Prediction
from RobustMedSAMLib.volume_io import Volume


class BoxFill:
    """Slices of 24 x 24; the answer to a box is the box filled, except on the slices in ``empty`` (no mask)."""

    def __init__(self, num_slices, empty=()):
        self.num_slices, self.slice_shape, self.empty = num_slices, (24, 24), set(empty)

    def predict_slice(self, index, prompt):
        m = np.zeros(self.slice_shape, bool)
        if index not in self.empty and prompt.box is not None:
            x0, y0, x1, y1 = (int(v) for v in prompt.box)
            m[y0:y1, x0:x1] = True
        return Prediction(m[None], np.where(m, 5.0, -5.0)[None].astype(np.float32), np.array([0.9], np.float32),
                          np.zeros((1, 4, 4), np.float32))


def cube(num_slices=10, lo=3, hi=6):
    ref = np.zeros((num_slices, 24, 24), bool)
    ref[lo:hi + 1, 8:16, 8:16] = True
    return ref


def test_markdown_summary_when_the_oracle_finds_nothing():
    """A model that answers no box with a mask: every Dice is 0; the summary says so instead of dividing by 0."""
    ref = cube()
    ev = evaluate_segment(BoxFill(10, empty=range(10)), "cube", ref)
    assert ev.oracle.dice == 0.0 and ev.one_box.dice == 0.0 and ev.one_box.found is None
    text = to_markdown(FieldEvaluation([ev], 0))
    assert "| cube | 3-6 | 0.000 | 0.000 | - | 0.000 | - |" in text and "no ratio" in text


def test_window_for_an_unknown_segment_is_an_error_before_any_prediction():
    vol = Volume(np.full((10, 24, 24), -1000.0) + cube() * 1000.0, np.eye(4))
    ref = {"Cube": cube()}
    with pytest.raises(ValueError, match=r"segment\(s\) \['cueb'\].*evaluated segments are: Cube"):
        field_evaluation(vol, ref, None, windows={"cueb": "lung"})
    with pytest.raises(ValueError, match="unknown window preset 'lugn'"):
        field_evaluation(vol, ref, None, windows={"cube": "lugn"})
