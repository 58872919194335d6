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
3. **Between consecutive seeds** ``a < b`` (no IoU stopping): adjacent seeds -> nothing; if ``a`` is the
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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .mask_prompts import Projection, parse_projection, prompt_from_mask
from .propagation_types import (  # noqa: F401  (re-exported: the public types live there)
    SOURCES, STOP_REASONS, CancelCallback, ProgressCallback, PropagationCancelled, PropagationResult,
    SliceRecord, SliceSegmenter, StopReason, compute_iou, propagation_report)
from .stop_rules import RULE_DEFAULTS, StopRule, make_rule, measure, seed_reference, verdict

__all__ = [
    "SliceSegmenter", "SliceRecord", "StopReason", "PropagationResult", "PropagationCancelled",
    "propagate", "repropagate", "propagation_report", "compute_iou", "SOURCES", "STOP_REASONS",
]


# --------------------------------------------------------------------------------------------------------
# options, seeds and the plan
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    rule: StopRule
    projection: Projection
    projection_spec: Any
    box_extension: float
    stop_lower: bool
    stop_upper: bool
    lo: int
    hi: int
    slice_range: Optional[Tuple[int, int]]
    num_slices: int

    @property
    def iou_threshold(self) -> float:
        return self.rule.iou_threshold

    def as_dict(self) -> Dict[str, Any]:
        spec = dict(self.projection_spec) if isinstance(self.projection_spec, Mapping) else self.projection_spec
        return {"iou_threshold": self.iou_threshold, "projection": spec, "box_extension": self.box_extension,
                "stop_rule": self.rule.as_dict(), "stop_lower": self.stop_lower, "stop_upper": self.stop_upper,
                "slice_range": self.slice_range}


def _geometry(segmenter: SliceSegmenter) -> Tuple[int, Tuple[int, int]]:
    try:
        num_slices = int(segmenter.num_slices)
        h, w = (int(s) for s in segmenter.slice_shape)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TypeError("the segmenter needs num_slices (int) and slice_shape (H, W)") from exc
    if num_slices < 1 or h < 1 or w < 1:
        raise ValueError(f"segmenter has {num_slices} slices of {h} x {w}: nothing to segment")
    return num_slices, (h, w)


def _make_options(num_slices: int, iou_threshold, projection, box_extension, stop_lower, stop_upper,
                  slice_range, stop_rule=None, segmenter=None) -> _Options:
    rule = make_rule(stop_rule, None if iou_threshold is None else float(iou_threshold))
    if projection is None:
        projection = getattr(segmenter, "default_projection", None) or "mask"
    if box_extension is None:
        box_extension = RULE_DEFAULTS[rule.name]["box_extension"]
    ext = float(box_extension)
    if not np.isfinite(ext) or ext < 0:
        raise ValueError(f"box_extension must be >= 0 (pixels if >= 1, a fraction if < 1), got {box_extension}")
    proj = parse_projection(projection)
    if slice_range is None:
        lo, hi, rng = 0, num_slices - 1, None
    else:
        try:
            lo, hi = (int(v) for v in slice_range)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"slice_range must be (first, last) slice indices, got {slice_range!r}") from exc
        if not 0 <= lo <= hi <= num_slices - 1:
            raise ValueError(f"slice_range ({lo}, {hi}) must satisfy 0 <= first <= last <= {num_slices - 1}")
        rng = (lo, hi)
    return _Options(rule, proj, projection, ext, bool(stop_lower), bool(stop_upper), lo, hi, rng, num_slices)


def _check_seeds(seeds: Mapping[int, np.ndarray], opts: _Options, shape: Tuple[int, int]) -> Dict[int, np.ndarray]:
    """Fresh bool copies of the seed masks, validated (indices, shapes, empty-seed rule)."""
    if not isinstance(seeds, Mapping) or len(seeds) == 0:
        raise ValueError("give at least one seed slice as {slice index: (H, W) mask}")
    out: Dict[int, np.ndarray] = {}
    for key, mask in seeds.items():
        index = int(key)
        if index != key:
            raise ValueError(f"seed slice index {key!r} is not an integer")
        if not opts.lo <= index <= opts.hi:
            where = "the volume" if opts.slice_range is None else f"slice_range {opts.slice_range}"
            raise ValueError(f"seed slice {index} lies outside {where} (slices {opts.lo}..{opts.hi})")
        arr = np.array(mask, dtype=bool, copy=True)
        if arr.shape != tuple(shape):
            raise ValueError(f"seed mask of slice {index} has shape {arr.shape}, the slices are {tuple(shape)}")
        out[index] = arr
    order = sorted(out)
    for pos, index in enumerate(order):
        if out[index].any() or 0 < pos < len(order) - 1:
            continue  # an empty seed between two others: the object is absent there
        if (pos == 0 and opts.stop_lower) or (pos == len(order) - 1 and opts.stop_upper):
            continue  # micro-sam's stop slice
        raise ValueError(
            f"seed mask of slice {index} is empty: the lowest and highest seeds need at least one foreground "
            "pixel (unless stop_lower=True / stop_upper=True makes them empty stop slices)")
    if not any(out[i].any() for i in order):
        raise ValueError(f"all seed masks are empty (slices {order}): nothing to propagate")
    return out


@dataclass(frozen=True)
class _Segment:
    """An independent piece of the work: one extrapolation direction or one gap between seeds."""

    kind: str            # "lower" | "upper" | "gap"
    start: int           # the seed it grows from (lower/upper) or the lower seed a (gap)
    end: int             # the last allowed slice (lower/upper) or the upper seed b (gap)
    mode: str            # lower/upper: "run" | "stop_flag" | "no_seed_side";
                         # gap: "both" | "from_upper" | "from_lower" | "none" (both seeds empty)
    key: Tuple[Any, ...]  # everything the segment's output depends on besides its seed masks

    @property
    def seeds(self) -> Tuple[int, ...]:
        return (self.start, self.end) if self.kind == "gap" else (self.start,)

    def clear_region(self, num_slices: int) -> slice:
        """The slices this segment owns (written by it, or empty)."""
        if self.kind == "lower":
            return slice(0, self.start)
        if self.kind == "upper":
            return slice(self.start + 1, num_slices)
        return slice(self.start + 1, self.end)

    def expected(self) -> int:
        """Number of predictions if nothing stops early."""
        if self.kind == "gap":
            return 0 if self.mode == "none" else self.end - self.start - 1
        if self.mode != "run":
            return 0
        return abs(self.end - self.start)


def _plan(seed_order: Sequence[int], empty: Mapping[int, bool], opts: _Options) -> List[_Segment]:
    z0, z1 = seed_order[0], seed_order[-1]
    common = (opts.projection.key, opts.box_extension)
    plan = []
    for kind, seed, flag, limit in (("lower", z0, opts.stop_lower, opts.lo), ("upper", z1, opts.stop_upper, opts.hi)):
        if flag:
            mode = "no_seed_side" if empty[seed] else "stop_flag"
            plan.append(_Segment(kind, seed, limit, mode, (kind, seed, mode)))
        else:
            plan.append(_Segment(kind, seed, limit, "run", (kind, seed, "run", limit, opts.rule.key) + common))
    for a, b in zip(seed_order[:-1], seed_order[1:]):
        if b - a == 1:
            continue
        if empty[a] and empty[b]:  # the object is absent on both: nothing to grow from
            mode = "none"
        elif empty[a]:      # a is an empty stop or absent slice
            mode = "from_upper"
        elif empty[b]:
            mode = "from_lower"
        elif a == z0 and opts.stop_lower:
            mode = "from_upper"
        elif b == z1 and opts.stop_upper:
            mode = "from_lower"
        else:
            mode = "both"
        plan.append(_Segment("gap", a, b, mode, ("gap", a, b, mode) + common))
    return plan


# --------------------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------------------

class _Runner:
    def __init__(self, segmenter: SliceSegmenter, masks: np.ndarray, records: Dict[int, SliceRecord],
                 opts: _Options, progress: Optional[ProgressCallback], cancel: Optional[CancelCallback],
                 total: int) -> None:
        self.segmenter, self.masks, self.records, self.opts = segmenter, masks, records, opts
        self.progress, self.cancel = progress, cancel
        self.total, self.done = total, 0
        self.predicted: List[int] = []
        self.gap_stops: List[StopReason] = []

    def predict(self, index: int, source: np.ndarray) -> Tuple[np.ndarray, float]:
        if self.cancel is not None and self.cancel():
            raise PropagationCancelled(f"propagation cancelled before slice {index} "
                                       f"({self.done} slice(s) predicted)")
        prompt = prompt_from_mask(source, self.opts.projection, self.opts.box_extension)
        prediction = self.segmenter.predict_slice(int(index), prompt)
        mask = np.array(prediction.mask, dtype=bool, copy=True)
        if mask.shape != self.masks.shape[1:]:
            raise ValueError(f"predict_slice({index}) returned a mask of shape {mask.shape}, "
                             f"expected {self.masks.shape[1:]}")
        self.done += 1
        self.predicted.append(int(index))
        return mask, float(prediction.score)

    def report(self, index: int) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, int(index))

    def write(self, index: int, mask: np.ndarray, record: SliceRecord) -> None:
        self.masks[index] = mask
        self.records[index] = record

    # one walk away from a seed, judged by the stop rule -------------------------------------------------
    def _walk(self, seed: int, last: int, step: int, source: str) -> Tuple[int, Optional[StopReason]]:
        """Predict ``seed+step .. last`` (inclusive) each from the previous slice while the stop rule accepts;
        returns ``(last slice written or seed, StopReason of the rejected slice or None)``."""
        rule = self.opts.rule
        reference = None
        if rule.name != "micro-sam" and (last - seed) * step > 0:
            reference = seed_reference(self.segmenter, seed, self.masks[seed])
        z = seed + step
        while (z - last) * step <= 0:
            prev = self.masks[z - step]
            mask, score = self.predict(z, prev)
            iou = compute_iou(prev, mask)
            measures = measure(self.segmenter, z, prev, mask, iou, reference) if reference else {"iou": iou}
            reason = verdict(rule, mask, measures)
            if reason is not None:
                self.total -= abs(last - z)  # the slices beyond z will not be predicted
                self.report(z)
                return z - step, StopReason(reason, z, iou, measures if reference else None)
            self.write(z, mask, SliceRecord(z, source, score, iou, z - step, measures if reference else None))
            self.report(z)
            z += step
        return last, None

    # one extrapolation direction ----------------------------------------------------------------------
    def extrapolate(self, seg: _Segment) -> StopReason:
        if seg.mode != "run":
            return StopReason(seg.mode, seg.start)
        step = -1 if seg.kind == "lower" else 1
        volume_end = 0 if step < 0 else self.opts.num_slices - 1
        bound = "volume_bound" if seg.end == volume_end else "slice_range"
        _, stop = self._walk(seg.start, seg.end, step, "extrapolated")
        return stop if stop is not None else StopReason(bound, seg.end)

    # one gap between seeds ----------------------------------------------------------------------------
    def _chain(self, start: int, last: int, step: int) -> None:
        """Predict ``start+step .. last`` (inclusive) each from the previous slice; no IoU stopping."""
        for z in range(start + step, last + step, step):
            prev = self.masks[z - step]
            mask, score = self.predict(z, prev)
            iou = compute_iou(prev, mask)
            if not mask.any():
                self.total -= abs(last - z)
                self.gap_stops.append(StopReason("empty_prediction", z, iou))
                self.report(z)
                return
            self.write(z, mask, SliceRecord(z, "interpolated", score, iou, z - step))
            self.report(z)

    def _from_union(self, z: int, lower: int, upper: int) -> None:
        source = self.masks[lower] | self.masks[upper]
        if not source.any():  # both sides ended early: nothing to prompt from
            self.total -= 1
            self.report(z)
            return
        mask, score = self.predict(z, source)
        iou = compute_iou(source, mask)
        if not mask.any():
            self.gap_stops.append(StopReason("empty_prediction", z, iou))
        else:
            self.write(z, mask, SliceRecord(z, "interpolated", score, iou, (lower, upper)))
        self.report(z)

    def fill_gap(self, seg: _Segment) -> None:
        a, b = seg.start, seg.end
        diff = b - a
        if diff <= 1 or seg.mode == "none":
            return
        if self.opts.rule.name != "micro-sam":
            self._fill_gap_consistent(seg)
        elif seg.mode == "from_upper":
            self._chain(b, a + 1, -1)
        elif seg.mode == "from_lower":
            self._chain(a, b - 1, 1)
        elif diff == 2:
            self._from_union(a + 1, a, b)
        else:
            mid = (a + b) // 2
            even = diff % 2 == 0
            self._chain(a, mid - 1 if even else mid, 1)
            self._chain(b, mid + 1, -1)
            if even:
                self._from_union(mid, mid - 1, mid + 1)


    def _fill_gap_consistent(self, seg: _Segment) -> None:
        """Consistency rule: walk from the seed with the larger mask (more shape to carry) towards the other,
        judged by the rule; where it stops, walk back from the other seed over the slices left. Slices both
        walks reject stay empty; both rejections are listed in ``gap_stops``."""
        a, b = seg.start, seg.end
        if seg.mode == "from_upper":
            first = b
        elif seg.mode == "from_lower":
            first = a
        else:
            first = a if np.count_nonzero(self.masks[a]) >= np.count_nonzero(self.masks[b]) else b
        other = b if first == a else a
        step = 1 if first == a else -1
        reached, stop = self._walk(first, other - step, step, "interpolated")
        if stop is None:
            return
        if seg.mode == "both":
            _, back = self._walk(other, reached + step, -step, "interpolated")
            if back is None:
                return  # the other side filled what was left
            self.gap_stops.append(back)
        self.gap_stops.append(stop)


def _run(segmenter, masks, records, stops, segments, opts, progress, cancel) -> _Runner:
    runner = _Runner(segmenter, masks, records, opts, progress, cancel, sum(s.expected() for s in segments))
    for seg in segments:  # micro-sam's order: lower, upper, then the gaps from bottom to top
        if seg.kind == "gap":
            runner.fill_gap(seg)
        else:
            stops[seg.kind] = runner.extrapolate(seg)
    return runner


def _result(masks, records, stops, seed_order, gap_stops, runner, opts) -> PropagationResult:
    written = sorted(records)
    return PropagationResult(
        masks=masks, slices={i: records[i] for i in written}, stops=dict(stops),
        z_range=(written[0], written[-1]), seeds=tuple(int(s) for s in seed_order),
        gap_stops=tuple(sorted(gap_stops, key=lambda s: s.at_index)), predicted=tuple(runner.predicted),
        options=opts.as_dict())


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
            default: the stop rule's (0.1 for ``"consistency"``, 0.5 for ``"micro-sam"``).
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
            ``estimated_total`` shrinks when a direction stops early and equals ``done`` at the end.
        cancel: polled before each prediction; returning True raises :class:`PropagationCancelled`.
        stop_rule: ``"consistency"`` (default) or ``"micro-sam"``, or a dict / :class:`StopRule` with
            thresholds (:mod:`RobustMedSAMLib.stop_rules`).

    Returns:
        A :class:`PropagationResult` with freshly allocated arrays.
    """
    num_slices, shape = _geometry(segmenter)
    opts = _make_options(num_slices, iou_threshold, projection, box_extension, stop_lower, stop_upper,
                         slice_range, stop_rule, segmenter)
    seed_masks = _check_seeds(seeds, opts, shape)
    order = sorted(seed_masks)
    masks = np.zeros((num_slices,) + tuple(shape), dtype=bool)
    records: Dict[int, SliceRecord] = {}
    for index in order:
        masks[index] = seed_masks[index]
        records[index] = SliceRecord(index, "seed")
    plan = _plan(order, {i: not seed_masks[i].any() for i in order}, opts)
    stops: Dict[str, StopReason] = {}
    runner = _run(segmenter, masks, records, stops, plan, opts, progress, cancel)
    return _result(masks, records, stops, order, runner.gap_stops, runner, opts)


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
    num_slices, shape = _geometry(segmenter)
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
    old_opts = _make_options(num_slices, old["iou_threshold"], old["projection"], old["box_extension"],
                             old["stop_lower"], old["stop_upper"], old["slice_range"], old["stop_rule"], segmenter)
    if stop_rule is not None and iou_threshold is None:  # a new rule brings its own default threshold
        new_rule, new_iou = stop_rule, None
    else:
        new_rule, new_iou = pick(stop_rule, "stop_rule"), pick(iou_threshold, "iou_threshold")
    opts = _make_options(num_slices, new_iou, pick(projection, "projection"),
                         pick(box_extension, "box_extension"), pick(stop_lower, "stop_lower"),
                         pick(stop_upper, "stop_upper"), pick(slice_range, "slice_range"), new_rule, segmenter)
    if not 0 <= index < num_slices:
        raise ValueError(f"slice {index} is outside the volume (0..{num_slices - 1})")

    old_order = sorted(int(s) for s in previous.seeds)
    seeds = {s: previous.masks[s] for s in old_order}
    seeds[index] = new_mask
    seed_masks = _check_seeds(seeds, opts, shape)
    order = sorted(seed_masks)

    old_plan = _plan(old_order, {s: not previous.masks[s].any() for s in old_order}, old_opts)
    new_plan = _plan(order, {s: not seed_masks[s].any() for s in order}, opts)
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

    runner = _run(segmenter, masks, records, stops, redo, opts, progress, cancel)
    return _result(masks, records, stops, order, gap_stops + runner.gap_stops, runner, opts)
