"""The prompt effect's GUI-free interaction classes (RobustMedSAM/RobustMedSAMLogic/interaction.py):
view XY -> IJK -> slice prompt for axial/coronal/sagittal/oblique views and flipped volumes, drags ->
normalised boxes, prompt editing, and the preview/apply/cancel state machine (with the engine's tiny model
and with Slicer segments)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))

from RobustMedSAMLib.prompts import Prediction  # noqa: E402
from RobustMedSAMLogic.events import DragTracker  # noqa: E402
from RobustMedSAMLogic.interaction import (  # noqa: E402
    ERROR, IDLE, PENDING, PREVIEW, ObliqueViewError, OutsideVolumeError, PromptSession, PromptSet,
    SliceViewMapper, box_from_corners, nearest_voxel_axis)

SHAPE = (12, 20, 30)  # (K, J, I)


def geometry(flip=False, permute=False):
    """IJKToRAS of a volume: LPS-like axial (i -> -R, j -> -A, k -> S), optionally flipped/permuted."""
    cols = np.diag([-1.0, -1.0, 1.0])
    if flip:
        cols = cols @ np.diag([-1.0, 1.0, -1.0])
    if permute:  # i -> S, j -> -R, k -> -A
        cols = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=float)
    m = np.eye(4)
    m[:3, :3] = cols @ np.diag([0.7, 0.8, 2.5])
    m[:3, 3] = (5.0, -3.0, 11.0)
    return m


class FakeView:
    """A slice view: XY pixels -> RAS through a SliceToRAS-like matrix (what Slicer's xyToRas computes)."""

    def __init__(self, normal, right, origin, mm_per_pixel=0.5):
        n = np.asarray(normal, float) / np.linalg.norm(normal)
        r = np.asarray(right, float) - np.dot(right, n) * n
        r /= np.linalg.norm(r)
        up = np.cross(n, r)
        self.m = np.eye(4)
        self.m[:3, 0], self.m[:3, 1], self.m[:3, 2] = r * mm_per_pixel, up * mm_per_pixel, n
        self.m[:3, 3] = origin
        self.normal = n

    def xy_to_ras(self, xy):
        return (self.m @ np.array([xy[0], xy[1], 0.0, 1.0]))[:3]

    def ras_to_xy(self, ras):
        return (np.linalg.inv(self.m) @ np.append(ras, 1.0))[:2]


VIEWS = {"axial": ((0, 0, 1), (1, 0, 0)), "coronal": ((0, 1, 0), (1, 0, 0)), "sagittal": ((1, 0, 0), (0, 1, 0))}


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("view", list(VIEWS))
def test_event_xy_to_ijk_and_slice_prompt(view, flip, permute):
    ijk_to_ras = geometry(flip, permute)
    target_ijk = np.array([13.0, 7.0, 5.0])  # a voxel centre (i, j, k)
    target_ras = (ijk_to_ras @ np.append(target_ijk, 1.0))[:3]
    normal, right = VIEWS[view]
    v = FakeView(normal, right, target_ras + 3.0 * np.asarray(right))
    mapper = SliceViewMapper(v.xy_to_ras, ijk_to_ras, SHAPE, v.normal)
    assert mapper.angle < 1e-6
    pos = mapper.xy_to_position(v.ras_to_xy(target_ras))
    np.testing.assert_allclose(pos.ijk, target_ijk, atol=1e-9)
    # the voxel axis along the view normal is the slice axis; (x, y) per docs/coordinates.md
    voxel_axis = int(np.argmax(np.abs(ijk_to_ras[:3, :3].T @ np.asarray(normal, float))))  # 0 = i
    assert pos.axis == 2 - voxel_axis
    expected_xy = {0: (13.0, 7.0), 1: (13.0, 5.0), 2: (7.0, 5.0)}[pos.axis]
    assert pos.index == int(target_ijk[voxel_axis])
    np.testing.assert_allclose(pos.xy, expected_xy, atol=1e-9)
    assert pos.pixel() == tuple(int(v) for v in expected_xy)
    h, w = mapper.slice_shape
    assert (h, w) == tuple(s for a, s in enumerate(SHAPE) if a != pos.axis)


def test_slice_index_rounds_half_up_and_outside_is_refused():
    ijk_to_ras = geometry()
    v = FakeView((0, 0, 1), (1, 0, 0), (ijk_to_ras @ np.array([0, 0, 4.5, 1.0]))[:3])
    mapper = SliceViewMapper(v.xy_to_ras, ijk_to_ras, SHAPE, v.normal)
    centre_xy = v.ras_to_xy((ijk_to_ras @ np.array([10, 10, 4.5, 1.0]))[:3])
    assert mapper.xy_to_position(centre_xy).index == 5
    far = v.ras_to_xy((ijk_to_ras @ np.array([-3, 10, 4.5, 1.0]))[:3])
    with pytest.raises(OutsideVolumeError):
        mapper.xy_to_position(far)
    assert mapper.xy_to_position(far, clamp=True).xy[0] == 0.0


def test_oblique_views_use_nearest_axis_or_refuse():
    ijk_to_ras = geometry()
    tilt = np.radians(10)
    axis, angle = nearest_voxel_axis((0, np.sin(tilt), np.cos(tilt)), ijk_to_ras)
    assert axis == 0 and abs(angle - 10) < 1e-6
    target = (ijk_to_ras @ np.array([12.0, 9.0, 6.0, 1.0]))[:3]
    v = FakeView((0, np.sin(tilt), np.cos(tilt)), (1, 0, 0), target)
    mapper = SliceViewMapper(v.xy_to_ras, ijk_to_ras, SHAPE, v.normal, max_oblique_degrees=20)
    pos = mapper.xy_to_position(v.ras_to_xy(target))
    assert (pos.axis, pos.index) == (0, 6)  # projected along k onto the nearest voxel slice
    np.testing.assert_allclose(pos.xy, (12.0, 9.0), atol=1e-9)
    steep = FakeView((0, np.sin(np.radians(40)), np.cos(np.radians(40))), (1, 0, 0), target)
    with pytest.raises(ObliqueViewError, match="40 degrees"):
        SliceViewMapper(steep.xy_to_ras, ijk_to_ras, SHAPE, steep.normal).xy_to_position((0, 0))


@pytest.mark.parametrize("a,b", [((3.2, 4.6), (9.4, 12.5)), ((9.4, 12.5), (3.2, 4.6)), ((9.4, 4.6), (3.2, 12.5)),
                                 ((3.2, 12.5), (9.4, 4.6))])
def test_drag_gives_normalised_exclusive_box_any_direction(a, b):
    np.testing.assert_array_equal(box_from_corners(a, b, (20, 30)), [3, 5, 10, 14])


def test_box_is_clipped_and_drag_tracker_tells_clicks_from_drags():
    np.testing.assert_array_equal(box_from_corners((-4, -2), (50, 7.2), (20, 30)), [0, 0, 30, 8])
    d = DragTracker(threshold=4)
    d.press((100, 100), modifier=True)
    assert not d.move((102, 101))
    assert d.release((102, 101)) == ("click", (100.0, 100.0), (100.0, 100.0))
    d.press((100, 100))
    assert d.move((80, 130)) and d.rectangle == (80.0, 100.0, 100.0, 130.0)
    kind, start, end = d.release((70, 140))
    assert (kind, start, end) == ("drag", (100.0, 100.0), (70.0, 140.0)) and not d.active


def test_prompt_editing():
    p = PromptSet(0, 3, (20, 30))
    p.add_point((5, 6))
    p.add_point((10, 12), positive=False)
    p.set_box((1, 2, 8, 9))
    p.set_box((2, 2, 9, 9))  # a new box replaces the old one
    prompt = p.to_prompt()
    np.testing.assert_array_equal(prompt.points, [[5, 6], [10, 12]])
    np.testing.assert_array_equal(prompt.labels, [1, 0])
    np.testing.assert_array_equal(prompt.box, [2, 2, 9, 9])
    assert p.remove_nearest_point((10.5, 12.5)) and len(p.points) == 1
    assert not p.remove_nearest_point((25, 19))
    assert p.undo_last() and len(p.points) == 2  # removal undone
    assert p.undo_last() and p.box == (1, 2, 8, 9)  # box replacement undone
    p.clear()
    assert p.empty and p.undo_last() and not p.empty
    with pytest.raises(OutsideVolumeError):
        p.add_point((30, 1))
    single = PromptSet(0, 0, (20, 30))
    single.add_point((3, 3))
    assert single.ambiguous


class Recorder:
    def __init__(self, fail=False):
        self.shown, self.written, self.calls, self.prefetched, self.fail = [], [], [], [], fail

    def predict(self, axis, index, prompt, multimask, reply):
        """Answers at once (the engine's answer arrives later in the effect: see the deferred tests)."""
        self.calls.append((axis, index, prompt, multimask))
        if self.fail:
            raise RuntimeError("model not available")
        n = 3 if multimask else 1
        masks = np.zeros((n, 20, 30), bool)
        for c in range(n):
            masks[c, : 2 + c * 3, :5] = True
        reply(Prediction(masks, masks.astype(np.float32), np.array([0.5, 0.9, 0.7][:n], np.float32),
                         np.zeros((n, 8, 8), np.float32)))

    def show(self, axis, index, mask):
        self.shown.append((axis, index, None if mask is None else mask.copy()))

    def write(self, axis, index, mask):
        self.written.append((axis, index, mask.copy()))


def make_pos(axis, index, xy):
    from RobustMedSAMLogic.interaction import SlicePosition

    return SlicePosition(axis, index, tuple(float(v) for v in xy), (0.0, 0.0, 0.0))


def test_preview_apply_cancel_state_machine():
    r = Recorder()
    s = PromptSession(r.predict, r.show, r.write, prefetch=lambda a, i: r.prefetched.append((a, i)))
    assert s.state == IDLE and not s.apply()
    s.view_moved(0, 4)
    assert r.prefetched == [(0, 4)]
    s.add_point(make_pos(0, 4, (3, 3)), (20, 30))
    assert s.state == PREVIEW and r.calls[-1][3] is True  # one positive point: three candidates
    assert s.selected == 1 and s.mask.sum() == 25  # best predicted IoU
    assert s.next_candidate() == 2 and r.shown[-1][2].sum() == 40
    s.add_point(make_pos(0, 4, (8, 9)), (20, 30), positive=False)
    assert r.calls[-1][3] is False and s.candidates == 1
    np.testing.assert_array_equal(r.calls[-1][2].labels, [1, 0])
    s.set_box(make_pos(0, 4, (9.4, 12.5)), make_pos(0, 4, (3.2, 4.6)), (20, 30))
    np.testing.assert_array_equal(r.calls[-1][2].box, [3, 5, 10, 14])
    assert s.apply() and s.state == IDLE and len(r.written) == 1
    axis, index, mask = r.written[0]
    assert (axis, index) == (0, 4) and mask.sum() == 10
    assert r.shown[-1][2] is None  # preview cleared after apply
    # cancel drops prompts and preview, writes nothing
    s.add_point(make_pos(0, 4, (1, 1)), (20, 30))
    s.cancel()
    assert s.state == IDLE and len(r.written) == 1 and s.prompts.empty and r.shown[-1][2] is None
    # undo of the last prompt re-predicts; undoing everything clears the preview
    s.add_point(make_pos(0, 4, (1, 1)), (20, 30))
    s.add_point(make_pos(0, 4, (2, 2)), (20, 30))
    assert s.undo_last() and len(s.prompts.points) == 1 and s.state == PREVIEW
    assert s.undo_last() and s.state == IDLE and r.shown[-1][2] is None
    # a prompt on another slice starts a new prompt set there
    s.add_point(make_pos(0, 4, (1, 1)), (20, 30))
    s.add_point(make_pos(0, 7, (1, 1)), (20, 30))
    assert (s.prompts.index, len(s.prompts.points)) == (7, 1)
    assert any(e[:2] == (0, 4) and e[2] is None for e in r.shown[-3:])


def test_failed_prediction_shows_error_and_cannot_apply():
    r = Recorder(fail=True)
    s = PromptSession(r.predict, r.show, r.write)
    s.add_point(make_pos(0, 1, (1, 1)), (20, 30))
    assert s.state == ERROR and "model not available" in s.message
    assert not s.apply() and r.written == []


class Deferred(Recorder):
    """Holds each answer until :meth:`answer` releases it, like the engine process."""

    def __init__(self):
        super().__init__()
        self.waiting = []

    def predict(self, axis, index, prompt, multimask, reply):
        answers = []
        Recorder.predict(self, axis, index, prompt, multimask, answers.append)
        self.waiting.append((reply, answers[0]))

    def answer(self, n=0):
        reply, pred = self.waiting.pop(n)
        reply(pred)


def test_answers_arrive_later_and_only_the_newest_counts():
    """A click returns at once (pending); an answer to older prompts, or one arriving after Cancel or Apply,
    never reaches the preview or the segment."""
    r = Deferred()
    s = PromptSession(r.predict, r.show, r.write)
    changes = []
    s.on_change = lambda: changes.append(s.state)
    s.add_point(make_pos(0, 4, (3, 3)), (20, 30))
    assert s.state == PENDING and not s.can_apply and not s.apply() and r.shown == []
    s.add_point(make_pos(0, 4, (9, 9)), (20, 30), positive=False)  # a second click before the first answer
    r.answer(0)  # the first click's answer: stale
    assert s.state == PENDING and r.shown == [] and changes == []
    r.answer(0)  # the newest answer
    assert s.state == PREVIEW and s.can_apply and changes == [PREVIEW] and r.shown[-1][2].sum() == 10
    s.add_point(make_pos(0, 4, (5, 5)), (20, 30))
    s.cancel()
    r.answer(0)  # arrives after Cancel: dropped
    assert s.state == IDLE and r.shown[-1][2] is None and r.written == []
    s.add_point(make_pos(0, 4, (5, 5)), (20, 30))
    r.answer(0)
    s.add_point(make_pos(0, 4, (6, 6)), (20, 30))  # still pending when the user applies the shown preview
    assert not s.apply() and r.written == []
    r.answer(0)
    assert s.apply() and len(r.written) == 1


def test_failed_answer_shows_the_error():
    s = PromptSession(lambda a, i, p, m, reply: reply(error=RuntimeError("the engine process stopped")),
                      lambda *a: None, lambda *a: None)
    s.add_point(make_pos(0, 1, (1, 1)), (20, 30))
    assert s.state == ERROR and "engine process stopped" in s.message and not s.can_apply


def test_event_router_clicks_drags_double_click_and_keys():
    """Events as the effect forwards them: a double click (second press reported as a double click, no
    press) gives two points and is consumed; a drag gives a box; Shift removes; Esc is not claimed."""
    from RobustMedSAMLogic.events import EventRouter

    router = EventRouter()
    view = object()
    actions = []
    for kind, xy in (("press", (10, 10)), ("release", (10, 10)), ("double_click", (11, 10)), ("release", (11, 10))):
        consumed, got = router.handle(view, kind, xy)
        assert consumed
        actions += got
    assert [(a.kind, a.xy, a.positive) for a in actions] == [("point", (10.0, 10.0), True),
                                                             ("point", (11.0, 10.0), True)]
    assert router.handle(view, "press", (5, 5), control=True) == (True, [])
    consumed, got = router.handle(view, "move", (30, 25))
    assert consumed and got[0].kind == "band" and got[0].rect == (5.0, 5.0, 30.0, 25.0)
    consumed, got = router.handle(view, "release", (30, 25))
    assert [a.kind for a in got] == ["band", "box"] and (got[1].xy, got[1].end) == ((5.0, 5.0), (30.0, 25.0))
    router.handle(view, "press", (7, 7), control=True)
    assert router.handle(view, "release", (7, 8))[1][0].positive is False  # Ctrl+click: background point
    router.handle(view, "press", (7, 7), shift=True)
    assert router.handle(view, "release", (7, 7))[1][0].kind == "remove"
    assert router.handle(view, "right_press", (2, 3))[1][0].positive is False
    assert router.handle(view, "move", (1, 1)) == (False, [])  # hovering is Slicer's
    assert router.handle(view, "key", (0, 0), key="Return")[1][0].kind == "apply"
    assert router.handle(view, "key", (0, 0), key="BackSpace")[1][0].kind == "undo"
    assert router.handle(view, "key", (0, 0), key="Escape") == (False, [])


def test_session_with_engine_and_slicer_segment(tiny_model):
    """The whole 2D effect path headless: engine requests on a volume node's slice (answers delivered by
    polling, as the Qt timer does), preview node, apply as one undoable slice replacement, cancel leaves the
    segment alone."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    import slicer.util

    from RobustMedSAMLogic import segments, volumes
    from RobustMedSAMLogic.engine import EngineSession
    from RobustMedSAMLogic.headless import make_headless_scene

    scene, _ = make_headless_scene()
    rng = np.random.default_rng(0)
    array = (rng.random((4, 40, 48)) * 50).astype(np.int16)
    array[:, 10:30, 12:36] += 400
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(vol, array)
    vol.SetIJKToRASMatrix(volumes.to_vtk(geometry(flip=True)))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("organ", "organ")
    engine = EngineSession(loaded=tiny_model)
    engine.connection.debounce = 0.0
    assert engine.wait(engine.load()).ok
    writer = segments.SegmentWriter(segments.editor_access(scene, seg, vol), seg, vol)
    preview = segments.PreviewSegmentation(scene, vol, seg)
    shape = volumes.shape_of(vol)

    def predict(axis, index, prompt, multimask, reply):
        engine.predict(vol, axis, index, prompt, multimask, "auto",
                       on_done=lambda r: reply(r.result) if r.ok else reply(error=r.error))

    session = PromptSession(predict, lambda a, i, m: preview.show_slice(shape, a, i, m),
                            lambda a, i, m: writer.replace_slice(sid, a, i, m),
                            prefetch=lambda a, i: engine.prefetch(vol, a, i, "auto"))
    session.view_moved(0, 2)
    engine.poll()
    service = engine.client.service
    assert service.predictor.encoder_calls == 1  # the slice in view, encoded before any click
    session.set_box(make_pos(0, 2, (12, 10)), make_pos(0, 2, (35, 29)), (40, 48))
    assert session.state == PENDING
    engine.poll()
    assert session.state == PREVIEW
    shown = preview.mask(shape)
    assert shown[2].any() and not shown[[0, 1, 3]].any()
    np.testing.assert_array_equal(shown[2], session.mask)
    before = segments.snapshot(seg, vol)
    session.cancel()
    assert segments.same_snapshot(before, segments.snapshot(seg, vol)) and not preview.mask(shape).any()
    session.set_box(make_pos(0, 2, (12, 10)), make_pos(0, 2, (35, 29)), (40, 48))
    engine.poll()
    expected = session.mask.copy()
    assert session.apply()
    result = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol) != 0
    np.testing.assert_array_equal(result[2], expected)
    assert not result[[0, 1, 3]].any()
    assert writer.undo() and not volumes.segment_mask(seg, sid, vol).any()
    assert service.predictor.encoder_calls == 1  # the prefetched encoding served every prompt


def test_prompt_points_are_drawn_only_in_views_showing_their_slice():
    """The effect's drawing (VTK actors) with a real slice node: a point of slice k = 2 appears where the
    view shows k = 2, at the view pixel the view maps it to, and nowhere else."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    import slicer.util

    from RobustMedSAMLogic import volumes
    from RobustMedSAMLogic.drawing import PromptDrawing
    from RobustMedSAMLogic.headless import make_headless_scene

    scene, _ = make_headless_scene()
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(vol, np.zeros((4, 20, 30), np.int16))
    vol.SetIJKToRASMatrix(volumes.to_vtk(geometry()))

    class View:
        def __init__(self, k):
            self.node = slicer.vtkMRMLSliceNode()
            xy_to_ras = volumes.ijk_to_ras(vol) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, k], [0, 0, 0, 1.0]])
            self.node.GetXYToRAS().DeepCopy(volumes.to_vtk(xy_to_ras))

        def sliceLogic(self):
            return self

        def GetSliceNode(self):
            return self.node

    class Effect:
        def __init__(self):
            self.added, self.rendered = [], 0

        def addActor2D(self, view, actor):
            self.added.append((view, actor))

        def removeActor2D(self, view, actor):
            self.added.remove((view, actor))

        def scheduleRender(self, view):
            self.rendered += 1

    effect = Effect()
    drawing = PromptDrawing(effect)
    shown, other = View(2), View(3)
    prompts = PromptSet(0, 2, (20, 30))
    prompts.add_point((7, 5))
    prompts.add_point((9, 11), positive=False)
    drawing.points([shown, other], prompts, vol)
    glyphs = {view: drawing.actors[view][2] for view in (shown, other)}
    positive, negative = glyphs[shown][True][1], glyphs[shown][False][1]
    assert positive.GetNumberOfPoints() == 1 and negative.GetNumberOfPoints() == 1
    np.testing.assert_allclose(positive.GetPoint(0)[:2], (7, 5), atol=1e-9)
    assert glyphs[other][True][1].GetNumberOfPoints() == 0 and glyphs[other][False][1].GetNumberOfPoints() == 0
    drawing.band(shown, (1, 2, 5, 6))
    assert drawing.actors[shown][0].GetVisibility() == 1 and drawing.actors[shown][1].GetNumberOfPoints() == 5
    drawing.remove_all()
    assert effect.added == [] and drawing.actors == {}
