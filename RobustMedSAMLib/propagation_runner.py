"""Runs a propagation plan: predicts the slices of each :class:`~RobustMedSAMLib.propagation_plan.Segment`
in micro-sam's order and collects the masks, slice records and stops into a ``PropagationResult``.

Used by :mod:`RobustMedSAMLib.propagation` (the algorithm is described there); masks are ``(num_slices, H,
W)`` bool, slice ``z`` along the segmenter's slice axis.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .mask_prompts import prompt_from_mask
from .propagation_plan import Options, Segment
from .propagation_types import (CancelCallback, ProgressCallback, PropagationCancelled, PropagationResult,
                                SliceRecord, SliceSegmenter, StopReason, compute_iou)
from .stop_rules import measure, seed_reference, verdict


class Runner:
    """Predicts and writes slices into ``masks`` / ``records`` for the segments it is given, counting progress
    (``total`` the expected number of predictions, reduced when a walk stops early)."""

    def __init__(self, segmenter: SliceSegmenter, masks: np.ndarray, records: Dict[int, SliceRecord],
                 opts: Options, progress: Optional[ProgressCallback], cancel: Optional[CancelCallback],
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
    def extrapolate(self, seg: Segment) -> StopReason:
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

    def fill_gap(self, seg: Segment) -> None:
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

    def _fill_gap_consistent(self, seg: Segment) -> None:
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
            # the first walk took the slices beyond its rejection off the estimate; the walk back predicts
            # them, and the rejected slice again
            self.total += abs((other - step) - (reached + step)) + 1
            _, back = self._walk(other, reached + step, -step, "interpolated")
            if back is None:
                return  # the other side filled what was left
            self.gap_stops.append(back)
        self.gap_stops.append(stop)


def run_plan(segmenter, masks, records, stops, segments, opts, progress, cancel) -> Runner:
    """Run ``segments`` in order, writing into ``masks`` / ``records`` and the extrapolation stops into ``stops``."""
    runner = Runner(segmenter, masks, records, opts, progress, cancel, sum(s.expected() for s in segments))
    for seg in segments:  # micro-sam's order: lower, upper, then the gaps from bottom to top
        if seg.kind == "gap":
            runner.fill_gap(seg)
        else:
            stops[seg.kind] = runner.extrapolate(seg)
    return runner


def build_result(masks, records, stops, seed_order, gap_stops, runner, opts) -> PropagationResult:
    """The :class:`PropagationResult` of a finished run."""
    written = sorted(records)
    return PropagationResult(
        masks=masks, slices={i: records[i] for i in written}, stops=dict(stops),
        z_range=(written[0], written[-1]), seeds=tuple(int(s) for s in seed_order),
        gap_stops=tuple(sorted(gap_stops, key=lambda s: s.at_index)), predicted=tuple(runner.predicted),
        options=opts.as_dict())
