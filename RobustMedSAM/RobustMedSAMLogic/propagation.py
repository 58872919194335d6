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

A run goes through a *runner*: :func:`engine_runner` sends it to the engine process (the MRML reads happen
here, in the GUI thread, when the request is made; the answer arrives through the engine's poll), and
:func:`local_runner` computes it at once in this process with any ``SliceSegmenter`` (batch mode, tests).
A result that arrives after the run was cancelled, superseded or its effect deactivated is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import volumes


@dataclass
class PropagationOptions:
    """The propagate effect's options; None (and projection "auto") take the engine's defaults: the stop
    rule's IoU threshold and box extension, the model's projection (boxes for box-trained models)."""

    axis: int = 0
    iou_threshold: Optional[float] = None
    projection: str = "auto"
    box_extension: Optional[float] = None
    slice_range: Optional[Tuple[int, int]] = None
    stop_rule: Optional[str] = None

    def engine_kwargs(self) -> dict:
        return {"iou_threshold": None if self.iou_threshold is None else float(self.iou_threshold),
                "projection": None if self.projection in (None, "auto") else self.projection,
                "box_extension": None if self.box_extension is None else float(self.box_extension),
                "slice_range": self.slice_range, "stop_rule": self.stop_rule}


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


class _Finished:
    """A request-like record of a run computed in this process (what :func:`local_runner` returns)."""

    def __init__(self, result=None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.status = "ok" if error is None else ("cancelled" if isinstance(error, _cancelled()) else "error")
        self.finished = True

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def cancel(self) -> None:
        pass


def _cancelled():
    from RobustMedSAMLib.propagation import PropagationCancelled

    return PropagationCancelled


def compute(segmenter, plan: PropagationPlan, options: PropagationOptions,
            progress: Optional[Callable[[int, int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None):
    """Run ``plan`` with the engine's propagation on ``segmenter`` in this process; returns the
    ``PropagationResult`` (raises ``PropagationCancelled`` when cancelled)."""
    from RobustMedSAMLib.propagation import propagate, repropagate

    if plan.mode == "full":
        return propagate(segmenter, plan.seeds, progress=progress, cancel=cancel, **options.engine_kwargs())
    result = plan.previous
    kwargs = options.engine_kwargs()
    if kwargs["slice_range"] is None:
        kwargs["slice_range"] = (0, segmenter.num_slices - 1)
    for index in plan.changed:
        result = repropagate(segmenter, result, index, plan.seeds[index], progress=progress, cancel=cancel, **kwargs)
    return result


def local_runner(segmenter_factory: Callable[[int], object], cancel: Optional[Callable[[], bool]] = None):
    """A runner computing in this process with ``segmenter_factory(axis)`` (a ``SliceSegmenter``)."""

    def run(plan, options, on_progress=None, on_done=None):
        try:
            record = _Finished(compute(segmenter_factory(options.axis), plan, options, on_progress, cancel))
        except Exception as exc:  # noqa: BLE001 - reported like an engine failure
            record = _Finished(error=exc)
        if on_done is not None:
            on_done(record)
        return record

    return run


def engine_runner(engine, volume_node, intensity="display"):
    """A runner that sends the run to the engine process (``EngineSession.propagate``/``repropagate``)."""

    def run(plan, options, on_progress=None, on_done=None):
        kwargs = options.engine_kwargs()
        progress = None if on_progress is None else (
            lambda request: on_progress(int(request.done), int(request.total or 0), request.message))
        if plan.mode == "full":
            return engine.propagate(volume_node, options.axis, plan.seeds, kwargs, intensity, progress, on_done)
        return engine.repropagate(volume_node, options.axis, plan.previous,
                                  [(i, plan.seeds[i]) for i in plan.changed], kwargs, intensity, progress, on_done)

    return run


class PropagationSession:
    """One segment of one segmentation, propagated on one source volume.

    Arguments:
        runner: ``(plan, options, on_progress, on_done) -> request`` (:func:`engine_runner`, :func:`local_runner`);
            ``on_progress(done, total, message)``; ``on_done(request)`` with ``request.ok``/``result``/``error``.
        read_segment: ``() -> (K, J, I) bool`` current segment on the volume grid.
        show_preview: ``((K, J, I) mask or None) -> None``.
        write_segment: ``((K, J, I) mask) -> None``: one undoable "set segment" modification.
    """

    def __init__(self, runner, read_segment: Callable[[], np.ndarray],
                 show_preview: Callable[[Optional[np.ndarray]], None],
                 write_segment: Callable[[np.ndarray], None]) -> None:
        self.runner = runner
        self.read_segment = read_segment
        self.show_preview = show_preview
        self.write_segment = write_segment
        self.options = PropagationOptions()
        self.last_applied = None     # PropagationResult whose masks are now in the segment
        self.last_options: Optional[PropagationOptions] = None
        self.result = None           # computed, not yet applied
        self.result_options: Optional[PropagationOptions] = None
        self.request = None          # the run in progress
        self.message = ""
        self._run = 0                # numbers the runs; only the newest one's answer counts

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

    # running -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.request is not None and not self.request.finished

    def start(self, plan: PropagationPlan, on_progress=None, on_done=None):
        """Run ``plan`` (any earlier run and unapplied result are dropped); ``on_progress(done, total,
        message)`` and ``on_done(request)`` are called while it is the current run (not after it was
        cancelled or superseded: the engine keeps reporting until its reply arrives); nothing is shown or
        written here."""
        self.cancel()
        self._run += 1
        run, options = self._run, self.options

        def progress(done, total, message) -> None:
            if run == self._run and on_progress is not None:
                on_progress(done, total, message)

        def done(request) -> None:
            if run != self._run:
                return  # cancelled or superseded: the answer is dropped
            self.request = None
            if request.ok:
                self.result, self.result_options = request.result, options
            if on_done is not None:
                on_done(request)

        request = self.runner(plan, options, progress, done)
        if run == self._run and not request.finished:
            self.request = request
        return request

    # preview / apply / cancel (GUI thread) -------------------------------------------------------
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
        """Stop a run in progress, drop a computed result and its preview; the segment is untouched."""
        self._run += 1
        if self.request is not None:
            self.request.cancel()
            self.request = None
        self.result = None
        self.show_preview(None)

    def report(self) -> List[dict]:
        res = self.result if self.result is not None else self.last_applied
        return [] if res is None else res.report()


def bind_session(segmentation_node, segment_id: str, volume_node, runner, writer, preview):
    """A :class:`PropagationSession` wired to MRML: reads the segment with :func:`volumes.segment_mask`,
    previews in ``preview`` (:class:`~.segments.PreviewSegmentation`), writes with ``writer``
    (:class:`~.segments.SegmentWriter`); ``runner``: :func:`engine_runner` or :func:`local_runner`."""
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
        runner,
        lambda: volumes.segment_mask(segmentation_node, segment_id, volume_node),
        show,
        lambda mask: writer.set_segment(segment_id, mask.reshape(shape)))


class SessionRegistry:
    """The propagate effect's sessions, one per (segmentation node, segment, source volume node).

    Keyed by node *objects*: after a scene close Slicer reuses node IDs ("vtkMRMLSegmentationNode1"), so a
    registry keyed by IDs would hand a new scene's node an old session (reading and writing an orphaned
    node). :meth:`get` also refuses a session whose nodes left their scene; :meth:`clear` drops all (scene
    close, source volume or reference geometry changed), cancelling runs in progress.
    """

    def __init__(self) -> None:
        self._sessions: Dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, segmentation_node, segment_id: str, volume_node, make: Callable[[], PropagationSession]
            ) -> PropagationSession:
        key = (id(segmentation_node), segment_id, id(volume_node))
        entry = self._sessions.get(key)
        if entry is not None:
            (seg, vol), session = entry
            if seg is segmentation_node and vol is volume_node and seg.GetScene() is not None \
                    and vol.GetScene() is not None:
                return session
            session.cancel()
        session = make()
        self._sessions[key] = ((segmentation_node, volume_node), session)
        return session

    def clear(self) -> None:
        for _, session in self._sessions.values():
            session.cancel()
        self._sessions.clear()
