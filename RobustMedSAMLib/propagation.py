"""Volumetric segmentation by propagating a 2D mask from annotated ("seed") slices to their neighbours.

Same algorithm as micro-sam's ``segment_mask_in_volume`` (see docs and ``REFERENCE.md`` section 6), on
any :class:`SliceSegmenter` (the engine, or a stand-in in tests). Slices are 2D images ``0..num_slices-1``
along one voxel axis; which axis is the caller's business (docs/coordinates.md).

:func:`propagate`:

1. **Below the lowest seed** ``z0`` (unless ``stop_lower``): for ``z = z0-1, z0-2, ...`` derive prompts from
   mask ``z+1`` (see :mod:`RobustMedSAMLib.mask_prompts`), predict slice ``z`` and compute the IoU of mask
   ``z+1`` with the prediction (``|A and B| / (|A or B| + 1e-7)``). The stop rule
   (:mod:`RobustMedSAMLib.stop_rules`: ``"consistency"`` by default, ``"micro-sam"`` = IoU below
   ``iou_threshold``) may reject the prediction: the direction then stops **without writing slice z**; it
   also stops after the volume bound / the ``slice_range`` limit.
2. **Above the highest seed**, symmetrically (unless ``stop_upper``).
3. **Between consecutive seeds** ``a < b`` (micro-sam's rule: no IoU stopping; the consistency rule walks
   each gap from its larger seed and back from the other, judged by the rule, see
   :mod:`RobustMedSAMLib.stop_rules`): adjacent seeds -> nothing; if ``a`` is the
   lowest seed and ``stop_lower`` -> propagate from ``b`` down to ``a+1`` only (likewise ``b`` highest and
   ``stop_upper`` -> from ``a`` up to ``b-1``); a gap of one slice -> predicted from the union of masks
   ``a`` and ``b``; a larger gap -> from ``a`` upward and from ``b`` downward towards ``(a+b)//2`` (the lower
   side takes the middle slice of an odd gap), and the exact middle slice of an even gap from the union of
   its two neighbours. Inside a gap an empty prediction is not written and ends that side (there is
   nothing left to prompt from); it is listed in ``PropagationResult.gap_stops``.

Empty seed masks: micro-sam's "stop slice" -- the lowest seed may be empty when ``stop_lower`` is set (the
object ends above it) and the highest when ``stop_upper`` is set; and a seed between two others may be empty
(the object is absent on that slice: each gap next to it is filled from its other seed only, and nothing
between two empty seeds). An empty extreme seed without its stop flag is an error (nothing to extrapolate).

:func:`repropagate` recomputes only what depends on one edited/added seed slice; see its docstring.

Only numpy and scipy are used.

The options and the plan are in ``propagation_plan.py``, the slice runner in ``propagation_runner.py``, the
result types in ``propagation_types.py``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from .propagation_plan import check_seeds, make_options, make_plan, segmenter_geometry
from .propagation_runner import build_result, run_plan
from .propagation_types import (  # noqa: F401  (re-exported: the public types live there)
    SOURCES, STOP_REASONS, CancelCallback, ProgressCallback, PropagationCancelled, PropagationResult,
    SliceRecord, SliceSegmenter, StopReason, compute_iou, propagation_report)
from .stop_rules import StopRule

__all__ = [
    "SliceSegmenter", "SliceRecord", "StopReason", "PropagationResult", "PropagationCancelled",
    "propagate", "repropagate", "propagation_report", "compute_iou", "SOURCES", "STOP_REASONS",
]


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------

def propagate(segmenter: SliceSegmenter, seeds: Mapping[int, np.ndarray], *, iou_threshold: Optional[float] = None,
              projection: Optional[Union[str, Mapping[str, bool]]] = None, box_extension: Optional[float] = None,
              stop_lower: bool = False, stop_upper: bool = False,
              slice_range: Optional[Tuple[int, int]] = None, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelCallback] = None,
              stop_rule: Union[None, str, Mapping[str, Any], StopRule] = None) -> PropagationResult:
    """Segment an object through the volume from one or more seed slices (see the module docstring).

    Args:
        segmenter: a :class:`SliceSegmenter`.
        seeds: ``{slice index: (H, W) mask}`` of the annotated slices (not modified).
        iou_threshold: extrapolation stops (slice not written) when the IoU of consecutive masks is below it;
            default: the stop rule's (0.4 for ``"consistency"``, 0.5 for ``"micro-sam"``).
        projection: which prompts are derived from the previous mask: ``"box"``, ``"mask"`` (box + mask),
            ``"points"``, ``"points_and_mask"``, ``"single_point"`` or ``{"use_box", "use_mask",
            "use_points"}``; default: the segmenter's ``default_projection`` (``"box"`` for box-trained
            models such as MedSAM and LiteMedSAM), else ``"mask"``.
        box_extension: enlarges derived boxes (and the point-sampling window): ``>= 1`` pixels per side,
            ``0 < e < 1`` that fraction of the box size per side; default: the stop rule's (0.05 for
            ``"consistency"``, micro-sam's 0.025 for ``"micro-sam"``).
        stop_lower / stop_upper: no extrapolation below the lowest / above the highest seed, and the gap
            next to that seed is filled from the other side only (micro-sam's stop slices).
        slice_range: inclusive ``(first, last)`` slice limits for extrapolation; seeds must lie inside.
        progress: called as ``progress(done, estimated_total, index)`` after each predicted slice;
            ``estimated_total`` shrinks when a direction stops early (and grows when the consistency rule
            walks a gap back from its other seed) and equals ``done`` at the end.
        cancel: polled before each prediction; returning True raises :class:`PropagationCancelled`.
        stop_rule: ``"consistency"`` (default) or ``"micro-sam"``, or a dict / :class:`StopRule` with
            thresholds (:mod:`RobustMedSAMLib.stop_rules`).

    Returns:
        A :class:`PropagationResult` with freshly allocated arrays.
    """
    num_slices, shape = segmenter_geometry(segmenter)
    opts = make_options(num_slices, iou_threshold, projection, box_extension, stop_lower, stop_upper,
                        slice_range, stop_rule, segmenter)
    seed_masks = check_seeds(seeds, opts, shape)
    order = sorted(seed_masks)
    masks = np.zeros((num_slices,) + tuple(shape), dtype=bool)
    records: Dict[int, SliceRecord] = {}
    for index in order:
        masks[index] = seed_masks[index]
        records[index] = SliceRecord(index, "seed")
    plan = make_plan(order, {i: not seed_masks[i].any() for i in order}, opts)
    stops: Dict[str, StopReason] = {}
    runner = run_plan(segmenter, masks, records, stops, plan, opts, progress, cancel)
    return build_result(masks, records, stops, order, runner.gap_stops, runner, opts)


_DEFAULTS: Dict[str, Any] = {"iou_threshold": None, "projection": None, "box_extension": None, "stop_rule": None,
                             "stop_lower": False, "stop_upper": False, "slice_range": None}


def repropagate(segmenter: SliceSegmenter, previous: PropagationResult, index: int, new_mask: np.ndarray, *,
                iou_threshold: Optional[float] = None, projection: Optional[Union[str, Mapping[str, bool]]] = None,
                box_extension: Optional[float] = None, stop_lower: Optional[bool] = None,
                stop_upper: Optional[bool] = None, slice_range: Optional[Tuple[int, int]] = None,
                progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelCallback] = None,
                stop_rule: Union[None, str, Mapping[str, Any], StopRule] = None) -> PropagationResult:
    """Correct a propagation after the user edited or re-prompted slice ``index`` (now ``new_mask``).

    ``index`` becomes a seed (replacing the seed there, if any) and only what depends on it is recomputed;
    the result equals ``propagate`` with the new seed set, for a deterministic segmenter.

    Rule: the work is split into independent pieces -- the extrapolation below the lowest seed, the one
    above the highest seed, and each gap between consecutive seeds. A piece is recomputed (its slices
    cleared first) if it did not exist in ``previous`` with the same seeds, mode and options, or if one of
    its seeds is ``index``. Every other slice, record and stop is copied unchanged. Hence:

    * ``index`` below the lowest seed: the extrapolation below ``index`` and the gap up to the old lowest
      seed (and, with ``stop_lower``, also the old lowest gap, which is now filled from both sides);
    * ``index`` above the highest seed: symmetrically;
    * ``index`` inside a gap: the two sub-gaps;
    * ``index`` an existing seed: its adjacent gaps and, if it is the lowest/highest seed, that direction.

    An empty ``new_mask`` (the user erased the slice) at or beyond the highest seed means "the object ends
    before this slice": it becomes an empty stop seed with ``stop_upper`` (at or below the lowest seed:
    ``stop_lower``), so nothing is extrapolated past it and the gap up to it is filled from the other side
    only, stopping by the usual rules. Between seeds it means "the object is absent on this slice": an empty
    seed there, and each gap next to it is filled from its other seed only (see :func:`propagate`).

    Options left as None are taken from ``previous.options`` (pass ``slice_range=(0, num_slices - 1)`` to
    drop a previous range); changing an option recomputes the pieces it affects. ``previous`` and
    ``new_mask`` are not modified. ``result.predicted`` lists the slices predicted by this call.
    """
    num_slices, shape = segmenter_geometry(segmenter)
    if previous.masks.shape != (num_slices,) + tuple(shape):
        raise ValueError(f"previous result has masks of shape {previous.masks.shape}; the segmenter has "
                         f"{num_slices} slices of {tuple(shape)}")
    old = {**_DEFAULTS, **(previous.options or {})}
    index = int(index)
    others = [int(z) for z in previous.seeds if int(z) != index]
    if others and not np.asarray(new_mask).any():  # erased: the object ends before this slice
        if index > max(others) and stop_upper is None:
            stop_upper = True
        elif index < min(others) and stop_lower is None:
            stop_lower = True
    pick = (lambda value, name: old[name] if value is None else value)
    old_opts = make_options(num_slices, old["iou_threshold"], old["projection"], old["box_extension"],
                            old["stop_lower"], old["stop_upper"], old["slice_range"], old["stop_rule"], segmenter)
    if stop_rule is not None and iou_threshold is None:  # a new rule brings its own default threshold
        new_rule, new_iou = stop_rule, None
    else:
        new_rule, new_iou = pick(stop_rule, "stop_rule"), pick(iou_threshold, "iou_threshold")
    opts = make_options(num_slices, new_iou, pick(projection, "projection"),
                        pick(box_extension, "box_extension"), pick(stop_lower, "stop_lower"),
                        pick(stop_upper, "stop_upper"), pick(slice_range, "slice_range"), new_rule, segmenter)
    if not 0 <= index < num_slices:
        raise ValueError(f"slice {index} is outside the volume (0..{num_slices - 1})")

    old_order = sorted(int(s) for s in previous.seeds)
    seeds = {s: previous.masks[s] for s in old_order}
    seeds[index] = new_mask
    seed_masks = check_seeds(seeds, opts, shape)
    order = sorted(seed_masks)

    old_plan = make_plan(old_order, {s: not previous.masks[s].any() for s in old_order}, old_opts)
    new_plan = make_plan(order, {s: not seed_masks[s].any() for s in order}, opts)
    old_keys = {seg.key for seg in old_plan}
    redo = [seg for seg in new_plan if seg.key not in old_keys or index in seg.seeds]

    masks = previous.masks.copy()
    owned = np.zeros(num_slices, dtype=bool)
    for seg in redo:
        region = seg.clear_region(num_slices)
        masks[region] = False
        owned[region] = True
    masks[index] = seed_masks[index]
    records = {i: r for i, r in previous.slices.items() if not owned[i] and i != index}
    records[index] = SliceRecord(index, "seed")
    gap_stops = [s for s in previous.gap_stops if not owned[s.at_index] and s.at_index != index]
    stops = {k: v for k, v in previous.stops.items()}

    runner = run_plan(segmenter, masks, records, stops, redo, opts, progress, cancel)
    return build_result(masks, records, stops, order, gap_stops + runner.gap_stops, runner, opts)
