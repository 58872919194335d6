"""Per-object volumetric prompts from files: our JSON format and 3D Slicer markups (``.mrk.json``).

Each object becomes an :class:`ObjectPrompts` holding one 2D :class:`~RobustMedSAMLib.prompts.Prompt` per
prompted slice, in that slice's ``(x, y)`` pixel frame (docs/coordinates.md) for a given volume and axis.

JSON format (``"coordinates"`` applies to the 3D entries ``points``/``box``)::

    {
      "coordinates": "ijk",            # "ijk" (default, continuous voxel index), "lps" or "ras" (mm)
      "axis": "k",                     # optional: axis the 2D "slices" entries refer to (0/1/2, k/j/i,
                                       #   axial/coronal/sagittal); default: the axis asked for
      "objects": [                     # one object = one segment
        {
          "name": "liver",             # optional, default "object 1", "object 2"... (must be unique)
          "color": [0.9, 0.3, 0.2],    # optional, r g b in 0..1
          "window": "lung",            # optional CT window for this object: a preset (wide, soft_tissue,
                                       #   lung, bone, brain) or [level, width] in HU
          "points": [{"position": [a, b, c], "label": 1}],   # 3D points; label 1 = object, 0 = background
          "box": {"corners": [[a, b, c], [a, b, c]]},        # 3D box: two opposite corners on one slice
          "slices": [                  # 2D form, slice pixel coordinates of slice "index" along the axis
            {"index": 12, "points": [[x, y]], "labels": [1], "box": [x0, y0, x1, y1]}
          ]
        }
      ]
    }

Rules:

* A 3D point goes to the slice ``round(along)`` (nearest integer index along the axis, halves up); its 2D
  ``(x, y)`` are the other two continuous indices (axis k: (i, j); axis j: (i, k); axis i: (j, k)).
* A point must lie inside the volume: continuous index within ``-0.5 .. n - 0.5`` (the outer voxels' edges);
  points in that outer half voxel are moved onto the border voxel centre.
* Box corners are the centres of the first and last voxels inside the box: both must be on the same slice;
  the 2D box is ``(round(min x), round(min y), round(max x) + 1, round(max y) + 1)`` (exclusive upper bound).
  2D ``box`` entries in ``slices`` are already ``x0 y0 x1 y1`` with exclusive ``x1, y1``.
* Several entries on the same slice of one object are merged (points added; at most one box per slice).
* Unknown keys are errors (typos would otherwise be silently ignored).

3D Slicer markups (``.mrk.json``, as Slicer saves them; ``coordinateSystem`` ``"LPS"`` or ``"RAS"``):

* Each markups node in the file is one object, named by its ``name`` field if present, else by the file
  name (``liver.mrk.json`` -> ``liver``; ``liver_2``... for further nodes in the same file). Its colour is the
  node's displayed (``selectedColor``) colour.
* ``Fiducial`` (point list): every control point whose ``positionStatus`` is ``defined`` (or absent) is a
  prompt point. Negative-point rule: a control point is negative (background) if its label starts with
  ``-`` or with ``neg`` (any case), or its description is ``negative``; otherwise it is positive. Slicer's
  default labels (``F-1``, ``F-2``...) are positive.
* ``ROI``: a box on the slice through the ROI centre (nearest slice), the bounding box of the pixels whose
  centres lie inside the ROI's cross-section with that slice plane (exact for a ROI aligned with the volume;
  for a rotated ROI the bounding box of the cross-section polygon). A flat/thin ROI that does not reach the
  slice's plane gives the bounding box of its projection onto the slice. The slices the ROI spans along the
  axis are reported in :attr:`ObjectPrompts.slice_range`. Other markup types (lines, curves, planes...) are
  rejected.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .intensity import IntensityError, Window, get_window
from .prompts import Prompt, PromptError
from .volume_io import AxisLike, Volume, ijk_to_slice, round_half_up

PathLike = Union[str, "os.PathLike[str]"]
COORDINATES = ("ijk", "lps", "ras")
TOP_KEYS = ("coordinates", "axis", "objects", "description")
OBJECT_KEYS = ("name", "color", "points", "box", "slices", "description", "window")
POINT_KEYS = ("position", "label")
BOX_KEYS = ("corners",)
SLICE_KEYS = ("index", "points", "labels", "box")
MARKUP_TYPES = ("Fiducial", "ROI")
_EDGE_TOL = 1e-6  # index units
_ROI_TOL = 1e-3   # index units: a ROI face this close to a voxel centre still includes it


class PromptFileError(ValueError):
    """A prompt file is invalid; the message names the file, the object and what to fix."""


@dataclass
class ObjectPrompts:
    """Prompts of one object (segment).

    Attributes:
        name: object/segment name.
        color: ``(r, g, b)`` in 0..1, or ``None`` (let the caller choose).
        slices: slice index along the axis -> 2D :class:`Prompt` in that slice's ``(x, y)`` frame.
        slice_range: ``(first, last)`` slice (inclusive) the object's ROI spans along the axis, if known.
        window: the CT window this object is segmented in (:class:`~RobustMedSAMLib.intensity.Window`), or
            ``None`` for the run's window.
    """

    name: str
    color: Optional[Tuple[float, float, float]]
    slices: Dict[int, Prompt] = field(default_factory=dict)
    slice_range: Optional[Tuple[int, int]] = None
    window: Optional[Window] = None


class _Builder:
    """Collects points/boxes per slice for one object, then builds validated Prompts."""

    def __init__(self, ctx: "_Context", name: str, color) -> None:
        self.ctx, self.name, self.color = ctx, name, color
        self.points: Dict[int, List[Tuple[float, float, int]]] = {}
        self.boxes: Dict[int, np.ndarray] = {}
        self.slice_range: Optional[Tuple[int, int]] = None
        self.window: Optional[Window] = None

    def add_point(self, index: int, xy, label: int) -> None:
        self.points.setdefault(index, []).append((float(xy[0]), float(xy[1]), int(label)))

    def add_box(self, index: int, box, what: str) -> None:
        if index in self.boxes:
            self.ctx.fail(f"object {self.name!r}: two boxes on slice {index} ({what}); a slice takes one box per "
                          "object")
        self.boxes[index] = np.asarray(box, dtype=np.float64)

    def build(self) -> ObjectPrompts:
        out = ObjectPrompts(self.name, self.color, {}, self.slice_range, self.window)
        for index in sorted(set(self.points) | set(self.boxes)):
            pts = self.points.get(index, [])
            prompt = Prompt(points=np.array([p[:2] for p in pts]) if pts else None,
                            labels=np.array([p[2] for p in pts]) if pts else None,
                            box=self.boxes.get(index))
            try:
                prompt.validate(self.ctx.volume.slice_shape(self.ctx.axis))
            except PromptError as e:
                self.ctx.fail(f"object {self.name!r}, slice {index} along axis {'kji'[self.ctx.axis]}: {e}")
            out.slices[index] = prompt
        if not out.slices:
            self.ctx.fail(f"object {self.name!r} has no prompt: give points, a box or slices")
        return out


class _Context:
    def __init__(self, volume: Volume, axis: int, source: str) -> None:
        self.volume, self.axis, self.source = volume, axis, source
        self.n_along = volume.shape[axis]
        h, w = volume.slice_shape(axis)
        self.h, self.w = h, w

    def fail(self, message: str) -> None:
        raise PromptFileError(f"{self.source}: {message}")

    def extent_text(self, coords: str) -> str:
        if coords == "ijk":
            i, j, k = self.volume.size_ijk
            return f"i 0..{i - 1}, j 0..{j - 1}, k 0..{k - 1} (voxel centres; edges 0.5 further out)"
        lo, hi = self.volume.physical_extent(coords)
        names = ("L", "P", "S") if coords == "lps" else ("R", "A", "S")
        return ", ".join(f"{n} {a:.1f}..{b:.1f}" for n, a, b in zip(names, lo, hi)) + \
            f" mm ({coords.upper()} bounding box)"

    def to_ijk(self, position, coords: str, what: str) -> np.ndarray:
        try:
            p = np.asarray(position, dtype=np.float64)
        except (TypeError, ValueError):
            p = np.array([])
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            self.fail(f"{what}: a 3D position needs 3 finite numbers, got {position!r}")
        ijk = p if coords == "ijk" else self.volume.physical_to_ijk(p, coords)
        size = np.array(self.volume.size_ijk, dtype=np.float64)
        if np.any(ijk < -0.5 - _EDGE_TOL) or np.any(ijk > size - 0.5 + _EDGE_TOL):
            where = ", ".join(f"{c:.4g}" for c in p)
            at_ijk = "" if coords == "ijk" else f" (voxel index i, j, k = {', '.join(f'{c:.1f}' for c in ijk)})"
            self.fail(f"{what} at {coords.upper()} ({where}){at_ijk} is outside the volume, which spans "
                      f"{self.extent_text(coords)}")
        return ijk

    def to_slice(self, ijk: np.ndarray) -> Tuple[int, np.ndarray]:
        """Slice index and clamped (x, y) of an inside point."""
        along, xy = ijk_to_slice(ijk, self.axis)
        index = int(np.clip(round_half_up(along[0]), 0, self.n_along - 1))
        xy = np.clip(xy[0], 0, [self.w - 1, self.h - 1])
        return index, xy


def _check_keys(ctx: _Context, obj: Any, allowed: Sequence[str], what: str) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        ctx.fail(f"{what} must be a JSON object {{...}}, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        ctx.fail(f"{what}: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed: {', '.join(allowed)}")
    return obj


def _color(ctx: _Context, value, what: str) -> Optional[Tuple[float, float, float]]:
    if value is None:
        return None
    try:
        c = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        c = ()
    if len(c) != 3 or not all(0.0 <= v <= 1.0 for v in c):
        ctx.fail(f"{what}: color must be [r, g, b] with numbers in 0..1, got {value!r}")
    return c  # type: ignore[return-value]


def _label(ctx: _Context, value, what: str) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        ctx.fail(f"{what}: label must be 1 (object) or 0 (background), got {value!r}")
    return int(value)


def _list(ctx: _Context, value, what: str) -> list:
    if not isinstance(value, list):
        ctx.fail(f"{what} must be a list [...], got {type(value).__name__}")
    return value


def _box_from_corners(ctx: _Context, b: _Builder, corners, coords: str, what: str) -> None:
    if not isinstance(corners, list) or len(corners) != 2:
        ctx.fail(f"{what}: 'corners' must be two 3D positions [[a, b, c], [a, b, c]]")
    ijk = [ctx.to_ijk(c, coords, f"{what}, corner {n + 1}") for n, c in enumerate(corners)]
    slices = [ctx.to_slice(p)[0] for p in ijk]
    if slices[0] != slices[1]:
        ctx.fail(f"{what}: the corners lie on slices {slices[0]} and {slices[1]} along axis {'kji'[ctx.axis]}; "
                 "both corners of a box must be on the same slice")
    xy = np.array([ctx.to_slice(p)[1] for p in ijk])
    lo, hi = round_half_up(xy.min(axis=0)), round_half_up(xy.max(axis=0)) + 1
    b.add_box(slices[0], [lo[0], lo[1], hi[0], hi[1]], what)


def prompts_from_json(data: Any, volume: Volume, axis: Optional[AxisLike] = None,
                      source: str = "prompt JSON") -> List[ObjectPrompts]:
    """Objects' prompts from our JSON format (already parsed), see the module docstring."""
    ctx = _Context(volume, 0, source)
    data = _check_keys(ctx, data, TOP_KEYS, "top level")
    coords = data.get("coordinates", "ijk")
    if not isinstance(coords, str) or coords.lower() not in COORDINATES:
        ctx.fail(f"'coordinates' must be one of {', '.join(COORDINATES)}, got {coords!r}")
    coords = coords.lower()
    ctx = _Context(volume, _resolve_file_axis(ctx, volume, axis, data.get("axis")), source)
    objects = _list(ctx, data.get("objects"), "'objects'") if "objects" in data else ctx.fail("no 'objects' list")
    if not objects:
        ctx.fail("'objects' is empty: add at least one object with points, a box or slices")
    out: List[ObjectPrompts] = []
    for n, obj in enumerate(objects):
        label = f"object {n + 1}"
        obj = _check_keys(ctx, obj, OBJECT_KEYS, label)
        name = str(obj.get("name", label))
        b = _Builder(ctx, name, _color(ctx, obj.get("color"), f"object {name!r}"))
        if obj.get("window") is not None:
            try:
                b.window = get_window(obj["window"])
            except IntensityError as e:
                ctx.fail(f"object {name!r}: {e}")
        for m, pt in enumerate(_list(ctx, obj.get("points", []), f"object {name!r} 'points'")):
            what = f"object {name!r}, point {m + 1}"
            pt = _check_keys(ctx, pt, POINT_KEYS, what)
            if "position" not in pt:
                ctx.fail(f"{what}: missing 'position' [a, b, c]")
            index, xy = ctx.to_slice(ctx.to_ijk(pt["position"], coords, what))
            b.add_point(index, xy, _label(ctx, pt.get("label", 1), what))
        if "box" in obj:
            what = f"object {name!r}, box"
            box = _check_keys(ctx, obj["box"], BOX_KEYS, what)
            _box_from_corners(ctx, b, box.get("corners"), coords, what)
        for m, sl in enumerate(_list(ctx, obj.get("slices", []), f"object {name!r} 'slices'")):
            _add_2d_slice(ctx, b, sl, f"object {name!r}, slices entry {m + 1}")
        out.append(b.build())
    _check_unique(ctx, out)
    return out


def _resolve_file_axis(ctx: _Context, volume: Volume, axis, file_axis) -> int:
    try:
        wanted = None if axis is None else volume.resolve_axis(axis)
        in_file = None if file_axis is None else volume.resolve_axis(file_axis)
    except ValueError as e:
        ctx.fail(str(e))
    if wanted is not None and in_file is not None and wanted != in_file:
        ctx.fail(f"the file's 2D slices are on axis {'kji'[in_file]} ('axis': {file_axis!r}) but prompts are asked "
                 f"for axis {'kji'[wanted]}; use the same axis")
    return wanted if wanted is not None else (in_file if in_file is not None else 0)


def _add_2d_slice(ctx: _Context, b: _Builder, sl, what: str) -> None:
    sl = _check_keys(ctx, sl, SLICE_KEYS, what)
    index = sl.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        ctx.fail(f"{what}: 'index' must be an integer slice index, got {index!r}")
    if not 0 <= index < ctx.n_along:
        ctx.fail(f"{what}: slice index {index} is outside 0..{ctx.n_along - 1} along axis {'kji'[ctx.axis]}")
    points = sl.get("points", [])
    labels = sl.get("labels", [1] * len(points) if isinstance(points, list) else [])
    if not isinstance(points, list) or not isinstance(labels, list) or len(points) != len(labels):
        ctx.fail(f"{what}: 'points' must be a list of [x, y] and 'labels' a list of the same length")
    for m, (p, lab) in enumerate(zip(points, labels)):
        try:
            xy = np.asarray(p, dtype=np.float64)
        except (TypeError, ValueError):
            xy = np.array([])
        if xy.shape != (2,):
            ctx.fail(f"{what}, point {m + 1}: a 2D point is [x, y], got {p!r}")
        b.add_point(index, xy, _label(ctx, lab, f"{what}, point {m + 1}"))
    if "box" in sl:
        try:
            box = np.asarray(sl["box"], dtype=np.float64)
        except (TypeError, ValueError):
            box = np.array([])
        if box.shape != (4,):
            ctx.fail(f"{what}: 'box' is [x0, y0, x1, y1], got {sl['box']!r}")
        b.add_box(index, box, what)
    if not points and "box" not in sl:
        ctx.fail(f"{what}: give 'points' and/or a 'box'")


def _check_unique(ctx: _Context, objects: List[ObjectPrompts]) -> None:
    seen = set()
    for o in objects:
        if o.name in seen:
            ctx.fail(f"several objects are named {o.name!r}; object names must be unique (one segment each)")
        seen.add(o.name)


# --------------------------------------------------------------------------------------------- markups
def is_negative_control_point(point: Dict[str, Any]) -> bool:
    """The negative-point rule for markups control points (see the module docstring)."""
    label = str(point.get("label", "")).strip().lower()
    description = str(point.get("description", "")).strip().lower()
    return label.startswith("-") or label.startswith("neg") or description == "negative"


def prompts_from_markups(data: Any, volume: Volume, axis: Optional[AxisLike] = None, source: str = "markups",
                         default_name: str = "markups") -> List[ObjectPrompts]:
    """Objects' prompts from a parsed 3D Slicer ``.mrk.json`` (one object per markups node)."""
    ctx = _Context(volume, 0, source)
    if not isinstance(data, dict) or not isinstance(data.get("markups"), list):
        ctx.fail("not a 3D Slicer markups file (no 'markups' list)")
    try:
        ax = 0 if axis is None else volume.resolve_axis(axis)
    except ValueError as e:
        ctx.fail(str(e))
    ctx = _Context(volume, ax, source)
    nodes = data["markups"]
    if not nodes:
        ctx.fail("the file holds no markups node")
    out = []
    for n, node in enumerate(nodes):
        if not isinstance(node, dict):
            ctx.fail(f"markups node {n + 1} is not a JSON object")
        name = str(node.get("name") or (default_name if n == 0 else f"{default_name}_{n + 1}"))
        kind = node.get("type")
        if kind not in MARKUP_TYPES:
            ctx.fail(f"markups node {name!r} is of type {kind!r}; supported: {', '.join(MARKUP_TYPES)} "
                     "(point list, ROI)")
        system = node.get("coordinateSystem")
        if not isinstance(system, str) or system.upper() not in ("LPS", "RAS"):
            ctx.fail(f"markups node {name!r}: 'coordinateSystem' must be \"LPS\" or \"RAS\", got {system!r}")
        coords = system.lower()
        units = node.get("coordinateUnits", "mm")
        if units != "mm":
            ctx.fail(f"markups node {name!r}: coordinates in {units!r}; only mm are supported")
        display = node.get("display") if isinstance(node.get("display"), dict) else {}
        color = _color(ctx, display.get("selectedColor", display.get("color")), f"markups node {name!r}")
        b = _Builder(ctx, name, color)
        if kind == "Fiducial":
            points = node.get("controlPoints", [])
            for m, cp in enumerate(_list(ctx, points, f"markups node {name!r} 'controlPoints'")):
                if not isinstance(cp, dict):
                    ctx.fail(f"markups node {name!r}, control point {m + 1} is not a JSON object")
                if cp.get("positionStatus", "defined") != "defined":
                    continue  # placed-but-undefined/preview points are not prompts (Slicer does not show them)
                what = f"object {name!r}, control point {m + 1} ({cp.get('label', '')!r})"
                index, xy = ctx.to_slice(ctx.to_ijk(cp.get("position"), coords, what))
                b.add_point(index, xy, 0 if is_negative_control_point(cp) else 1)
        else:
            _roi_box(ctx, b, node, coords, name)
        out.append(b.build())
    return out


def _roi_box(ctx: _Context, b: _Builder, node: Dict[str, Any], coords: str, name: str) -> None:
    what = f"ROI {name!r}"
    if node.get("insideOut"):
        ctx.fail(f"{what} is inside-out (marks everything outside); use a normal ROI")
    center_pos = node.get("center")
    if center_pos is None and node.get("controlPoints"):
        center_pos = node["controlPoints"][0].get("position")  # older files: the centre is the control point
    center = ctx.to_ijk(center_pos, coords, f"{what} centre")
    try:
        size = np.asarray(node.get("size"), dtype=np.float64)
        orientation = np.asarray(node.get("orientation", np.eye(3).ravel()), dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError):
        size, orientation = np.array([]), np.eye(3)
    if size.shape != (3,) or np.any(size < 0) or not np.all(np.isfinite(size)):
        ctx.fail(f"{what}: 'size' must be 3 numbers >= 0 (mm), got {node.get('size')!r}")
    c_phys = np.asarray(center_pos, dtype=np.float64)
    # corners in the file's space: centre + orientation columns (ROI axes) scaled by +-size/2
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = c_phys + (signs * size / 2.0) @ orientation.T
    ijk = ctx.volume.physical_to_ijk(corners, coords)
    along, xy = ijk_to_slice(ijk, ctx.axis)
    index, c_xy = ctx.to_slice(center)
    section = _cross_section(along, xy, float(index), signs)
    outline = section if len(section) else xy  # a thin ROI that misses the slice plane: its projection
    lo = np.ceil(outline.min(axis=0) - _ROI_TOL).astype(np.int64)
    hi = np.floor(outline.max(axis=0) + _ROI_TOL).astype(np.int64) + 1
    # a ROI thinner than a pixel still gives the pixel under its centre
    c_pix = round_half_up(c_xy)
    lo, hi = np.minimum(lo, c_pix), np.maximum(hi, c_pix + 1)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [ctx.w, ctx.h])
    b.add_box(index, [lo[0], lo[1], hi[0], hi[1]], what)
    first = max(0, math.ceil(along.min() - _ROI_TOL))
    last = min(ctx.n_along - 1, math.floor(along.max() + _ROI_TOL))
    b.slice_range = (min(first, index), max(last, index))


def _cross_section(along: np.ndarray, xy: np.ndarray, plane: float, signs: np.ndarray) -> np.ndarray:
    """(x, y) of the points where the box's 12 edges meet the plane ``along == plane`` (empty if it misses)."""
    points = []
    for a in range(8):
        for b in range(a + 1, 8):
            if np.count_nonzero(signs[a] != signs[b]) != 1:
                continue  # not an edge
            da, db = along[a] - plane, along[b] - plane
            if abs(da) <= _EDGE_TOL:
                points.append(xy[a])
            if abs(db) <= _EDGE_TOL:
                points.append(xy[b])
            if da * db < 0:
                points.append(xy[a] + (xy[b] - xy[a]) * (da / (da - db)))
    return np.array(points).reshape(-1, 2)


# --------------------------------------------------------------------------------------------- files
def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found. Check the path and spelling.")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot be read ({e})") from None


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".mrk.json", ".json"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def read_prompts(paths: Union[PathLike, Sequence[PathLike]], volume: Volume,
                 axis: Optional[AxisLike] = None) -> List[ObjectPrompts]:
    """Read prompts from one or several files (our JSON format or 3D Slicer ``.mrk.json``).

    A file with a top-level ``markups`` list is read as Slicer markups, any other JSON as our format.

    Args:
        paths: a file or a list of files; their objects are concatenated (names must be unique).
        volume: the volume the prompts refer to (its geometry converts LPS/RAS and checks extents).
        axis: slicing axis (0/1/2, k/j/i, axial/coronal/sagittal). Default: the JSON file's ``axis`` or 0 (k).

    Raises:
        PromptFileError: missing/invalid file, unknown keys, wrong coordinates value, points outside the
            volume, empty objects...
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[ObjectPrompts] = []
    for p in paths:
        path = Path(p)
        data = _load_json(path)
        if isinstance(data, dict) and "markups" in data:
            out += prompts_from_markups(data, volume, axis, str(path), _stem(path))
        else:
            out += prompts_from_json(data, volume, axis, str(path))
    _check_unique(_Context(volume, 0, ", ".join(str(p) for p in paths)), out)
    return out
