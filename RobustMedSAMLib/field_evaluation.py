"""Field evaluation: how well does a model + propagation setting segment *your* annotated scan?

For every segment of a reference segmentation (on the volume's grid), along one slice axis:

* **oracle**: the reference's box on every slice where the segment is present (the best a box can do, slice
  by slice; no propagation);
* **one box**: the reference box on the segment's largest slice, then propagation;
* **three boxes**: reference boxes on its first, largest and last slice, then propagation. A box that gives
  an empty mask on the first (last) slice becomes an empty stop seed there (the object ends at that slice);

each with its 3D Dice against the reference, the slice range found against the true one, and why each
direction stopped. Slices are encoded once and shared by the three runs and all segments (the predictor's
cache; give it ``disk_dir`` to reuse encodings across runs). Boxes follow prompts.py's convention (exclusive
max), computed with :func:`~RobustMedSAMLib.prompts.box_from_mask` from the reference slice.

Outputs: :func:`to_markdown`, :func:`to_csv` and :func:`write_png` (a few slices with reference and result
outlines, drawn with Pillow). Used by ``robustmedsam evaluate-volume``.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .intensity import WindowLike, get_window
from .prompts import Prompt, box_from_mask
from .propagation import PropagationResult, propagate
from .robustness import dice
from .segmentation_io import Segmentation
from .volume_io import AxisLike, Volume
from .volume_segmentation import VolumeSegmenter, uint8_volume

Range = Optional[Tuple[int, int]]


@dataclass
class Run:
    """One way of prompting a segment: 3D Dice, slice range found, stop reasons (``"lower"``/``"upper"`` ->
    ``"reason at slice"``), and the ``(num_slices, H, W)`` mask along the axis."""

    dice: float
    found: Range
    stops: Dict[str, str] = field(default_factory=dict)
    masks: Optional[np.ndarray] = field(default=None, repr=False)


@dataclass
class SegmentEvaluation:
    """All runs of one reference segment. ``true_range``: first/last slice where the reference is present;
    ``largest``: its largest slice; ``window``: the intensity mapping it was segmented in (description);
    ``reference``: its ``(num_slices, H, W)`` mask along the axis."""

    name: str
    true_range: Tuple[int, int]
    largest: int
    oracle: Run
    one_box: Run
    three_boxes: Run
    window: str = ""
    notes: List[str] = field(default_factory=list)
    reference: Optional[np.ndarray] = field(default=None, repr=False)

    def overrun(self, run: Run) -> int:
        """Slices found beyond the true range (0 if inside it; counts both ends, the larger)."""
        if run.found is None:
            return 0
        return max(0, self.true_range[0] - run.found[0], run.found[1] - self.true_range[1])


@dataclass
class FieldEvaluation:
    """The evaluation of one volume: ``segments`` in order, the ``axis`` and the ``options`` used."""

    segments: List[SegmentEvaluation]
    axis: int
    options: Dict[str, object] = field(default_factory=dict)

    def by_name(self) -> Dict[str, SegmentEvaluation]:
        return {s.name: s for s in self.segments}

    def mean(self, run: str, names: Optional[Sequence[str]] = None) -> float:
        """Mean 3D Dice of ``run`` (``"oracle"``, ``"one_box"``, ``"three_boxes"``) over ``names`` (default all)."""
        segs = [s for s in self.segments if names is None or s.name in names]
        return float(np.mean([getattr(s, run).dice for s in segs])) if segs else float("nan")


def _range(stack: np.ndarray) -> Range:
    z = np.flatnonzero(stack.reshape(stack.shape[0], -1).any(axis=1))
    return (int(z[0]), int(z[-1])) if z.size else None


def _stops(result: PropagationResult) -> Dict[str, str]:
    return {side: f"{stop.reason} at {stop.at_index}" for side, stop in sorted(result.stops.items())}


def reference_segments(reference: Union[Segmentation, Mapping[str, np.ndarray]],
                       names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """``{segment name: (K, J, I) bool}`` from a :class:`Segmentation` or a mapping; ``names`` selects
    (case-insensitive; an unknown name is an error listing the segments)."""
    if isinstance(reference, Segmentation):
        masks = {s.name: reference.labels == s.label_value for s in reference.segments}
    else:
        masks = {str(k): np.asarray(v, bool) for k, v in reference.items()}
    if names is None:
        return masks
    lower = {k.lower(): k for k in masks}
    out = {}
    for name in names:
        key = lower.get(str(name).lower())
        if key is None:
            raise ValueError(f"the reference has no segment named {name!r}; it has: {', '.join(masks) or 'none'}")
        out[key] = masks[key]
    return out


def evaluate_segment(segmenter: VolumeSegmenter, name: str, reference: np.ndarray, **options) -> SegmentEvaluation:
    """The three runs for one segment; ``reference`` is ``(num_slices, H, W)`` along the segmenter's axis;
    ``options`` go to :func:`~RobustMedSAMLib.propagation.propagate`."""
    area = reference.reshape(reference.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(area)
    if present.size == 0:
        raise ValueError(f"reference segment {name!r} is empty")
    first, last, largest = int(present[0]), int(present[-1]), int(np.argmax(area))
    oracle = np.zeros(reference.shape, dtype=bool)
    for z in present:
        oracle[z] = segmenter.predict_slice(int(z), Prompt(box=box_from_mask(reference[z]))).mask
    notes: List[str] = []
    runs = {}
    for label, seeds in (("one box", [largest]), ("three boxes", sorted({first, largest, last}))):
        masks = {z: oracle[z] for z in seeds}
        if not masks[largest].any():
            notes.append(f"{label}: the box on the largest slice {largest} gave an empty mask")
            runs[label] = Run(0.0, None, {}, np.zeros_like(oracle))
            continue
        lower, upper = seeds[0], seeds[-1]
        stop_lower, stop_upper = not masks[lower].any(), not masks[upper].any()
        for flag, z in ((stop_lower, lower), (stop_upper, upper)):
            if flag:
                notes.append(f"{label}: the box on slice {z} gave an empty mask (used as the object's end)")
        result = propagate(segmenter, masks, stop_lower=stop_lower, stop_upper=stop_upper, **options)
        runs[label] = Run(dice(result.masks, reference), _range(result.masks), _stops(result), result.masks)
    return SegmentEvaluation(name, (first, last), largest, Run(dice(oracle, reference), _range(oracle), {}, oracle),
                             runs["one box"], runs["three boxes"], notes=notes, reference=reference)


def field_evaluation(volume: Volume, reference: Union[Segmentation, Mapping[str, np.ndarray]], predictor, *,
                     segments: Optional[Sequence[str]] = None, axis: AxisLike = 0, modality: Optional[str] = None,
                     window: Optional[WindowLike] = None, windows: Optional[Mapping[str, WindowLike]] = None,
                     square_pixels: bool = False, progress: Optional[Callable[[int, int, str], None]] = None,
                     **options) -> FieldEvaluation:
    """Evaluate every (or each named) reference segment; see the module docstring.

    Arguments:
        volume: the scan. reference: a segmentation on its grid (``read_segmentation(path, reference=volume)``)
            or ``{segment name: (K, J, I) mask}``.
        predictor: a :class:`~RobustMedSAMLib.predictor.Predictor`.
        segments: names to evaluate (default: all). axis: slice axis.
        modality, window: the intensity mapping for all segments (default: guessed modality; CT: ``wide``);
            ``windows`` maps segment names to their own CT window.
        square_pixels: resample non-square slices to square pixels for the model (see ``segment_volume``).
        options: propagation options (``stop_rule``, ``iou_threshold``, ``projection``, ``box_extension``).
        progress: ``progress(done, total, segment name)`` per segment.
    """
    ax = volume.resolve_axis(axis)
    masks = reference_segments(reference, segments)
    if not masks:
        raise ValueError("the reference segmentation has no segment to evaluate")
    spacing = tuple(float(v) for v in volume.spacing[::-1]) if square_pixels else None
    segmenters: Dict[object, Tuple[VolumeSegmenter, str]] = {}
    own = {str(k).lower(): v for k, v in (windows or {}).items()}
    unknown = sorted(set(own) - {name.lower() for name in masks})
    if unknown:
        raise ValueError(f"a window is given for segment(s) {unknown} that are not evaluated; the evaluated "
                         f"segments are: {', '.join(masks)} (check the names given with --segment-window)")
    for name, w in own.items():
        get_window(w)  # a bad window fails before any slice is encoded
    out: List[SegmentEvaluation] = []
    for n, (name, mask) in enumerate(masks.items()):
        if progress is not None:
            progress(n, len(masks), name)
        if mask.shape != volume.shape:
            raise ValueError(f"reference segment {name!r} has shape {mask.shape}, the volume {volume.shape}; "
                             "read the reference with read_segmentation(path, reference=volume)")
        w = own.get(name.lower(), window)
        key = None if w is None else get_window(w)
        if key not in segmenters:
            from .intensity import intensity_mapping

            mapping = intensity_mapping(volume.array, modality=modality, window=key)
            segmenters[key] = (VolumeSegmenter(predictor, mapping.apply(volume.array), ax, voxel_spacing=spacing),
                               mapping.description)
        segmenter, description = segmenters[key]
        evaluation = evaluate_segment(segmenter, name, np.moveaxis(mask, ax, 0), **options)
        evaluation.window = description
        out.append(evaluation)
    if progress is not None:
        progress(len(masks), len(masks), "done")
    return FieldEvaluation(out, ax, dict(options))


# ------------------------------------------------------------------------------------------------ output
def _fmt_range(r: Range) -> str:
    return "-" if r is None else f"{r[0]}-{r[1]}"


COLUMNS = ("segment", "true slices", "oracle Dice", "one box Dice", "one box slices", "one box stops",
           "three boxes Dice", "three boxes slices", "three boxes stops", "window", "notes")


def rows(evaluation: FieldEvaluation) -> List[Dict[str, object]]:
    """One dict per segment with the :data:`COLUMNS` keys (numbers rounded to 3 decimals)."""
    out = []
    for s in evaluation.segments:
        out.append({"segment": s.name, "true slices": _fmt_range(s.true_range),
                    "oracle Dice": round(s.oracle.dice, 3),
                    "one box Dice": round(s.one_box.dice, 3), "one box slices": _fmt_range(s.one_box.found),
                    "one box stops": "; ".join(f"{k} {v}" for k, v in s.one_box.stops.items()),
                    "three boxes Dice": round(s.three_boxes.dice, 3),
                    "three boxes slices": _fmt_range(s.three_boxes.found),
                    "three boxes stops": "; ".join(f"{k} {v}" for k, v in s.three_boxes.stops.items()),
                    "window": s.window, "notes": "; ".join(s.notes)})
    return out


def to_csv(evaluation: FieldEvaluation) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(evaluation))
    return buf.getvalue()


def to_markdown(evaluation: FieldEvaluation, summary: Optional[Sequence[str]] = None) -> str:
    """A Markdown table (one row per segment, stop reasons and notes below it) and, for the segments in
    ``summary`` (default all), the mean Dice of each run and its ratio to the oracle."""
    lines = ["| segment | true slices | oracle | one box | slices | three boxes | slices |",
             "|---|---|---:|---:|---|---:|---|"]
    for s in evaluation.segments:
        lines.append(f"| {s.name} | {_fmt_range(s.true_range)} | {s.oracle.dice:.3f} | {s.one_box.dice:.3f} | "
                     f"{_fmt_range(s.one_box.found)} | {s.three_boxes.dice:.3f} | {_fmt_range(s.three_boxes.found)} |")
    names = list(summary) if summary is not None else [s.name for s in evaluation.segments]
    oracle = evaluation.mean("oracle", names)
    one, three = evaluation.mean("one_box", names), evaluation.mean("three_boxes", names)
    ratio = (lambda v: f"{v / oracle:.2f} x oracle") if oracle > 0 else (lambda v: "oracle 0: no ratio")
    lines += ["", f"Mean over {', '.join(names)}: oracle {oracle:.3f}, one box {one:.3f} ({ratio(one)}), "
              f"three boxes {three:.3f} ({ratio(three)}).", "", "Stops:"]
    for s in evaluation.segments:
        one_stops = ", ".join(f"{k} {v}" for k, v in s.one_box.stops.items()) or "-"
        three_stops = ", ".join(f"{k} {v}" for k, v in s.three_boxes.stops.items()) or "-"
        lines.append(f"- {s.name} ({s.window}): one box: {one_stops}; three boxes: {three_stops}"
                     + (f". {'; '.join(s.notes)}" if s.notes else ""))
    return "\n".join(lines) + "\n"


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def write_png(path: Union[str, Path], volume: Volume, evaluation: FieldEvaluation, *,
              images: Optional[np.ndarray] = None, run: str = "one_box", slices: Optional[Sequence[int]] = None,
              colors: Optional[Mapping[str, Tuple[float, float, float]]] = None, scale: int = 2,
              segments: Optional[Sequence[str]] = None) -> Path:
    """A PNG of a few slices: for each, the reference outlines (left) and the ``run``'s result outlines
    (right) of every segment in its colour, on the grey image (``images``: the uint8 volume, default the
    volume in the default window). ``slices``: indices along the axis (default: 4 spread over the segments'
    true ranges). Pixels are repeated ``scale`` times (nearest) so outlines stay sharp. ``segments``: the
    names to draw (default all). Rows and columns are the slice's array rows/columns (docs/coordinates.md)."""
    from PIL import Image, ImageDraw

    from .segmentation_io import DEFAULT_COLORS

    ax = evaluation.axis
    grey = uint8_volume(volume) if images is None else images
    shown = [s for s in evaluation.segments if segments is None or s.name in segments]
    lo = min(s.true_range[0] for s in shown)
    hi = max(s.true_range[1] for s in shown)
    if slices is None:
        slices = sorted({int(round(v)) for v in np.linspace(lo, hi, 6)[1:-1]})
    tiles = []
    for z in slices:
        base = np.take(grey, int(z), axis=ax)
        pair = []
        for kind in ("reference", run):
            rgb = np.repeat(base[:, :, None], 3, axis=2).copy()
            for n, s in enumerate(evaluation.segments):
                if s.name not in {t.name for t in shown}:
                    continue
                color = (colors or {}).get(s.name) or DEFAULT_COLORS[n % len(DEFAULT_COLORS)]
                stack = s.reference if kind == "reference" else getattr(s, run).masks
                if stack is not None:
                    rgb[_outline(np.asarray(stack[int(z)], bool))] = [int(255 * c) for c in color]
            pair.append(np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)))
        tiles.append((z, pair))
    h, w = tiles[0][1][0].shape[:2]
    pad, label = 4, 14
    canvas = Image.new("RGB", (2 * w + 3 * pad, len(tiles) * (h + label + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (z, pair) in enumerate(tiles):
        y = pad + row * (h + label + pad)
        for col, (tile, title) in enumerate(zip(pair, ("reference", run.replace("_", " ")))):
            x = pad + col * (w + pad)
            draw.text((x, y), f"slice {z}: {title}", fill=(0, 0, 0))
            canvas.paste(Image.fromarray(tile), (x, y + label))
    path = Path(path)
    canvas.save(path)
    return path
