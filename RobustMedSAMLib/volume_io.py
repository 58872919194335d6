"""Volumes with their geometry: reading, writing segmentations, slicing.

Conventions (docs/coordinates.md, the reference):

* ``Volume.array`` is indexed ``array[k, j, i]`` (shape ``(K, J, I)``, SimpleITK's ``GetArrayFromImage`` order).
* ``Volume.ijk_to_lps`` is the 4 x 4 matrix taking a column ``(i, j, k, 1)`` to LPS millimetres;
  ``ijk_to_ras = diag(-1, -1, 1, 1) @ ijk_to_lps`` (Slicer's ``IJKToRAS``).
* ``spacing``, ``origin`` and ``direction`` follow SimpleITK: ``spacing`` is ``(si, sj, sk)`` (i first, the
  reverse of ``shape``), ``direction`` columns are the unit vectors of i, j, k in LPS.
* ``slice(axis, index)``: ``axis`` is the voxel axis held constant as an array axis (0 = k, 1 = j, 2 = i);
  rows/columns of the 2D slice follow the table in docs/coordinates.md.

No Qt, Slicer or torch import here: the module is shared by the CLI, the Slicer module and training.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
AxisLike = Union[int, str]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".nii", ".nii.gz", ".nrrd", ".mha")
_AXIS_LETTERS = {"k": 0, "j": 1, "i": 2}
_ANATOMICAL_ROW = {"sagittal": 0, "coronal": 1, "axial": 2}  # row of LPS the axis is closest to: L, P, S
# Default colours for segments without one (r, g, b in 0..1).
DEFAULT_COLORS = (
    (0.90, 0.30, 0.25), (0.30, 0.70, 0.35), (0.25, 0.45, 0.90), (0.95, 0.80, 0.20), (0.70, 0.35, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.55, 0.15), (0.55, 0.75, 0.20), (0.85, 0.40, 0.60), (0.45, 0.30, 0.20),
)


class VolumeError(ValueError):
    """A volume or segmentation cannot be read, written or used; the message names the file, problem and fix."""


def _ext(path: PathLike) -> str:
    """Lower-case extension, with the double extensions ``.nii.gz`` and ``.seg.nrrd`` kept whole."""
    name = os.path.basename(str(path)).lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return os.path.splitext(name)[1]


# --------------------------------------------------------------------------------------------- axes
def resolve_axis(axis: AxisLike, direction: Optional[np.ndarray] = None) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) named by ``axis``.

    Accepts 0/1/2, ``"k"``/``"j"``/``"i"`` and, given the volume's 3 x 3 ``direction`` (columns = i, j, k in
    LPS), ``"axial"``/``"coronal"``/``"sagittal"``: the voxel axis closest to S, A/P or R/L. The three names are
    assigned together (the permutation of voxel axes to L, P, S with the largest summed ``|cosine|``), so they
    always name three different axes, even for a very oblique volume.
    """
    if isinstance(axis, (bool, np.bool_)):
        raise VolumeError(f"invalid axis {axis!r}: use 0/1/2, 'k'/'j'/'i' or 'axial'/'coronal'/'sagittal'")
    if isinstance(axis, (int, np.integer)):
        if int(axis) in (0, 1, 2):
            return int(axis)
        raise VolumeError(f"invalid axis {axis}: array axes are 0 (k), 1 (j) and 2 (i)")
    if isinstance(axis, str):
        key = axis.strip().lower()
        if key in _AXIS_LETTERS:
            return _AXIS_LETTERS[key]
        if key in ("0", "1", "2"):
            return int(key)
        if key in _ANATOMICAL_ROW:
            if direction is None:
                raise VolumeError(f"axis {axis!r} needs the volume's direction to be resolved")
            d = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
            # perm[row] = voxel column (0 = i, 1 = j, 2 = k) assigned to physical row (L, P, S)
            best = max(itertools.permutations(range(3)), key=lambda p: sum(d[r, p[r]] for r in range(3)))
            return 2 - best[_ANATOMICAL_ROW[key]]
    raise VolumeError(f"invalid axis {axis!r}: use 0/1/2, 'k'/'j'/'i' or 'axial'/'coronal'/'sagittal'")


# Columns of an (N, 3) ijk array: (along-axis, x, y) for each array axis (see docs/coordinates.md table).
_SLICE_COLUMNS = {0: (2, 0, 1), 1: (1, 0, 2), 2: (0, 1, 2)}


def ijk_to_slice(points_ijk: np.ndarray, axis: AxisLike) -> Tuple[np.ndarray, np.ndarray]:
    """Continuous ``(N, 3)`` (i, j, k) -> ``(along (N,), xy (N, 2))`` for slices along ``axis`` (0/1/2/k/j/i).

    ``along`` is the continuous index along the axis (the slice is its nearest integer); ``xy`` the 2D
    ``(x, y)`` = (column, row) of that slice.
    """
    a = resolve_axis(axis)
    p = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    c_along, c_x, c_y = _SLICE_COLUMNS[a]
    return p[:, c_along].copy(), p[:, [c_x, c_y]].copy()


def slice_to_ijk(axis: AxisLike, index: Union[float, np.ndarray], xy: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ijk_to_slice`: slice ``index`` and ``(N, 2)`` (x, y) -> ``(N, 3)`` (i, j, k)."""
    a = resolve_axis(axis)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = np.empty((len(xy), 3), dtype=np.float64)
    c_along, c_x, c_y = _SLICE_COLUMNS[a]
    out[:, c_along] = index
    out[:, c_x] = xy[:, 0]
    out[:, c_y] = xy[:, 1]
    return out


def round_half_up(values) -> np.ndarray:
    """Nearest integer with halves rounded up (``floor(v + 0.5)``), the rounding used for slice indices."""
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


# --------------------------------------------------------------------------------------------- Volume
@dataclass(eq=False)
class Volume:
    """A scalar volume ``array[k, j, i]`` and its ``ijk_to_lps`` 4 x 4 matrix (float64)."""

    array: np.ndarray = field(repr=False)
    ijk_to_lps: np.ndarray

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise VolumeError(f"a volume array must be 3D (K, J, I), got shape {self.array.shape}")
        m = np.array(self.ijk_to_lps, dtype=np.float64)
        if m.shape != (4, 4):
            raise VolumeError(f"ijk_to_lps must be 4 x 4, got shape {m.shape}")
        if not np.all(np.isfinite(m)) or not np.allclose(m[3], (0, 0, 0, 1)):
            raise VolumeError("ijk_to_lps must be finite with last row (0, 0, 0, 1)")
        if abs(np.linalg.det(m[:3, :3])) < 1e-12:
            raise VolumeError("ijk_to_lps is singular (zero spacing or degenerate direction)")
        self.ijk_to_lps = m

    def __repr__(self) -> str:
        spacing = tuple(round(float(v), 6) for v in self.spacing)
        origin = tuple(round(float(v), 6) for v in self.origin)
        return f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing={spacing}, origin={origin})"

    # geometry -------------------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(K, J, I)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> Tuple[int, int, int]:
        """``(I, J, K)``: number of voxels along i, j, k (SimpleITK's ``GetSize()``)."""
        return self.shape[::-1]

    @property
    def spacing(self) -> np.ndarray:
        """``(si, sj, sk)`` in mm (i first, as SimpleITK)."""
        return np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return self.ijk_to_lps[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3 x 3, columns the unit vectors of i, j, k in LPS (SimpleITK's direction reshaped row-major)."""
        return self.ijk_to_lps[:3, :3] / self.spacing

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """Slicer's ``IJKToRAS``: ``diag(-1, -1, 1, 1) @ ijk_to_lps``."""
        return LPS_TO_RAS @ self.ijk_to_lps

    def _matrix(self, space: str) -> np.ndarray:
        key = str(space).lower()
        if key == "lps":
            return self.ijk_to_lps
        if key == "ras":
            return self.ijk_to_ras
        raise VolumeError(f"unknown physical space {space!r}: use 'lps' or 'ras'")

    def ijk_to_physical(self, points: np.ndarray, space: str = "lps") -> np.ndarray:
        """``(N, 3)`` (or ``(3,)``) continuous (i, j, k) -> LPS or RAS mm, same shape."""
        p = np.asarray(points, dtype=np.float64)
        m = self._matrix(space)
        out = p.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        return out.reshape(p.shape)

    def physical_to_ijk(self, points: np.ndarray, space: str = "lps") -> np.ndarray:
        """``(N, 3)`` (or ``(3,)``) LPS or RAS mm -> continuous (i, j, k), same shape."""
        p = np.asarray(points, dtype=np.float64)
        m = self._matrix(space)
        out = np.linalg.solve(m[:3, :3], (p.reshape(-1, 3) - m[:3, 3]).T).T
        return out.reshape(p.shape)

    def physical_extent(self, space: str = "lps") -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box ``(min (3,), max (3,))`` of the volume's voxels (outer voxel edges)."""
        n = np.array(self.size_ijk, dtype=np.float64)
        corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in n])))
        phys = self.ijk_to_physical(corners, space)
        return phys.min(axis=0), phys.max(axis=0)

    # SimpleITK ------------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> "Volume":
        """A :class:`Volume` from a 3D single-component ``SimpleITK.Image`` (geometry kept exactly)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError(f"expected a 3D single-component image, got a {image.GetDimension()}D image with "
                              f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
        m = np.eye(4)
        m[:3, :3] = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
        m[:3, 3] = image.GetOrigin()
        return cls(sitk.GetArrayFromImage(image), m)

    def to_sitk(self):
        """A ``SimpleITK.Image`` with this array and geometry (bool becomes uint8, float16 float32)."""
        import SimpleITK as sitk

        a = self.array
        if a.dtype == bool:
            a = a.astype(np.uint8)
        elif a.dtype == np.float16:
            a = a.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(a), isVector=False)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.ravel()])
        return image

    def with_array(self, new_array: np.ndarray) -> "Volume":
        """A volume with the same geometry and another array of the same ``(K, J, I)`` shape."""
        new_array = np.asarray(new_array)
        if new_array.shape != self.array.shape:
            raise VolumeError(f"array of shape {new_array.shape} does not match the volume's {self.array.shape}")
        return Volume(new_array, self.ijk_to_lps.copy())

    # slicing --------------------------------------------------------------------------------------
    def resolve_axis(self, axis: AxisLike) -> int:
        """Array axis for ``axis`` (0/1/2, k/j/i, axial/coronal/sagittal), see :func:`resolve_axis`."""
        return resolve_axis(axis, self.direction)

    def num_slices(self, axis: AxisLike) -> int:
        """Number of slices along ``axis``."""
        return self.shape[self.resolve_axis(axis)]

    def slice_shape(self, axis: AxisLike) -> Tuple[int, int]:
        """``(H, W)`` = (rows, columns) of the slices along ``axis``."""
        a = self.resolve_axis(axis)
        return tuple(s for n, s in enumerate(self.shape) if n != a)  # type: ignore[return-value]

    def _index(self, a: int, index: int) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise VolumeError(f"slice index must be an integer, got {index!r}")
        n = self.shape[a]
        if not 0 <= int(index) < n:
            raise VolumeError(f"slice index {index} is outside 0..{n - 1} along axis {'kji'[a]}")
        return int(index)

    def slice(self, axis: AxisLike, index: int) -> np.ndarray:
        """The 2D slice ``index`` along ``axis`` (a view): ``array[k]``, ``array[:, j]`` or ``array[:, :, i]``."""
        a = self.resolve_axis(axis)
        return self.array[(slice(None),) * a + (self._index(a, index),)]

    def set_slice(self, axis: AxisLike, index: int, values: np.ndarray) -> None:
        """Write a 2D slice (inverse of :meth:`slice`) into :attr:`array` in place."""
        a = self.resolve_axis(axis)
        values = np.asarray(values)
        if values.shape != self.slice_shape(a):
            raise VolumeError(f"slice of shape {values.shape} does not fit {self.slice_shape(a)} (axis {'kji'[a]})")
        self.array[(slice(None),) * a + (self._index(a, index),)] = values

    def stack_slices(self, axis: AxisLike, slices: Sequence[np.ndarray]) -> np.ndarray:
        """Stack one 2D array per slice along ``axis`` into a ``(K, J, I)`` array (inverse of :meth:`slice`)."""
        a = self.resolve_axis(axis)
        if len(slices) != self.shape[a]:
            raise VolumeError(f"{len(slices)} slices given, the volume has {self.shape[a]} along axis {'kji'[a]}")
        want = self.slice_shape(a)
        for n, s in enumerate(slices):
            if np.shape(s) != want:
                raise VolumeError(f"slice {n} has shape {np.shape(s)}, expected {want} (axis {'kji'[a]})")
        return np.stack([np.asarray(s) for s in slices], axis=a)


# --------------------------------------------------------------------------------------------- reading
def _check_volume_image(image, where: str) -> None:
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    size_txt = " x ".join(str(s) for s in size)
    if dim == 2:
        raise VolumeError(f"{where}: is a 2D image ({size_txt} pixels), not a volume. Use the 2D image mode for "
                          "single images, or stack slices into a 3D file (NIfTI, NRRD, MHA or a DICOM series).")
    if dim == 4:
        raise VolumeError(f"{where}: is a 4D volume ({size_txt}; e.g. a time series or multi-echo/diffusion "
                          "acquisition). Extract one 3D frame first (e.g. SimpleITK Extract or Slicer's Sequences "
                          "module) and segment that.")
    if dim != 3:
        raise VolumeError(f"{where}: has {dim} dimensions ({size_txt}); a volume needs exactly 3")
    comps = image.GetNumberOfComponentsPerPixel()
    if comps != 1:
        kind = "RGB colour" if comps == 3 else ("RGBA colour" if comps == 4 else "vector")
        raise VolumeError(f"{where}: is a multi-component volume ({comps} components per voxel, {kind}). Convert "
                          "it to a single-component greyscale volume first (e.g. Slicer's 'Vector to Scalar "
                          "Volume' module or SimpleITK VectorIndexSelectionCast).")
    if min(size) < 2:
        raise VolumeError(f"{where}: has a single slice (size {size_txt}); propagation needs at least 2 slices "
                          "along every axis. Use the 2D image mode for a single slice.")


def _check_intensities(array: np.ndarray, where: str) -> None:
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise VolumeError(f"{where}: {bad} voxel(s) are NaN or infinite. Replace them (e.g. with the "
                              "background value) before segmenting.")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise VolumeError(f"{where}: all voxels have the same intensity ({lo}); the image holds no structure "
                          "to segment. Check that the right file/series was loaded.")


def _read_dicom_series(folder: Path, series_uid: Optional[str]):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise VolumeError(f"{folder}: no DICOM series found in this folder (sub-folders are not searched). "
                          "Point to the folder that directly holds the DICOM files, or give a NIfTI/NRRD/MHA file.")
    files = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    if series_uid is not None:
        if series_uid not in files:
            raise VolumeError(f"{folder}: no DICOM series with UID {series_uid}; the folder holds: "
                              + ", ".join(f"{u} ({len(f)} files)" for u, f in files.items()))
        uid = series_uid
    else:
        uid = max(uids, key=lambda u: len(files[u]))
        if len(uids) > 1:
            others = ", ".join(f"{u} ({len(files[u])} files)" for u in uids if u != uid)
            warnings.warn(f"{folder} holds {len(uids)} DICOM series; reading the largest, {uid} ({len(files[uid])} "
                          f"files). Others: {others}. Pass series_uid=... to choose another.", stacklevel=3)
    names = files[uid]
    if len(names) < 2:
        raise VolumeError(f"{folder}: DICOM series {uid} has a single slice; propagation needs at least 2 slices. "
                          "Use the 2D image mode for a single slice.")
    _warn_uneven_dicom_spacing(names, folder)
    reader.SetFileNames(names)
    try:
        return reader.Execute(), f"{folder} (DICOM series {uid})"
    except RuntimeError as e:
        raise VolumeError(f"{folder}: could not read DICOM series {uid}: {_first_line(e)}") from None


def _warn_uneven_dicom_spacing(names: List[str], folder: Path) -> None:
    """Warn if slice positions along the normal are not evenly spaced (ITK then assumes an average spacing)."""
    import SimpleITK as sitk

    try:
        pos, normal = [], None
        for name in names:
            r = sitk.ImageFileReader()
            r.SetFileName(name)
            r.ReadImageInformation()
            if normal is None:
                iop = [float(v) for v in r.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(iop[:3], iop[3:])
            pos.append(float(np.dot([float(v) for v in r.GetMetaData("0020|0032").split("\\")], normal)))
    except (RuntimeError, ValueError):
        return  # tags missing: let ITK decide
    gaps = np.diff(np.sort(pos))
    if len(gaps) and gaps.max() - gaps.min() > 0.01 * max(abs(gaps.mean()), 1e-6):
        warnings.warn(f"{folder}: DICOM slice spacing is uneven ({gaps.min():.4g} to {gaps.max():.4g} mm; missing "
                      "slices or a variable-thickness scan); the volume uses an average spacing, so positions are "
                      "approximate. Resample the series to even spacing for exact geometry.", stacklevel=4)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages put the useful part in the last "Description:" line
    for ln in reversed(lines):
        if ln.startswith("Description:") or "ERROR" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


def read_volume(path: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read a 3D scalar volume with its geometry (origin, spacing, direction kept exactly).

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``)
            file, or a folder holding a DICOM series (several series: the one with most files is read and a
            warning names the others).
        series_uid: DICOM SeriesInstanceUID to read from a folder with several series.

    Raises:
        VolumeError: missing file, unreadable format, 2D, 4D or multi-component (RGB) image, a single slice,
            NaN/infinite or constant intensities; the message names the file, the problem and a fix.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        parent = p.parent if str(p.parent) else Path(".")
        hint = "" if parent.is_dir() else f" (the folder {parent} does not exist either)"
        raise VolumeError(f"{p}: file not found{hint}. Check the path and spelling.")
    if p.is_dir():
        image, where = _read_dicom_series(p, series_uid)
    else:
        where = str(p)
        ext = _ext(p)
        if ext == ".dcm":
            raise VolumeError(f"{p}: is a single DICOM file; give the folder that holds the whole series instead.")
        if ext in IMAGE_2D_EXTENSIONS:
            raise VolumeError(f"{p}: is a 2D image format ({ext}), not a volume. Use the 2D image mode for images.")
        if ext not in VOLUME_EXTENSIONS:
            raise VolumeError(f"{p}: unsupported format {ext or '(no extension)'}. Supported: "
                              f"{', '.join(VOLUME_EXTENSIONS)} files or a DICOM series folder.")
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as e:
            raise VolumeError(f"{p}: could not be read as {ext} ({_first_line(e)}). The file may be damaged, "
                              "incomplete or have the wrong extension; check that it opens in 3D Slicer.") from None
    _check_volume_image(image, where)
    volume = Volume.from_sitk(image)
    _check_intensities(volume.array, where)
    return volume


# --------------------------------------------------------------------------------------------- segmentations
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
        labels, matrix = vol.array, vol.ijk_to_lps
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                raise VolumeError(f"{p}: holds non-integer values; a label volume must hold integer labels")
            labels = labels.astype(np.int32)
        if labels.dtype.kind not in "iub":
            raise VolumeError(f"{p}: label volume has type {labels.dtype}; integer labels are needed")
        if labels.size and labels.min() < 0:
            raise VolumeError(f"{p}: negative label values found; labels must be >= 0")
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
