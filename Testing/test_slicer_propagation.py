"""The propagate effect's session and the module logic on slicer-core: seeds from a segment, preview,
one undoable apply, repropagation after a correction, and cancelled/failed runs (or answers arriving after
Cancel) leaving the segmentation exactly as it was; segmentVolume with the engine's tiny model, parameters,
IoU table and plot."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))

import slicer.util  # noqa: E402

from RobustMedSAMLib.prompts import Prediction, Prompt  # noqa: E402
from RobustMedSAMLogic import segments, volumes  # noqa: E402
from RobustMedSAMLogic.headless import make_headless_scene  # noqa: E402
from RobustMedSAMLogic.propagation import PropagationOptions, bind_session, local_runner  # noqa: E402

SHAPE = (10, 16, 18)


def truth():
    """The object: a rectangle on slices 2..7 along k, growing with k."""
    t = np.zeros(SHAPE, bool)
    for k in range(2, 8):
        t[k, 4:8 + k // 2, 3:10 + k // 2] = True
    return t


class StandIn:
    """A deterministic SliceSegmenter: returns the true object on each slice (the model is not under test)."""

    def __init__(self, axis=0, fail_at=None):
        self.t = np.moveaxis(truth(), axis, 0)
        self.num_slices = self.t.shape[0]
        self.slice_shape = self.t.shape[1:]
        self.calls = []
        self.fail_at = fail_at

    def predict_slice(self, index, prompt, multimask=False):
        self.calls.append(index)
        if index == self.fail_at:
            raise RuntimeError("CUDA out of memory")
        m = self.t[index][None]
        return Prediction(m.copy(), m.astype(np.float32), np.array([0.93], np.float32), np.zeros((1, 4, 4), np.float32))


@pytest.fixture
def setup():
    scene, _ = make_headless_scene()
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(vol, (truth() * 300).astype(np.int16))
    m = np.diag([-0.9, -0.9, 3.0, 1.0])
    vol.SetIJKToRASMatrix(volumes.to_vtk(m))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    other = seg.GetSegmentation().AddEmptySegment("other", "other")
    o = np.zeros(SHAPE, bool)
    o[0, 0:2, 0:2] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(o.astype(np.uint8), seg, other, vol)
    sid = seg.GetSegmentation().AddEmptySegment("organ", "organ")
    writer = segments.SegmentWriter(segments.editor_access(scene, seg, vol), seg, vol)
    writer.replace_slice(sid, 0, 4, truth()[4])  # the user's annotation on slice 4
    preview = segments.PreviewSegmentation(scene, vol, seg)
    return scene, vol, seg, sid, writer, preview


def compute(session, plan):
    """Run ``plan`` to the end (the local runner answers at once); the result, or the run's error raised."""
    request = session.start(plan)
    if not request.ok:
        raise request.error
    return session.result


def test_propagate_preview_apply_undo_and_repropagate(setup):
    scene, vol, seg, sid, writer, preview = setup
    segmenters = []

    def factory(axis):
        segmenters.append(StandIn(axis))
        return segmenters[-1]

    session = bind_session(seg, sid, vol, local_runner(factory), writer, preview)
    plan = session.plan(PropagationOptions(axis=0, iou_threshold=0.3))
    assert plan.mode == "full" and list(plan.seeds) == [4]
    before = segments.snapshot(seg, vol)
    result = compute(session, plan)
    assert result.z_range == (2, 7)
    session.preview()
    np.testing.assert_array_equal(preview.mask(SHAPE), truth())
    assert segments.same_snapshot(before, segments.snapshot(seg, vol))  # nothing written before apply
    assert session.apply()
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol) != 0, truth())
    assert not preview.visible
    assert writer.undo()  # the whole propagation is one undo step
    assert segments.same_snapshot(before, segments.snapshot(seg, vol))
    writer.access.logic.Redo()
    np.testing.assert_array_equal(volumes.segment_mask(seg, sid, vol), truth())
    # correction on slice 6 (e.g. with the prompt effect): only the dependent part is recomputed
    corrected = truth()[6].copy()
    corrected[4:6, 3:6] = False
    writer.replace_slice(sid, 0, 6, corrected)
    plan = session.plan(PropagationOptions(axis=0, iou_threshold=0.3))
    assert plan.mode == "repropagate" and plan.changed == [6]
    result = compute(session, plan)
    assert set(segmenters[-1].calls) <= {5, 7, 8, 9} and 4 not in segmenters[-1].calls
    assert 6 in result.seeds and 4 in result.seeds
    session.apply()
    got = volumes.segment_mask(seg, sid, vol)
    np.testing.assert_array_equal(got[6], corrected)
    np.testing.assert_array_equal(got[2:6], truth()[2:6])
    report = session.report()
    assert {r["index"] for r in report} >= {4, 6}
    # the user erases slice 7 (the object should end at 6): propagating again ends it there
    writer.replace_slice(sid, 0, 7, np.zeros(SHAPE[1:], bool))
    plan = session.plan(PropagationOptions(axis=0, iou_threshold=0.3))
    assert plan.mode == "repropagate" and plan.changed == [7]
    result = compute(session, plan)
    assert result.options["stop_upper"] is True
    session.apply()
    got = volumes.segment_mask(seg, sid, vol)
    assert not got[7:].any()
    np.testing.assert_array_equal(got[6], corrected)
    np.testing.assert_array_equal(got[2:6], truth()[2:6])
    # the user erases slice 5, between the seeds 4 and 6 (the object is absent there): it stays empty
    writer.replace_slice(sid, 0, 5, np.zeros(SHAPE[1:], bool))
    plan = session.plan(PropagationOptions(axis=0, iou_threshold=0.3))
    assert plan.mode == "repropagate" and plan.changed == [5]
    result = compute(session, plan)
    assert 5 in result.seeds and not result.masks[5].any()
    session.apply()
    got = volumes.segment_mask(seg, sid, vol)
    assert not got[5].any() and not got[7:].any()
    np.testing.assert_array_equal(got[6], corrected)
    np.testing.assert_array_equal(got[2:5], truth()[2:5])


class Pending:
    """A run still going in the engine: the test answers it later (or never)."""

    def __init__(self):
        self.finished, self.cancelled, self.on_done = False, False, None

    def cancel(self):
        self.cancelled = True

    def answer(self, result):
        self.finished, self.ok, self.result, self.status = True, True, result, "ok"
        self.on_done(self)


@pytest.mark.parametrize("how", ["cancel", "fail", "late_answer"])
def test_cancelled_or_failed_run_leaves_segmentation_as_before(setup, how):
    scene, vol, seg, sid, writer, preview = setup
    calls = iter(range(100))
    runner = local_runner(lambda axis: StandIn(axis, fail_at=6 if how == "fail" else None),
                          cancel=(lambda: next(calls) >= 2) if how == "cancel" else None)
    pending = []
    if how == "late_answer":
        def runner(plan, options, on_progress=None, on_done=None):  # noqa: F811 - an engine that answers late
            pending.append(Pending())
            pending[-1].on_done = on_done
            return pending[-1]
    session = bind_session(seg, sid, vol, runner, writer, preview)
    before = segments.snapshot(seg, vol)
    nodes_before = scene.GetNumberOfNodes()
    plan = session.plan(PropagationOptions(axis=0, iou_threshold=0.3))
    done = []
    request = session.start(plan, on_done=done.append)
    if how == "cancel":
        assert request.status == "cancelled" and done == [request]
    elif how == "fail":
        assert request.status == "error" and "out of memory" in str(request.error)
    else:
        assert session.running and not request.finished
        session.cancel()  # Cancel clicked, or the effect deactivated
        assert request.cancelled and not session.running
        request.answer(StandIn().t)  # the engine's answer arrives anyway: dropped
        assert done == []
    assert session.result is None and not session.apply()
    assert segments.same_snapshot(before, segments.snapshot(seg, vol))
    assert scene.GetNumberOfNodes() == nodes_before and not preview.visible


def _bright_box_scene():
    """A headless scene with a 3 x 32 x 40 noisy CT-like volume holding a bright box at [:, 8:24, 10:30]."""
    scene, _ = make_headless_scene()
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    arr = (np.random.default_rng(3).random((3, 32, 40)) * 80).astype(np.int16)
    arr[:, 8:24, 10:30] += 500
    slicer.util.updateVolumeFromArray(vol, arr)
    vol.SetIJKToRASMatrix(volumes.to_vtk(np.diag([-0.8, -0.8, 2.0, 1.0])))
    return scene, vol, arr


def test_segment_volume_logic_parameters_iou_plot(tiny_model):
    from RobustMedSAMLib.prompt_files import ObjectPrompts
    from RobustMedSAMLogic.engine import EngineSession
    from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic, Settings

    scene, vol, arr = _bright_box_scene()
    engine = EngineSession(loaded=tiny_model)
    logic = RobustMedSAMBridgeLogic(scene, engine)
    node = logic.getParameterNode()
    assert logic.getParameterNode() is node and logic.settings() == Settings()
    logic.setSettings(Settings(iouThreshold=0.7, propagate=False, cacheMB=256.0, model="sam-vit-b"))
    s = logic.settings()
    assert (s.iouThreshold, s.propagate, s.cacheMB, s.model) == (0.7, False, 256.0, "sam-vit-b")
    objects = [ObjectPrompts("bright", (1.0, 0.2, 0.2), {1: Prompt(box=[10, 8, 30, 24])}),
               ObjectPrompts("corner", None, {1: Prompt(points=[[2, 2]], labels=[1])})]
    seg, ids, result = logic.segmentVolume(vol, objects, axis="k", propagate=True, iouThreshold=0.0, engine=engine)
    assert list(ids) == ["bright", "corner"]
    for obj in result.objects:
        np.testing.assert_array_equal(volumes.segment_mask(seg, ids[obj.name], vol), obj.mask)
    assert seg.GetSegmentation().GetSegment(ids["bright"]).GetColor() == pytest.approx((1.0, 0.2, 0.2))
    table = logic.iouTable(result)
    t = table.GetTable()
    assert t.GetColumnName(0) == "slice" and t.GetNumberOfColumns() == 5
    assert t.GetNumberOfRows() >= 1
    chart = logic.iouPlot(table)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(0).GetYColumnName() == "bright predicted IoU"
    # each Apply re-plots into the same table and chart: the old series leave the scene
    for _ in range(3):
        assert logic.iouPlot(logic.iouTable(result, table), chart) is chart
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2
    # the whole run (new segments and their voxels) is one undo step
    assert logic.undo(seg)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_robustness_check_on_volume_node_with_reference_node(tiny_model):
    """The engine's robustness check through the bridge: reference = a segmentation node's segments."""
    from RobustMedSAMLib.prompt_files import ObjectPrompts
    from RobustMedSAMLogic.engine import EngineSession
    from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

    scene, vol, arr = _bright_box_scene()
    truth_mask = np.zeros(arr.shape, bool)
    truth_mask[:, 8:24, 10:30] = True
    ref = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    ref.CreateDefaultDisplayNodes()
    ref.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = ref.GetSegmentation().AddEmptySegment("bright", "Bright")  # matched by name, case-insensitive
    slicer.util.updateSegmentBinaryLabelmapFromArray(truth_mask.astype(np.uint8), ref, sid, vol)
    before = segments.snapshot(ref, vol)
    logic = RobustMedSAMBridgeLogic(scene, EngineSession(loaded=tiny_model))
    objects = [ObjectPrompts("bright", None, {1: Prompt(box=[10, 8, 30, 24])})]
    rows, table = logic.robustnessCheck(vol, objects, ref, axis="k", corruptions=["gaussian_noise", "step_motion"],
                                        iou_threshold=0.0)
    assert [(r.corruption, r.object) for r in rows] == [("clear", "bright"), ("gaussian_noise", "bright"),
                                                       ("step_motion", "bright")]
    assert rows[0].dice_vs_clean == 1.0 and all(r.dice_vs_reference is not None for r in rows)
    t = table.GetTable()
    assert t.GetNumberOfRows() == 3 and t.GetColumnName(5) == "Dice vs reference"
    assert t.GetColumnByName("Dice vs clean").GetValue(0) == 1.0
    assert t.GetColumnByName("Dice vs reference").GetValue(2) == pytest.approx(rows[2].dice_vs_reference)
    assert segments.same_snapshot(before, segments.snapshot(ref, vol))  # the reference is only read


def test_robustness_request_checks_before_any_model_work(tiny_model):
    """The panel's split: robustnessRequest refuses bad input at once (no engine request is made); a good
    one returns a request at once, whose rows equal robustnessCheck's."""
    from RobustMedSAMLib.prompt_files import ObjectPrompts
    from RobustMedSAMLogic.engine import EngineSession
    from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

    scene, vol, arr = _bright_box_scene()
    ref = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    ref.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    ref.GetSegmentation().AddEmptySegment("liver", "liver")
    engine = EngineSession(loaded=tiny_model)
    logic = RobustMedSAMBridgeLogic(scene, engine)
    objects = [ObjectPrompts("bright", None, {1: Prompt(box=[10, 8, 30, 24])}),
               ObjectPrompts("dark", None, {1: Prompt(box=[2, 2, 8, 8])})]
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        logic.robustnessRequest(vol, objects, corruptions=["snow"])
    with pytest.raises(ValueError, match="severity must be one of"):
        logic.robustnessRequest(vol, objects, severity=7)
    with pytest.raises(ValueError, match="no segment named 'bright'.*liver"):
        logic.robustnessRequest(vol, objects, ref)
    assert engine.client.pending == 0 and engine.client.service.predictor is None  # refused before any work
    kwargs = dict(axis="k", corruptions=["gaussian_noise"], iou_threshold=0.0)
    request = logic.robustnessRequest(vol, objects[:1], **kwargs)
    rows = engine.wait(request).value()
    expected, table = logic.robustnessCheck(vol, objects[:1], **kwargs)
    assert [(r.corruption, r.voxels, r.dice_vs_clean) for r in rows] == \
        [(r.corruption, r.voxels, r.dice_vs_clean) for r in expected]
    assert rows[0].voxels > 0 and table.GetTable().GetNumberOfRows() == 2
