"""Prompt files (our JSON, 3D Slicer markups written by Slicer itself) on the real chest CT."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import slicerio
from support import headless_slicer_scene

from RobustMedSAMLib.prompt_files import (ObjectPrompts, PromptFileError, is_negative_control_point,
                                          prompts_from_json, read_prompts)
from RobustMedSAMLib.volume_io import Volume, read_volume

CT_PATH = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
# an anatomical point (continuous voxel index i, j, k) and a box on slice k = 15 in the right lung region
POINT_IJK = np.array([40.3, 60.6, 14.7])
NEG_IJK = np.array([90.0, 64.0, 15.2])
BOX_IJK = (np.array([25.0, 40.0, 15.0]), np.array([55.4, 90.6, 15.0]))


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT_PATH)


def _coords(ct, ijk, space):
    return [float(v) for v in (ijk if space == "ijk" else ct.ijk_to_physical(ijk, space))]


def _json(ct, space):
    return {"coordinates": space, "objects": [{
        "name": "right lung", "color": [0.1, 0.8, 0.3],
        "points": [{"position": _coords(ct, POINT_IJK, space), "label": 1},
                   {"position": _coords(ct, NEG_IJK, space), "label": 0}],
        "box": {"corners": [_coords(ct, BOX_IJK[0], space), _coords(ct, BOX_IJK[1], space)]}}]}


def test_json_same_prompt_in_ijk_lps_ras(ct, tmp_path):
    results = {}
    for space in ("ijk", "lps", "ras"):
        path = tmp_path / f"{space}.json"
        path.write_text(json.dumps(_json(ct, space)))
        (obj,) = read_prompts(path, ct)
        assert isinstance(obj, ObjectPrompts) and obj.name == "right lung" and obj.color == (0.1, 0.8, 0.3)
        assert list(obj.slices) == [15]
        results[space] = obj.slices[15]
    for space in ("lps", "ras"):
        np.testing.assert_allclose(results[space].points, results["ijk"].points, atol=1e-9)
        np.testing.assert_array_equal(results[space].labels, results["ijk"].labels)
        np.testing.assert_array_equal(results[space].box, results["ijk"].box)
    p = results["ijk"]
    # axis k: (x, y) = (i, j); box corners are inclusive voxel centres -> exclusive upper + 1, rounded
    np.testing.assert_allclose(p.points, [[40.3, 60.6], [90.0, 64.0]])
    np.testing.assert_array_equal(p.labels, [1, 0])
    np.testing.assert_array_equal(p.box, [25, 40, 56, 92])
    # the anatomy under the point is the same voxel in the volume
    assert ct.slice(0, 15)[61, 40] == ct.array[15, 61, 40]


def test_other_axes_and_anatomical_names(ct):
    data = {"coordinates": "ras", "objects": [{"name": "a", "points": [
        {"position": _coords(ct, POINT_IJK, "ras")}]}]}
    for axis, index, xy in [(1, 61, (40.3, 14.7)), ("i", 40, (60.6, 14.7)), ("axial", 15, (40.3, 60.6)),
                            ("coronal", 61, (40.3, 14.7)), ("sagittal", 40, (60.6, 14.7))]:
        (obj,) = prompts_from_json(data, ct, axis)
        assert list(obj.slices) == [index], axis
        np.testing.assert_allclose(obj.slices[index].points, [xy], atol=1e-9)
    # corners on one axial slice are on different coronal slices
    with pytest.raises(PromptFileError, match="corners lie on slices 40 and 91 along axis j"):
        prompts_from_json(_json(ct, "ijk"), ct, axis="coronal")


def test_2d_slices_form_and_merging(ct):
    data = {"axis": "k", "objects": [
        {"name": "liver", "slices": [{"index": 20, "points": [[10, 12], [30, 40]], "labels": [1, 0]},
                                     {"index": 20, "box": [5, 6, 50, 60]},
                                     {"index": 22, "box": [1, 2, 3, 4]}],
         "points": [{"position": [11.0, 13.0, 20.2]}]},
        {"name": "spleen", "points": [{"position": [-0.4, 127.3, 33.4], "label": 1}]}]}
    liver, spleen = prompts_from_json(data, ct)
    assert sorted(liver.slices) == [20, 22] and liver.color is None
    np.testing.assert_allclose(liver.slices[20].points, [[11, 13], [10, 12], [30, 40]])
    np.testing.assert_array_equal(liver.slices[20].labels, [1, 1, 0])
    np.testing.assert_array_equal(liver.slices[20].box, [5, 6, 50, 60])
    # a point in the outer half voxel is moved onto the border voxel centre
    np.testing.assert_allclose(spleen.slices[33].points, [[0, 127]])
    with pytest.raises(PromptFileError, match="on axis k .* asked for axis j"):
        prompts_from_json(data, ct, axis=1)


def _errors(ct):
    base = {"name": "o", "points": [{"position": [10, 10, 10]}]}
    return [
        ({"coordinates": "xyz", "objects": [base]}, "'coordinates' must be one of ijk, lps, ras, got 'xyz'"),
        ({"objects": [base], "colour": 1}, "top level: unknown key\\(s\\) 'colour'; allowed: coordinates, axis"),
        ({"objects": [dict(base, pts=[])]}, "object 1: unknown key\\(s\\) 'pts'; allowed: name, color, points"),
        ({"objects": [{"name": "empty"}]}, "object 'empty' has no prompt"),
        ({"objects": []}, "'objects' is empty"),
        ({}, "no 'objects' list"),
        ({"objects": [{"name": "o", "points": [{"position": [10, 10, 40]}]}]},
         "object 'o', point 1 at IJK \\(10, 10, 40\\) is outside the volume, which spans i 0..127, j 0..127, k 0..33"),
        ({"coordinates": "ras", "objects": [{"name": "o", "points": [{"position": [0, 0, 100]}]}]},
         "point 1 at RAS \\(0, 0, 100\\) \\(voxel index .*\\) is outside the volume, which spans "
         "R -194.6..195.4, A -217.9..172.1, S -345.[23]..-5.[23] mm \\(RAS bounding box\\)"),
        ({"objects": [{"name": "o", "points": [{"position": [10, 10, 10], "label": 2}]}]}, "label must be 1"),
        ({"objects": [{"name": "o", "color": [255, 0, 0], "points": [{"position": [1, 1, 1]}]}]}, "0..1"),
        ({"objects": [base, base]}, "several objects are named 'o'"),
        ({"objects": [{"name": "o", "slices": [{"index": 3, "box": [1, 1, 5, 5]}, {"index": 3, "box": [1, 1, 6, 6]}]}]},
         "two boxes on slice 3"),
        ({"objects": [{"name": "o", "slices": [{"index": 3, "box": [10, 1, 5, 5]}]}]},
         "object 'o', slice 3 along axis k: box .* is empty or inverted"),
        ({"objects": [{"name": "o", "slices": [{"index": 3, "points": [[200, 5]]}]}]},
         "object 'o', slice 3 along axis k: point \\(x=200, y=5\\) is outside the image"),
        ({"objects": [{"name": "o", "slices": [{"index": 40, "points": [[2, 5]]}]}]},
         "slice index 40 is outside 0..33"),
        ({"objects": [{"name": "o", "box": {"corners": [[1, 1, 1]]}}]}, "'corners' must be two 3D positions"),
    ]


def test_json_errors_are_clear(ct, tmp_path):
    for data, message in _errors(ct):
        with pytest.raises(PromptFileError, match=message):
            prompts_from_json(data, ct, source="p.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"objects": [}')
    with pytest.raises(PromptFileError, match="bad.json: invalid JSON at line 1"):
        read_prompts(bad, ct)
    with pytest.raises(PromptFileError, match="prompt file not found"):
        read_prompts(tmp_path / "nope.json", ct)


# ------------------------------------------------------------------------------------------- Slicer markups
def _markups_scene():
    return headless_slicer_scene("Markups")


def _save(scene, node, storage_cls, path, system):
    import slicer

    storage = storage_cls()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS if system == "LPS"
                                else slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    assert json.loads(path.read_text())["markups"][0]["coordinateSystem"] == system


def test_slicer_point_list_ras_and_lps_equivalent(ct, tmp_path):
    import slicer
    import vtk

    scene, keep = _markups_scene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    for ijk, label in [(POINT_IJK, "F-1"), (NEG_IJK, "-background"), ([70.0, 50.0, 15.0], "vessel"),
                       ([20.0, 20.0, 30.0], "F-4")]:
        node.AddControlPoint(vtk.vtkVector3d(*ct.ijk_to_physical(np.asarray(ijk, float), "ras")), label)
    node.SetNthControlPointDescription(2, "Negative")
    prompts = {}
    for system in ("RAS", "LPS"):
        path = tmp_path / f"lung_{system}.mrk.json"
        _save(scene, node, slicer.vtkMRMLMarkupsJsonStorageNode, path, system)
        (obj,) = read_prompts(path, ct)
        assert obj.name == f"lung_{system}"
        np.testing.assert_allclose(obj.color, node.GetDisplayNode().GetSelectedColor())
        prompts[system] = obj
    for k in (15, 30):
        np.testing.assert_allclose(prompts["RAS"].slices[k].points, prompts["LPS"].slices[k].points, atol=1e-5)
    np.testing.assert_allclose(prompts["LPS"].slices[15].points, [POINT_IJK[:2], NEG_IJK[:2], [70, 50]], atol=1e-5)
    np.testing.assert_array_equal(prompts["LPS"].slices[15].labels, [1, 0, 0])
    np.testing.assert_array_equal(prompts["LPS"].slices[30].labels, [1])
    # an undefined (not yet placed) control point is not a prompt; an empty list is an error
    data = json.loads((tmp_path / "lung_LPS.mrk.json").read_text())
    for cp in data["markups"][0]["controlPoints"]:
        cp["positionStatus"] = "undefined"
    (tmp_path / "empty.mrk.json").write_text(json.dumps(data))
    with pytest.raises(PromptFileError, match="object 'empty' has no prompt"):
        read_prompts(tmp_path / "empty.mrk.json", ct)
    assert is_negative_control_point({"label": "neg 1"}) and not is_negative_control_point({"label": "F-1"})


def test_slicer_roi_box(ct, tmp_path):
    import slicer
    import vtk

    scene, keep = _markups_scene()
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    # ROI aligned with the volume around voxel centres i 30..60, j 40..90, k 14..16 (edges half a voxel out)
    lo, hi = np.array([29.5, 39.5, 13.5]), np.array([60.5, 90.5, 16.5])
    corners_ras = ct.ijk_to_physical(np.array([lo, hi]), "ras")
    roi.SetCenter(list(corners_ras.mean(axis=0)))
    roi.SetSize(list(np.abs(corners_ras[1] - corners_ras[0])))
    for system in ("RAS", "LPS"):
        path = tmp_path / f"box_{system}.mrk.json"
        _save(scene, roi, slicer.vtkMRMLMarkupsROIJsonStorageNode, path, system)
        (obj,) = read_prompts(path, ct)
        assert list(obj.slices) == [15] and obj.slice_range == (14, 16)
        np.testing.assert_array_equal(obj.slices[15].box, [30, 40, 61, 91])
        assert obj.slices[15].points is None
    # a rotated and tilted ROI: the box encloses the pixels inside its cross-section with slice 15
    transform = vtk.vtkTransform()
    centre = corners_ras.mean(axis=0)
    transform.Translate(*centre)  # Slicer's ROI is centred on its object frame's origin
    transform.RotateZ(30)
    transform.RotateX(20)
    roi.SetAndObserveObjectToNodeMatrix(transform.GetMatrix())
    np.testing.assert_allclose(roi.GetCenterWorld(), centre, atol=1e-6)
    path = tmp_path / "rotated.mrk.json"
    _save(scene, roi, slicer.vtkMRMLMarkupsROIJsonStorageNode, path, "LPS")
    (obj,) = read_prompts(path, ct)
    x0, y0, x1, y1 = obj.slices[15].box
    jj, ii = np.mgrid[:128, :128]
    ras = ct.ijk_to_physical(np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, 15.0)], 1), "ras")
    world_to_roi = np.linalg.inv(np.array([[roi.GetObjectToWorldMatrix().GetElement(r, c) for c in range(4)]
                                           for r in range(4)]))
    local = ras @ world_to_roi[:3, :3].T + world_to_roi[:3, 3]
    size = np.array(roi.GetSize())
    inside = np.all(np.abs(local) <= size / 2 + 1e-6, axis=1)
    cols, rows = ii.ravel()[inside], jj.ravel()[inside]
    assert x0 <= cols.min() and cols.max() < x1 and y0 <= rows.min() and rows.max() < y1
    assert cols.min() - x0 <= 1 and x1 - 1 - cols.max() <= 1 and rows.min() - y0 <= 1 and y1 - 1 - rows.max() <= 1
    assert x1 - x0 > 61 - 30  # wider than the unrotated box


def test_markups_errors(ct, tmp_path):
    base = {"type": "Fiducial", "coordinateSystem": "LPS",
            "controlPoints": [{"label": "p", "position": [0.0, 0.0, -100.0]}]}
    cases = [
        (dict(base, type="Line"), "of type 'Line'; supported: Fiducial, ROI"),
        ({k: v for k, v in base.items() if k != "coordinateSystem"}, "'coordinateSystem' must be \"LPS\" or \"RAS\""),
        (dict(base, controlPoints=[{"label": "far", "position": [0.0, 0.0, 500.0]}]),
         "object 'm', control point 1 \\('far'\\) at LPS \\(0, 0, 500\\) .* L -195.4..194.6, P -172.1..217.9"),
        (dict(base, coordinateUnits="um"), "only mm"),
    ]
    for node, message in cases:
        path = tmp_path / "m.mrk.json"
        path.write_text(json.dumps({"markups": [node]}))
        with pytest.raises(PromptFileError, match=message):
            read_prompts(path, ct)
    path = tmp_path / "m.mrk.json"
    path.write_text(json.dumps({"markups": [base, dict(base, name="second")]}))
    first, second = read_prompts(path, ct)
    assert (first.name, second.name) == ("m", "second")
    with pytest.raises(PromptFileError, match="several objects are named 'm'"):
        read_prompts([path, path], ct)


def test_flat_roi_off_the_slice_plane_uses_its_projection(ct):
    from RobustMedSAMLib.prompt_files import prompts_from_markups

    centre = ct.ijk_to_physical(np.array([45.0, 65.0, 15.3]))  # between slice centres 15 and 16
    roi = {"type": "ROI", "coordinateSystem": "LPS", "center": list(centre), "size": [3.046875 * 20, 3.046875 * 10, 0],
           "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    (obj,) = prompts_from_markups({"markups": [roi]}, ct, source="flat", default_name="flat")
    assert list(obj.slices) == [15] and obj.slice_range == (15, 15)
    # LPS axes vs the CT's (-L, -P) voxel axes: the ROI spans i 35..55, j 60..70 (voxel centres)
    np.testing.assert_array_equal(obj.slices[15].box, [35, 60, 56, 71])


def test_modules_import_neither_torch_nor_qt_nor_slicer():
    import subprocess
    import sys

    code = ("import sys, RobustMedSAMLib.volume_io, RobustMedSAMLib.intensity, RobustMedSAMLib.prompt_files; "
            "print(sorted(m for m in ('torch', 'slicer', 'qt', 'PythonQt', 'vtk') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_object_window(tmp_path):
    from RobustMedSAMLib.intensity import Window

    vol = Volume(np.zeros((4, 8, 8), np.int16), np.eye(4))
    data = {"objects": [{"name": "lung", "window": "lung", "slices": [{"index": 1, "box": [1, 1, 5, 5]}]},
                        {"name": "spine", "window": [400, 1800], "slices": [{"index": 2, "points": [[3, 3]]}]},
                        {"name": "other", "slices": [{"index": 2, "points": [[3, 3]]}]}]}
    objs = prompts_from_json(data, vol)
    assert [o.window for o in objs] == [Window(-600, 1500), Window(400, 1800), None]
    data["objects"][0]["window"] = "liver"
    with pytest.raises(PromptFileError, match="object 'lung': unknown window preset 'liver'"):
        prompts_from_json(data, vol)
