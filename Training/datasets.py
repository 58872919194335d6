"""Training data: 2D image + label sources, objects and prompts, clean/degraded pairs.

Sources (each yields ``Item(image uint8 (H, W) or (H, W, 3), label int (H, W), name)``):

* :class:`MedSegBenchSource`: a MedSegBench ``{name}_{size}.npz`` file (keys ``{split}_images`` and
  ``{split}_label``; sub-categories ``{split}_images_C1`` / ``{split}_label_C1``...; ``idrib`` keeps
  un-suffixed images). :func:`resolve_medsegbench` finds the file by dataset name and can download it
  through the optional ``medsegbench`` package.
* :class:`FolderSource`: an images folder and a masks folder matched by file stem (PNG, JPEG, TIFF, BMP,
  NIfTI, NRRD, MHA). 2D files give one item; 3D volumes give one item per slice (along ``axis``) that
  contains an object, with intensities mapped to uint8 once per volume (``intensity.intensity_mapping``).

Objects (``label_mode``): ``"semantic"`` (default): every connected component of every label value;
``"instance"``: every label value is one object; ``"binary"``: connected components of ``label > 0``.
The training target is the **largest object** (RobustSAM/RobustMedSAM ``get_largest_mask``).

:class:`TrainingPairs` (a torch ``Dataset``) resizes image and label to ``train_size`` x ``train_size``
(RobustSAM resizes to 512 x 512), draws 3 positive points uniformly from the target's pixels (RobustSAM's
``get_prompt``) and a box around it enlarged by 0..``bbox_shift`` px per side (MedSAM's ``bbox_shift``), and
a degradation drawn uniformly from ``["clear"] + 12 corruptions`` (RobustMedSAM). Every random choice comes
from ``numpy.random.default_rng([seed, epoch, index, stream])``, so a sample depends only on
(seed, epoch, index): runs are reproducible, independent of worker processes, resumable mid-epoch, and
identical between one process and ``torchrun`` shards. With ``fixed_views`` the degradation (type and noise)
ignores the epoch, like RobustMedSAM's corrupted copies precomputed once (needed to cache embeddings).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MEDICAL_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_MODES = ("semantic", "instance", "binary")
SPLITS = ("train", "val", "test")
MEDSEGBENCH_ROOT_ENV = "MEDSEGBENCH_ROOT"

# independent random streams of one sample
_STREAM_PROMPT, _STREAM_CORRUPTION = 1, 2


class DatasetError(ValueError):
    """A dataset cannot be used; the message names the file and what to do."""


@dataclass
class Item:
    """One 2D training/evaluation example."""

    image: np.ndarray
    label: np.ndarray
    name: str


# ============================================================================================ objects
def object_masks(label: np.ndarray, mode: str = "semantic") -> List[np.ndarray]:
    """The objects of a label image as boolean masks (see module docstring for ``mode``)."""
    from scipy import ndimage

    if mode not in LABEL_MODES:
        raise DatasetError(f"unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}")
    label = np.asarray(label)
    if mode == "instance":
        return [label == v for v in np.unique(label) if v != 0]
    values = [1] if mode == "binary" else [v for v in np.unique(label) if v != 0]
    masks = []
    for v in values:
        fg = label > 0 if mode == "binary" else label == v
        components, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
        masks.extend(components == c for c in range(1, n + 1))
    return masks


def largest_object(label: np.ndarray, mode: str = "semantic") -> Optional[np.ndarray]:
    """The object with most pixels (the first one on ties), or None for an empty label."""
    masks = object_masks(label, mode)
    if not masks:
        return None
    areas = [int(m.sum()) for m in masks]
    return masks[int(np.argmax(areas))]


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positive points ``(x, y)`` drawn uniformly without replacement from the mask's pixels
    (with replacement when the mask has fewer pixels than ``n``)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise DatasetError("cannot place points on an empty mask")
    pick = rng.choice(rows.size, size=n, replace=rows.size < n)
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)


def jittered_box(mask: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Tight box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) enlarged by 0..``shift`` px per side, clipped
    to the image (MedSAM's ``bbox_shift``)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DatasetError("cannot place a box on an empty mask")
    h, w = mask.shape
    d = rng.integers(0, int(shift) + 1, size=4) if shift > 0 else np.zeros(4, dtype=np.int64)
    return np.array([max(0, cols[0] - d[0]), max(0, rows[0] - d[1]),
                     min(w, cols[-1] + 1 + d[2]), min(h, rows[-1] + 1 + d[3])], dtype=np.float64)


def resize_nearest(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D array to ``(h, w)`` (pixel centres)."""
    h, w = label.shape[:2]
    rows = np.minimum((np.arange(size[0]) + 0.5) * h / size[0], h - 1).astype(np.int64)
    cols = np.minimum((np.arange(size[1]) + 0.5) * w / size[1], w - 1).astype(np.int64)
    return label[rows][:, cols]


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a uint8 ``(H, W, 3)`` image to ``(h, w)``."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _as_label(array: np.ndarray, where: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # colour-coded mask: equal channels, or one label per colour
        rgb = a[..., :3]
        if np.all(rgb == rgb[..., :1]):
            a = rgb[..., 0]
        else:
            colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
            background = np.flatnonzero((colours == 0).all(axis=1))
            order = np.arange(len(colours))
            if background.size:  # black stays 0
                order = np.where(order == background[0], 0, order + (order < background[0]))
            a = order[inverse.reshape(-1)].reshape(rgb.shape[:2])
    if a.ndim != 2:
        raise DatasetError(f"{where}: a mask must be 2D (H, W), got shape {a.shape}")
    from RobustMedSAMLib.segmentation_io import integer_labels

    return integer_labels(a, f"{where}: the mask", DatasetError)


def _as_image(array: np.ndarray, where: str) -> np.ndarray:
    from RobustMedSAMLib.image_io import to_uint8

    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise DatasetError(f"{where}: an image must be (H, W) grey or (H, W, 3) RGB, got shape {a.shape}")
    if a.ndim == 3:
        a = a[..., :3]
    return to_uint8(a)


# ============================================================================================ sources
class Source:
    """A list of 2D items. ``candidates`` are the indices whose label holds at least one object."""

    name: str = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, index: int) -> Item:
        raise NotImplementedError

    def candidates(self) -> List[int]:
        return list(range(len(self)))


def default_medsegbench_root() -> Path:
    return Path(os.environ.get(MEDSEGBENCH_ROOT_ENV) or Path.home() / ".medsegbench")


def resolve_medsegbench(name_or_path: os.PathLike, size: int = 256, root: Optional[os.PathLike] = None,
                        download: bool = False) -> Path:
    """The ``.npz`` file of a MedSegBench dataset given as a path or a dataset name (``kvasir``).

    A name is looked up as ``{root}/{name}_{size}.npz`` (root: ``$MEDSEGBENCH_ROOT`` or ``~/.medsegbench``,
    the package's default). With ``download`` a missing file is fetched by the ``medsegbench`` package
    (``pip install medsegbench``), which is imported only then.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix == ".npz" or os.sep in text or path.exists():
        if not path.is_file():
            raise DatasetError(f"{path}: MedSegBench file not found")
        return path
    root = Path(root).expanduser() if root else default_medsegbench_root()
    path = root / f"{text}_{int(size)}.npz"
    if path.is_file():
        return path
    if not download:
        raise DatasetError(f"MedSegBench dataset {text!r} (size {size}) not found at {path}; give the .npz path, "
                           "or add --download to fetch it with the medsegbench package")
    try:
        import medsegbench.dataset as msb  # optional dependency, imported only when downloading
    except ImportError:
        raise DatasetError(f"downloading {text!r} needs the optional package medsegbench "
                           "(pip install medsegbench), or download the .npz by hand into " + str(root)) from None
    classes = [c for c in vars(msb).values() if isinstance(c, type) and getattr(c, "flag", None) == text]
    if not classes:
        raise DatasetError(f"medsegbench has no dataset called {text!r}")
    root.mkdir(parents=True, exist_ok=True)
    classes[0](split="train", download=True, root=str(root), size=int(size))
    if not path.is_file():
        raise DatasetError(f"medsegbench did not create {path}")
    return path


class MedSegBenchSource(Source):
    """One split (and optional sub-category) of a MedSegBench ``.npz`` file, held in memory."""

    def __init__(self, path: os.PathLike, split: str = "train", category: Optional[str] = None) -> None:
        path = Path(path)
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        try:
            npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"{path}: file not found") from None
        except Exception as e:  # zipfile/numpy raise several types for damaged files
            raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        with npz:
            keys = sorted(npz.files)
            suffix = f"_{category}" if category else ""
            image_key = f"{split}_images{suffix}"
            if image_key not in keys and f"{split}_images" in keys:
                image_key = f"{split}_images"  # idrib: one image set, per-category labels
            label_key = f"{split}_label{suffix}"
            missing = [k for k in (image_key, label_key) if k not in keys]
            if missing:
                cats = sorted({k.rsplit("_", 1)[1] for k in keys if k.startswith(f"{split}_label_")})
                hint = (f" This file has sub-categories {', '.join(cats)}: choose one (--category)." if cats and
                        not category else "")
                raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}; keys found: {', '.join(keys)}."
                                   f"{hint} A MedSegBench file has {{split}}_images and {{split}}_label arrays.")
            images, labels = npz[image_key], npz[label_key]
        if len(images) != len(labels):
            raise DatasetError(f"{path}: {len(images)} images ({image_key}) but {len(labels)} labels ({label_key})")
        if labels.ndim == 4 and labels.shape[-1] == 1:
            labels = labels[..., 0]
        if images.ndim not in (3, 4) or labels.ndim != 3 or images.shape[1:3] != labels.shape[1:3]:
            raise DatasetError(f"{path}: images {images.shape} and labels {labels.shape} do not match "
                               "(expected (N, H, W[, 3]) and (N, H, W))")
        self.path, self.split, self.category = path, split, category
        self.images, self.labels = images, labels
        self.name = path.stem + (f"/{category}" if category else "") + f"/{split}"

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int) -> Item:
        where = f"{self.path} [{index}]"
        return Item(_as_image(self.images[index], where), _as_label(self.labels[index], where),
                    f"{self.name}/{index}")

    def candidates(self) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.labels.reshape(len(self.labels), -1).any(axis=1))]


def split_ext(name: str) -> Tuple[str, str]:
    """``("case1", ".nii.gz")`` for ``case1.nii.gz``; the extension is lower-case."""
    lower = name.lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if lower.endswith(double):
            return name[: -len(double)], double
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def _list_files(folder: Path, what: str) -> Dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist")
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem, ext = split_ext(p.name)
        if p.name.startswith(".") or not p.is_file() or ext not in RASTER_EXTENSIONS + MEDICAL_EXTENSIONS + (
                ".seg.nrrd",):
            continue
        if stem in out:
            raise DatasetError(f"{what} folder {folder}: two files with the stem {stem!r} ({out[stem].name}, "
                               f"{p.name}); keep one")
        out[stem] = p
    return out


def _header(path: Path) -> Tuple[int, Tuple[int, ...]]:
    """(dimension, size in numpy order) of a medical image file, reading the header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot be read ({str(e).strip().splitlines()[-1][:200]})") from None
    size = tuple(int(s) for s in reversed(reader.GetSize()))
    if reader.GetDimension() == 3 and size[0] == 1:
        return 2, size[1:]
    return reader.GetDimension(), size


def _read_2d_medical(path: Path) -> np.ndarray:
    """A 2D (or single-slice 3D) NIfTI/NRRD/MHA file as ``(H, W)`` or ``(H, W, C)``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 3:
        array = array[0]
    return array


class FolderSource(Source):
    """Images and masks in two folders, matched by file stem (``mask_suffix`` is appended to the image's
    stem, e.g. ``"_mask"`` for ``case1.png`` / ``case1_mask.png``). Every mismatch is reported before use."""

    def __init__(self, images: os.PathLike, masks: os.PathLike, mask_suffix: str = "", axis: int = 0,
                 modality: Optional[str] = None, window=None, cache_volumes: int = 2) -> None:
        self.images_dir, self.masks_dir = Path(images), Path(masks)
        self.axis, self.modality, self.window = int(axis), modality, window
        self.name = self.images_dir.name
        images_by_stem = _list_files(self.images_dir, "images")
        masks_by_stem = _list_files(self.masks_dir, "masks")
        if not images_by_stem:
            raise DatasetError(f"no images (PNG, JPEG, TIFF, BMP, NIfTI, NRRD, MHA) in {self.images_dir}")
        without_mask = [p.name for s, p in images_by_stem.items() if s + mask_suffix not in masks_by_stem]
        wanted = {s + mask_suffix for s in images_by_stem}
        without_image = [p.name for s, p in masks_by_stem.items() if s not in wanted]
        if without_mask:
            raise DatasetError(f"no mask in {self.masks_dir} for image(s) {', '.join(without_mask[:5])}"
                               f"{' ...' if len(without_mask) > 5 else ''} (looked for the same file stem"
                               f"{' + ' + repr(mask_suffix) if mask_suffix else ''} with any supported extension)")
        if without_image:
            raise DatasetError(f"mask(s) {', '.join(without_image[:5])}{' ...' if len(without_image) > 5 else ''} in "
                               f"{self.masks_dir} match no image in {self.images_dir} (matched by file stem)")
        self.pairs = [(images_by_stem[s], masks_by_stem[s + mask_suffix]) for s in images_by_stem]
        self.entries: List[Tuple[int, Optional[int]]] = []  # (pair, slice or None)
        self._has_object: List[bool] = []
        self._cache: "OrderedDict[int, tuple]" = OrderedDict()
        self._cache_size = max(1, int(cache_volumes))
        for n, (img, msk) in enumerate(self.pairs):
            self._index_pair(n, img, msk)

    def _index_pair(self, n: int, img: Path, msk: Path) -> None:
        img_ext, msk_ext = split_ext(img.name)[1], split_ext(msk.name)[1]
        if img_ext in RASTER_EXTENSIONS:
            from PIL import Image

            try:
                with Image.open(img) as im:
                    img_size = (im.size[1], im.size[0])
            except OSError as e:
                raise DatasetError(f"{img}: not a readable image ({e})") from None
            dim = 2
        else:
            dim, img_size = _header(img)
            img_size = img_size[:3] if dim == 3 else img_size[:2]
        if dim == 2:
            label = self._read_label_2d(msk)
            if label.shape != tuple(img_size[:2]):
                raise DatasetError(f"mask {msk} has {label.shape[1]} x {label.shape[0]} pixels but image {img.name} "
                                   f"has {img_size[1]} x {img_size[0]}; masks must match their images")
            self.entries.append((n, None))
            self._has_object.append(bool(label.any()))
            return
        if dim != 3:
            raise DatasetError(f"{img}: a {dim}D image; use 2D images or 3D volumes")
        if msk_ext in RASTER_EXTENSIONS:
            raise DatasetError(f"mask {msk} is a 2D image but {img.name} is a 3D volume")
        labels = self._read_labels_3d(msk)
        if labels.shape != tuple(img_size):
            raise DatasetError(f"mask {msk} has shape {labels.shape} (K, J, I) but volume {img.name} has "
                               f"{tuple(img_size)}; the label volume must share the image's voxel grid")
        other = tuple(a for a in range(3) if a != self.axis)
        present = np.flatnonzero(labels.any(axis=other))  # only slices that contain an object
        for k in present:
            self.entries.append((n, int(k)))
            self._has_object.append(True)

    @staticmethod
    def _read_label_2d(path: Path) -> np.ndarray:
        ext = split_ext(path.name)[1]
        if ext in RASTER_EXTENSIONS:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.seek(0)
                    array = np.asarray(im)
            except OSError as e:
                raise DatasetError(f"{path}: not a readable mask image ({e})") from None
        else:
            _header(path)
            array = _read_2d_medical(path)
        return _as_label(array, str(path))

    @staticmethod
    def _read_labels_3d(path: Path) -> np.ndarray:
        from RobustMedSAMLib.volume_io import VolumeError
        from RobustMedSAMLib.segmentation_io import read_segmentation

        try:
            return read_segmentation(path).labels
        except VolumeError as e:
            raise DatasetError(str(e)) from None

    def _volume(self, n: int):
        if n in self._cache:
            self._cache.move_to_end(n)
            return self._cache[n]
        from RobustMedSAMLib.intensity import intensity_mapping
        from RobustMedSAMLib.volume_io import VolumeError, read_volume

        img, msk = self.pairs[n]
        try:
            volume = read_volume(img)
        except VolumeError as e:
            raise DatasetError(str(e)) from None
        image = intensity_mapping(volume.array, self.modality, self.window).apply(volume.array)
        entry = (image, self._read_labels_3d(msk))
        self._cache[n] = entry
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def candidates(self) -> List[int]:
        return [i for i, ok in enumerate(self._has_object) if ok]

    def item(self, index: int) -> Item:
        n, k = self.entries[index]
        img, msk = self.pairs[n]
        if k is None:
            if split_ext(img.name)[1] in RASTER_EXTENSIONS:
                from RobustMedSAMLib.image_io import ImageError, read_image

                try:
                    image = read_image(img)
                except ImageError as e:
                    raise DatasetError(str(e)) from None
            else:
                array = _read_2d_medical(img)
                if array.ndim == 2 and array.dtype != np.uint8:
                    from RobustMedSAMLib.intensity import to_uint8

                    image = to_uint8(array, self.modality, self.window)
                else:
                    image = _as_image(array, str(img))
            return Item(image, self._read_label_2d(msk), img.name)
        image, labels = self._volume(n)
        return Item(np.take(image, k, axis=self.axis), np.take(labels, k, axis=self.axis), f"{img.name}#{k}")


# ============================================================================================ pairs
def corruption_choices(names: Optional[Sequence[str]] = None) -> List[str]:
    """``["clear"] + the 12 corruptions`` (RobustMedSAM), or the given names after checking them."""
    if names is not None and all(n == "clear" for n in names):
        return list(names)
    from RobustMedSAMLib import corruptions

    known = [n for n in corruptions.names() if n != "clear"]
    if names is None:
        return ["clear"] + known
    names = list(names)
    bad = [n for n in names if n != "clear" and n not in known]
    if bad:
        raise DatasetError(f"unknown corruption(s) {', '.join(bad)}; known: clear, {', '.join(known)}")
    return names


def degrade(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 RGB) degraded by corruption ``name`` ("clear" returns it unchanged)."""
    if name == "clear":
        return image
    from RobustMedSAMLib import corruptions

    return corruptions.corrupt(image, name, severity=severity, seed=seed)


@dataclass
class PairConfig:
    """How :class:`TrainingPairs` builds a sample (see module docstring)."""

    train_size: int = 512
    num_points: int = 3
    bbox_shift: int = 20
    label_mode: str = "semantic"
    severity: int = 3
    corruptions: Optional[List[str]] = None
    fixed_views: bool = False
    seed: int = 0
    min_pixels: int = 1
    extra: Dict[str, str] = field(default_factory=dict)


class TrainingPairs:
    """Clean/degraded pairs with prompts, as a map-style torch dataset (see module docstring).

    ``sample = pairs[i]`` is a dict: ``clean`` and ``degraded`` ``(3, S, S)`` float32 model inputs,
    ``mask`` ``(T, T)`` float32 target (T = ``train_size``), ``points`` ``(P, 2)`` / ``point_labels`` ``(P,)``
    and ``box`` ``(4,)`` in the model's input frame, ``corruption`` (index into :attr:`corruptions`) and
    ``index``. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, sources: Sequence[Source], preprocessing, config: Optional[PairConfig] = None) -> None:
        from RobustMedSAMLib.preprocess import model_frame

        self.config = config or PairConfig()
        if self.config.label_mode not in LABEL_MODES:
            raise DatasetError(f"unknown label mode {self.config.label_mode!r}; use one of {', '.join(LABEL_MODES)}")
        self.sources = list(sources)
        self.preprocessing = preprocessing
        self.corruptions = corruption_choices(self.config.corruptions)
        self.index: List[Tuple[int, int]] = [(s, i) for s, src in enumerate(self.sources) for i in src.candidates()]
        if not self.index:
            what = ", ".join(s.name for s in self.sources) or "no source given"
            raise DatasetError(f"the dataset is empty: no image with a non-empty mask ({what})")
        t = int(self.config.train_size)
        self.frame = model_frame((t, t), preprocessing)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe(self) -> str:
        return "; ".join(f"{s.name} ({sum(1 for j, _ in self.index if j == n)} items)"
                         for n, s in enumerate(self.sources))

    def rng(self, index: int, stream: int, epoch: Optional[int] = None) -> np.random.Generator:
        e = self.epoch if epoch is None else epoch
        return np.random.default_rng([int(self.config.seed), int(e), int(index), int(stream)])

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray, str]:
        """``(RGB uint8 (T, T, 3), target bool (T, T), name)`` at the training size, before degradation."""
        from RobustMedSAMLib.preprocess import as_rgb

        s, i = self.index[index]
        item = self.sources[s].item(i)
        t = int(self.config.train_size)
        rgb = resize_image(as_rgb(item.image), (t, t))
        label = resize_nearest(item.label, (t, t))
        target = largest_object(label, self.config.label_mode)
        if target is None or target.sum() < self.config.min_pixels:  # the object vanished when resizing
            target = resize_nearest(largest_object(item.label, self.config.label_mode), (t, t))
            if not target.any():
                raise DatasetError(f"{item.name}: the object is too small for a {t} px training size")
        return rgb, target, item.name

    def view(self, index: int) -> Tuple[str, int]:
        """``(corruption name, noise seed)`` of sample ``index`` in the current epoch."""
        rng = self.rng(index, _STREAM_CORRUPTION, 0 if self.config.fixed_views else None)
        name = self.corruptions[int(rng.integers(len(self.corruptions)))]
        return name, int(rng.integers(2 ** 31 - 1))

    def prompts(self, index: int, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(points (P, 2), box (4,))`` in training-size pixels for sample ``index`` of this epoch."""
        rng = self.rng(index, _STREAM_PROMPT)
        points = sample_points(target, self.config.num_points, rng)
        return points, jittered_box(target, self.config.bbox_shift, rng)

    def __getitem__(self, index: int) -> dict:
        import torch

        from RobustMedSAMLib.preprocess import prepare_image

        rgb, target, _ = self.raw(index)
        points, box = self.prompts(index, target)
        name, seed = self.view(index)
        degraded = degrade(rgb, name, self.config.severity, seed)
        clean_t, frame = prepare_image(rgb, self.preprocessing)
        degraded_t, _ = prepare_image(degraded, self.preprocessing)
        return {
            "clean": clean_t[0], "degraded": degraded_t[0],
            "mask": torch.from_numpy(target.astype(np.float32)),
            "points": torch.as_tensor(frame.points_to_model(points), dtype=torch.float32),
            "point_labels": torch.ones(len(points), dtype=torch.int64),
            "box": torch.as_tensor(frame.boxes_to_model(box), dtype=torch.float32),
            "corruption": self.corruptions.index(name),
            "index": index,
        }


# ============================================================================================ from options
def build_sources(npz: Sequence[str] = (), images: Sequence[str] = (), masks: Sequence[str] = (),
                  split: str = "train", category: Optional[str] = None, npz_size: int = 256,
                  npz_root: Optional[str] = None, download: bool = False, mask_suffix: str = "",
                  axis: int = 0, modality: Optional[str] = None, window=None) -> List[Source]:
    """Sources from command-line style options (``images[i]`` pairs with ``masks[i]``)."""
    if len(images) != len(masks):
        raise DatasetError(f"{len(images)} --images folder(s) but {len(masks)} --masks folder(s); give them in pairs")
    sources: List[Source] = []
    for spec in npz:
        path = resolve_medsegbench(spec, size=npz_size, root=npz_root, download=download)
        sources.append(MedSegBenchSource(path, split, category))
    for img, msk in zip(images, masks):
        sources.append(FolderSource(img, msk, mask_suffix=mask_suffix, axis=axis, modality=modality, window=window))
    if not sources:
        raise DatasetError("no data given: use --npz FILE_OR_NAME and/or --images DIR --masks DIR")
    return sources
