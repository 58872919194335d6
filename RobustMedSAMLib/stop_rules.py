"""When does propagation stop? The rules that accept or reject each extrapolated slice.

:func:`~RobustMedSAMLib.propagation.propagate` predicts slice ``z`` from the accepted mask of its neighbour
``p`` (the previous slice in the walk) and asks its rule whether to keep it. A rejected slice is not written
and ends that direction.

``"micro-sam"`` (micro-sam's ``segment_mask_in_volume``): reject when the prediction is empty or its IoU
with mask ``p`` is below ``iou_threshold`` (default 0.5); gaps between seeds are filled from both sides
without stopping.

``"consistency"`` (the default): the object must stay *itself*, compared with the seed the walk started
from. Reject when

* the prediction is empty (``empty_prediction``), or its IoU with mask ``p`` is below ``iou_threshold``
  (default 0.4; ``iou_below_threshold``);
* its area exceeds ``max_growth`` x the area of ``p`` (default 2; ``area_jump``): a box that grows with its
  mask runs away into the surrounding tissue;
* fewer than ``min_intensity_fraction`` (default 0.5) of its pixels have grey levels inside the seed's
  5th-95th percentile range (``intensity_changed``): e.g. a lung mask that slides onto the liver;
* the cosine similarity of its mean image-encoder embedding with the seed mask's is below
  ``min_similarity`` (default 0.8; ``appearance_changed``): what the model "sees" inside the mask is no
  longer the seeded object.

Gaps between seeds are filled by walking from the seed with the larger mask towards the other one, judged
by the same rule against that seed; where it stops, a walk from the other seed fills the slices left.
(Tiny masks at an object's end carry little shape; a box on them is a poor prompt.)

The two last tests need the segmenter to offer ``slice_values(index, mask) -> (N,)`` grey levels and
``slice_descriptor(index, mask) -> (D,)`` unit vector (:class:`~RobustMedSAMLib.volume_segmentation.VolumeSegmenter`
does); without them they are skipped. How the defaults were chosen (LiteMedSAM on the sample chest CT,
measured per slice, four windows): README, "Propagation" and ``docs/propagation.md``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

RULES = ("consistency", "micro-sam")
DEFAULT_RULE = "consistency"

#: defaults per rule, for the options left as None
RULE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "micro-sam": {"iou_threshold": 0.5, "box_extension": 0.025},
    "consistency": {"iou_threshold": 0.4, "box_extension": 0.05},
}

#: grey levels of the seed that define its intensity range (percentiles)
INTENSITY_PERCENTILES = (5.0, 95.0)


@dataclass(frozen=True)
class StopRule:
    """A rule and its thresholds (see the module docstring); build it with :func:`make_rule`."""

    name: str = DEFAULT_RULE
    iou_threshold: float = 0.4
    max_growth: float = 2.0
    min_intensity_fraction: float = 0.5
    min_similarity: float = 0.8

    @property
    def key(self) -> Tuple[Any, ...]:
        return tuple(asdict(self).values())

    def as_dict(self) -> Dict[str, Any]:
        if self.name == "micro-sam":
            return {"name": self.name}
        return {k: v for k, v in asdict(self).items() if k != "iou_threshold"}


def make_rule(rule: Union[None, str, Mapping[str, Any], StopRule], iou_threshold: Optional[float]) -> StopRule:
    """A :class:`StopRule` from a name (``"consistency"`` / ``"micro-sam"``), a dict of its fields (``name``
    plus any of ``max_growth``, ``min_intensity_fraction``, ``min_similarity``) or a StopRule;
    ``iou_threshold`` None takes the rule's default."""
    if isinstance(rule, StopRule):
        fields = asdict(rule)
    elif rule is None or isinstance(rule, str):
        fields = {"name": DEFAULT_RULE if rule is None else rule}
    elif isinstance(rule, Mapping):
        fields = dict(rule)
        unknown = set(fields) - set(StopRule.__dataclass_fields__) - {"iou_threshold"}
        if unknown:
            raise ValueError(f"unknown stop rule option(s) {sorted(unknown)}; use name, max_growth, "
                             "min_intensity_fraction, min_similarity")
    else:
        raise ValueError(f"{rule!r} is not a stop rule: give one of {', '.join(RULES)} or a dict")
    name = str(fields.get("name", DEFAULT_RULE)).strip().lower().replace("_", "-")
    if name in ("microsam", "iou"):
        name = "micro-sam"
    if name not in RULES:
        raise ValueError(f"unknown stop rule {fields.get('name')!r}; choose one of {', '.join(RULES)}")
    fields["name"] = name
    if iou_threshold is not None:
        fields["iou_threshold"] = iou_threshold
    elif not isinstance(rule, StopRule) and "iou_threshold" not in fields:
        fields["iou_threshold"] = RULE_DEFAULTS[name]["iou_threshold"]
    out = StopRule(**{k: float(v) if k != "name" else v for k, v in fields.items()})
    if not 0.0 <= out.iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {out.iou_threshold}")
    if not (out.max_growth > 1.0 and 0.0 <= out.min_intensity_fraction <= 1.0 and -1.0 <= out.min_similarity <= 1.0):
        raise ValueError("stop rule thresholds: max_growth > 1, min_intensity_fraction in [0, 1], "
                         f"min_similarity in [-1, 1]; got {out}")
    return out


@dataclass
class SeedReference:
    """What the consistency rule remembers of a seed: grey-level range and mean embedding (or None)."""

    intensity_range: Optional[Tuple[float, float]]
    descriptor: Optional[np.ndarray]


def seed_reference(segmenter, index: int, mask: np.ndarray) -> SeedReference:
    """The seed's reference values, from whatever the segmenter offers (see the module docstring)."""
    values = _values(segmenter, index, mask)
    rng = None
    if values is not None and values.size:
        lo, hi = np.percentile(values.astype(np.float64), INTENSITY_PERCENTILES)
        rng = (float(lo), float(hi))
    return SeedReference(rng, _descriptor(segmenter, index, mask))


def _values(segmenter, index: int, mask: np.ndarray) -> Optional[np.ndarray]:
    fn = getattr(segmenter, "slice_values", None)
    return None if fn is None or not mask.any() else np.asarray(fn(int(index), mask)).reshape(-1)


def _descriptor(segmenter, index: int, mask: np.ndarray) -> Optional[np.ndarray]:
    fn = getattr(segmenter, "slice_descriptor", None)
    if fn is None or not mask.any():
        return None
    d = fn(int(index), mask)
    if d is None:
        return None
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    n = np.linalg.norm(d)
    return d / n if n > 0 else None


def measure(segmenter, index: int, previous: np.ndarray, mask: np.ndarray, iou: float,
            reference: Optional[SeedReference]) -> Dict[str, float]:
    """The measurements of a predicted slice that the consistency rule tests (JSON-able floats):
    ``iou`` with the previous mask, ``growth`` (area / previous area) and, where available,
    ``intensity_fraction`` and ``similarity`` to the seed."""
    out = {"iou": float(iou), "growth": float(mask.sum()) / max(float(previous.sum()), 1.0)}
    if reference is None or not mask.any():
        return out
    if reference.intensity_range is not None:
        values = _values(segmenter, index, mask)
        if values is not None:
            lo, hi = reference.intensity_range
            out["intensity_fraction"] = float(np.mean((values >= lo) & (values <= hi)))
    if reference.descriptor is not None:
        d = _descriptor(segmenter, index, mask)
        if d is not None:
            out["similarity"] = float(d @ reference.descriptor)
    return out


def verdict(rule: StopRule, mask: np.ndarray, measures: Mapping[str, float]) -> Optional[str]:
    """None to accept the slice, else the stop reason (:data:`~RobustMedSAMLib.propagation.STOP_REASONS`)."""
    if not mask.any():
        return "empty_prediction"
    if measures["iou"] < rule.iou_threshold:
        return "iou_below_threshold"
    if rule.name == "micro-sam":
        return None
    if measures["growth"] > rule.max_growth:
        return "area_jump"
    if measures.get("intensity_fraction", 1.0) < rule.min_intensity_fraction:
        return "intensity_changed"
    if measures.get("similarity", 1.0) < rule.min_similarity:
        return "appearance_changed"
    return None
