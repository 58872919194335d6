"""Writing masks into segments the way the Segment Editor does, and the preview segmentation.

:class:`SegmentWriter` takes ``(K, J, I)`` masks on the source volume's voxel grid, builds modifier labelmaps on
the segmentation's reference geometry (the grid the Segment Editor edits on: the volume's own, an oversampled
one, or another volume's) and hands them to one of the accesses of :mod:`.edit_access` (the effect's
editor, Slicer's segment editor logic, or the Slicer 5.8 fallback), grouping the modifications of one user
action into one undo step. :class:`PreviewSegmentation` shows a result before it is applied.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import volumes
from .edit_access import (ADD, EDITOR_SINGLETON_TAG, MODES, REMOVE, SET, EditorLogicAccess, EffectAccess,  # noqa: F401
                          FallbackAccess, SegmentEditError, copy_masking_settings, editor_access,
                          find_segment_editor_node)

BINARY_LABELMAP = "Binary labelmap"
PREVIEW_NAME = "RobustMedSAM preview"
PREVIEW_ATTRIBUTE = "RobustMedSAM.Preview"

log = logging.getLogger(__name__)


def ensure_labelmap_source(segmentation_node) -> None:
    """Make sure segments are edited as binary labelmaps (an empty segmentation is switched; a segmentation
    holding e.g. closed surfaces must be converted by the user, as the Segment Editor asks)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() == BINARY_LABELMAP:
        return
    if segmentation.GetNumberOfSegments() == 0:
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
        return
    raise SegmentEditError(
        f"{segmentation_node.GetName()!r} stores {segmentation.GetSourceRepresentationName()!r} segments; make "
        "'Binary labelmap' its source representation first (Segmentations module, Representations section)")


# ------------------------------------------------------------------------------------------ writer
class SegmentWriter:
    """Masks on the source volume's voxel grid -> segment modifications through an access object.

    Every public method is one user action: it saves one undo state first (``undo=False`` to group several
    calls under an earlier :meth:`begin`), then modifies. Modifier labelmaps are built where Slicer expects
    them, on the segmentation's reference geometry (``access.reference_geometry()``, in the segmentation
    node's local frame, parent transforms handled, linear only): the mask is resampled onto it by nearest
    neighbour with Slicer's resampler (an exact copy when that geometry is the volume's grid) and cropped
    to the changed region. :meth:`read` gives a segment back on the volume's grid.
    """

    def __init__(self, access, segmentation_node, volume_node) -> None:
        self.access = access
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        self.shape = volumes.shape_of(volume_node)
        self.matrix = volumes.ijk_to_segmentation(volume_node, segmentation_node)
        ensure_labelmap_source(segmentation_node)

    # segments ------------------------------------------------------------------------------------
    def ensure_segment(self, name: str, color: Optional[Sequence[float]] = None, replace: bool = True) -> str:
        """ID of the segment called ``name`` (created if missing, or always new when ``replace`` is False)."""
        segmentation = self.segmentation_node.GetSegmentation()
        if replace:
            sid = segmentation.GetSegmentIdBySegmentName(name)
            if sid:
                return sid
        sid = segmentation.AddEmptySegment("", name, list(color) if color is not None else None) \
            if color is not None else segmentation.AddEmptySegment("", name)
        if not sid:
            raise SegmentEditError(f"could not add segment {name!r} (segmentation geometry not set?)")
        return sid

    def begin(self) -> None:
        """Save one undo state for the modifications that follow (each method does this by default)."""
        self.access.save_state_for_undo()

    def _check(self, segment_id: str) -> None:
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise SegmentEditError(f"segment {segment_id!r} is not in {self.segmentation_node.GetName()!r}")

    def _full(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != self.shape:
            raise SegmentEditError(f"mask of shape {mask.shape} does not match the volume {self.shape}")
        return mask

    # modifier labelmaps -------------------------------------------------------------------------
    def _modifier(self, mask: np.ndarray, geometry, extent: Optional[volumes.Extent] = None, whole: bool = False):
        """``mask`` ``(K, J, I)`` (volume grid) as a labelmap on the reference ``geometry``
        ``(ijk_to_frame, extent)``; ``extent`` (volume voxels, default: the mask's bounding box) bounds what
        it covers, ``whole`` covers the full reference extent (as the editor's default modifier labelmap).
        None if nothing of ``extent`` falls inside the reference extent."""
        ref_matrix, ref_extent = geometry
        if extent is None:
            extent = volumes.mask_extent(mask)
        if whole:
            target = ref_extent
        elif extent is None:
            return None
        else:
            target = volumes.intersect_extents(volumes.extent_on_grid(extent, self.matrix, ref_matrix), ref_extent)
            if target is None:
                log.warning("RobustMedSAM: the result lies outside the reference geometry of %r; nothing written",
                            self.segmentation_node.GetName())
                return None
        return volumes.resample_onto(volumes.oriented_image(mask, self.matrix, extent), ref_matrix, target)

    # modifications --------------------------------------------------------------------------------
    def set_segment(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        """Replace the whole segment by ``mask`` ``(K, J, I)`` (masking and overwrite settings apply)."""
        self._check(segment_id)
        mask = self._full(mask)
        if undo:
            self.begin()
        # the full reference extent, like the editor's default modifier labelmap: with masking on, "set"
        # keeps the segment outside the editable area only within the modifier's extent
        modifier = self._modifier(mask, self.access.reference_geometry(), whole=True)
        self.access.modify(segment_id, modifier, SET)

    def add(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        self._modify(segment_id, mask, ADD, undo)

    def remove(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        self._modify(segment_id, mask, REMOVE, undo)

    def _modify(self, segment_id: str, mask: np.ndarray, mode: str, undo: bool) -> None:
        self._check(segment_id)
        mask = self._full(mask)
        if undo:
            self.begin()
        if mask.any():
            modifier = self._modifier(mask, self.access.reference_geometry())
            if modifier is not None:
                self.access.modify(segment_id, modifier, mode)

    def replace_slice(self, segment_id: str, axis: int, index: int, mask2d: np.ndarray, undo: bool = True) -> None:
        """Make the segment equal ``mask2d`` on slice ``index`` along array axis ``axis`` (0 = k, 1 = j,
        2 = i; rows/columns as in docs/coordinates.md) and leave every other slice alone: one undo step.
        On a reference geometry other than the volume's grid, "the slice" is the set of reference voxels
        whose nearest volume voxel lies on it."""
        self._check(segment_id)
        plane = np.zeros(self.shape, dtype=bool)
        sl = [slice(None)] * 3
        sl[axis] = index
        expected = plane[tuple(sl)].shape
        mask2d = np.asarray(mask2d).astype(bool)
        if mask2d.shape != expected:
            raise SegmentEditError(f"slice mask of shape {mask2d.shape} does not match the slice {expected}")
        if undo:
            self.begin()
        plane[tuple(sl)] = True
        extent = volumes.mask_extent(plane)
        geometry = self.access.reference_geometry()
        modifier = self._modifier(plane, geometry, extent)
        if modifier is None:
            return
        self.access.modify(segment_id, modifier, REMOVE)
        plane[tuple(sl)] = mask2d
        if mask2d.any():
            self.access.modify(segment_id, self._modifier(plane, geometry, extent), ADD)

    def read(self, segment_id: str) -> np.ndarray:
        """The segment as ``(K, J, I)`` bool on the volume's grid."""
        return volumes.segment_mask(self.segmentation_node, segment_id, self.volume_node)

    def can_undo(self) -> bool:
        return self.access.can_undo()

    def undo(self) -> bool:
        return self.access.undo()

    def close(self) -> None:
        """Release the access (its private segment editor node and undo states)."""
        close = getattr(self.access, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------------------ preview
class PreviewSegmentation:
    """A transient segmentation node ("RobustMedSAM preview", not saved with the scene) showing a result
    before it is applied; it follows the target segmentation's parent transform and the target segment's
    colour. Removing it never touches the target segmentation."""

    def __init__(self, scene, volume_node, target_segmentation_node=None, opacity: float = 0.6) -> None:
        self.scene = scene
        self.volume_node = volume_node
        self.target = target_segmentation_node
        self.opacity = opacity
        self.node = None
        self.segment_id = None

    def _ensure(self, color) -> None:
        import slicer

        if self.node is None or self.node.GetScene() is None:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(self.scene.GenerateUniqueName(PREVIEW_NAME))
            node.SetAttribute(PREVIEW_ATTRIBUTE, "1")
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            self.scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
            node.GetSegmentation().SetSourceRepresentationName(BINARY_LABELMAP)
            self.node = node
            self.segment_id = node.GetSegmentation().AddEmptySegment("preview", "preview")
            display = node.GetDisplayNode()
            if display is not None:
                display.SetOpacity2DFill(self.opacity)
                display.SetOpacity2DOutline(1.0)
                display.SetOpacity3D(self.opacity)
        if self.target is not None:
            parent = self.target.GetParentTransformNode()
            self.node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
        if color is not None:
            self.node.GetSegmentation().GetSegment(self.segment_id).SetColor(*[float(c) for c in color[:3]])

    def show(self, mask: np.ndarray, color=None, extent=None) -> None:
        """Show ``mask`` ``(K, J, I)`` (``extent`` limits the stored region, e.g. one slice)."""
        import slicer

        self._ensure(color)
        matrix = (volumes.ijk_to_segmentation(self.volume_node, self.target) if self.target is not None
                  else volumes.ijk_to_ras(self.volume_node))
        image = volumes.oriented_image(mask, matrix, extent)
        Logic = slicer.vtkSlicerSegmentationsModuleLogic
        Logic.SetBinaryLabelmapToSegment(image, self.node, self.segment_id, Logic.MODE_REPLACE)
        self.node.Modified()

    def show_slice(self, shape: Sequence[int], axis: int, index: int, mask2d: Optional[np.ndarray], color=None) -> None:
        """Show a 2D mask on one slice (or clear it when ``mask2d`` is None)."""
        full = np.zeros(tuple(shape), dtype=bool)
        sl = [slice(None)] * 3
        sl[axis] = index
        if mask2d is not None:
            full[tuple(sl)] = mask2d
        plane = np.zeros(tuple(shape), dtype=bool)
        plane[tuple(sl)] = True
        self.show(full, color, volumes.mask_extent(plane))

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        if self.node is None or self.node.GetScene() is None:
            return np.zeros(tuple(shape), dtype=bool)
        return volumes.segment_mask(self.node, self.segment_id, self.volume_node)

    @property
    def visible(self) -> bool:
        return self.node is not None and self.node.GetScene() is not None

    def remove(self) -> None:
        if self.node is not None and self.node.GetScene() is not None:
            self.scene.RemoveNode(self.node)
        self.node = None
        self.segment_id = None


def remove_stale_previews(scene) -> int:
    """Remove preview nodes left behind (e.g. by an effect that was closed abruptly); returns how many."""
    stale = [scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
             for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    stale = [node for node in stale if node.GetAttribute(PREVIEW_ATTRIBUTE) == "1"]
    for node in stale:
        scene.RemoveNode(node)
    return len(stale)


def segment_ids(segmentation_node) -> List[str]:
    s = segmentation_node.GetSegmentation()
    return [s.GetNthSegmentID(n) for n in range(s.GetNumberOfSegments())]


def snapshot(segmentation_node, volume_node) -> Dict[str, Tuple[str, Tuple[float, ...], np.ndarray]]:
    """``{segment id: (name, colour, (K, J, I) mask)}``: to prove a segmentation is unchanged."""
    out = {}
    for sid in segment_ids(segmentation_node):
        seg = segmentation_node.GetSegmentation().GetSegment(sid)
        out[sid] = (seg.GetName(), tuple(seg.GetColor()), volumes.segment_mask(segmentation_node, sid, volume_node))
    return out


def same_snapshot(a, b) -> bool:
    if list(a) != list(b):
        return False
    return all(a[k][0] == b[k][0] and np.allclose(a[k][1], b[k][1]) and np.array_equal(a[k][2], b[k][2]) for k in a)
