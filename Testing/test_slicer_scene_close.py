"""Scene close on slicer-core: Slicer reuses node IDs after ``vtkMRMLScene::Clear``, so nothing of ours may be
keyed by node ID. Undo writers, engine volumes and propagate sessions of a closed scene never reach the
new scene's nodes; repeated runs reuse one segment editor node; a double click gives two points."""
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

from RobustMedSAMLib.prompt_files import ObjectPrompts  # noqa: E402
from RobustMedSAMLib.prompts import Prompt  # noqa: E402
from RobustMedSAMLogic import segments, volumes  # noqa: E402
from RobustMedSAMLogic.engine import EngineSession  # noqa: E402
from RobustMedSAMLogic.headless import make_headless_scene  # noqa: E402
from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic  # noqa: E402
from RobustMedSAMLogic.propagation import SessionRegistry, bind_session, local_runner  # noqa: E402


def add_nodes(scene, value=500):
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    arr = np.zeros((4, 32, 40), np.int16)
    arr[:, 8:24, 10:30] = value
    slicer.util.updateVolumeFromArray(vol, arr)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    return vol, seg


@pytest.fixture
def scene():
    scene, logics = make_headless_scene()
    yield scene
    del logics


def test_undo_writers_do_not_survive_a_scene_close_with_reused_ids(scene, tiny_model):
    engine = EngineSession(loaded=tiny_model)
    logic = RobustMedSAMBridgeLogic(scene, engine)
    vol, seg = add_nodes(scene)
    objects = [ObjectPrompts("box", None, {1: Prompt(box=[10, 8, 30, 24])})]
    for _ in range(3):  # repeated runs reuse one private segment editor node
        logic.segmentVolume(vol, objects, seg, propagate=False, engine=engine)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1
    assert logic.canUndo(seg)
    old_ids = (vol.GetID(), seg.GetID())
    scene.Clear(0)  # File > Close scene
    vol2, seg2 = add_nodes(scene)
    assert (vol2.GetID(), seg2.GetID()) == old_ids  # Slicer reuses the IDs
    assert not logic.canUndo(seg2) and not logic.undo(seg2)  # keyed by node object, not by ID
    logic.forgetScene()  # what the module does on StartCloseEvent
    assert logic._writers == {}
    sid = seg2.GetSegmentation().AddEmptySegment("other", "other")
    logic.segmentVolume(vol2, objects, seg2, propagate=False, engine=engine)
    assert logic.undo(seg2) and seg2.GetSegmentation().GetSegment(sid) is not None


def test_engine_volumes_follow_node_objects_and_voxels(scene, tiny_model):
    engine = EngineSession(loaded=tiny_model)
    vol, _ = add_nodes(scene, value=500)
    key = engine.volume_key(vol)
    assert engine.volume_key(vol) == key  # sent once
    old_id = vol.GetID()
    scene.Clear(0)
    vol2, _ = add_nodes(scene, value=900)
    assert vol2.GetID() == old_id
    key2 = engine.volume_key(vol2)
    assert key2 != key  # a new node object is a new volume, whatever its ID
    service = engine.client.service
    engine.wait(engine.predict(vol2, 0, 1, Prompt(box=[10, 8, 30, 24]), intensity="auto"))  # sends it
    np.testing.assert_array_equal(service.volumes[key2].volume.array, slicer.util.arrayFromVolume(vol2))
    slicer.util.updateVolumeFromArray(vol2, slicer.util.arrayFromVolume(vol2) + 1)  # voxels edited
    key3 = engine.volume_key(vol2)
    assert key3 != key2
    engine.forget_scene()
    engine.wait(engine.refresh_status())
    assert engine.status["volumes"] == []  # dropped in the engine too


def test_scene_close_releases_engine_volumes_when_only_the_effects_are_used(scene, tiny_model):
    """The effects reach the engine through ``RobustMedSAMBridgeLogic.engineSession()``; the module panel
    (whose StartCloseEvent handler also forgets the scene) may never have been opened. Closing the scene must
    still release the closed scene's volume nodes, their voxel copies and the engine's volumes; a volume node
    removed from the scene is released on the next request."""
    import weakref

    engine = EngineSession(loaded=tiny_model)
    assert RobustMedSAMBridgeLogic(scene, engine).engineSession() is engine  # what each effect does
    vol, _ = add_nodes(scene)
    engine.wait(engine.predict(vol, 0, 1, Prompt(box=[10, 8, 30, 24]), intensity="auto"))
    assert len(engine.client.service.volumes) == 1
    image = weakref.ref(vol.GetImageData())
    del vol
    scene.Clear(0)  # File > Close scene; nobody calls forget_scene by hand
    assert engine._volumes == {}
    assert image() is None  # the closed scene's voxels are not kept alive by the engine session
    engine.wait(engine.refresh_status())
    assert engine.status["volumes"] == []
    vol2, _ = add_nodes(scene)
    other, _ = add_nodes(scene)
    for node in (vol2, other):
        engine.wait(engine.predict(node, 0, 1, Prompt(box=[10, 8, 30, 24]), intensity="auto"))
    scene.RemoveNode(other)
    engine.wait(engine.predict(vol2, 0, 2, Prompt(box=[10, 8, 30, 24]), intensity="auto"))
    assert [e.node for e in engine._volumes.values()] == [vol2]
    assert list(engine.client.service.volumes) == [engine.volume_key(vol2)]


class StandIn:
    def __init__(self, shape=(4, 32, 40)):
        self.num_slices, self.slice_shape = shape[0], shape[1:]

    def predict_slice(self, index, prompt, multimask=False):
        from RobustMedSAMLib.prompts import Prediction

        m = np.zeros((1,) + tuple(self.slice_shape), bool)
        m[0, 8:24, 10:30] = True
        return Prediction(m, m.astype(np.float32), np.array([0.9], np.float32), np.zeros((1, 4, 4), np.float32))


def test_propagate_sessions_do_not_survive_a_scene_close_with_reused_ids(scene):
    registry = SessionRegistry()
    vol, seg = add_nodes(scene)
    sid = seg.GetSegmentation().AddEmptySegment("organ", "organ")

    def make(seg_node, vol_node):
        writer = segments.SegmentWriter(segments.editor_access(scene, seg_node, vol_node), seg_node, vol_node)
        return lambda: bind_session(seg_node, sid, vol_node, local_runner(lambda axis: StandIn()), writer,
                                    segments.PreviewSegmentation(scene, vol_node, seg_node))

    first = registry.get(seg, sid, vol, make(seg, vol))
    assert registry.get(seg, sid, vol, make(seg, vol)) is first
    ids = (seg.GetID(), vol.GetID())
    scene.Clear(0)
    vol2, seg2 = add_nodes(scene)
    seg2.GetSegmentation().AddEmptySegment(sid, "organ")
    assert (seg2.GetID(), vol2.GetID()) == ids
    second = registry.get(seg2, sid, vol2, make(seg2, vol2))
    assert second is not first
    mask = np.zeros((4, 32, 40), bool)
    mask[1, 8:24, 10:30] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg2, sid, vol2)
    second.start(second.plan())
    assert second.apply()
    assert volumes.segment_mask(seg2, sid, vol2)[:, 8:24, 10:30].all()  # written into the new scene's node
    registry.clear()
    assert len(registry) == 0


def test_double_click_gives_two_points_on_a_volume_slice(scene):
    """Slice-view events through the router and the view mapper onto a real volume node's voxel slice."""
    from RobustMedSAMLogic.events import EventRouter
    from RobustMedSAMLogic.interaction import PromptSession, SliceViewMapper

    vol, _ = add_nodes(scene)
    ijk_to_ras = volumes.ijk_to_ras(vol)
    xy_to_ras = lambda xy: (ijk_to_ras @ [xy[0], xy[1], 2.0, 1.0])[:3]  # noqa: E731 - a view on slice k = 2
    mapper = SliceViewMapper(xy_to_ras, ijk_to_ras, volumes.shape_of(vol), ijk_to_ras[:3, 2])
    calls = []
    session = PromptSession(lambda a, i, p, m, reply: calls.append(p), lambda *a: None, lambda *a: None)
    router = EventRouter()
    view = object()
    for kind, xy in (("press", (12, 10)), ("release", (12, 10)), ("double_click", (12, 10)), ("release", (12, 10))):
        consumed, actions = router.handle(view, kind, xy)
        assert consumed  # a double click must not reach Slicer (it would maximize the view)
        for action in actions:
            session.add_point(mapper.xy_to_position(action.xy), mapper.slice_shape, action.positive)
    assert session.prompts.index == 2 and len(session.prompts.points) == 2
    np.testing.assert_array_equal(calls[-1].points, [[12, 10], [12, 10]])
