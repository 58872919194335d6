"""The "RobustMedSAM Propagate" effect's session: a segment's annotated slices -> propagation through the
volume -> preview -> one undoable apply.

* Seeds: the slices where the selected segment is non-empty along the chosen axis (the user's annotations,
  e.g. made with the prompt effect or any other effect).
* First run: the engine's :func:`~RobustMedSAMLib.propagation.propagate` from those seeds.
* Re-run after a correction: if the segment still equals the last applied result except on a few slices
  (the corrected ones), :func:`~RobustMedSAMLib.propagation.repropagate` is called once per corrected slice,
  so only the pieces depending on it are recomputed; otherwise a full run.
* Nothing touches the segmentation before :meth:`PropagationSession.apply`; the preview lives in a separate
  transient node, so a cancelled or failed run leaves the segmentation exactly as it was.

:meth:`PropagationSession.compute` is pure computation (no MRML), safe to run in a worker thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import volumes


@dataclass
class PropagationOptions:
    axis: int = 0
    iou_threshold: float = 0.5
    projection: str = "mask"
    box_extension: float = 0.025
    slice_range: Optional[Tuple[int, int]] = None

    def engine_kwargs(self) -> dict:
        return {"iou_threshold": float(self.iou_threshold), "projection": self.projection,
                "box_extension": float(self.box_extension), "slice_range": self.slice_range}


@dataclass
class PropagationPlan:
    """What a run will do: ``mode`` "full" (seeds) or "repropagate" (``changed`` slices on ``previous``)."""

    mode: str
    seeds: Dict[int, np.ndarray]
    changed: List[int] = field(default_factory=list)
    previous: object = None


def stack_along(mask: np.ndarray, axis: int) -> np.ndarray:
    """``(K, J, I)`` -> ``(num_slices, H, W)`` along array axis ``axis`` (a view)."""
    return np.moveaxis(mask, axis, 0)


def annotated_slices(mask: np.ndarray, axis: int) -> Dict[int, np.ndarray]:
    """``{index: (H, W) mask}`` of the non-empty slices of ``mask`` along ``axis``."""
    stack = stack_along(mask, axis)
    return {int(i): np.array(stack[i], copy=True) for i in np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))}


class PropagationSession:
    """One segment of one segmentation, propagated on one source volume.

    Arguments:
        segmenter_factory: ``(axis) -> SliceSegmenter`` (the engine's ``VolumeSegmenter`` on the volume's
            uint8 images; tests may pass a stand-in).
        read_segment: ``() -> (K, J, I) bool`` current segment on the volume grid.
        show_preview: ``((K, J, I) mask or None) -> None``.
        write_segment: ``((K, J, I) mask) -> None``: one undoable "set segment" modification.
    """

    def __init__(self, segmenter_factory: Callable[[int], object], read_segment: Callable[[], np.ndarray],
                 show_preview: Callable[[Optional[np.ndarray]], None],
                 write_segment: Callable[[np.ndarray], None]) -> None:
        self.segmenter_factory = segmenter_factory
        self.read_segment = read_segment
        self.show_preview = show_preview
        self.write_segment = write_segment
        self.options = PropagationOptions()
        self.last_applied = None     # PropagationResult whose masks are now in the segment
        self.last_options: Optional[PropagationOptions] = None
        self.result = None           # computed, not yet applied
        self.result_options: Optional[PropagationOptions] = None
        self.message = ""

    # planning (GUI thread: reads MRML) ------------------------------------------------------------
    def plan(self, options: Optional[PropagationOptions] = None, force_full: bool = False) -> PropagationPlan:
        options = options or self.options
        self.options = options
        current = np.asarray(self.read_segment(), dtype=bool)
        stack = stack_along(current, options.axis)
        prev = self.last_applied
        if (not force_full and prev is not None and self.last_options is not None
                and self.last_options.axis == options.axis and prev.masks.shape == stack.shape):
            differs = np.flatnonzero((prev.masks != stack).reshape(len(stack), -1).any(axis=1))
            if 0 < len(differs) <= max(3, len(stack) // 4):
                return PropagationPlan("repropagate", {int(i): np.array(stack[i]) for i in differs},
                                       [int(i) for i in differs], prev)
            if len(differs) == 0:
                return PropagationPlan("repropagate", {}, [], prev)
        seeds = annotated_slices(current, options.axis)
        if not seeds:
            raise ValueError("the selected segment is empty: draw or prompt it on at least one slice first")
        return PropagationPlan("full", seeds)

    # computation (worker thread: no MRML) ----------------------------------------------------------
    def compute(self, plan: PropagationPlan, progress: Optional[Callable[[int, int, int], None]] = None,
                cancel: Optional[Callable[[], bool]] = None):
        """Run the plan with the engine; returns the ``PropagationResult`` (also kept as :attr:`result`).
        Raises ``PropagationCancelled`` when cancelled; nothing is shown or written here."""
        from RobustMedSAMLib.propagation import propagate, repropagate

        options = self.options
        segmenter = self.segmenter_factory(options.axis)
        if plan.mode == "full":
            result = propagate(segmenter, plan.seeds, progress=progress, cancel=cancel, **options.engine_kwargs())
        else:
            result = plan.previous
            kwargs = options.engine_kwargs()
            if kwargs["slice_range"] is None:
                kwargs["slice_range"] = (0, segmenter.num_slices - 1)
            for index in plan.changed:
                result = repropagate(segmenter, result, index, plan.seeds[index], progress=progress, cancel=cancel,
                                     **kwargs)
        self.result, self.result_options = result, options
        return result

    # preview / apply / cancel (GUI thread) -------------------------------------------------------
    def full_mask(self, result=None) -> np.ndarray:
        result = result if result is not None else self.result
        return np.ascontiguousarray(np.moveaxis(result.masks, 0, self.result_options.axis))

    def preview(self) -> None:
        if self.result is not None:
            self.show_preview(self.full_mask())

    def apply(self) -> bool:
        """Write the computed result into the segment (one undo step); False if there is none."""
        if self.result is None:
            return False
        self.write_segment(self.full_mask())
        self.last_applied, self.last_options = self.result, self.result_options
        self.result = None
        self.show_preview(None)
        return True

    def cancel(self) -> None:
        """Drop a computed result and its preview; the segment is untouched."""
        self.result = None
        self.show_preview(None)

    def report(self) -> List[dict]:
        res = self.result if self.result is not None else self.last_applied
        return [] if res is None else res.report()


def bind_session(segmentation_node, segment_id: str, volume_node, segmenter_factory, writer, preview):
    """A :class:`PropagationSession` wired to MRML: reads the segment with :func:`volumes.segment_mask`,
    previews in ``preview`` (:class:`~.segments.PreviewSegmentation`), writes with ``writer``
    (:class:`~.segments.SegmentWriter`)."""
    shape = volumes.shape_of(volume_node)

    def color():
        seg = segmentation_node.GetSegmentation().GetSegment(segment_id)
        return seg.GetColor() if seg is not None else None

    def show(mask):
        if mask is None:
            preview.remove()
        else:
            preview.show(mask, color())

    return PropagationSession(
        segmenter_factory,
        lambda: volumes.segment_mask(segmentation_node, segment_id, volume_node),
        show,
        lambda mask: writer.set_segment(segment_id, mask.reshape(shape)))
