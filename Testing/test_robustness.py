"""Robustness check: clean + corrupted runs of the same prompts, Dice vs clean and vs a reference."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from RobustMedSAMLib import corruptions
from RobustMedSAMLib.cli import main as cli_main
from RobustMedSAMLib.prompt_files import ObjectPrompts
from RobustMedSAMLib.prompts import Prompt
from RobustMedSAMLib.robustness import dice, reference_masks, robustness_check, to_csv, to_markdown
from RobustMedSAMLib.segmentation_io import SegmentInfo, Segmentation, write_segmentation
from RobustMedSAMLib.volume_io import Volume
from RobustMedSAMLib.volume_segmentation import uint8_volume
from support import boxed_prediction


class ThresholdPredictor:
    """A naive image-dependent segmenter: pixels brighter than ``level`` inside the prompt's box. It records
    the hash of every image it is asked about."""

    def __init__(self, level: int = 128) -> None:
        self.level = level
        self.seen = []

    def predict(self, prompt: Prompt, multimask: bool = False, image=None, context=None):
        self.seen.append(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
        return boxed_prediction(image > self.level, prompt, multimask)

    def prefetch(self, image, context=""):
        return None


@pytest.fixture(scope="module")
def ball():
    """A bright ball of radius 7 voxels with a soft edge (ramp from r = 6.5 to 7.5) in a 16 x 32 x 32 volume
    with 1 mm voxels; the reference is r <= 7."""
    kk, jj, ii = np.mgrid[0:16, 0:32, 0:32]
    r = np.sqrt((kk - 8) ** 2 + (jj - 16) ** 2 + (ii - 16) ** 2)
    inside = r <= 7
    array = 20.0 + 180.0 * np.clip(7.5 - r, 0.0, 1.0)
    volume = Volume(array.astype(np.float32), np.eye(4))
    objects = [ObjectPrompts("ball", None, {8: Prompt(box=[6, 6, 27, 27])})]
    return volume, objects, inside


def test_rows_clean_and_corrupted_with_reference(ball):
    volume, objects, inside = ball
    reference = Segmentation(inside.astype(np.uint8), np.eye(4), [SegmentInfo("Ball", (1, 0, 0), 1)])
    predictor = ThresholdPredictor()
    names = ["gaussian_noise", "brightness", "gaussian_blur"]
    calls = []
    rows = robustness_check(volume, objects, predictor, corruption_names=names, severity=3, seed=5, modality="MR",
                            reference=reference, iou_threshold=0.0, progress=lambda d, t, m: calls.append((d, t)))
    assert [(r.corruption, r.severity) for r in rows] == [("clear", 0)] + [(n, 3) for n in names]
    assert calls[0] == (0, 4) and calls[-1] == (4, 4)
    clean = rows[0]
    assert clean.dice_vs_clean == 1.0 and clean.voxels > 0 and clean.note == ""
    # the clean threshold segmentation finds the ball (matched to segment "Ball" by name)
    assert clean.dice_vs_reference > 0.95
    for row in rows[1:]:
        assert 0.0 <= row.dice_vs_clean <= 1.0 and row.dice_vs_reference is not None
    noise = rows[1]
    assert noise.dice_vs_clean < 1.0  # sigma-16 noise moves pixels across the threshold
    # the predictor saw exactly the slices of corrupt_volume(clean images, name, 3, seed 5) for each run
    clean_images = uint8_volume(volume, "MR")
    expected = set()
    for name in names:
        degraded = corruptions.corrupt_volume(clean_images, name, 3, seed=5, axis=0)
        expected |= {hashlib.sha1(np.ascontiguousarray(s).tobytes()).hexdigest() for s in degraded}
    expected |= {hashlib.sha1(np.ascontiguousarray(s).tobytes()).hexdigest() for s in clean_images}
    assert set(predictor.seen) <= expected
    # deterministic for a seed
    again = robustness_check(volume, objects, ThresholdPredictor(), corruption_names=names, severity=3, seed=5,
                             modality="MR", reference=reference, iou_threshold=0.0)
    assert again == rows
    table = to_markdown(rows)
    assert "| gaussian_noise | 3 | ball |" in table and "Dice vs reference" in table and "Mean Dice vs clean" in table
    assert to_csv(rows).splitlines()[0] == "corruption,severity,object,voxels,dice_vs_clean,dice_vs_reference,note"


def test_empty_seed_under_a_corruption_is_reported_not_fatal(ball):
    volume, objects, _ = ball
    rows = robustness_check(volume, objects, ThresholdPredictor(level=120), corruption_names=["brightness"],
                            severity=5, modality="MR")  # brightness x 0.3..0.45: 255 -> at most 115, below 120
    assert rows[1].voxels == 0 and rows[1].dice_vs_clean == 0.0 and "no seed mask" in rows[1].note
    assert "(no seed mask)" in to_markdown(rows)


def test_bad_input_fails_before_any_prediction(ball):
    volume, objects, inside = ball
    predictor = ThresholdPredictor()
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        robustness_check(volume, objects, predictor, corruption_names=["fog"])
    with pytest.raises(ValueError, match="severity"):
        robustness_check(volume, objects, predictor, severity=7)
    two = Segmentation(inside.astype(np.uint8), np.eye(4), [SegmentInfo("liver", (1, 0, 0), 1),
                                                           SegmentInfo("spleen", (0, 1, 0), 2)])
    with pytest.raises(ValueError, match="no segment named 'ball' .*liver, spleen"):
        robustness_check(volume, objects, predictor, reference=two)
    assert predictor.seen == []
    one = Segmentation(inside.astype(np.uint8), np.eye(4), [SegmentInfo("tumour", (1, 0, 0), 1)])
    assert np.array_equal(reference_masks(one, objects)["ball"], inside)  # one object, one segment


def test_dice():
    a = np.array([1, 1, 0, 0], bool)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a, np.array([1, 0, 0, 0], bool)) == pytest.approx(2 / 3)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_cli_robustness_on_tiny_model(ball, tmp_path, capsys, monkeypatch):
    """The command end to end with the tiny seeded model (its masks are arbitrary; the plumbing is real)."""
    volume, _, inside = ball
    vol_path, ref_path = tmp_path / "ball.nrrd", tmp_path / "ball.seg.nrrd"
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(vol_path))
    write_segmentation(ref_path, inside.astype(np.uint8), volume, [SegmentInfo("ball", (1, 0, 0), 1)])
    prompts = tmp_path / "p.json"
    prompts.write_text('{"coordinates": "ijk", "objects": [{"name": "ball", "slices": [{"index": 8, '
                       '"box": [6, 6, 26, 26]}]}]}')
    import RobustMedSAMLib.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: models.seeded_model("tiny"))
    out_csv = tmp_path / "rows.csv"
    code = cli_main(["robustness", str(vol_path), "--prompts", str(prompts), "--reference", str(ref_path),
                     "--corruptions", "gaussian_noise", "step_motion", "--csv", str(out_csv), "--modality", "MR",
                     "--iou-threshold", "0", "--slice-range", "6", "10"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| clear | 0 | ball |" in printed and "| step_motion | 3 | ball |" in printed
    assert out_csv.read_text().count("\n") == 4  # header + clear + 2 corruptions
    # a reference without the object's segment is refused before the model loads
    write_segmentation(ref_path, inside.astype(np.uint8), volume, [SegmentInfo("liver", (1, 0, 0), 1)])
    two = tmp_path / "two.json"
    two.write_text('{"coordinates": "ijk", "objects": [{"name": "ball", "slices": [{"index": 8, "box": [6, 6, 26, 26]}]},'
                   ' {"name": "rim", "slices": [{"index": 8, "box": [2, 2, 30, 30]}]}]}')
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert cli_main(["robustness", str(vol_path), "--prompts", str(two), "--reference", str(ref_path)]) == 2
    assert "no segment named 'ball'" in capsys.readouterr().err


def test_worst_conditions_picks_each_objects_lowest_dice():
    from RobustMedSAMLib.robustness import RobustnessRow, worst_conditions

    rows = [RobustnessRow("clear", 0, "a", 10, 1.0, None, ""), RobustnessRow("clear", 0, "b", 5, 1.0, None, ""),
            RobustnessRow("gaussian_noise", 3, "a", 9, 0.8, None, ""),
            RobustnessRow("motion_blur", 3, "a", 7, 0.6, None, ""),
            RobustnessRow("motion_blur", 3, "b", 5, 0.9, None, "")]
    assert worst_conditions(rows) == {"a": (0.6, "motion_blur"), "b": (0.9, "motion_blur")}
