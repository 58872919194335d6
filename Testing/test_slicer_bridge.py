"""The Slicer module's MRML bridge (RobustMedSAM/RobustMedSAMLogic) on Slicer's compiled classes (slicer-core):
volume geometry, segment writing through Slicer's segment editor logic (masking, overwrite, undo), the
5.8 fallback against it, markups -> prompts, preview nodes, IoU table/plot."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover - the unrelated PyPI package "slicer"
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))

import slicer.util  # noqa: E402
import vtk  # noqa: E402

from RobustMedSAMLogic import segments, volumes  # noqa: E402
from RobustMedSAMLogic.headless import make_headless_scene  # noqa: E402

S = slicer.vtkMRMLSegmentationNode
E = slicer.vtkMRMLSegmentEditorNode


def rotation(deg_z, deg_x):
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def matrix(columns, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(columns, dtype=float) * np.asarray(spacing, dtype=float)
    m[:3, 3] = origin
    return m


GEOMETRIES = {
    "axial": matrix(np.diag([-1, -1, 1]), (0.8, 0.9, 2.5), (10.0, -20.0, 30.0)),
    "flipped": matrix(np.diag([1, -1, -1]), (0.8, 0.9, 2.5), (-5.0, 7.0, 12.0)),
    "permuted": matrix(np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]]), (1.1, 0.7, 3.0), (1.0, 2.0, 3.0)),
    "oblique": matrix(rotation(25, 15) @ np.diag([-1, -1, 1]), (0.6, 1.3, 2.2), (-40.0, 15.5, 8.25)),
}


def add_volume(scene, array, ijk_to_ras, name="vol"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(volumes.to_vtk(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, volume_node, masks):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = []
    for name, mask in masks.items():
        sid = seg.GetSegmentation().AddEmptySegment(name, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, volume_node)
        ids.append(sid)
    return seg, ids


@pytest.fixture
def scene():
    scene, _ = make_headless_scene()
    return scene


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_volume_geometry_and_array(scene, tmp_path, name):
    from RobustMedSAMLib.volume_io import read_volume

    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 1000, size=(5, 7, 9)).astype(np.int16)
    node = add_volume(scene, array, GEOMETRIES[name])
    vol = volumes.volume_from_node(node)
    np.testing.assert_allclose(vol.ijk_to_ras, GEOMETRIES[name], atol=1e-12)
    np.testing.assert_array_equal(vol.array, array)
    assert vol.shape == (5, 7, 9) and volumes.shape_of(node) == (5, 7, 9)
    # Slicer's own NRRD writer and the engine's reader agree on voxels and geometry (LPS <-> RAS)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "v.nrrd"))
    storage.SetUseCompression(False)
    assert storage.WriteData(node)
    back = read_volume(tmp_path / "v.nrrd")
    np.testing.assert_allclose(back.ijk_to_lps, vol.ijk_to_lps, atol=1e-9)
    np.testing.assert_array_equal(back.array, array)
    # a voxel centre maps to the same RAS point through the node and through the engine
    ijk = np.array([3.0, 2.0, 4.0])
    ras = [0.0, 0.0, 0.0, 1.0]
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    m.MultiplyPoint(list(ijk) + [1.0], ras)
    np.testing.assert_allclose(vol.ijk_to_physical(ijk, "ras"), ras[:3], atol=1e-9)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_mask_written_reads_back_voxel_exact(scene, name):
    rng = np.random.default_rng(2)
    node = add_volume(scene, rng.integers(0, 100, (6, 8, 10)).astype(np.int16), GEOMETRIES[name])
    seg, (keep,) = add_segmentation(scene, node, {"other": np.pad(np.ones((2, 2, 2), bool), ((0, 4), (0, 6), (0, 8)))})
    target = seg.GetSegmentation().AddEmptySegment("target", "target")
    mask = rng.random((6, 8, 10)) > 0.6
    w = segments.SegmentWriter(segments.editor_access(scene, seg, node), seg, node)
    settings = w.access.editor_node
    settings.SetOverwriteMode(E.OverwriteNone)
    w.set_segment(target, mask)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, node) != 0, mask)
    np.testing.assert_array_equal(volumes.segment_mask(seg, target, node), mask)
    # the other segment is kept (overwrite none)
    assert slicer.util.arrayFromSegmentBinaryLabelmap(seg, keep, node).sum() == 8
    # one slice replaced, every other slice untouched
    new = np.zeros((8, 10), bool)
    new[2:5, 3:9] = True
    w.replace_slice(target, 0, 3, new)
    expected = mask.copy()
    expected[3] = new
    np.testing.assert_array_equal(volumes.segment_mask(seg, target, node), expected)
    new_j = np.zeros((6, 10), bool)
    new_j[1:4, 0:2] = True
    w.replace_slice(target, 1, 5, new_j)
    expected[:, 5, :] = new_j
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, node) != 0, expected)
    # undo restores the previous state, step by step
    assert w.undo()
    after_one_undo = mask.copy()
    after_one_undo[3] = new
    np.testing.assert_array_equal(volumes.segment_mask(seg, target, node), after_one_undo)
    assert w.undo() and w.undo()
    assert not volumes.segment_mask(seg, target, node).any()


def test_segment_under_parent_transform(scene):
    node = add_volume(scene, np.zeros((4, 5, 6), np.int16), GEOMETRIES["oblique"])
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = np.eye(4)
    t[:3, 3] = (12.0, -3.0, 7.5)
    shift.SetMatrixTransformToParent(volumes.to_vtk(t))
    node.SetAndObserveTransformNodeID(shift.GetID())
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # not transformed: world frame
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    sid = seg.GetSegmentation().AddEmptySegment("s", "s")
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2:4, 1:5] = True
    segments.SegmentWriter(segments.editor_access(scene, seg, node), seg, node).set_segment(sid, mask)
    np.testing.assert_array_equal(volumes.segment_mask(seg, sid, node), mask)
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, sid, image, False)
    np.testing.assert_allclose(volumes.image_to_frame(image), t @ GEOMETRIES["oblique"], atol=1e-9)


def _masking_case(scene, fallback, mask_mode, overwrite, intensity=None):
    rng = np.random.default_rng(0)
    vol = add_volume(scene, rng.integers(0, 100, (5, 6, 7)).astype(np.int16), GEOMETRIES["permuted"])
    a_mask = np.zeros((5, 6, 7), bool)
    a_mask[1:4, 1:4, 1:4] = True
    b_mask = np.zeros((5, 6, 7), bool)
    b_mask[:, :, 3:] = True
    c_mask = np.zeros((5, 6, 7), bool)
    c_mask[4, :, :] = True
    seg, (a, b, c) = add_segmentation(scene, vol, {"a": a_mask, "b": b_mask, "c": c_mask})
    seg.GetDisplayNode().SetSegmentVisibility(c, False)
    settings = E()
    settings.SetMaskMode(mask_mode)
    settings.SetOverwriteMode(overwrite)
    if mask_mode == S.EditAllowedInsideSingleSegment:
        settings.SetMaskSegmentID(b)
    if intensity is not None:
        settings.SetSourceVolumeIntensityMask(True)
        settings.SetSourceVolumeIntensityMaskRange(*intensity)
    access = segments.editor_access(scene, seg, vol, settings_from=settings, prefer_fallback=fallback)
    return vol, seg, (a, b, c), segments.SegmentWriter(access, seg, vol), (a_mask, b_mask, c_mask)


CASES = [(S.EditAllowedEverywhere, E.OverwriteAllSegments), (S.EditAllowedEverywhere, E.OverwriteVisibleSegments),
         (S.EditAllowedEverywhere, E.OverwriteNone), (S.EditAllowedInsideAllSegments, E.OverwriteAllSegments),
         (S.EditAllowedInsideVisibleSegments, E.OverwriteNone), (S.EditAllowedOutsideAllSegments, E.OverwriteAllSegments),
         (S.EditAllowedOutsideVisibleSegments, E.OverwriteVisibleSegments),
         (S.EditAllowedInsideSingleSegment, E.OverwriteAllSegments)]


@pytest.mark.parametrize("mask_mode,overwrite", CASES)
def test_masking_settings_match_slicer(mask_mode, overwrite):
    """Slicer's editor logic applies the editable area and overwrite mode; the 5.8 fallback gives the same
    voxels for every operation; undo restores the exact previous state."""
    new = np.zeros((5, 6, 7), bool)
    new[0:5, 2:6, 2:6] = True
    results = {}
    for fallback in (False, True):
        scene, _ = make_headless_scene()
        vol, seg, ids, w, (a_mask, b_mask, c_mask) = _masking_case(scene, fallback, mask_mode, overwrite)
        before = segments.snapshot(seg, vol)
        for op in ("set", "add", "remove", "slice"):
            {"set": lambda: w.set_segment(ids[0], new), "add": lambda: w.add(ids[0], new),
             "remove": lambda: w.remove(ids[0], new), "slice": lambda: w.replace_slice(ids[0], 0, 1, new[1])}[op]()
            results[fallback, op] = [volumes.segment_mask(seg, s, vol) for s in ids]
            assert w.undo()
            assert segments.same_snapshot(before, segments.snapshot(seg, vol))
    for op in ("set", "add", "remove", "slice"):
        for x, y in zip(results[False, op], results[True, op]):
            np.testing.assert_array_equal(x, y, err_msg=f"{op}")
    a_set, b_set, c_set = results[False, "set"]
    editable_everywhere = mask_mode == S.EditAllowedEverywhere
    if editable_everywhere:
        np.testing.assert_array_equal(a_set, new)
    else:
        assert not np.array_equal(a_set, new)  # the editable area restricted the edit
    b_orig = np.zeros((5, 6, 7), bool)
    b_orig[:, :, 3:] = True
    if overwrite == E.OverwriteNone:
        np.testing.assert_array_equal(b_set, b_orig)  # other segments kept
    elif editable_everywhere:
        np.testing.assert_array_equal(b_set, b_orig & ~new)  # other segments overwritten
    c_orig = np.zeros((5, 6, 7), bool)
    c_orig[4] = True
    if overwrite == E.OverwriteVisibleSegments:
        np.testing.assert_array_equal(c_set, c_orig)  # hidden segment not overwritten


def test_intensity_range_masking_matches_slicer():
    new = np.ones((5, 6, 7), bool)
    out = []
    for fallback in (False, True):
        scene, _ = make_headless_scene()
        vol, seg, ids, w, (a_mask, _, _) = _masking_case(scene, fallback, S.EditAllowedEverywhere, E.OverwriteNone,
                                                         (20, 60))
        w.set_segment(ids[0], new)
        out.append(volumes.segment_mask(seg, ids[0], vol))
        values = volumes.volume_array(vol)
        # set inside the editable intensity range; the segment's voxels outside it are kept
        np.testing.assert_array_equal(out[-1], ((values >= 20) & (values <= 60)) | a_mask)
    np.testing.assert_array_equal(out[0], out[1])


def test_preview_node_is_separate_and_removable(scene):
    vol = add_volume(scene, np.zeros((4, 5, 6), np.int16), GEOMETRIES["flipped"])
    seg, (a,) = add_segmentation(scene, vol, {"a": np.zeros((4, 5, 6), bool)})
    before = segments.snapshot(seg, vol)
    preview = segments.PreviewSegmentation(scene, vol, seg)
    m2 = np.zeros((5, 6), bool)
    m2[1:3, 2:5] = True
    preview.show_slice((4, 5, 6), 0, 2, m2, color=(1, 0, 0))
    expected = np.zeros((4, 5, 6), bool)
    expected[2] = m2
    np.testing.assert_array_equal(preview.mask((4, 5, 6)), expected)
    assert preview.node.GetSaveWithScene() == 0 and preview.node.GetHideFromEditors()
    assert segments.same_snapshot(before, segments.snapshot(seg, vol))
    preview.remove()
    assert not preview.visible
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_markups_nodes_to_prompts(scene):
    from RobustMedSAMLogic.markups import prompts_from_markups_nodes
    from RobustMedSAMLib.prompt_files import PromptFileError

    vol = add_volume(scene, np.zeros((10, 20, 30), np.int16), GEOMETRIES["oblique"])
    m = GEOMETRIES["oblique"]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "liver")
    for ijk, label in (((4.2, 7.0, 3.0), "F-1"), ((10.0, 12.4, 3.3), "-bg")):
        points.AddControlPoint(*(m @ np.append(ijk, 1.0))[:3], label)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "kidney")
    roi.SetCenter(*(m @ np.array([15.0, 10.0, 6.0, 1.0]))[:3])
    roi.SetSize(4 * 0.6, 6 * 1.3, 0.5)
    roi_axes = np.eye(4)
    roi_axes[:3, :3] = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    roi.GetObjectToNodeMatrix().DeepCopy(volumes.to_vtk(roi_axes))
    roi.SetCenter(*(m @ np.array([15.0, 10.0, 6.0, 1.0]))[:3])
    objects = prompts_from_markups_nodes([points, roi], vol, "k")
    assert [o.name for o in objects] == ["liver", "kidney"]
    liver = objects[0].slices[3]
    np.testing.assert_allclose(liver.points, [[4.2, 7.0], [10.0, 12.4]], atol=1e-6)
    np.testing.assert_array_equal(liver.labels, [1, 0])
    (index, kidney), = objects[1].slices.items()
    assert index == 6
    np.testing.assert_array_equal(kidney.box, [13, 7, 18, 14])
    # under a parent transform, world positions are moved into the volume's frame
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = np.eye(4)
    t[:3, 3] = (5.0, 0.0, -2.0)
    shift.SetMatrixTransformToParent(volumes.to_vtk(t))
    vol.SetAndObserveTransformNodeID(shift.GetID())
    moved = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moved")
    moved.AddControlPoint(*(t @ m @ np.array([4.2, 7.0, 3.0, 1.0]))[:3], "p")
    (obj,) = prompts_from_markups_nodes([moved], vol, "k")
    np.testing.assert_allclose(obj.slices[3].points, [[4.2, 7.0]], atol=1e-6)
    outside = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "outside")
    outside.AddControlPoint(1e4, 0, 0, "x")
    with pytest.raises(PromptFileError, match="outside the volume"):
        prompts_from_markups_nodes([outside], vol, "k")
