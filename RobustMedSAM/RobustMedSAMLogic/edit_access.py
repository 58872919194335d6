"""The three ways to reach Slicer's segment editing machinery, and the masking settings they apply.

Chosen by :func:`editor_access`; all expose the same small interface: ``save_state_for_undo()``,
``reference_geometry()`` (the grid modifier labelmaps must be on), ``modify(segment_id, labelmap, mode)``,
``can_undo()``, ``undo()``:

* :class:`EffectAccess` -- inside a Segment Editor effect: ``scriptedEffect.saveStateForUndo()``,
  ``scriptedEffect.defaultModifierLabelmap()`` (its geometry) and ``scriptedEffect.modifySegmentByLabelmap``,
  i.e. the editor widget's own undo history and its masking settings (editable area, editable intensity
  range, overwrite other segments). This is what the two effects use in the Slicer application (5.8 on).
* :class:`EditorLogicAccess` -- ``slicer.vtkSlicerSegmentEditorLogic`` (Slicer 5.10 and later, and the
  slicer-core wheel): the same C++ code the editor widget runs (``ModifySegmentByLabelmap``,
  ``SaveStateForUndo``, ``Undo``) on a segment editor node that carries the masking settings, with its own
  undo history. Used by the module panel and batch mode.
* :class:`FallbackAccess` -- Slicer 5.8 without a segment editor widget (batch mode): the edit mask from
  ``vtkMRMLSegmentationNode.GenerateEditMask`` (Slicer's own), the editable intensity range and the
  overwrite rule applied in numpy with the same semantics as ``ModifySegmentByLabelmap``, written with
  ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``; undo via ``vtkSegmentationHistory``.

Modifier labelmaps must lie on the segmentation's reference geometry (``reference_geometry()``): Slicer
skips the editable-area mask, refuses the editable intensity range and clears the wrong region on "set"
for any other grid. :class:`~.segments.SegmentWriter` builds them there.
"""
from __future__ import annotations

import logging
from typing import Tuple

import numpy as np

from . import volumes

SET, ADD, REMOVE = "set", "add", "remove"
MODES = (SET, ADD, REMOVE)
EDITOR_SINGLETON_TAG = "SegmentEditor"  # the Segment Editor module's parameter node

log = logging.getLogger(__name__)


class SegmentEditError(RuntimeError):
    """A segment cannot be modified (no such segment, not a labelmap segmentation...)."""


def find_segment_editor_node(scene):
    """The Segment Editor module's parameter node (its masking/overwrite settings), or None."""
    node = scene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode") if scene else None
    if node is None and scene is not None:
        node = scene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
    return node


def copy_masking_settings(source, target, segmentation_node=None) -> None:
    """Copy editable area, editable intensity range and overwrite mode between segment editor nodes.

    With ``segmentation_node`` (the segmentation ``target`` edits), only what exists there is copied:
    "inside a single segment" names a segment of ``source``'s segmentation; if that is another
    segmentation, or the segment is not in ``segmentation_node``, the editable area would be empty and
    nothing would be written, so the area becomes "everywhere" (logged); the other settings are kept.
    """
    if source is None or target is None:
        return
    import slicer

    mode, mask_segment = source.GetMaskMode(), source.GetMaskSegmentID()
    if mode == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment and segmentation_node is not None:
        own = source.GetSegmentationNode()
        exists = bool(mask_segment) and segmentation_node.GetSegmentation().GetSegment(mask_segment) is not None
        if not exists or (own is not None and own is not segmentation_node):
            where = own.GetName() if own is not None else "no segmentation"
            log.warning("RobustMedSAM: the Segment Editor's editable area 'inside segment %r' (of %r) does not exist "
                        "in %r: writing there with editable area 'everywhere' (intensity range and overwrite "
                        "settings kept)", mask_segment, where, segmentation_node.GetName())
            mode, mask_segment = slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere, None
    target.SetMaskMode(mode)
    target.SetMaskSegmentID(mask_segment)
    target.SetOverwriteMode(source.GetOverwriteMode())
    target.SetSourceVolumeIntensityMask(source.GetSourceVolumeIntensityMask())
    target.SetSourceVolumeIntensityMaskRange(*source.GetSourceVolumeIntensityMaskRange())


# ---------------------------------------------------------------------------------------- accesses
class EffectAccess:
    """Edits through a Segment Editor effect (``self.scriptedEffect``): the editor's undo and masking."""

    def __init__(self, scripted_effect, segmentation_node) -> None:
        self.effect = scripted_effect
        self.segmentation_node = segmentation_node

    def save_state_for_undo(self) -> None:
        self.effect.saveStateForUndo()

    def reference_geometry(self) -> Tuple[np.ndarray, volumes.Extent]:
        """The geometry of the editor's default modifier labelmap (the segmentation's reference geometry)."""
        labelmap = self.effect.defaultModifierLabelmap()
        if labelmap is None or volumes.extent_is_empty(labelmap.GetExtent()):
            raise SegmentEditError("the Segment Editor has no geometry for this segmentation; select a source volume")
        return volumes.image_to_frame(labelmap), tuple(int(v) for v in labelmap.GetExtent())

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
            copy_masking_settings(settings_from, editor_node, segmentation_node)
        self.editor_node = editor_node
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(editor_node)
        self.logic.SetMaximumNumberOfUndoStates(max_undo_states)
        editor_node.SetAndObserveSegmentationNode(segmentation_node)
        editor_node.SetAndObserveSourceVolumeNode(source_volume_node)

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def reference_geometry(self) -> Tuple[np.ndarray, volumes.Extent]:
        text = self.logic.GetReferenceImageGeometryString()
        if not text:
            raise SegmentEditError(f"{self.segmentation_node.GetName()!r} has no reference geometry")
        return volumes.geometry_from_string(text)

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
    ``ModifySegmentByLabelmap`` computed in numpy on the reference geometry (see module docstring)."""

    def __init__(self, scene, segmentation_node, source_volume_node, editor_node=None, settings_from=None) -> None:
        import slicer

        self.scene = scene
        self.segmentation_node = segmentation_node
        self.volume_node = source_volume_node
        self.editor_node = editor_node or slicer.vtkMRMLSegmentEditorNode()  # settings holder only
        if editor_node is None:
            self.editor_node.SetOverwriteMode(self.editor_node.OverwriteNone)  # without user settings: keep overlaps
            copy_masking_settings(settings_from, self.editor_node, segmentation_node)
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

    def reference_geometry(self) -> Tuple[np.ndarray, volumes.Extent]:
        return volumes.reference_geometry(self.segmentation_node, self.volume_node)

    def modify(self, segment_id: str, labelmap, mode: str) -> None:
        import slicer

        node, editor = self.segmentation_node, self.editor_node
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(segment_id) is None:
            raise SegmentEditError(f"segment {segment_id!r} is not in {node.GetName()!r}")
        ref_matrix, ref_extent = self.reference_geometry()
        matrix = volumes.image_to_frame(labelmap)
        if not np.allclose(matrix, ref_matrix, rtol=0, atol=1e-3):  # Slicer's geometry tolerance
            raise SegmentEditError("the modifier labelmap is not on the segmentation's reference geometry")
        # the grid: reference geometry over its extent (which holds every segment) and the modifier's
        ext = labelmap.GetExtent()
        box = [min(ext[n], ref_extent[n]) if n % 2 == 0 else max(ext[n], ref_extent[n]) for n in range(6)]
        shape = (box[5] - box[4] + 1, box[3] - box[2] + 1, box[1] - box[0] + 1)
        grid = ref_matrix.copy()
        grid[:3, 3] = ref_matrix[:3, :3] @ np.array([box[0], box[2], box[4]], dtype=float) + ref_matrix[:3, 3]

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
            blocked |= ~self._in_intensity_range(ref_matrix, ref_extent, box, shape)
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

    def _in_intensity_range(self, ref_matrix, ref_extent, box, shape) -> np.ndarray:
        """Where the source volume, aligned to the reference geometry as the editor aligns it, lies in the
        editable intensity range (Slicer's ``vtkImageThreshold``: bounds cast to the voxel type, inclusive);
        voxels of ``box`` outside the reference extent stay editable, as in Slicer."""
        lo, hi = self.editor_node.GetSourceVolumeIntensityMaskRange()
        values = volumes.volume_on_grid(self.volume_node, self.segmentation_node, ref_matrix, ref_extent)
        if np.issubdtype(values.dtype, np.integer):
            info = np.iinfo(values.dtype)
            lo, hi = (np.array(np.clip(v, info.min, info.max)).astype(values.dtype) for v in (lo, hi))
        inside = np.ones(shape, dtype=bool)
        k0, j0, i0 = ref_extent[4] - box[4], ref_extent[2] - box[2], ref_extent[0] - box[0]
        inside[k0:k0 + values.shape[0], j0:j0 + values.shape[1], i0:i0 + values.shape[2]] = \
            (values >= lo) & (values <= hi)
        return inside

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
