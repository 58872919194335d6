"""Helpers shared by tests: geometry variants of the chest CT, Slicer's own segmentation reader, and stand-in
predictions."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RobustMedSAMLib.seeded import seeded_array
from RobustMedSAMLib.volume_io import Volume

PARITY = Path(__file__).resolve().parent / "data" / "parity"


def boxed_prediction(mask: np.ndarray, prompt, multimask: bool = False):
    """A stand-in predictor's answer: ``mask`` (H, W) cut to the prompt's box (x0, y0, x1, y1; x = column),
    repeated for multimask output, with confident logits and predicted IoU 0.9."""
    from RobustMedSAMLib.prompts import Prediction

    mask = np.asarray(mask, bool).copy()
    if prompt.box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        region = np.zeros(mask.shape, dtype=bool)
        region[max(y0, 0):y1, max(x0, 0):x1] = True
        mask &= region
    c = 3 if multimask else 1
    masks = np.repeat(mask[None], c, axis=0)
    return Prediction(masks, np.where(masks, 5.0, -5.0).astype(np.float32), np.full(c, 0.9, np.float32),
                      np.zeros((c, 64, 64), np.float32))


def rotation(deg_z, deg_x):
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def resample(image, spacing, direction):
    """Nearest-neighbour resampling of ``image`` onto a grid with ``spacing``/``direction`` covering it."""
    vol = Volume.from_sitk(image)
    lo, hi = vol.physical_extent()
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    local = corners @ np.asarray(direction)  # coordinates along the new axes
    start, stop = local.min(axis=0), local.max(axis=0)
    size = np.ceil((stop - start) / spacing).astype(int)
    origin = np.asarray(direction) @ (start + np.asarray(spacing) / 2)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputDirection([float(d) for d in np.asarray(direction).ravel()])
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0 if image.GetPixelID() == sitk.sitkUInt8 else -5000)  # -5000: outside the CT
    return f.Execute(image)


def geometry_variants(ct_image, label_image):
    oblique = rotation(25, 15) @ np.array(ct_image.GetDirection()).reshape(3, 3)
    out = {"original": (ct_image, label_image)}
    out["flipped"] = tuple(sitk.Flip(im, [True, False, True]) for im in (ct_image, label_image))
    out["permuted"] = tuple(sitk.PermuteAxes(im, [2, 0, 1]) for im in (ct_image, label_image))
    aniso_dir = np.array(ct_image.GetDirection()).reshape(3, 3)
    out["anisotropic"] = tuple(resample(im, (2.3, 4.1, 6.7), aniso_dir) for im in (ct_image, label_image))
    out["oblique"] = tuple(resample(im, (3.3, 2.9, 5.5), oblique) for im in (ct_image, label_image))
    return out


def headless_slicer_scene(*modules: str):
    """A bare MRML scene with Slicer's module logics attached (default: Segmentations), as the application
    does at start-up (shared/REFERENCE.md 0b). Keep the returned logics alive as long as the scene."""
    import slicer
    import vtk

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = [app]
    classes = {"Segmentations": slicer.vtkSlicerSegmentationsModuleLogic, "Markups": slicer.vtkSlicerMarkupsLogic,
               "Volumes": slicer.vtkSlicerVolumesLogic, "Colors": slicer.vtkSlicerColorLogic}
    for name in modules or ("Segmentations",):
        logic = classes[name]()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics.append(logic)
    return scene, logics


def load_with_slicer(path):
    """Open a .seg.nrrd with Slicer's own storage node; return {name: (color, voxel count)} and IJK-to-RAS."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    scene, keep = headless_slicer_scene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    out, matrix = {}, None
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(n))
        labelmap = segment.GetRepresentation("Binary labelmap")
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        out[segment.GetName()] = (segment.GetColor(), int(np.count_nonzero(voxels == segment.GetLabelValue())))
        m = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(m)
        # Slicer's image-to-world (RAS) matrix; we write a zero extent offset, so its ijk are the file's
        matrix = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return out, matrix


def load_parity(name: str) -> dict:
    """One reference file of Testing/data/parity (written by the official code; no pickles)."""
    with np.load(PARITY / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def vit_b_decoder_inputs(ref: dict):
    """The documented seeded inputs of vit_b_decoder.npz: image embeddings (1, 256, 64, 64) and early
    encoder features (1, 64, 64, 768), each standard normal (seeded_array * sqrt(prod(shape[1:]))) * std."""
    import torch

    seed = int(ref["meta.input_seed"])
    out = []
    for name, shape, std in (("parity.vit_b.embeddings", (1, 256, 64, 64), float(ref["meta.embeddings_std"])),
                             ("parity.vit_b.early", (1, 64, 64, 768), float(ref["meta.early_std"]))):
        scale = np.float32(math.sqrt(math.prod(shape[1:])) * std)
        out.append(torch.from_numpy(seeded_array(name, shape, seed) * scale))
    return out


def parity_prompt(ref: dict, case: str) -> dict:
    """Decoder keyword arguments of a parity file's prompt case ("box", "points" or "box_points"): ``boxes``
    (1, 4) as x0, y0, x1, y1 and/or ``points`` ((1, N, 2) x/y coordinates, (1, N) labels), model input frame."""
    import torch

    kw = {}
    if "box" in case:
        kw["boxes"] = torch.from_numpy(np.asarray(ref["meta.box"], dtype=np.float32)[None])
    if "points" in case:
        kw["points"] = (torch.from_numpy(ref[f"prompt.{case}.coords"])[None],
                        torch.from_numpy(ref[f"prompt.{case}.labels"])[None])
    return kw
