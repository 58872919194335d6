"""Scalar volume nodes <-> engine volumes, and masks <-> ``vtkOrientedImageData``, with exact geometry.

Conventions (docs/coordinates.md): arrays are ``(K, J, I)`` (``slicer.util.arrayFromVolume`` order);
``Volume.ijk_to_lps = diag(-1, -1, 1, 1) @ IJKToRAS``. A node's *local* frame is the RAS frame its own matrix
maps to; its *world* frame adds the linear parent transforms. Prompts and masks are computed on the source
volume's voxel grid, so local geometry is what the engine sees; world geometry is used only to move
markups and labelmaps between nodes that sit under different transforms. Non-linear transforms are refused
(harden them first).

A segmentation stores its labelmaps on its *reference geometry* (a voxel grid in the segmentation node's
local frame: the source volume's grid, an oversampled one ("Specify geometry"), or another volume's grid);
the Segment Editor edits on that grid. :func:`reference_geometry` finds it as the editor does, and
:func:`resample_onto` moves a labelmap onto it with Slicer's own nearest-neighbour resampler.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from RobustMedSAMLib.volume_io import LPS_TO_RAS, Volume

Extent = Tuple[int, int, int, int, int, int]


class GeometryError(ValueError):
    """The nodes' geometry cannot be used (non-linear transform, vector volume, no image data...)."""


# ------------------------------------------------------------------------------------------- matrices
def to_numpy(vtk_matrix) -> np.ndarray:
    """``vtkMatrix4x4`` -> 4 x 4 float64 array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def to_vtk(matrix: np.ndarray):
    """4 x 4 array -> ``vtkMatrix4x4``."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's own ``IJKToRAS`` (local frame, parent transforms not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return to_numpy(m)


def local_to_world(node) -> np.ndarray:
    """4 x 4 matrix from ``node``'s local frame to world RAS (identity without parent transform)."""
    import slicer
    import vtk

    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, m):
        raise GeometryError(f"{node.GetName()!r} is under a non-linear transform; harden the transform first "
                            "(Data module: right-click the transform, 'Harden transform')")
    return to_numpy(m)


def local_to_local(source_node, target_node) -> np.ndarray:
    """4 x 4 matrix taking ``source_node``-local coordinates to ``target_node``-local coordinates."""
    return np.linalg.inv(local_to_world(target_node)) @ local_to_world(source_node)


# ------------------------------------------------------------------------------------------- volumes
def volume_array(volume_node) -> np.ndarray:
    """The ``(K, J, I)`` voxel array of a scalar volume node (a view of its image data)."""
    import slicer.util

    if volume_node is None or volume_node.GetImageData() is None:
        raise GeometryError("the volume has no image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"{volume_node.GetName()!r} has {volume_node.GetImageData().GetNumberOfScalarComponents()} "
                            "components per voxel; convert it to a scalar volume first (Vector to Scalar Volume module)")
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim != 3:
        raise GeometryError(f"expected a 3D volume, got an array of shape {array.shape}")
    return array


def volume_from_node(volume_node, copy: bool = False) -> Volume:
    """Engine :class:`Volume` of a scalar volume node: ``array`` ``(K, J, I)`` and ``ijk_to_lps`` from the
    node's ``IJKToRAS`` (local frame). ``copy`` detaches the array from the node's memory."""
    array = volume_array(volume_node)
    return Volume(np.array(array, copy=True) if copy else array, LPS_TO_RAS @ ijk_to_ras(volume_node))


def shape_of(volume_node) -> Tuple[int, int, int]:
    """``(K, J, I)`` of a volume node."""
    i, j, k = volume_node.GetImageData().GetDimensions()
    return (k, j, i)


# ------------------------------------------------------------------------------------ oriented images
def mask_extent(mask: np.ndarray) -> Optional[Extent]:
    """Voxel extent ``(i0, i1, j0, j1, k0, k1)`` (inclusive) of the non-zero voxels of a ``(K, J, I)`` mask."""
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(v.size == 0 for v in nz):
        return None
    (k0, k1), (j0, j1), (i0, i1) = ((v[0], v[-1]) for v in nz)
    return (int(i0), int(i1), int(j0), int(j1), int(k0), int(k1))


def oriented_image(mask: np.ndarray, ijk_to_frame: np.ndarray, extent: Optional[Extent] = None,
                   value: int = 1):
    """A ``vtkOrientedImageData`` (unsigned char) holding ``mask`` ``(K, J, I)`` on the grid whose voxel
    indices map to the target frame by ``ijk_to_frame``; only ``extent`` (default: the mask's non-zero
    bounding box, or a single voxel if empty) is stored, voxel indices unchanged."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise GeometryError(f"a mask must be (K, J, I), got shape {mask.shape}")
    if extent is None:
        extent = mask_extent(mask) or (0, 0, 0, 0, 0, 0)
    i0, i1, j0, j1, k0, k1 = (int(v) for v in extent)
    block = np.ascontiguousarray((mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] != 0).astype(np.uint8) * np.uint8(value))
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = block.ravel()
    image.SetImageToWorldMatrix(to_vtk(ijk_to_frame))
    return image


def image_to_frame(image) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return to_numpy(m)


def array_on_grid(image, ijk_to_frame: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Values of an oriented image on the grid ``shape`` ``(K, J, I)`` / ``ijk_to_frame`` (nearest
    neighbour; zero outside the image). Same grid: exact voxel copy, no resampling."""
    import slicer
    from vtk.util import numpy_support

    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, dtype=np.uint8)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return out
    ext = image.GetExtent()
    if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5]:
        return out
    if not np.allclose(image_to_frame(image), ijk_to_frame, atol=1e-6, rtol=1e-9):
        ref = slicer.vtkOrientedImageData()
        ref.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
        ref.SetImageToWorldMatrix(to_vtk(ijk_to_frame))
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                image, ref, resampled, False, False):
            raise GeometryError("resampling the segment onto the volume's grid failed")
        image = resampled
        ext = image.GetExtent()
        if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5]:
            return out
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    values = values.reshape(dims)
    lo = np.array([ext[4], ext[2], ext[0]])
    hi = np.array([ext[5], ext[3], ext[1]]) + 1
    a = np.maximum(lo, 0)
    b = np.minimum(hi, shape)
    if np.any(b <= a):
        return out
    out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = values[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1],
                                                  a[2] - lo[2]:b[2] - lo[2]]
    return out


def ijk_to_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """4 x 4 matrix from the volume's voxel indices to the segmentation node's local frame (the frame of its
    labelmaps and of Segment Editor modifier labelmaps)."""
    return local_to_local(volume_node, segmentation_node) @ ijk_to_ras(volume_node)


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """Segment ``segment_id`` as a ``(K, J, I)`` bool array on ``volume_node``'s voxel grid."""
    return segment_mask_on_grid(segmentation_node, segment_id,
                                ijk_to_segmentation(volume_node, segmentation_node), shape_of(volume_node))


def segment_mask_on_grid(segmentation_node, segment_id: str, ijk_to_frame: np.ndarray, shape) -> np.ndarray:
    """Segment ``segment_id`` on any grid given in the segmentation node's local frame. Segments may share a
    labelmap layer, so the layer is compared with the segment's label value."""
    import slicer

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segment {segment_id!r} is not in {segmentation_node.GetName()!r}")
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image, False):
        return np.zeros(tuple(shape), dtype=bool)
    return array_on_grid(image, ijk_to_frame, shape) == segment.GetLabelValue()


# ------------------------------------------------------------------------------- reference geometry
def extent_is_empty(extent: Sequence[int]) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def intersect_extents(a: Sequence[int], b: Sequence[int]) -> Optional[Extent]:
    """Common part of two voxel extents ``(i0, i1, j0, j1, k0, k1)``, or None."""
    out = tuple(int(max(a[n], b[n])) if n % 2 == 0 else int(min(a[n], b[n])) for n in range(6))
    return None if extent_is_empty(out) else out


def extent_on_grid(extent: Sequence[int], from_ijk_to_frame: np.ndarray, to_ijk_to_frame: np.ndarray) -> Extent:
    """Voxel extent on the grid ``to_ijk_to_frame`` covering the voxels ``extent`` of the grid
    ``from_ijk_to_frame`` (both grids in one frame): every target voxel whose centre lies in one of those
    voxels (their faces at index +-0.5) is inside it."""
    i0, i1, j0, j1, k0, k1 = extent
    corners = np.array([[i, j, k, 1.0] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5)
                        for k in (k0 - 0.5, k1 + 0.5)])
    mapped = (np.linalg.inv(to_ijk_to_frame) @ from_ijk_to_frame @ corners.T)[:3]
    lo = np.ceil(mapped.min(axis=1) - 1e-6).astype(int)
    hi = np.floor(mapped.max(axis=1) + 1e-6).astype(int)
    return (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))


def geometry_from_string(text: str) -> Tuple[np.ndarray, Extent]:
    """``(ijk_to_frame, extent)`` of a serialized image geometry (``vtkSegmentationConverter`` format)."""
    import slicer

    image = slicer.vtkOrientedImageData()
    if not text or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False):
        raise GeometryError(f"not an image geometry: {text!r}")
    return image_to_frame(image), tuple(int(v) for v in image.GetExtent())


def _reference_string_from_segmentation(segmentation) -> str:
    """The Segment Editor's reference geometry of a segmentation (Slicer's
    ``GetReferenceImageGeometryStringFromSegmentation``, 5.10 and later; the same rule in Python for 5.8):
    the "Reference image geometry" conversion parameter, its extent grown to hold every segment; without
    it, the common geometry of the segments' labelmaps; "" if neither exists."""
    import slicer

    logic = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
    if logic is not None and hasattr(logic, "GetReferenceImageGeometryStringFromSegmentation"):
        return logic.GetReferenceImageGeometryStringFromSegmentation(segmentation)
    return _reference_string_python(segmentation)


def _reference_string_python(segmentation) -> str:
    import slicer

    Converter = slicer.vtkSegmentationConverter
    text = segmentation.GetConversionParameter(Converter.GetReferenceImageGeometryParameterName())
    if text:
        image = slicer.vtkOrientedImageData()
        Converter.DeserializeImageGeometry(text, image, False)
        segments_extent = [0, -1, 0, -1, 0, -1]
        segmentation.DetermineCommonLabelmapExtent(segments_extent, image, None)  # None: all segments
        if not extent_is_empty(segments_extent):
            own = image.GetExtent()
            image.SetExtent(*[min(own[n], segments_extent[n]) if n % 2 == 0 else max(own[n], segments_extent[n])
                              for n in range(6)])
            text = Converter.SerializeImageGeometry(image)
        return text
    if segmentation.ContainsRepresentation(Converter.GetSegmentationBinaryLabelmapRepresentationName()):
        return segmentation.DetermineCommonLabelmapGeometry(segmentation.EXTENT_UNION_OF_SEGMENTS, None)
    return ""


def reference_geometry(segmentation_node, volume_node=None) -> Tuple[np.ndarray, Extent]:
    """``(ijk_to_frame, extent)`` of the grid the Segment Editor edits ``segmentation_node`` on (its default
    modifier labelmap), in the segmentation node's local frame. If the segmentation has none yet, the
    volume's geometry becomes its reference geometry, as the Segment Editor does with its source volume."""
    segmentation = segmentation_node.GetSegmentation()
    text = _reference_string_from_segmentation(segmentation)
    if not text and volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        text = _reference_string_from_segmentation(segmentation)
    if not text:
        raise GeometryError(f"{segmentation_node.GetName()!r} has no reference geometry; select a source volume "
                            "for it (Segment Editor) or set one (Segmentations module, 'Specify geometry')")
    return geometry_from_string(text)


def resample_onto(image, ijk_to_frame: np.ndarray, extent: Sequence[int], linear: bool = False,
                  transform=None, background: float = 0.0):
    """``image`` (a ``vtkOrientedImageData``) resampled onto the grid ``ijk_to_frame`` over ``extent`` with
    Slicer's ``vtkOrientedImageDataResample`` (nearest neighbour unless ``linear``; ``transform``: an
    optional ``vtkAbstractTransform`` from the image's frame to the grid's; zero/``background`` outside);
    a plain copy when the grids match. None if ``extent`` is empty."""
    import slicer

    if extent_is_empty(extent):
        return None
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*[int(v) for v in extent])
    reference.SetImageToWorldMatrix(to_vtk(ijk_to_frame))
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, out, bool(linear), False, transform, float(background)):
        raise GeometryError("Slicer could not resample the labelmap onto the segmentation's geometry")
    return out


def volume_on_grid(volume_node, segmentation_node, ijk_to_frame: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """The volume's voxels on a grid of the segmentation's local frame, ``(K, J, I)`` over ``extent``, as
    the Segment Editor aligns its source volume (linear interpolation in the volume's own scalar type,
    the volume's background value outside it, parent transforms applied)."""
    import slicer
    from vtk.util import numpy_support

    source = slicer.vtkOrientedImageData()
    source.ShallowCopy(volume_node.GetImageData())
    source.SetGeometryFromImageToWorldMatrix(to_vtk(ijk_to_ras(volume_node)))
    transform = None
    if volume_node.GetParentTransformNode() is not None or segmentation_node.GetParentTransformNode() is not None:
        import vtk

        local_to_world(volume_node), local_to_world(segmentation_node)  # refuse non-linear transforms clearly
        transform = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), transform)
    background = volume_node.GetImageBackgroundScalarComponentAsDouble(0)
    aligned = resample_onto(source, ijk_to_frame, extent, linear=True, transform=transform, background=background)
    ext = aligned.GetExtent()
    values = numpy_support.vtk_to_numpy(aligned.GetPointData().GetScalars())
    return values.reshape(ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
