"""Robustness check on the user's own volume: segment it clean and under each corruption, compare.

The same prompts are run on the clean volume and on copies degraded slice by slice along the segmentation
axis (:func:`~RobustMedSAMLib.corruptions.corrupt_volume`, seeded, severity 3 = the RobustMedSAM paper's
setting). Each object's mask is compared by Dice with its clean mask (how much the model's answer changes
with image quality) and, when a reference segmentation is given, with the matching reference segment
(accuracy). A prompt whose own slice comes out empty under a corruption is reported, not fatal.

Cost: every corrupted copy is encoded again (one encoder pass per slice reached by the propagation).
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import corruptions
from .prompt_files import ObjectPrompts
from .segmentation_io import Segmentation
from .volume_io import AxisLike, Volume
from .intensity import WindowLike
from .volume_results import SeedError, uint8_volume


@dataclass
class RobustnessRow:
    """One object under one condition (``corruption`` "clear" = the clean volume, severity 0)."""

    corruption: str
    severity: int
    object: str
    voxels: int
    dice_vs_clean: float
    dice_vs_reference: Optional[float]
    note: str = ""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def reference_masks(reference: Union[Segmentation, Mapping[str, np.ndarray]], objects: Sequence[ObjectPrompts]
                    ) -> Dict[str, np.ndarray]:
    """``{object name: (K, J, I) bool}`` from a reference on the volume's grid: a :class:`Segmentation` or
    ``{segment name: (K, J, I) mask}`` (e.g. the segments of a Slicer segmentation node).

    Objects match segments by name (case-insensitive); a single object and a single segment match whatever
    their names. Raises ValueError naming both lists when an object has no match.
    """
    if isinstance(reference, Segmentation):
        named = {s.name: (lambda v=s.label_value: reference.labels == v) for s in reference.segments}
    else:
        named = {str(name): (lambda m=mask: np.asarray(m, bool)) for name, mask in reference.items()}
    by_name = {name.lower(): name for name in named}
    out = {}
    for obj in objects:
        name = by_name.get(obj.name.lower())
        if name is None and len(objects) == 1 and len(named) == 1:
            name = next(iter(named))
        if name is None:
            raise ValueError(f"the reference segmentation has no segment named {obj.name!r} (it has: "
                             f"{', '.join(named) or 'none'}); name the prompt objects like the reference segments")
        out[obj.name] = named[name]()
    return out


def check_conditions(corruption_names: Optional[Sequence[str]], severity: int) -> List[str]:
    """The corruption names to run (default: all 12, :func:`corruptions.names`); raises ValueError naming the
    valid choices for an unknown name or a severity outside 1..5."""
    names = list(corruptions.names() if corruption_names is None else corruption_names)
    for name in names:
        if name not in corruptions.names():
            raise ValueError(f"unknown corruption {name!r}; use one of: {', '.join(corruptions.names())}")
    if int(severity) not in corruptions.SEVERITIES:
        raise ValueError(f"severity must be one of {corruptions.SEVERITIES}, got {severity!r}")
    return names


def robustness_check(volume: Volume, objects: Sequence[ObjectPrompts], predictor, *,
                     corruption_names: Optional[Sequence[str]] = None, severity: int = 3, seed: int = 0,
                     axis: AxisLike = 0, modality: Optional[str] = None, window: Optional[WindowLike] = None,
                     images: Optional[np.ndarray] = None,
                     reference: Optional[Union[Segmentation, Mapping[str, np.ndarray]]] = None,
                     progress: Optional[Callable[[int, int, str], None]] = None,
                     cancel: Optional[Callable[[], bool]] = None, **options) -> List[RobustnessRow]:
    """Segment ``objects`` on the clean volume and under each corruption; one row per object and condition.

    Arguments:
        volume, objects, predictor, axis, modality, window, images: as
            :func:`~.volume_segmentation.segment_volume` (``images``: the clean volume already mapped to uint8).
        corruption_names: default all 12 (:func:`corruptions.names`); severity 1..5; seed: noise seed.
        reference: a segmentation on the volume's grid (``read_segmentation(path, reference=volume)``) or
            ``{segment name: (K, J, I) mask}``; see :func:`reference_masks`.
        progress: ``progress(done, total, message)`` with one unit per condition.
        options: propagation options passed to ``segment_volume`` (``iou_threshold``, ``projection``, ...).
    """
    from .volume_segmentation import segment_volume

    names = check_conditions(corruption_names, severity)  # fail before any model work
    truth = reference_masks(reference, objects) if reference is not None else {}
    ax = volume.resolve_axis(axis)
    clean_images = uint8_volume(volume, modality, window) if images is None else images
    conditions = [(corruptions.CLEAR, 0)] + [(name, int(severity)) for name in names]
    clean: Dict[str, np.ndarray] = {}
    rows: List[RobustnessRow] = []
    for done, (name, level) in enumerate(conditions):
        if progress is not None:
            progress(done, len(conditions), name)
        images = clean_images if name == corruptions.CLEAR else corruptions.corrupt_volume(
            clean_images, name, level, seed=seed, axis=ax)
        try:
            result = segment_volume(volume, objects, predictor, axis=ax, images=images, cancel=cancel, **options)
            masks, note = {o.name: o.mask for o in result.objects}, ""
        except SeedError as e:
            if name == corruptions.CLEAR:
                raise
            masks, note = {o.name: np.zeros(volume.shape, bool) for o in objects}, f"no seed mask: {e}"
        for obj in objects:
            mask = masks[obj.name]
            if name == corruptions.CLEAR:
                clean[obj.name] = mask
            ref = truth.get(obj.name)
            rows.append(RobustnessRow(name, level, obj.name, int(mask.sum()), dice(mask, clean[obj.name]),
                                      None if ref is None else dice(mask, ref), note))
    if progress is not None:
        progress(len(conditions), len(conditions), "done")
    return rows


def worst_conditions(rows: Sequence[RobustnessRow]) -> Dict[str, Tuple[float, str]]:
    """``{object: (lowest Dice vs clean, its corruption)}`` over the rows, objects in row order."""
    worst: Dict[str, Tuple[float, str]] = {}
    for r in rows:
        if r.object not in worst or r.dice_vs_clean < worst[r.object][0]:
            worst[r.object] = (r.dice_vs_clean, r.corruption)
    return worst


def to_csv(rows: Sequence[RobustnessRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(RobustnessRow.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return out.getvalue()


def to_markdown(rows: Sequence[RobustnessRow]) -> str:
    """A table (one line per object and condition), then the mean Dice over the corruptions."""
    has_ref = any(r.dice_vs_reference is not None for r in rows)
    head = "| corruption | severity | object | voxels | Dice vs clean |" + (" Dice vs reference |" if has_ref else "")
    lines = [head, "|---" * (5 + has_ref) + "|"]
    for r in rows:
        ref = "" if not has_ref else (" n/a |" if r.dice_vs_reference is None else f" {r.dice_vs_reference:.3f} |")
        note = " (no seed mask)" if r.note else ""
        lines.append(f"| {r.corruption} | {r.severity} | {r.object}{note} | {r.voxels} | {r.dice_vs_clean:.3f} |{ref}")
    degraded = [r for r in rows if r.corruption != corruptions.CLEAR]
    if degraded:
        mean = np.mean([r.dice_vs_clean for r in degraded])
        summary = f"\nMean Dice vs clean over {len(degraded)} corrupted runs: {mean:.3f}"
        refs = [r.dice_vs_reference for r in degraded if r.dice_vs_reference is not None]
        if refs:
            clean_refs = [r.dice_vs_reference for r in rows if r.corruption == corruptions.CLEAR
                          and r.dice_vs_reference is not None]
            summary += f"; vs reference: {np.mean(refs):.3f} (clean: {np.mean(clean_refs):.3f})"
        lines.append(summary)
    return "\n".join(lines) + "\n"
