"""Types of :mod:`RobustMedSAMLib.propagation`: the segmenter protocol, per-slice records, stop reasons and
the result (re-exported there; import them from ``propagation``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple, Union, runtime_checkable

import numpy as np

from .prompts import Prediction, Prompt

SOURCES = ("seed", "extrapolated", "interpolated")
STOP_REASONS = ("iou_below_threshold", "empty_prediction", "area_jump", "intensity_changed", "appearance_changed",
                "volume_bound", "slice_range", "stop_flag", "no_seed_side")

ProgressCallback = Callable[[int, int, int], Any]
CancelCallback = Callable[[], bool]


class PropagationCancelled(RuntimeError):
    """Raised by :func:`propagate` / :func:`repropagate` when ``cancel()`` returned True."""


@runtime_checkable
class SliceSegmenter(Protocol):
    """Something that segments one object on one 2D slice of a volume from a prompt.

    ``predict_slice`` returns a :class:`Prediction` with a single mask of shape ``slice_shape`` (if it
    holds several, the one with the highest predicted IoU is used). Optional: ``default_projection``
    (``projection=None`` uses it, else ``"mask"``) and the ``slice_values`` / ``slice_descriptor`` methods
    used by the consistency stop rule (:mod:`RobustMedSAMLib.stop_rules`).
    """

    num_slices: int
    slice_shape: Tuple[int, int]

    def predict_slice(self, index: int, prompt: Prompt) -> Prediction:
        ...


@dataclass(frozen=True)
class SliceRecord:
    """How slice ``index`` of a :class:`PropagationResult` was obtained.

    ``source``: ``"seed"`` (given), ``"extrapolated"`` (beyond the lowest/highest seed) or ``"interpolated"``
    (between two seeds). ``predicted_iou``: the model's own IoU estimate (None for seeds).
    ``interslice_iou``: IoU of the prompting mask with the prediction (None for seeds). ``from_index``: the
    slice whose mask prompted this one, or a pair ``(lower, upper)`` when prompted by the union of two.
    ``measures``: what the stop rule measured on an extrapolated slice (``stop_rules.measure``).
    """

    index: int
    source: str
    predicted_iou: Optional[float] = None
    interslice_iou: Optional[float] = None
    from_index: Optional[Union[int, Tuple[int, int]]] = None
    measures: Optional[Dict[str, float]] = None


@dataclass(frozen=True)
class StopReason:
    """Why a direction (or one side of a gap) stopped.

    ``reason``:

    * ``"iou_below_threshold"`` / ``"empty_prediction"`` / ``"area_jump"`` / ``"intensity_changed"`` /
      ``"appearance_changed"``: slice ``at_index`` was predicted but rejected by the stop rule (not
      written); ``iou`` is its IoU with the previous slice, ``measures`` all the rule measured.
    * ``"volume_bound"`` / ``"slice_range"``: ``at_index`` is the last slice allowed (0 or num_slices-1, or
      the ``slice_range`` limit); the direction reached it (or its seed already lies there).
    * ``"stop_flag"``: ``stop_lower``/``stop_upper`` was set; ``at_index`` is the extreme seed.
    * ``"no_seed_side"``: the extreme seed on that side is an empty stop slice, so there was nothing to
      extrapolate from; ``at_index`` is that seed.
    """

    reason: str
    at_index: int
    iou: Optional[float] = None
    measures: Optional[Dict[str, float]] = None


@dataclass
class PropagationResult:
    """Outcome of :func:`propagate` / :func:`repropagate`; every array is owned by the result.

    Attributes:
        masks: ``(Z, H, W)`` bool, seeds included.
        slices: ``{index: SliceRecord}`` for every slice that was written (seeds included).
        stops: ``{"lower": StopReason, "upper": StopReason}``.
        z_range: ``(first, last)`` written slice.
        seeds: sorted seed indices.
        gap_stops: empty predictions that ended one side of a gap early (rare).
        predicted: slice indices passed to ``predict_slice`` during this call, in order (rejected ones too).
        options: the options used (``iou_threshold``, ``projection``, ``box_extension``, ``stop_rule``,
            ``stop_lower``, ``stop_upper``, ``slice_range``); :func:`repropagate` reuses them by default.
    """

    masks: np.ndarray
    slices: Dict[int, SliceRecord]
    stops: Dict[str, StopReason]
    z_range: Tuple[int, int]
    seeds: Tuple[int, ...]
    gap_stops: Tuple[StopReason, ...] = ()
    predicted: Tuple[int, ...] = ()
    options: Dict[str, Any] = field(default_factory=dict)

    def report(self) -> List[Dict[str, Any]]:
        """One dict per written slice, by index, for tables and plots of predicted IoU per slice.

        Keys: ``index``, ``source``, ``predicted_iou``, ``interslice_iou``, ``from_index`` (int, ``[lower,
        upper]`` for a union prompt, or None), ``area`` (pixels in the mask) and ``measures`` (the stop
        rule's measurements, or None). JSON-serialisable.
        """
        rows = []
        for index in sorted(self.slices):
            rec = self.slices[index]
            src = list(rec.from_index) if isinstance(rec.from_index, tuple) else rec.from_index
            rows.append({"index": int(index), "source": rec.source, "predicted_iou": rec.predicted_iou,
                         "interslice_iou": rec.interslice_iou, "from_index": src,
                         "area": int(np.count_nonzero(self.masks[index])), "measures": rec.measures})
        return rows


def propagation_report(result: PropagationResult) -> List[Dict[str, Any]]:
    """Same as :meth:`PropagationResult.report`."""
    return result.report()


def compute_iou(a: np.ndarray, b: np.ndarray) -> float:
    """``|a and b| / (|a or b| + 1e-7)`` of two boolean masks (micro-sam's ``compute_iou``)."""
    inter = np.count_nonzero(np.logical_and(a, b))
    union = np.count_nonzero(np.logical_or(a, b))
    return float(inter) / (float(union) + 1e-7)
