"""GUI-free interaction logic of the "RobustMedSAM" Segment Editor effect.

The effect's Qt/VTK code only forwards events here: slice-view positions go through callables (``xy ->
RAS``) supplied by the effect, so everything below runs and is tested without a view.

* :class:`SliceViewMapper` -- which voxel axis a slice view shows (the one closest to the view's normal),
  event XY -> continuous IJK -> ``(axis, slice index, 2D (x, y))`` in the engine's slice convention
  (docs/coordinates.md: axis k -> (i, j), axis j -> (i, k), axis i -> (j, k)).

  Oblique views: the voxel axis closest to the view normal is used when the angle between them is at most
  ``max_oblique_degrees`` (default 20); the prompt's in-plane position is its exact voxel position on the
  voxel slice through the point (the nearest slice along that axis), i.e. the prompt is projected along
  the voxel axis. Beyond that angle :class:`ObliqueViewError` asks the user to align the view ("Reset
  field of view"/"Rotate to volume plane" in the slice view's menu).
* :func:`box_from_corners` -- two slice positions -> normalised exclusive box ``(x0, y0, x1, y1)``.
* :class:`PromptSet` -- the prompt list on one slice: add/remove/undo last/clear, -> engine ``Prompt``.
* :class:`PromptSession` -- the effect's state machine: prompts -> prediction request -> preview (when the
  engine answers; stale answers ignored) -> apply (writes the selected segment) or cancel (drops it);
  multimask choice; background prefetch.

Slice-view events (press, release, double click, keys) become prompt actions in :mod:`.events`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from RobustMedSAMLib.prompts import Prompt
from RobustMedSAMLib.volume_io import ijk_to_slice, round_half_up

AXIS_NAMES = ("k", "j", "i")


class InteractionError(ValueError):
    """A user action cannot be turned into a prompt; the message says why and what to do."""


class ObliqueViewError(InteractionError):
    pass


class OutsideVolumeError(InteractionError):
    pass


# --------------------------------------------------------------------------------------- geometry
def nearest_voxel_axis(normal_ras: Sequence[float], ijk_to_ras: np.ndarray) -> Tuple[int, float]:
    """``(array axis, angle in degrees)`` of the voxel axis most parallel to a view normal.

    Array axes follow ``array[k, j, i]``: 0 = k, 1 = j, 2 = i. ``ijk_to_ras`` is the source volume's voxel
    index -> view (world) RAS matrix; its columns are the voxel axes.
    """
    n = np.asarray(normal_ras, dtype=np.float64)[:3]
    if not np.linalg.norm(n) > 0:
        raise InteractionError("the slice view has no orientation")
    n = n / np.linalg.norm(n)
    cols = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    cosines = np.abs(n @ (cols / np.linalg.norm(cols, axis=0)))  # |cos| for i, j, k
    voxel = int(np.argmax(cosines))
    angle = math.degrees(math.acos(min(1.0, float(cosines[voxel]))))
    return 2 - voxel, angle


@dataclass(frozen=True)
class SlicePosition:
    """A position on a voxel slice: ``axis`` (0/1/2 = k/j/i), ``index`` (nearest slice), ``xy`` the 2D
    ``(x, y)`` = (column, row) in that slice's pixel frame (continuous), ``ijk`` the continuous voxel index."""

    axis: int
    index: int
    xy: Tuple[float, float]
    ijk: Tuple[float, float, float]

    def pixel(self) -> Tuple[int, int]:
        """Nearest pixel ``(x, y)`` (halves up, as everywhere in the engine)."""
        x, y = round_half_up(self.xy)
        return int(x), int(y)


class SliceViewMapper:
    """Maps a slice view's event positions to the source volume's voxel slices.

    Arguments:
        xy_to_ras: view pixel ``(x, y)`` -> world RAS (the effect passes its ``xyToRas``).
        ijk_to_ras: source volume voxel index -> world RAS, 4 x 4 (``IJKToRAS`` with parent transforms).
        shape: the volume's ``(K, J, I)``.
        normal_ras: the view's normal in RAS (third column of the slice node's ``SliceToRAS``).
        max_oblique_degrees: largest accepted angle between the view normal and the nearest voxel axis.
    """

    def __init__(self, xy_to_ras: Callable[[Sequence[float]], Sequence[float]], ijk_to_ras: np.ndarray,
                 shape: Sequence[int], normal_ras: Sequence[float], max_oblique_degrees: float = 20.0) -> None:
        self.xy_to_ras = xy_to_ras
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        self.ras_to_ijk = np.linalg.inv(self.ijk_to_ras)
        self.shape = tuple(int(s) for s in shape)
        self.axis, self.angle = nearest_voxel_axis(normal_ras, self.ijk_to_ras)
        self.max_oblique_degrees = float(max_oblique_degrees)

    @property
    def oblique(self) -> bool:
        return self.angle > 1e-3

    def check_orientation(self) -> None:
        if self.angle > self.max_oblique_degrees:
            raise ObliqueViewError(
                f"this view is tilted {self.angle:.0f} degrees from the volume's nearest voxel axis "
                f"({AXIS_NAMES[self.axis]}); RobustMedSAM segments voxel slices. Align the view with the volume "
                "(slice view menu: 'Rotate to volume plane') or use another view")

    @property
    def slice_shape(self) -> Tuple[int, int]:
        return tuple(s for a, s in enumerate(self.shape) if a != self.axis)  # type: ignore[return-value]

    def ras_to_position(self, ras: Sequence[float], clamp: bool = False) -> SlicePosition:
        """World RAS -> :class:`SlicePosition` on the nearest voxel slice along :attr:`axis`."""
        self.check_orientation()
        ijk = (self.ras_to_ijk @ np.append(np.asarray(ras, dtype=np.float64)[:3], 1.0))[:3]
        size = np.array(self.shape[::-1], dtype=np.float64)  # (I, J, K)
        inside = np.all(ijk >= -0.5) and np.all(ijk <= size - 0.5)
        if not inside and not clamp:
            raise OutsideVolumeError("the position is outside the source volume")
        ijk = np.clip(ijk, 0.0, size - 1.0)
        along, xy = ijk_to_slice(ijk[None, :], self.axis)
        index = int(np.clip(round_half_up(along[0]), 0, self.shape[self.axis] - 1))
        return SlicePosition(self.axis, index, (float(xy[0, 0]), float(xy[0, 1])), tuple(float(v) for v in ijk))

    def xy_to_position(self, xy: Sequence[float], clamp: bool = False) -> SlicePosition:
        """View pixel -> :class:`SlicePosition` (raises :class:`OutsideVolumeError` off the volume)."""
        return self.ras_to_position(self.xy_to_ras(xy), clamp=clamp)


def box_from_corners(a: Tuple[float, float], b: Tuple[float, float], slice_shape: Sequence[int]
                     ) -> np.ndarray:
    """Two opposite corners (continuous slice ``(x, y)``, any order) -> ``(x0, y0, x1, y1)`` exclusive box
    of the pixels whose centres are nearest the corners, clipped to the slice (docs/coordinates.md)."""
    h, w = int(slice_shape[0]), int(slice_shape[1])
    xs = round_half_up([a[0], b[0]])
    ys = round_half_up([a[1], b[1]])
    x0, x1 = int(np.clip(xs.min(), 0, w - 1)), int(np.clip(xs.max(), 0, w - 1)) + 1
    y0, y1 = int(np.clip(ys.min(), 0, h - 1)), int(np.clip(ys.max(), 0, h - 1)) + 1
    return np.array([x0, y0, x1, y1], dtype=np.float64)


# -------------------------------------------------------------------------------------- prompt set
@dataclass
class PromptItem:
    kind: str                      # "point" | "box"
    value: Tuple[float, ...]       # (x, y) or (x0, y0, x1, y1)
    positive: bool = True


@dataclass
class PromptSet:
    """Prompts of one object on one slice (``axis``, ``index``): points (positive/negative) and at most one
    box (a new box replaces the previous one). Edits are recorded so :meth:`undo_last` reverts the last."""

    axis: int
    index: int
    slice_shape: Tuple[int, int]
    items: List[PromptItem] = field(default_factory=list)
    _history: List[List[PromptItem]] = field(default_factory=list, repr=False)

    def _save(self) -> None:
        self._history.append([PromptItem(i.kind, i.value, i.positive) for i in self.items])

    def add_point(self, xy: Sequence[float], positive: bool = True) -> None:
        h, w = self.slice_shape
        x, y = float(xy[0]), float(xy[1])
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise OutsideVolumeError(f"point ({x:.1f}, {y:.1f}) is outside the slice ({w} x {h} pixels)")
        self._save()
        self.items.append(PromptItem("point", (x, y), bool(positive)))

    def set_box(self, box: Sequence[float]) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise InteractionError("the box is empty")
        self._save()
        self.items = [i for i in self.items if i.kind != "box"] + [PromptItem("box", (x0, y0, x1, y1))]

    def remove_nearest_point(self, xy: Sequence[float], radius: float = 3.0) -> bool:
        """Remove the point nearest ``xy`` if within ``radius`` slice pixels; True if one was removed."""
        points = [(n, i) for n, i in enumerate(self.items) if i.kind == "point"]
        if not points:
            return False
        dist = [math.hypot(i.value[0] - xy[0], i.value[1] - xy[1]) for _, i in points]
        best = int(np.argmin(dist))
        if dist[best] > radius:
            return False
        self._save()
        del self.items[points[best][0]]
        return True

    def remove_box(self) -> bool:
        if not any(i.kind == "box" for i in self.items):
            return False
        self._save()
        self.items = [i for i in self.items if i.kind != "box"]
        return True

    def undo_last(self) -> bool:
        """Revert the last edit (add, box, removal or clear); False if there is nothing to revert."""
        if not self._history:
            return False
        self.items = self._history.pop()
        return True

    def clear(self) -> None:
        if self.items:
            self._save()
        self.items = []

    @property
    def empty(self) -> bool:
        return not self.items

    @property
    def points(self) -> List[Tuple[float, float, bool]]:
        return [(i.value[0], i.value[1], i.positive) for i in self.items if i.kind == "point"]

    @property
    def box(self) -> Optional[Tuple[float, float, float, float]]:
        boxes = [i.value for i in self.items if i.kind == "box"]
        return boxes[-1] if boxes else None  # type: ignore[return-value]

    def to_prompt(self) -> Prompt:
        """The engine prompt (points ``(x, y)``, labels 1/0, box ``x0 y0 x1 y1`` exclusive)."""
        pts = self.points
        points = np.array([p[:2] for p in pts], dtype=np.float64) if pts else None
        labels = np.array([1 if p[2] else 0 for p in pts], dtype=np.int64) if pts else None
        box = np.array(self.box, dtype=np.float64) if self.box is not None else None
        return Prompt(points=points, labels=labels, box=box)

    @property
    def ambiguous(self) -> bool:
        """A single positive point and nothing else (SAM recommends three candidate masks)."""
        pts = self.points
        return self.box is None and len(pts) == 1 and pts[0][2]


# ---------------------------------------------------------------------------------- prompt session
IDLE, PENDING, PREVIEW, ERROR = "idle", "pending", "preview", "error"


class PromptSession:
    """State machine of the prompt effect.

    States: ``idle`` (no prompt), ``pending`` (prompts sent, the engine's answer not back yet; the previous
    preview stays on screen), ``preview`` (prompts and their predicted mask shown), ``error`` (prompts whose
    prediction failed; :attr:`message` says why). Every prompt edit asks for a new prediction; an answer to
    an older edit (or one arriving after :meth:`apply`/:meth:`cancel`) is ignored, so the preview always
    belongs to the prompts on screen. :meth:`apply` writes the shown mask and returns to ``idle``;
    :meth:`cancel` drops prompts and preview. A prompt on another slice (or axis) starts a new prompt set
    there (the unapplied preview is dropped).

    Callables (supplied by the effect, or by tests):
        predict(axis, index, prompt, multimask, reply)  (engine; later or at once ``reply(prediction)`` or
            ``reply(error=exception)``; a ``Prediction`` has ``masks`` ``(C, H, W)`` and ``iou`` ``(C,)``)
        show(axis, index, mask2d or None)                (preview display)
        write(axis, index, mask2d)                       (apply: one undoable modification)
        prefetch(axis, index)                            (optional: encode in the background)

    ``multimask``: ``"auto"`` (three candidates for an ambiguous single point, else one), ``"always"`` or
    ``"never"``; :meth:`next_candidate` cycles through candidates, otherwise the best predicted IoU is shown.
    """

    def __init__(self, predict, show, write, prefetch=None, multimask: str = "auto") -> None:
        if multimask not in ("auto", "always", "never"):
            raise ValueError(f"multimask must be auto, always or never, got {multimask!r}")
        self._predict, self._show, self._write, self._prefetch = predict, show, write, prefetch
        self.multimask = multimask
        self.prompts: Optional[PromptSet] = None
        self.prediction = None
        self.candidate: Optional[int] = None  # None: best predicted IoU
        self.state = IDLE
        self.message = ""
        self.applied = 0
        self._sequence = 0  # numbers the prediction requests; only the newest answer counts
        self.on_change: Optional[Callable[[], None]] = None  # called after an answer arrived

    # prompts ---------------------------------------------------------------------------------------
    def _prompt_set(self, pos: SlicePosition, slice_shape: Tuple[int, int]) -> PromptSet:
        if self.prompts is None or (self.prompts.axis, self.prompts.index) != (pos.axis, pos.index):
            if self.prompts is not None and not self.prompts.empty:
                self._show(self.prompts.axis, self.prompts.index, None)
            self.prompts = PromptSet(pos.axis, pos.index, tuple(slice_shape))
            self.prediction, self.candidate = None, None
        return self.prompts

    def add_point(self, pos: SlicePosition, slice_shape: Tuple[int, int], positive: bool = True) -> None:
        self._prompt_set(pos, slice_shape).add_point(pos.xy, positive)
        self.candidate = None
        self.update()

    def set_box(self, a: SlicePosition, b: SlicePosition, slice_shape: Tuple[int, int]) -> None:
        if (a.axis, a.index) != (b.axis, b.index):
            b = SlicePosition(a.axis, a.index, b.xy, b.ijk)  # a drag stays on the slice where it started
        self._prompt_set(a, slice_shape).set_box(box_from_corners(a.xy, b.xy, slice_shape))
        self.candidate = None
        self.update()

    def remove_point(self, pos: SlicePosition, radius: float = 3.0) -> bool:
        if self.prompts is None or (self.prompts.axis, self.prompts.index) != (pos.axis, pos.index):
            return False
        if self.prompts.remove_nearest_point(pos.xy, radius):
            self.update()
            return True
        return False

    def undo_last(self) -> bool:
        if self.prompts is None or not self.prompts.undo_last():
            return False
        self.update()
        return True

    def clear(self) -> None:
        if self.prompts is not None:
            self.prompts.clear()
        self.update()

    # prediction ------------------------------------------------------------------------------------
    def wants_multimask(self) -> bool:
        if self.multimask == "always":
            return True
        if self.multimask == "never" or self.prompts is None:
            return False
        return self.prompts.ambiguous

    def update(self) -> None:
        """Ask for a prediction from the current prompts; the preview follows when the answer arrives."""
        self._sequence += 1
        if self.prompts is None or self.prompts.empty:
            if self.prompts is not None:
                self._show(self.prompts.axis, self.prompts.index, None)
            self.prediction, self.state, self.message = None, IDLE, ""
            return
        sequence, axis, index = self._sequence, self.prompts.axis, self.prompts.index
        self.state, self.message = PENDING, ""

        def reply(prediction=None, error: Optional[BaseException] = None) -> None:
            if sequence != self._sequence:
                return  # an answer to older prompts, or the session moved on (apply, cancel)
            if error is not None or prediction is None:
                self.prediction, self.state = None, ERROR
                self.message = (str(error) or type(error).__name__) if error is not None else "no prediction"
                self._show(axis, index, None)
            else:
                self.prediction, self.state, self.message = prediction, PREVIEW, ""
                if self.candidate is not None and self.candidate >= len(prediction.iou):
                    self.candidate = None
                self._show(axis, index, self.mask)
            if self.on_change is not None:
                self.on_change()

        try:
            self._predict(axis, index, self.prompts.to_prompt(), self.wants_multimask(), reply)
        except Exception as exc:  # shown to the user; the segmentation is untouched
            reply(error=exc)

    @property
    def candidates(self) -> int:
        return 0 if self.prediction is None else len(self.prediction.iou)

    @property
    def selected(self) -> Optional[int]:
        if self.prediction is None:
            return None
        return int(np.argmax(self.prediction.iou)) if self.candidate is None else self.candidate

    @property
    def mask(self) -> Optional[np.ndarray]:
        return None if self.prediction is None else self.prediction.masks[self.selected]

    @property
    def score(self) -> Optional[float]:
        return None if self.prediction is None else float(self.prediction.iou[self.selected])

    def next_candidate(self) -> Optional[int]:
        """Show the next of the candidate masks (multimask output); returns its index."""
        if self.prediction is None or self.candidates < 2:
            return self.selected
        self.candidate = (self.selected + 1) % self.candidates
        self._show(self.prompts.axis, self.prompts.index, self.mask)
        return self.candidate

    # apply / cancel --------------------------------------------------------------------------------
    @property
    def can_apply(self) -> bool:
        return self.state == PREVIEW and self.prediction is not None

    def apply(self) -> bool:
        """Write the previewed mask (one undoable modification); False if there is nothing to apply."""
        if not self.can_apply:
            return False
        axis, index, mask = self.prompts.axis, self.prompts.index, self.mask
        self._write(axis, index, mask)
        self._sequence += 1
        self._show(axis, index, None)
        self.prompts = PromptSet(axis, index, self.prompts.slice_shape)
        self.prediction, self.candidate, self.state, self.message = None, None, IDLE, ""
        self.applied += 1
        return True

    def cancel(self) -> None:
        """Drop prompts and preview (an answer still on its way is ignored); nothing is written."""
        self._sequence += 1
        if self.prompts is not None:
            self._show(self.prompts.axis, self.prompts.index, None)
            self.prompts = PromptSet(self.prompts.axis, self.prompts.index, self.prompts.slice_shape)
        self.prediction, self.candidate, self.state, self.message = None, None, IDLE, ""

    def view_moved(self, axis: int, index: int) -> None:
        """The view now shows slice ``index`` along ``axis``: start encoding it in the background."""
        if self._prefetch is not None:
            self._prefetch(axis, index)
