"""The errors of the weights registry, cache and downloader (:mod:`RobustMedSAMLib.weights`).

Pure standard library. All derive from :class:`WeightsError`; :class:`DownloadError` (and its
:class:`ChecksumError`) carry ``url``, ``dest`` and ``reason``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .progress import format_bytes


class WeightsError(Exception):
    """Base class of this module's errors."""


class UnknownWeightsError(WeightsError, KeyError):
    """No registry entry of that name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DownloadError(WeightsError):
    """A download failed. ``url``, ``dest`` (where the file belongs) and ``reason`` are attributes."""

    def __init__(self, url: str, dest: os.PathLike, reason: str, *, hint: Optional[str] = None):
        self.url, self.dest, self.reason = url, Path(dest), reason
        text = f"could not download {url}: {reason}"
        if hint:
            text += f"\n{hint}"
        text += f"\nYou can download it by hand (e.g. in a web browser) and save it as:\n  {self.dest}"
        super().__init__(text)


class ChecksumError(DownloadError):
    """The downloaded file has the wrong size or SHA-256 digest; it was deleted."""

    def __init__(self, url: str, dest: os.PathLike, what: str, expected, actual):
        self.expected, self.actual = expected, actual
        reason = (f"the downloaded {Path(dest).name} has the wrong {what}: expected {expected}, got {actual} "
                  f"(the partial file was deleted; the server may have sent a different version or a "
                  f"corrupted copy)")
        super().__init__(url, dest, reason)


class DownloadCancelled(WeightsError):
    """The ``cancel`` callback asked to stop. The partial file is kept; downloading again resumes."""

    def __init__(self, url: str, part: Path, done: int):
        self.url, self.part, self.done = url, part, done
        super().__init__(f"download of {url} cancelled after {format_bytes(done)}; the partial file {part} "
                         f"is kept and the next download resumes from it")


class WeightsNotAvailableError(WeightsError):
    """Named weights are neither cached nor downloadable; the message explains how to provide them."""

    def __init__(self, message: str, *, name: str = "", path: Optional[Path] = None):
        self.name, self.path = name, path
        super().__init__(message)


__all__ = ["WeightsError", "UnknownWeightsError", "DownloadError", "ChecksumError", "DownloadCancelled",
           "WeightsNotAvailableError"]
