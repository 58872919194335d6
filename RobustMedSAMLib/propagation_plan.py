"""Propagation options, seed checks and the plan: the independent pieces of work of a propagation.

Used by :mod:`RobustMedSAMLib.propagation` (the algorithm is described there). A plan is a list of
:class:`Segment`: the extrapolation below the lowest seed, the one above the highest seed, and one per gap
between consecutive seeds; ``Segment.key`` is what :func:`~RobustMedSAMLib.propagation.repropagate` compares
to decide which pieces to recompute. Slice indices are along the segmenter's slice axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .mask_prompts import Projection, parse_projection
from .propagation_types import SliceSegmenter
from .stop_rules import RULE_DEFAULTS, StopRule, make_rule


@dataclass(frozen=True)
class Options:
    """The checked options of one propagation; ``lo``..``hi`` are the allowed slices (``slice_range`` or all)."""

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


def segmenter_geometry(segmenter: SliceSegmenter) -> Tuple[int, Tuple[int, int]]:
    """``(num_slices, (H, W))`` of ``segmenter``; TypeError / ValueError when it has none."""
    try:
        num_slices = int(segmenter.num_slices)
        h, w = (int(s) for s in segmenter.slice_shape)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TypeError("the segmenter needs num_slices (int) and slice_shape (H, W)") from exc
    if num_slices < 1 or h < 1 or w < 1:
        raise ValueError(f"segmenter has {num_slices} slices of {h} x {w}: nothing to segment")
    return num_slices, (h, w)


def make_options(num_slices: int, iou_threshold, projection, box_extension, stop_lower, stop_upper,
                 slice_range, stop_rule=None, segmenter=None) -> Options:
    """:class:`Options` from :func:`~RobustMedSAMLib.propagation.propagate`'s arguments (None: the defaults of
    the stop rule / the segmenter); ValueError naming a bad value."""
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
    return Options(rule, proj, projection, ext, bool(stop_lower), bool(stop_upper), lo, hi, rng, num_slices)


def check_seeds(seeds: Mapping[int, np.ndarray], opts: Options, shape: Tuple[int, int]) -> Dict[int, np.ndarray]:
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
class Segment:
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


def make_plan(seed_order: Sequence[int], empty: Mapping[int, bool], opts: Options) -> List[Segment]:
    """The segments for the sorted seeds (``empty[z]``: seed ``z`` has no foreground): lower, upper, then
    the gaps from bottom to top."""
    z0, z1 = seed_order[0], seed_order[-1]
    common = (opts.projection.key, opts.box_extension)
    # micro-sam fills gaps without stopping (only the rule's name matters); the consistency rule judges
    # every gap slice, so its thresholds are part of what a gap depends on
    gap_rule = (opts.rule.name,) if opts.rule.name == "micro-sam" else opts.rule.key
    plan = []
    for kind, seed, flag, limit in (("lower", z0, opts.stop_lower, opts.lo), ("upper", z1, opts.stop_upper, opts.hi)):
        if flag:
            mode = "no_seed_side" if empty[seed] else "stop_flag"
            plan.append(Segment(kind, seed, limit, mode, (kind, seed, mode)))
        else:
            plan.append(Segment(kind, seed, limit, "run", (kind, seed, "run", limit, opts.rule.key) + common))
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
        plan.append(Segment("gap", a, b, mode, ("gap", a, b, mode, gap_rule) + common))
    return plan
