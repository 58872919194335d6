"""Segmentation files with their geometry: 3D Slicer ``.seg.nrrd`` (segment names and colours) and label
volumes (NIfTI, NRRD, MetaImage), written atomically and checked before any work starts.

Label arrays are indexed ``labels[k, j, i]`` on the grid of a reference :class:`~.volume_io.Volume`
(``ijk_to_lps``), as everywhere in the engine (docs/coordinates.md). No Qt, Slicer or torch import here.
"""
from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .volume_io import VOLUME_EXTENSIONS, PathLike, Volume, VolumeError, _ext, _first_line

SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".nii", ".nii.gz", ".nrrd", ".mha")

# Default colours for segments without one (r, g, b in 0..1).
DEFAULT_COLORS = (
    (0.90, 0.30, 0.25), (0.30, 0.70, 0.35), (0.25, 0.45, 0.90), (0.95, 0.80, 0.20), (0.70, 0.35, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.55, 0.15), (0.55, 0.75, 0.20), (0.85, 0.40, 0.60), (0.45, 0.30, 0.20),
)

@dataclass
class SegmentInfo:
    """One segment: ``name``, ``color`` (r, g, b floats 0..1) and its ``label_value`` (>= 1) in a label array."""

    name: str
    color: Tuple[float, float, float]
    label_value: int

    def __post_init__(self) -> None:
        self.name = str(self.name)
        c = tuple(float(v) for v in self.color)
        if len(c) != 3 or not all(0.0 <= v <= 1.0 for v in c):
            raise VolumeError(f"segment {self.name!r}: colour must be 3 numbers in 0..1 (r, g, b), got {self.color}")
        self.color = c  # type: ignore[assignment]
        if isinstance(self.label_value, (bool, np.bool_)) or int(self.label_value) != self.label_value \
                or int(self.label_value) < 1:
            raise VolumeError(f"segment {self.name!r}: label value must be an integer >= 1, got {self.label_value!r}")
        self.label_value = int(self.label_value)


class Segmentation(NamedTuple):
    """Result of :func:`read_segmentation`; unpacks as ``labels, ijk_to_lps, segments``."""

    labels: np.ndarray
    ijk_to_lps: np.ndarray
    segments: List[SegmentInfo]

    @property
    def volume(self) -> Volume:
        """The labels as a :class:`Volume` with their geometry."""
        return Volume(self.labels, self.ijk_to_lps)


def default_segments(labels: np.ndarray) -> List[SegmentInfo]:
    """``Segment_<v>`` with a default colour for each non-zero value ``v`` of ``labels``."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    return [SegmentInfo(f"Segment_{v}", DEFAULT_COLORS[(v - 1) % len(DEFAULT_COLORS)], v) for v in values]


def integer_labels(labels: np.ndarray, where: str, error: type = VolumeError) -> np.ndarray:
    """``labels`` as non-negative integers (bool -> int32; integral floats -> int64), or ``error`` naming
    ``where`` and the problem (non-integer or non-finite values, a non-numeric type, negative labels)."""
    a = np.asarray(labels)
    if a.dtype == bool:
        return a.astype(np.int32)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise error(f"{where}: holds non-integer values; label maps must hold integer labels")
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise error(f"{where}: has type {a.dtype}; integer labels are needed")
    if a.size and a.min() < 0:
        raise error(f"{where}: negative label values; labels must be >= 0")
    return a


def _check_output_dir(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise VolumeError(f"{path}: cannot write, the folder {folder} does not exist. Create it first or choose "
                          "another output path.")
    if not folder.is_dir():
        raise VolumeError(f"{path}: cannot write, {folder} is not a folder.")
    if path.is_dir():
        raise VolumeError(f"{path}: cannot write, a folder with this name exists.")
    try:  # a real probe: os.access says yes for root even where writing fails
        with tempfile.NamedTemporaryFile(dir=str(folder), prefix=".robustmedsam-probe-"):
            pass
    except OSError as e:
        raise VolumeError(f"{path}: cannot write to the folder {folder} ({e.strerror or e}). Choose a folder you "
                          "have write permission for.") from None


def check_output_path(path: PathLike, kinds: Sequence[str] = SEGMENTATION_EXTENSIONS) -> Path:
    """Fail before any work if ``path`` has an unsupported extension or its folder is not writable."""
    path = Path(path)
    if _ext(path) not in kinds and path.suffix not in kinds:
        raise VolumeError(f"{path}: unsupported output format; use one of {', '.join(kinds)}")
    _check_output_dir(path)
    return path


def _atomic_write(path: Path, write) -> None:
    """Call ``write(temp_path)`` for a temporary file next to ``path``, then move it over ``path``."""
    ext = _ext(path)
    tmp = path.parent / f".{path.name[: len(path.name) - len(ext)]}.{uuid.uuid4().hex[:12]}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _label_dtype(max_label: int):
    if max_label <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_label <= np.iinfo(np.uint16).max:
        return np.uint16
    raise VolumeError(f"label value {max_label} is too large (at most 65535)")


def write_segmentation(path: PathLike, labels: np.ndarray, reference: Volume,
                       segments: Optional[Sequence[SegmentInfo]] = None, compression_level: int = 6) -> Path:
    """Write a label array as a segmentation on ``reference``'s geometry, atomically.

    Args:
        path: ``.seg.nrrd`` (a 3D Slicer segmentation with segment names and colours) or a label volume
            ``.nii``/``.nii.gz`` (also ``.nrrd``/``.mha``; names and colours are not stored there).
        labels: ``(K, J, I)`` integer array, 0 = background, ``v`` = the segment with ``label_value == v``.
        reference: the volume whose geometry the labels share.
        segments: one :class:`SegmentInfo` per label value; ``None``: ``Segment_<v>`` for each value present.

    The output folder is checked first (exists, writable); the file is written to a temporary file in the same
    folder and moved into place, so an existing file is never left half-written.
    """
    path = Path(path)
    ext = _ext(path)
    if ext not in SEGMENTATION_EXTENSIONS:
        raise VolumeError(f"{path}: unsupported segmentation format {ext or '(no extension)'}; use .seg.nrrd "
                          "(3D Slicer segmentation) or .nii/.nii.gz (label volume)")
    _check_output_dir(path)
    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise VolumeError(f"{path}: labels of shape {labels.shape} do not match the reference volume "
                          f"{reference.shape} (K, J, I)")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise VolumeError(f"{path}: labels must be an integer array, got {labels.dtype} (use labels.astype(np.uint8))")
    present = [int(v) for v in np.unique(labels)]
    if present and present[0] < 0:
        raise VolumeError(f"{path}: labels must be >= 0, found {present[0]}")
    segments = default_segments(labels) if segments is None else list(segments)
    values = [s.label_value for s in segments]
    if len(set(values)) != len(values):
        raise VolumeError(f"{path}: several segments share a label value: {values}")
    unknown = sorted(set(present) - set(values) - {0})
    if unknown:
        raise VolumeError(f"{path}: label value(s) {unknown} in the array have no SegmentInfo; add segments for "
                          "them or pass segments=None")
    data = labels.astype(_label_dtype(max(values + present + [1])), copy=False)

    if ext == ".seg.nrrd":
        import slicerio

        k, j, i = data.shape
        seg = {
            "voxels": np.asarray(data).transpose(2, 1, 0),  # slicerio/pynrrd: (I, J, K) with index_order "F"
            "ijkToLPS": reference.ijk_to_lps.copy(),
            "containedRepresentationNames": ["Binary labelmap"],
            "masterRepresentation": "Binary labelmap",
            "referenceImageExtentOffset": [0, 0, 0],
            "segments": [
                {"id": f"Segment_{s.label_value}", "name": s.name, "color": [float(c) for c in s.color],
                 "colorAutoGenerated": False, "nameAutoGenerated": False, "labelValue": s.label_value,
                 "layer": 0, "extent": [0, i - 1, 0, j - 1, 0, k - 1]}
                for s in segments],
        }

        def write(tmp: Path) -> None:
            slicerio.write_segmentation(str(tmp), seg, compression_level=compression_level)
    else:
        import SimpleITK as sitk

        image = reference.with_array(data).to_sitk()

        def write(tmp: Path) -> None:
            sitk.WriteImage(image, str(tmp), useCompression=ext in (".nii.gz", ".nrrd", ".mha"))
    try:
        _atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        raise VolumeError(f"{path}: writing failed ({_first_line(e)}); nothing was written.") from None
    return path


def write_segment_masks(path: PathLike, masks: Sequence[np.ndarray], reference: Volume,
                        segments: Sequence[SegmentInfo], compression_level: int = 6) -> Path:
    """Write one boolean ``(K, J, I)`` mask per segment, keeping overlaps where the format can.

    ``.seg.nrrd``: overlapping segments go to further layers, as 3D Slicer stores them, so no voxel of any
    segment is lost. Label volumes (``.nii``...) hold one label per voxel: a voxel claimed by several segments
    goes to the later one, and a warning says how many voxels that concerns. Atomic, like
    :func:`write_segmentation`; ``segments[n].label_value`` is used for label volumes only.
    """
    path = Path(path)
    if len(masks) != len(segments):
        raise VolumeError(f"{path}: {len(masks)} masks but {len(segments)} segment descriptions")
    for m in masks:
        if m.shape != reference.shape:
            raise VolumeError(f"{path}: a mask of shape {m.shape} does not match the volume {reference.shape} (K, J, I)")
    if _ext(path) != ".seg.nrrd":
        labels = np.zeros(reference.shape, dtype=_label_dtype(max([s.label_value for s in segments] + [1])))
        for m, info in zip(masks, segments):
            lost = int(np.count_nonzero(labels[m]))
            if lost:
                warnings.warn(f"{path}: {info.name} overlaps earlier segments on {lost} voxels; a label volume "
                              f"keeps one segment per voxel, so they are labelled {info.name} (use .seg.nrrd to keep "
                              "overlaps)", stacklevel=2)
            labels[m] = info.label_value
        return write_segmentation(path, labels, reference, segments, compression_level)
    _check_output_dir(path)
    import slicerio

    seg = slicerio.create_segmentation(reference.size_ijk, reference.ijk_to_lps, dtype="uint8")
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    seg["masterRepresentation"] = "Binary labelmap"
    seg["referenceImageExtentOffset"] = [0, 0, 0]
    for n, (m, info) in enumerate(zip(masks, segments)):
        slicerio.add_segment(seg, np.asarray(m, dtype=bool).transpose(2, 1, 0), {
            "id": f"Segment_{n + 1}", "name": info.name, "color": [float(c) for c in info.color],
            "colorAutoGenerated": False, "nameAutoGenerated": False})
    try:
        _atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), seg, compression_level=compression_level))
    except (OSError, RuntimeError) as e:
        raise VolumeError(f"{path}: writing failed ({_first_line(e)}); nothing was written.") from None
    return path


def _segments_from_slicerio(seg: dict, path: Path, overlap: str) -> Tuple[np.ndarray, List[SegmentInfo]]:
    voxels = np.asarray(seg["voxels"])
    entries = seg.get("segments", [])
    out_segments: List[SegmentInfo] = []
    if voxels.ndim == 3:
        labels = voxels.transpose(2, 1, 0)
        for n, s in enumerate(entries):
            color = s.get("color", DEFAULT_COLORS[n % len(DEFAULT_COLORS)])
            out_segments.append(SegmentInfo(s.get("name", s.get("id", f"Segment_{n + 1}")), color,
                                            s.get("labelValue", 1)))
        return np.ascontiguousarray(labels), out_segments
    if voxels.ndim != 4:
        raise VolumeError(f"{path}: unexpected segmentation array of {voxels.ndim} dimensions")
    # several layers (overlapping segments): relabel 1..N in segment order into one label array
    layers = voxels.transpose(0, 3, 2, 1)  # (L, K, J, I)
    if overlap not in ("error", "last"):
        raise VolumeError(f"overlap must be 'error' or 'last', got {overlap!r}")
    covered = np.count_nonzero(layers, axis=0)
    if overlap == "error" and (covered > 1).any():
        where = np.argwhere(covered > 1)[0]
        names = [s.get("name", s.get("id")) for s in entries
                 if layers[s.get("layer", 0)][tuple(where)] == s.get("labelValue", 1)]
        raise VolumeError(f"{path}: segments overlap ({' and '.join(map(str, names))} share voxel k, j, i = "
                          f"{tuple(int(v) for v in where)}); a label array holds one segment per voxel. Remove the "
                          "overlap in Slicer, or read with overlap='last' (later segments win).")
    labels = np.zeros(layers.shape[1:], dtype=_label_dtype(max(len(entries), 1)))
    for n, s in enumerate(entries):
        labels[layers[s.get("layer", 0)] == s.get("labelValue", 1)] = n + 1
        color = s.get("color", DEFAULT_COLORS[n % len(DEFAULT_COLORS)])
        out_segments.append(SegmentInfo(s.get("name", s.get("id", f"Segment_{n + 1}")), color, n + 1))
    return labels, out_segments


def _is_slicer_segmentation(path: Path) -> bool:
    if _ext(path) == ".seg.nrrd":
        return True
    if _ext(path) not in (".nrrd", ".nhdr"):
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - unreadable: let SimpleITK report it
        return False
    return any(key.startswith("Segment0_") for key in header)


def read_segmentation(path: PathLike, reference: Optional[Volume] = None, overlap: str = "error") -> Segmentation:
    """Read a segmentation as ``(labels (K, J, I), ijk_to_lps (4, 4), segments)``.

    Args:
        path: a 3D Slicer ``.seg.nrrd`` (names, colours, label values kept) or a label volume
            (``.nii``/``.nii.gz``/``.nrrd``/``.mha``: one segment ``Segment_<v>`` per non-zero value).
        reference: if given, the labels are resampled (nearest neighbour) onto this volume's grid, e.g. when
            Slicer saved a segmentation cropped to its extent; the returned geometry is then the reference's.
        overlap: for a ``.seg.nrrd`` with overlapping segments (several layers): ``"error"`` (default) raises,
            ``"last"`` lets later segments overwrite earlier ones. Multi-layer files are relabelled 1..N.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise VolumeError(f"{p}: segmentation file not found. Check the path and spelling.")
    if _is_slicer_segmentation(p):
        import slicerio

        try:
            seg = slicerio.read_segmentation(str(p))
        except Exception as e:  # noqa: BLE001 - slicerio raises several types
            raise VolumeError(f"{p}: could not be read as a 3D Slicer segmentation ({_first_line(e)})") from None
        labels, segments = _segments_from_slicerio(seg, p, overlap)
        matrix = np.asarray(seg["ijkToLPS"], dtype=np.float64)
    else:
        ext = _ext(p)
        if ext not in VOLUME_EXTENSIONS:
            raise VolumeError(f"{p}: unsupported segmentation format {ext or '(no extension)'}; use .seg.nrrd or a "
                              "label volume (.nii/.nii.gz/.nrrd/.mha)")
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as e:
            raise VolumeError(f"{p}: could not be read ({_first_line(e)})") from None
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError(f"{p}: a label volume must be 3D with one component per voxel, got "
                              f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
        vol = Volume.from_sitk(image)
        labels, matrix = integer_labels(vol.array, str(p)), vol.ijk_to_lps
        segments = default_segments(labels)
    if reference is not None:
        labels = _resample_labels(labels, matrix, reference)
        matrix = reference.ijk_to_lps.copy()
    return Segmentation(labels, matrix, segments)


def _resample_labels(labels: np.ndarray, ijk_to_lps: np.ndarray, reference: Volume) -> np.ndarray:
    import SimpleITK as sitk

    if labels.shape == reference.shape and np.allclose(ijk_to_lps, reference.ijk_to_lps, atol=1e-6):
        return labels
    src = Volume(labels, ijk_to_lps).to_sitk()
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reference.size_ijk])
    f.SetOutputSpacing([float(s) for s in reference.spacing])
    f.SetOutputOrigin([float(o) for o in reference.origin])
    f.SetOutputDirection([float(d) for d in reference.direction.ravel()])
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    return sitk.GetArrayFromImage(f.Execute(src))
