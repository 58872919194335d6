"""Pieces shared by the trainer's and the evaluation's command lines: data-source options and the sources
they name, the output-folder check and the progress bar."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Type

from Training import datasets as D


def add_source_args(g: argparse._ArgumentGroup, split: str, split_help: Optional[str] = None) -> None:
    """``--npz``, ``--images``/``--masks`` and the MedSegBench and 3D-volume options (``--split`` defaults to
    ``split``)."""
    g.add_argument("--npz", action="append", default=[], help="MedSegBench .npz file or dataset name (repeat)")
    g.add_argument("--images", action="append", default=[], help="images folder (repeat, paired with --masks)")
    g.add_argument("--masks", action="append", default=[], help="masks folder matched to --images by file stem")
    g.add_argument("--split", default=split, choices=D.SPLITS, help=split_help)
    g.add_argument("--category", help="MedSegBench sub-category (C1, C2, ...)")
    g.add_argument("--npz-size", type=int, default=256, help="MedSegBench image size for dataset names")
    g.add_argument("--npz-root", help="folder of MedSegBench files ($MEDSEGBENCH_ROOT or ~/.medsegbench)")
    g.add_argument("--download", action="store_true", help="download missing MedSegBench files (needs medsegbench)")
    g.add_argument("--mask-suffix", default="", help="mask stem = image stem + this (e.g. _mask)")
    g.add_argument("--slice-axis", type=int, default=0, choices=[0, 1, 2], help="3D volumes: array axis to slice")
    g.add_argument("--modality", help="3D volumes: CT, MR or other (default: guessed)")
    g.add_argument("--window", help="CT window preset or LEVEL,WIDTH")


def sources_from(opts, npz: Sequence[str], images: Sequence[str], masks: Sequence[str],
                 split: str) -> List[D.Source]:
    """:func:`datasets.build_sources` with the shared options of ``opts`` (parsed arguments or a config)."""
    return D.build_sources(npz=npz, images=images, masks=masks, split=split, category=opts.category,
                           npz_size=opts.npz_size, npz_root=opts.npz_root, download=opts.download,
                           mask_suffix=opts.mask_suffix, axis=opts.slice_axis, modality=opts.modality,
                           window=opts.window or None)


def require_objects(sources: Sequence[D.Source]) -> None:
    """:class:`datasets.DatasetError` unless some image has a non-empty mask."""
    if not any(s.candidates() for s in sources):
        raise D.DatasetError("the dataset is empty: no image with a non-empty mask in "
                             + ", ".join(s.name for s in sources))


def ensure_output_folder(out: Path, error: Type[Exception]) -> None:
    """Create ``out`` and check that a file can be written in it; raise ``error`` otherwise."""
    if out.exists() and not out.is_dir():
        raise error(f"output {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test"):
            pass
    except OSError as e:
        raise error(f"output folder {out} is not writable ({e.strerror or e})") from None


def progress_bar(total: int, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
