"""Segment writing when the segmentation's reference geometry is not the source volume's grid (slicer-core).

A segmentation oversampled x2 ("Specify geometry", Slicer's vtkSlicerSegmentationGeometryLogic) or made on
another volume stores its labelmaps on that geometry, and Slicer's editor only masks, thresholds and "sets"
correctly for modifier labelmaps on it. For the three accesses of RobustMedSAMLogic.edit_access (Slicer's
segment editor logic, the Slicer 5.8 fallback, and an effect's ``scriptedEffect`` stood in by that logic):
a written prediction equals, voxel for voxel on the reference grid, Slicer's own resampling of it (the
Segmentations module's "Specify geometry" + resample), masking settings hold, undo restores. Also: masking
settings copied from the Segment Editor onto another segmentation (issue 11 #25)."""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover - the unrelated PyPI package "slicer"
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))

import slicer.util  # noqa: E402

from RobustMedSAMLogic import segments, volumes  # noqa: E402
from RobustMedSAMLogic.headless import make_headless_scene  # noqa: E402

S = slicer.vtkMRMLSegmentationNode
E = slicer.vtkMRMLSegmentEditorNode
L = slicer.vtkSlicerSegmentEditorLogic
SHAPE = (5, 6, 7)  # (K, J, I) of the source volume


def rotation(deg_z, deg_x):
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


SOURCE = np.eye(4)  # an oblique, anisotropic source volume
SOURCE[:3, :3] = rotation(20, 10) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.1, 0.9, 2.0])
SOURCE[:3, 3] = (-30.0, 12.5, 7.0)


def add_volume(scene, array, ijk_to_ras, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(volumes.to_vtk(ijk_to_ras))
    return node


def covering_grid(ijk_to_ras, shape, axes, spacing):
    """IJKToRAS and (K, J, I) shape of a grid along ``axes`` (unit columns) with ``spacing`` that covers the
    voxels of the grid ``ijk_to_ras``/``shape`` (a volume "the segmentation was made on")."""
    k, j, i = shape
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
    local = (ijk_to_ras @ corners.T)[:3].T @ axes  # coordinates along the new axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    dims = np.ceil((hi - lo) / spacing).astype(int)
    m = np.eye(4)
    m[:3, :3] = axes * spacing
    m[:3, 3] = axes @ (lo + np.asarray(spacing) / 2)
    return m, (int(dims[2]), int(dims[1]), int(dims[0]))


def set_reference_geometry(seg, geometry_node, oversampling):
    """What the Segmentations module's "Specify geometry" dialog does: new reference geometry, labelmaps
    resampled onto it."""
    g = slicer.vtkSlicerSegmentationGeometryLogic()
    g.SetInputSegmentationNode(seg)
    g.SetSourceGeometryNode(geometry_node)
    g.SetOversamplingFactor(oversampling)
    assert g.CalculateOutputGeometry() == ""
    assert g.SetReferenceImageGeometryInSegmentationNode()
    assert g.ResampleLabelmapsInSegmentationNode()


def slicer_reference(seg):
    """(IJK -> segmentation frame, extent) of Slicer's reference geometry for the editor."""
    text = L.GetReferenceImageGeometryStringFromSegmentation(seg.GetSegmentation())
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False)
    return volumes.image_to_frame(image), tuple(image.GetExtent())


def on_reference(seg, sid, reference):
    """Segment ``sid`` as (K, J, I) bool on the reference grid (its labelmap lies on it: an exact copy)."""
    matrix, ext = reference
    grid = matrix.copy()
    grid[:3, 3] = (matrix @ np.array([ext[0], ext[2], ext[4], 1.0]))[:3]
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return volumes.segment_mask_on_grid(seg, sid, grid, shape)


def all_on_reference(seg, reference):
    return {sid: on_reference(seg, sid, reference) for sid in segments.segment_ids(seg)}


class Case:
    """A source volume, a segmentation with segments "a" (a block) and "b" (a half) drawn on the source
    grid, then given the reference geometry ``kind``: "oversampled" (x2) or "foreign" (another volume)."""

    def __init__(self, kind):
        self.scene, self.logics = make_headless_scene()
        rng = np.random.default_rng(3)
        self.volume = add_volume(self.scene, rng.integers(0, 100, SHAPE).astype(np.int16), SOURCE, "source")
        a = np.zeros(SHAPE, bool)
        a[1:4, 1:5, 1:5] = True
        b = np.zeros(SHAPE, bool)
        b[:, :, 4:] = True
        self.seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        self.seg.CreateDefaultDisplayNodes()
        self.seg.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        self.ids = []
        for name, mask in (("a", a), ("b", b)):
            sid = self.seg.GetSegmentation().AddEmptySegment(name, name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), self.seg, sid, self.volume)
            self.ids.append(sid)
        if kind == "oversampled":
            self.geometry_node, self.oversampling = self.volume, 2
        else:
            axes = rotation(-35, 25) @ np.diag([1.0, -1.0, 1.0])
            m, shape = covering_grid(SOURCE, SHAPE, axes, (0.8, 1.3, 0.7))
            self.geometry_node = add_volume(self.scene, np.zeros(shape, np.int16), m, "other")
            self.oversampling = 1
        set_reference_geometry(self.seg, self.geometry_node, self.oversampling)
        self.reference = slicer_reference(self.seg)
        assert not np.allclose(self.reference[0], volumes.ijk_to_segmentation(self.volume, self.seg), atol=1e-3)

    def slicer_resampled(self, mask):
        """Slicer's own resampling of ``mask`` (volume grid) onto this reference geometry: written into a
        scratch segmentation on the volume's grid, then "Specify geometry" + resample, read on the grid."""
        scratch = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "scratch")
        scratch.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        sid = scratch.GetSegmentation().AddEmptySegment("m", "m")
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), scratch, sid, self.volume)
        set_reference_geometry(scratch, self.geometry_node, self.oversampling)
        assert np.allclose(slicer_reference(scratch)[0], self.reference[0])
        out = on_reference(scratch, sid, self.reference)
        self.scene.RemoveNode(scratch)
        return out


class EffectStandIn:
    """What a Segment Editor effect's ``scriptedEffect`` offers the effects (qSlicerSegmentEditorAbstractEffect
    is not in slicer-core), on Slicer's vtkSlicerSegmentEditorLogic (the C++ the 5.10+ editor widget runs):
    the default modifier labelmap, modifying the selected segment with the editor's masking, undo."""

    def __init__(self, scene, seg, volume, settings):
        self.node = E()
        scene.AddNode(self.node)
        segments.copy_masking_settings(settings, self.node, seg)
        self.node.SetAndObserveSegmentationNode(seg)
        self.node.SetAndObserveSourceVolumeNode(volume)
        self.logic = L()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.node)

    def parameterSetNode(self):
        return self.node

    def saveStateForUndo(self):
        self.logic.SaveStateForUndo()

    def defaultModifierLabelmap(self):
        assert self.logic.ResetModifierLabelmapToDefault()
        return self.logic.GetModifierLabelmap()

    def modifySegmentByLabelmap(self, segmentation_node, segment_id, labelmap, mode, bypass_masking=False):
        self.node.SetSelectedSegmentID(segment_id)  # the effects edit the selected segment
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, True, bypass_masking)


@pytest.fixture
def effect_enums(monkeypatch):
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(
        ModificationModeSet=L.ModificationModeSet, ModificationModeAdd=L.ModificationModeAdd,
        ModificationModeRemove=L.ModificationModeRemove), raising=False)


def writer_for(case, access, settings=None):
    """A SegmentWriter through ``access``; returns (writer, undo function)."""
    if settings is None:
        settings = E()
        settings.SetOverwriteMode(E.OverwriteNone)
    if access == "effect":
        effect = EffectStandIn(case.scene, case.seg, case.volume, settings)
        w = segments.SegmentWriter(segments.EffectAccess(effect, case.seg), case.seg, case.volume)
        return w, effect.logic.Undo
    w = segments.SegmentWriter(segments.editor_access(case.scene, case.seg, case.volume, settings_from=settings,
                                                      prefer_fallback=access == "fallback"), case.seg, case.volume)
    return w, w.undo


KINDS = ["oversampled", "foreign"]
ACCESSES = ["logic", "fallback", "effect"]


@pytest.mark.parametrize("access", ACCESSES)
@pytest.mark.parametrize("kind", KINDS)
def test_prediction_is_written_on_the_reference_geometry(kind, access, effect_enums):
    case = Case(kind)
    rng = np.random.default_rng(7)
    mask = rng.random(SHAPE) > 0.5
    w, undo = writer_for(case, access)
    before = all_on_reference(case.seg, case.reference)
    t = w.ensure_segment("prediction")
    w.set_segment(t, mask)
    # stored on the reference geometry, equal to Slicer's own resampling of the prediction
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(case.seg, t, image, False)
    np.testing.assert_allclose(volumes.image_to_frame(image), case.reference[0], atol=1e-9)
    expected = case.slicer_resampled(mask)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(on_reference(case.seg, t, case.reference), expected)
    if kind == "oversampled":  # x2 nests the source grid: reading back on it gives the prediction exactly
        np.testing.assert_array_equal(w.read(t), mask)
    for sid in case.ids:  # overwrite none: the other segments are untouched
        np.testing.assert_array_equal(on_reference(case.seg, sid, case.reference), before[sid])
    # one slice replaced = Slicer's resampling of the volume mask with that slice replaced
    new = np.zeros(SHAPE[1:], bool)
    new[1:5, 2:6] = True
    w.replace_slice(t, 0, 2, new)
    replaced = mask.copy()
    replaced[2] = new
    np.testing.assert_array_equal(on_reference(case.seg, t, case.reference), case.slicer_resampled(replaced))
    # add into another segment
    w.add(case.ids[0], mask)
    np.testing.assert_array_equal(on_reference(case.seg, case.ids[0], case.reference), before[case.ids[0]] | expected)
    # undo restores each step
    undo()
    np.testing.assert_array_equal(on_reference(case.seg, case.ids[0], case.reference), before[case.ids[0]])
    undo()
    np.testing.assert_array_equal(on_reference(case.seg, t, case.reference), expected)
    undo()
    assert not on_reference(case.seg, t, case.reference).any()


SETTINGS = ["inside_b", "outside_all", "intensity", "overwrite_all"]


def masking_settings(name, case):
    settings = E()
    settings.SetOverwriteMode(E.OverwriteAllSegments if name == "overwrite_all" else E.OverwriteNone)
    if name == "inside_b":
        case.scene.AddNode(settings)
        settings.SetAndObserveSegmentationNode(case.seg)
        settings.SetMaskMode(S.EditAllowedInsideSingleSegment)
        settings.SetMaskSegmentID(case.ids[1])
    elif name == "outside_all":
        settings.SetMaskMode(S.EditAllowedOutsideAllSegments)
    elif name == "intensity":
        settings.SetSourceVolumeIntensityMask(True)
        settings.SetSourceVolumeIntensityMaskRange(20.5, 70.5)  # fractional bounds on an integer volume
    return settings


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_masking_settings_hold_on_the_reference_geometry(kind, setting, effect_enums):
    """Editable area (inside a segment / outside all segments), editable intensity range and overwrite
    other segments: each access gives the result computed on the reference grid from the settings' meaning,
    the same voxels for all three, and undo restores every segment."""
    results = {}
    mask = np.zeros(SHAPE, bool)
    mask[0:4, 2:6, 2:7] = True
    for access in ACCESSES:
        case = Case(kind)
        a, b = case.ids
        w, undo = writer_for(case, access, masking_settings(setting, case))
        before = all_on_reference(case.seg, case.reference)
        pred = case.slicer_resampled(mask)
        w.set_segment(a, mask)
        after = all_on_reference(case.seg, case.reference)
        results[access] = after
        if setting == "inside_b":
            editable = before[b]
        elif setting == "outside_all":
            editable = ~before[b]  # every segment but the edited one
        elif setting == "intensity":
            values = volumes.volume_on_grid(case.volume, case.seg, *case.reference)
            editable = (values >= 20) & (values <= 70)  # bounds cast to the voxel type, as vtkImageThreshold
        else:
            editable = np.ones_like(pred)
        assert editable.any() and not editable.all() or setting == "overwrite_all"
        np.testing.assert_array_equal(after[a], (pred & editable) | (before[a] & ~editable), err_msg=access)
        if setting == "overwrite_all":
            np.testing.assert_array_equal(after[b], before[b] & ~pred, err_msg=access)
            assert (before[b] & pred).any()
        else:
            np.testing.assert_array_equal(after[b], before[b], err_msg=access)
        undo()
        for sid in case.ids:
            np.testing.assert_array_equal(on_reference(case.seg, sid, case.reference), before[sid], err_msg=access)
    for access in ACCESSES[1:]:
        for sid in results["logic"]:
            np.testing.assert_array_equal(results[access][sid], results["logic"][sid], err_msg=access)


def test_reference_geometry_is_the_editors():
    """volumes.reference_geometry equals Slicer's editor geometry (GetReferenceImageGeometryString of the
    segment editor logic), also through the Python rule used on Slicer 5.8, in every situation: volume grid,
    oversampled, foreign, a segment reaching outside the reference extent, no reference parameter."""
    def editor_geometry(scene, seg, volume):
        node = E()
        scene.AddNode(node)
        node.SetAndObserveSegmentationNode(seg)
        node.SetAndObserveSourceVolumeNode(volume)
        logic = L()
        logic.SetMRMLScene(scene)
        logic.SetSegmentEditorNode(node)
        return volumes.geometry_from_string(logic.GetReferenceImageGeometryString())

    def check(case, label):
        seg, volume = case.seg, case.volume
        mine = volumes.reference_geometry(seg, volume)
        theirs = editor_geometry(case.scene, seg, volume)
        np.testing.assert_allclose(mine[0], theirs[0], atol=1e-12, err_msg=label)
        assert mine[1] == theirs[1], label
        text = volumes._reference_string_python(seg.GetSegmentation())
        assert volumes.geometry_from_string(text)[1] == theirs[1], label
        np.testing.assert_allclose(volumes.geometry_from_string(text)[0], theirs[0], atol=1e-12, err_msg=label)
        return mine

    for kind in KINDS:
        case = Case(kind)
        check(case, kind)
        # a labelmap reaching outside the reference extent grows it (as for imported segments)
        big = np.zeros((SHAPE[0] + 6, SHAPE[1], SHAPE[2]), np.uint8)
        big[-2:] = 1
        wide = add_volume(case.scene, big, SOURCE, "wide")
        sid = case.seg.GetSegmentation().AddEmptySegment("wide", "wide")
        slicer.util.updateSegmentBinaryLabelmapFromArray(big, case.seg, sid, wide)
        grown = check(case, kind + " grown")
        assert grown[1] != case.reference[1]
    # no reference parameter, segments present: their common geometry
    case = Case("oversampled")
    case.seg.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), "")
    check(case, "from labelmaps")
    # nothing at all: the source volume's geometry becomes the reference
    scene, _ = make_headless_scene()
    vol = add_volume(scene, np.zeros(SHAPE, np.int16), SOURCE, "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    m, ext = volumes.reference_geometry(seg, vol)
    np.testing.assert_allclose(m, SOURCE, atol=1e-12)
    assert ext == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
    with pytest.raises(volumes.GeometryError, match="no reference geometry"):
        volumes.reference_geometry(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "none"))


# ------------------------------------------------------------------ masking copied onto another segmentation
@pytest.mark.parametrize("fallback", [False, True])
def test_segment_editor_masking_copied_onto_another_segmentation(fallback, caplog):
    """The Segment Editor's settings edit segmentation A "inside segment X of A"; writing into segmentation B
    (module panel, batch) keeps what exists there (intensity range, overwrite mode) and edits everywhere,
    with a log line, instead of an empty editable area that writes nothing. Into A itself: kept."""
    scene, _ = make_headless_scene()
    rng = np.random.default_rng(5)
    vol = add_volume(scene, rng.integers(0, 100, SHAPE).astype(np.int16), SOURCE, "v")
    inside = np.zeros(SHAPE, bool)
    inside[:, :3] = True

    def segmentation(name, with_x):
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
        ids = []
        for n in (["x"] if with_x else []) + ["target"]:
            ids.append(seg.GetSegmentation().AddEmptySegment(n, n))
        if with_x:
            slicer.util.updateSegmentBinaryLabelmapFromArray(inside.astype(np.uint8), seg, ids[0], vol)
        return seg, ids

    seg_a, (x_id, target_a) = segmentation("A", True)
    seg_b, (target_b,) = segmentation("B", False)
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSingletonTag(segments.EDITOR_SINGLETON_TAG)  # the Segment Editor module's node
    editor.SetAndObserveSegmentationNode(seg_a)
    editor.SetMaskMode(S.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(x_id)
    editor.SetOverwriteMode(E.OverwriteNone)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(10, 90)
    values = volumes.volume_array(vol)
    in_range = (values >= 10) & (values <= 90)
    mask = np.zeros(SHAPE, bool)
    mask[1:4] = True

    with caplog.at_level(logging.WARNING):
        access = segments.editor_access(scene, seg_b, vol, prefer_fallback=fallback)
    assert "does not exist in 'B'" in caplog.text and "everywhere" in caplog.text
    node = access.editor_node
    assert node.GetMaskMode() == S.EditAllowedEverywhere and node.GetSourceVolumeIntensityMask()
    assert tuple(node.GetSourceVolumeIntensityMaskRange()) == (10, 90) and node.GetOverwriteMode() == E.OverwriteNone
    w = segments.SegmentWriter(access, seg_b, vol)
    w.set_segment(target_b, mask)
    np.testing.assert_array_equal(w.read(target_b), mask & in_range)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        access = segments.editor_access(scene, seg_a, vol, prefer_fallback=fallback)
    assert caplog.text == ""
    assert access.editor_node.GetMaskMode() == S.EditAllowedInsideSingleSegment
    w = segments.SegmentWriter(access, seg_a, vol)
    w.set_segment(target_a, mask)
    np.testing.assert_array_equal(w.read(target_a), mask & in_range & inside)

    # the mask segment was deleted from A meanwhile: everywhere, said once
    seg_a.GetSegmentation().RemoveSegment(x_id)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        access = segments.editor_access(scene, seg_a, vol, prefer_fallback=fallback)
    assert "does not exist in 'A'" in caplog.text
    w = segments.SegmentWriter(access, seg_a, vol)
    w.set_segment(target_a, mask)
    np.testing.assert_array_equal(w.read(target_a), mask & in_range)
