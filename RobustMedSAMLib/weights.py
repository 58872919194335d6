"""Known checkpoint files, the per-user weights cache, and a resumable, verified downloader.

Pure standard library: this module is imported by the Slicer module before torch is installed.

* :data:`REGISTRY` / :func:`get` / :func:`names`: the released checkpoint files we know about.
* :func:`cache_dir` / :func:`cached_path`: where they live (``ROBUSTMEDSAM_CACHE`` moves the folder).
* :func:`download`: streams into ``<dest>.part``, resumes with HTTP ``Range`` requests, retries a cut
  connection a few times, verifies size and SHA-256, and only then moves the file into place atomically.
* :func:`ensure_weights`: the cached file, downloading it on first use; when that is impossible,
  :class:`WeightsNotAvailableError` says where to get the file and exactly where to save it.
* :func:`format_bytes` / :class:`TextProgressBar`: command-line progress display.

This module holds :func:`ensure_weights` and is the place to import all of these from; the pieces live in
``weights_registry.py`` (registry, cache paths), ``weights_download.py`` (HTTP: resume, retries, cancel,
verification; :data:`RETRIES` and :data:`RETRY_BACKOFF` are set there), ``weights_digest.py`` (SHA-256 and
the ``.sha256`` sidecars) and ``weights_errors.py``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .progress import TextProgressBar, format_bytes  # noqa: F401  (re-exported)
from .weights_digest import ProgressCallback, cached_digest, sha256_file, write_sidecar  # noqa: F401
from .weights_download import RETRIES, RETRY_BACKOFF, CancelCallback, download, download_with_digest  # noqa: F401
from .weights_errors import (ChecksumError, DownloadCancelled, DownloadError, UnknownWeightsError,  # noqa: F401
                             WeightsError, WeightsNotAvailableError)
from .weights_registry import (CACHE_ENV, REGISTRY, WeightsFile, cache_dir, cached_path,  # noqa: F401
                               default_cache_dir, download_instructions, get, names)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- ensure_weights
def _not_available(entry: WeightsFile, path: Path, reason: str) -> WeightsNotAvailableError:
    text = (f"the {entry.name} weights ({entry.filename}: {entry.description}) are not available: {reason}.\n"
            + download_instructions(entry.name, path))
    return WeightsNotAvailableError(text, name=entry.name, path=path)


def _cached_problem(entry: WeightsFile, path: Path) -> Optional[str]:
    """Why the cached file is unusable, or None if it is fine (SHA-256 checked when known, cached)."""
    size = path.stat().st_size
    if size == 0:
        return f"the cached file {path} is empty"
    if entry.size is not None and size != entry.size:
        return f"the cached file {path} has {size} bytes instead of {entry.size}"
    if entry.sha256:
        digest = cached_digest(path)
        if digest != entry.sha256.lower():
            return f"the cached file {path} has SHA-256 {digest} instead of {entry.sha256.lower()}"
    return None


def ensure_weights(name: str, *, allow_download: bool = True, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelCallback] = None) -> Path:
    """Path of the cached weights ``name``, downloading them on first use.

    A cached file is checked against the known size and SHA-256 (the digest is remembered in a
    ``.sha256`` sidecar keyed by size and mtime, so this is cheap after the first time); a bad copy is
    downloaded again. Raises :class:`WeightsNotAvailableError` (what is missing, where to get it, the
    exact path to save it to, ``ROBUSTMEDSAM_CACHE`` and ``--checkpoint``) when the file has no download
    address, ``allow_download`` is False or the download fails; :class:`DownloadCancelled` when cancelled.
    """
    entry = get(name)
    path = cached_path(entry.name)
    problem = None
    if path.is_file():
        problem = _cached_problem(entry, path)
        if problem is None:
            return path
        log.warning("%s; it will be replaced", problem)
    if entry.url is None:
        raise _not_available(entry, path, problem or f"{path} does not exist and this file must be downloaded by hand")
    if not allow_download:
        raise _not_available(entry, path, problem or f"{path} does not exist and downloading is switched off")
    try:
        _, digest = download_with_digest(entry.url, path, sha256=entry.sha256, expected_size=entry.size,
                                          progress=progress, cancel=cancel)
    except DownloadError as e:
        raise _not_available(entry, path, f"downloading {e.url} failed: {e.reason}") from e
    write_sidecar(path, digest)
    return path


# ------------------------------------------------------------------------------------------- public names
__all__ = [
    "CACHE_ENV", "RETRIES", "RETRY_BACKOFF", "REGISTRY", "WeightsFile", "WeightsError", "UnknownWeightsError",
    "DownloadError", "ChecksumError", "DownloadCancelled", "WeightsNotAvailableError", "names", "get",
    "default_cache_dir", "cache_dir", "cached_path", "download_instructions", "sha256_file", "download",
    "ensure_weights", "format_bytes", "TextProgressBar",
]
