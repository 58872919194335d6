"""Volumes with their geometry: reading and slicing (segmentation files: ``segmentation_io.py``).

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
AxisLike = Union[int, str]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_AXIS_LETTERS = {"k": 0, "j": 1, "i": 2}
_ANATOMICAL_ROW = {"sagittal": 0, "coronal": 1, "axial": 2}  # row of LPS the axis is closest to: L, P, S


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
