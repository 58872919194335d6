"""The released checkpoint files we know about, and where they live in the per-user weights cache.

Pure standard library (the Slicer module imports it before torch is installed).

* :data:`REGISTRY` / :func:`get` / :func:`names`: the known files (URL, SHA-256, size, licence).
* :func:`default_cache_dir` / :func:`cache_dir` / :func:`cached_path`: where they live
  (``ROBUSTMEDSAM_CACHE`` moves the folder); :func:`download_instructions`: how to put one there by hand.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from .weights_errors import UnknownWeightsError

CACHE_ENV = "ROBUSTMEDSAM_CACHE"


@dataclass(frozen=True)
class WeightsFile:
    """A known checkpoint file. ``url`` None: it can only be downloaded by hand from ``manual_url``."""

    name: str
    filename: str
    url: Optional[str]
    sha256: Optional[str]
    size: Optional[int]
    license: str
    description: str
    manual_url: Optional[str] = None
    how_to: str = ""

    def source(self) -> str:
        """The address a person should open to get the file."""
        return self.manual_url or self.url or "(no public address known)"


REGISTRY: Dict[str, WeightsFile] = {w.name: w for w in [
    WeightsFile(
        name="robustmedsam",
        filename="robustmedsam_best.pth",
        url="https://github.com/jli2556/RobustMedSAM/releases/download/v1.0.0/robustmedsam_best.pth",
        sha256=None, size=None, license="MIT",
        description="RobustMedSAM v1.0.0: MedSAM image/prompt encoder + fine-tuned RobustSAM mask decoder",
        manual_url="https://github.com/jli2556/RobustMedSAM/releases/tag/v1.0.0",
    ),
    WeightsFile(
        name="robustsam-vit-b",
        filename="robustsam_checkpoint_b.pth",
        url="https://huggingface.co/robustsam/robustsam/resolve/main/model_checkpoint/robustsam_checkpoint_b.pth",
        sha256=None, size=None, license="MIT",
        description="RobustSAM ViT-B (SAM encoder + degradation-robust decoder), about 613 MB",
    ),
    WeightsFile(
        name="sam-vit-b",
        filename="sam_vit_b_01ec64.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        # the digest widely recorded for this file (prefix ec2df627..., suffix ...c912)
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size=375042383, license="Apache-2.0",
        description="Segment Anything ViT-B (Meta AI)",
    ),
    WeightsFile(
        name="medsam",
        filename="medsam_vit_b.pth",
        url=None, sha256=None, size=None, license="Apache-2.0",
        description="MedSAM ViT-B (bowang-lab); distributed only through a Google Drive folder",
        manual_url="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
        how_to=("MedSAM's official weights are only published in a Google Drive folder, which cannot be "
                "downloaded automatically. Open\n  "
                "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN\n"
                "in a web browser and download the file medsam_vit_b.pth (about 375 MB)."),
    ),
]}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def names() -> List[str]:
    """Names of the known weights files, in registry order."""
    return list(REGISTRY)


def get(name: str) -> WeightsFile:
    """The registry entry ``name`` (case-insensitive, ``_`` = ``-``); :class:`UnknownWeightsError` lists names."""
    entry = REGISTRY.get(_key(name))
    if entry is None:
        raise UnknownWeightsError(f"unknown weights {name!r}; known weights: {', '.join(REGISTRY)}")
    return entry


# ---------------------------------------------------------------------------------------------- cache
def default_cache_dir(platform: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                      home: Optional[Path] = None) -> Path:
    """The per-user cache folder for ``platform`` (default: this machine), ignoring ``ROBUSTMEDSAM_CACHE``."""
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else Path(home)
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "robustmedsam" / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / "robustmedsam"
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"  # XDG spec: ignore relative paths
    return base / "robustmedsam"


def cache_dir(create: bool = True) -> Path:
    """The weights cache: ``$ROBUSTMEDSAM_CACHE`` if set, else the per-user platform cache folder.

    Created on demand when ``create`` (an existing file at that path raises ``NotADirectoryError``).
    """
    override = os.environ.get(CACHE_ENV, "").strip()
    path = Path(os.path.abspath(os.path.expanduser(override))) if override else default_cache_dir()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cached_path(name: str) -> Path:
    """Where the weights ``name`` live (or would live) in the cache; does not create anything."""
    return cache_dir(create=False) / get(name).filename


def download_instructions(name: str, path: Optional[Path] = None) -> str:
    """Multi-line text telling a person how to put the weights ``name`` in place by hand."""
    entry = get(name)
    path = cached_path(name) if path is None else Path(path)
    lines = []
    if entry.how_to:
        lines.append(entry.how_to)
    else:
        lines.append(f"Download {entry.filename} from:\n  {entry.url or entry.source()}")
        if entry.manual_url and entry.url:
            lines.append(f"(release page: {entry.manual_url})")
    lines.append(f"Save it as:\n  {path}\n(that is, put {entry.filename} in the folder {path.parent})")
    lines.append(f"To keep the weights elsewhere, set the environment variable {CACHE_ENV} to a folder "
                 f"(currently {path.parent}).")
    lines.append("Or use any checkpoint file directly: --checkpoint FILE on the command line "
                 "(or choose the file in the Slicer module).")
    return "\n".join(lines)


__all__ = ["CACHE_ENV", "WeightsFile", "REGISTRY", "names", "get", "default_cache_dir", "cache_dir",
           "cached_path", "download_instructions"]
