"""Writing masks into segments the way the Segment Editor does, and the preview segmentation.

Three ways to reach Slicer's editing machinery, chosen by :func:`editor_access` (all expose the same small
interface: ``save_state_for_undo()``, ``modify(segment_id, labelmap, mode)``, ``can_undo()``, ``undo()``):

* :class:`EffectAccess` -- inside a Segment Editor effect: ``scriptedEffect.saveStateForUndo()`` and
  ``scriptedEffect.modifySegmentByLabelmap(...)``, i.e. the editor widget's own undo history and its
  masking settings (editable area, editable intensity range, overwrite other segments). This is what the
  two effects use in the Slicer application (5.8 and later).
* :class:`EditorLogicAccess` -- ``slicer.vtkSlicerSegmentEditorLogic`` (Slicer 5.10 and later, and the
  slicer-core wheel): the same C++ code the editor widget runs (``ModifySegmentByLabelmap``,
  ``SaveStateForUndo``, ``Undo``) on a segment editor node that carries the masking settings, with its own
  undo history. Used by the module panel and batch mode.
* :class:`FallbackAccess` -- Slicer 5.8 without a segment editor widget (batch mode): the edit mask from
  ``vtkMRMLSegmentationNode.GenerateEditMask`` (Slicer's own), the editable intensity range and the
  overwrite rule applied in numpy with the same semantics as ``ModifySegmentByLabelmap``, written with
  ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``; undo via ``vtkSegmentationHistory``.

:class:`SegmentWriter` builds the modifier labelmaps from ``(K, J, I)`` masks on the source volume's grid
and groups the modifications of one user action into one undo step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import volumes

SET, ADD, REMOVE = "set", "add", "remove"
MODES = (SET, ADD, REMOVE)
BINARY_LABELMAP = "Binary labelmap"
EDITOR_SINGLETON_TAG = "SegmentEditor"  # the Segment Editor module's parameter node
PREVIEW_NAME = "RobustMedSAM preview"
PREVIEW_ATTRIBUTE = "RobustMedSAM.Preview"


class SegmentEditError(RuntimeError):
    """A segment cannot be modified (no such segment, not a labelmap segmentation...)."""


def find_segment_editor_node(scene):
    """The Segment Editor module's parameter node (its masking/overwrite settings), or None."""
    node = scene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode") if scene else None
    if node is None and scene is not None:
        node = scene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
    return node


def copy_masking_settings(source, target) -> None:
    """Copy editable area, editable intensity range and overwrite mode between segment editor nodes."""
    if source is None or target is None:
        return
    target.SetMaskMode(source.GetMaskMode())
    target.SetMaskSegmentID(source.GetMaskSegmentID())
    target.SetOverwriteMode(source.GetOverwriteMode())
    target.SetSourceVolumeIntensityMask(source.GetSourceVolumeIntensityMask())
    target.SetSourceVolumeIntensityMaskRange(*source.GetSourceVolumeIntensityMaskRange())


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


# ---------------------------------------------------------------------------------------- accesses
class EffectAccess:
    """Edits through a Segment Editor effect (``self.scriptedEffect``): the editor's undo and masking."""

    def __init__(self, scripted_effect, segmentation_node) -> None:
        self.effect = scripted_effect
        self.segmentation_node = segmentation_node

    def save_state_for_undo(self) -> None:
        self.effect.saveStateForUndo()

    def modify(self, segment_id: str, labelmap, mode: str) -> None:
        import slicer

        enum = {SET: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
                ADD: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                REMOVE: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove}[mode]
        self.effect.modifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, enum)

    def can_undo(self) -> bool:
        return False  # the Segment Editor's Undo button owns this history

    def undo(self) -> bool:
        return False


class EditorLogicAccess:
    """Edits through ``slicer.vtkSlicerSegmentEditorLogic`` (Slicer >= 5.10): Slicer's own masking, overwrite
    and undo code. ``editor_node``: a segment editor node carrying the masking settings (a private one is
    created if omitted; pass ``settings_from`` to copy the Segment Editor module's settings into it)."""

    def __init__(self, scene, segmentation_node, source_volume_node, editor_node=None, settings_from=None,
                 max_undo_states: int = 10) -> None:
        import slicer

        self.scene = scene
        self.segmentation_node = segmentation_node
        self.owns_editor_node = editor_node is None
        if editor_node is None:
            editor_node = slicer.vtkMRMLSegmentEditorNode()
            editor_node.SetName(scene.GenerateUniqueName("RobustMedSAM editor"))
            editor_node.SetHideFromEditors(True)
            editor_node.SetSaveWithScene(False)
            scene.AddNode(editor_node)
            editor_node.SetOverwriteMode(editor_node.OverwriteNone)  # without user settings: keep overlaps
            copy_masking_settings(settings_from, editor_node)
        self.editor_node = editor_node
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(editor_node)
        self.logic.SetMaximumNumberOfUndoStates(max_undo_states)
        editor_node.SetAndObserveSegmentationNode(segmentation_node)
        editor_node.SetAndObserveSourceVolumeNode(source_volume_node)

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, segment_id: str, labelmap, mode: str) -> None:
        L = type(self.logic)
        enum = {SET: L.ModificationModeSet, ADD: L.ModificationModeAdd, REMOVE: L.ModificationModeRemove}[mode]
        # the edit mask ("inside all segments"...) excludes the *selected* segment: select the target
        previous = self.editor_node.GetSelectedSegmentID()
        self.editor_node.SetSelectedSegmentID(segment_id)
        try:
            self.logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, enum, True, False)
        finally:
            self.editor_node.SetSelectedSegmentID(previous)

    def can_undo(self) -> bool:
        return bool(self.logic.CanUndo())

    def undo(self) -> bool:
        if not self.logic.CanUndo():
            return False
        self.logic.Undo()
        return True

    def close(self) -> None:
        if self.owns_editor_node and self.editor_node.GetScene() is not None:
            self.scene.RemoveNode(self.editor_node)


class FallbackAccess:
    """Slicer 5.8 batch mode (no ``vtkSlicerSegmentEditorLogic``): same semantics as
    ``ModifySegmentByLabelmap`` computed in numpy on the modifier labelmap's grid (see module docstring)."""

    def __init__(self, scene, segmentation_node, source_volume_node, editor_node=None, settings_from=None) -> None:
        import slicer

        self.scene = scene
        self.segmentation_node = segmentation_node
        self.volume_node = source_volume_node
        self.editor_node = editor_node or slicer.vtkMRMLSegmentEditorNode()  # settings holder only
        if editor_node is None:
            self.editor_node.SetOverwriteMode(self.editor_node.OverwriteNone)  # without user settings: keep overlaps
            copy_masking_settings(settings_from, self.editor_node)
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self.history.SetMaximumNumberOfStates(10)

    def save_state_for_undo(self) -> None:
        self.history.SaveState()

    def can_undo(self) -> bool:
        return bool(self.history.IsRestorePreviousStateAvailable())

    def undo(self) -> bool:
        if not self.history.IsRestorePreviousStateAvailable():
            return False
        return bool(self.history.RestorePreviousState())

    def modify(self, segment_id: str, labelmap, mode: str) -> None:
        import slicer

        node, editor = self.segmentation_node, self.editor_node
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(segment_id) is None:
            raise SegmentEditError(f"segment {segment_id!r} is not in {node.GetName()!r}")
        # work on the modifier's own grid (the source volume's grid in SegmentWriter)
        matrix = volumes.image_to_frame(labelmap)
        ext = labelmap.GetExtent()
        full = self.volume_node.GetImageData().GetExtent()
        box = [min(ext[0], full[0]), max(ext[1], full[1]), min(ext[2], full[2]), max(ext[3], full[3]),
               min(ext[4], full[4]), max(ext[5], full[5])]
        offset = np.array([box[4], box[2], box[0]])
        shape = (box[5] - box[4] + 1, box[3] - box[2] + 1, box[1] - box[0] + 1)
        grid = matrix.copy()
        grid[:3, 3] = matrix[:3, :3] @ np.array([box[0], box[2], box[4]], dtype=float) + matrix[:3, 3]

        def on_grid(img) -> np.ndarray:
            return volumes.array_on_grid(img, grid, shape) != 0

        def segment_on_grid(sid: str) -> np.ndarray:
            return volumes.segment_mask_on_grid(node, sid, grid, shape)

        modifier = on_grid(labelmap)
        current = segment_on_grid(segment_id)
        blocked = np.zeros(shape, dtype=bool)
        if editor.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            ref = slicer.vtkOrientedImageData()
            ref.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
            ref.SetImageToWorldMatrix(volumes.to_vtk(grid))
            edit_mask = slicer.vtkOrientedImageData()
            if not node.GenerateEditMask(edit_mask, editor.GetMaskMode(), ref, segment_id,
                                         editor.GetMaskSegmentID() or ""):
                raise SegmentEditError("Slicer could not compute the editable area")
            blocked |= on_grid(edit_mask)
        if editor.GetSourceVolumeIntensityMask():
            lo, hi = editor.GetSourceVolumeIntensityMaskRange()
            vals = volumes.volume_array(self.volume_node)
            inside = np.zeros(shape, dtype=bool)
            k0, j0, i0 = -offset
            inside[k0:k0 + vals.shape[0], j0:j0 + vals.shape[1], i0:i0 + vals.shape[2]] = (vals >= lo) & (vals <= hi)
            blocked |= ~inside
        if mode == REMOVE and editor.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment:
            blocked &= ~current  # erasing inside a single segment may always remove the current segment
        effective = modifier & ~blocked
        if mode == SET:
            effective = effective | (current & blocked)  # the segment outside the editable area is kept
            new = effective
        elif mode == ADD:
            new = current | effective
        else:
            new = current & ~effective
        if mode in (SET, ADD):
            display = node.GetDisplayNode()
            others = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
            others = [s for s in others if s != segment_id]
            overwrite = editor.GetOverwriteMode()
            if overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteNone:
                others = []
            elif overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments:
                others = [s for s in others if display is None or display.GetSegmentVisibility(s)]
            for other in others:
                mask = segment_on_grid(other)
                if (mask & effective).any():
                    self._write(other, mask & ~effective, grid)
        self._write(segment_id, new, grid)
        mask_segment = editor.GetMaskSegmentID()
        if (mode == REMOVE and editor.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
                and mask_segment and mask_segment != segment_id and segmentation.GetSegment(mask_segment)
                and effective.any()):
            # as Slicer: erasing inside one segment gives the erased area to that segment (splitting)
            self._write(mask_segment, segment_on_grid(mask_segment) | effective, grid)

    def _write(self, segment_id: str, mask: np.ndarray, grid: np.ndarray) -> None:
        import slicer

        image = volumes.oriented_image(mask, grid)
        Logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not Logic.SetBinaryLabelmapToSegment(image, self.segmentation_node, segment_id, Logic.MODE_REPLACE):
            raise SegmentEditError(f"writing segment {segment_id!r} failed")

    def close(self) -> None:
        pass


def editor_access(scene, segmentation_node, source_volume_node, editor_node=None, settings_from=None,
                  prefer_fallback: bool = False):
    """:class:`EditorLogicAccess` where ``vtkSlicerSegmentEditorLogic`` exists (Slicer >= 5.10, slicer-core),
    else :class:`FallbackAccess`. ``settings_from``: a segment editor node whose masking settings to copy
    (default: the Segment Editor module's node, if any; without one: editable everywhere, other segments
    not overwritten, so overlapping objects are all kept as the command line writes them)."""
    import slicer

    if settings_from is None and editor_node is None:
        settings_from = find_segment_editor_node(scene)
    if hasattr(slicer, "vtkSlicerSegmentEditorLogic") and not prefer_fallback:
        return EditorLogicAccess(scene, segmentation_node, source_volume_node, editor_node, settings_from)
    return FallbackAccess(scene, segmentation_node, source_volume_node, editor_node, settings_from)


# ------------------------------------------------------------------------------------------ writer
class SegmentWriter:
    """Masks on the source volume's voxel grid -> segment modifications through an access object.

    Every public method is one user action: it saves one undo state first (``undo=False`` to group several
    calls under an earlier :meth:`begin`), then modifies. Modifier labelmaps are cropped to the changed
    region and expressed in the segmentation node's local frame (parent transforms handled, linear only).
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

    # modifications --------------------------------------------------------------------------------
    def set_segment(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        """Replace the whole segment by ``mask`` ``(K, J, I)`` (masking and overwrite settings apply)."""
        self._check(segment_id)
        mask = self._full(mask)
        if undo:
            self.begin()
        # full extent, like the editor's default modifier labelmap: with masking on, "set" keeps the segment
        # outside the editable area only within the modifier's extent
        full = (0, self.shape[2] - 1, 0, self.shape[1] - 1, 0, self.shape[0] - 1)
        self.access.modify(segment_id, volumes.oriented_image(mask, self.matrix, full), SET)

    def add(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        self._check(segment_id)
        mask = self._full(mask)
        if undo:
            self.begin()
        if mask.any():
            self.access.modify(segment_id, volumes.oriented_image(mask, self.matrix), ADD)

    def remove(self, segment_id: str, mask: np.ndarray, undo: bool = True) -> None:
        self._check(segment_id)
        mask = self._full(mask)
        if undo:
            self.begin()
        if mask.any():
            self.access.modify(segment_id, volumes.oriented_image(mask, self.matrix), REMOVE)

    def replace_slice(self, segment_id: str, axis: int, index: int, mask2d: np.ndarray, undo: bool = True) -> None:
        """Make the segment equal ``mask2d`` on slice ``index`` along array axis ``axis`` (0 = k, 1 = j,
        2 = i; rows/columns as in docs/coordinates.md) and leave every other slice alone: one undo step."""
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
        self.access.modify(segment_id, volumes.oriented_image(plane, self.matrix, extent), REMOVE)
        plane[tuple(sl)] = mask2d
        if mask2d.any():
            self.access.modify(segment_id, volumes.oriented_image(plane, self.matrix, extent), ADD)

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
