"""Known checkpoint files, the per-user weights cache, and a resumable, verified downloader.

Pure standard library: this module is imported by the Slicer module before torch is installed.

* :data:`REGISTRY` / :func:`get` / :func:`names`: the released checkpoint files we know about.
* :func:`cache_dir` / :func:`cached_path`: where they live (``ROBUSTMEDSAM_CACHE`` moves the folder).
* :func:`download`: streams into ``<dest>.part``, resumes with HTTP ``Range`` requests, retries a cut
  connection a few times, verifies size and SHA-256, and only then moves the file into place atomically.
* :func:`ensure_weights`: the cached file, downloading it on first use; when that is impossible,
  :class:`WeightsNotAvailableError` says where to get the file and exactly where to save it.
* :func:`format_bytes` / :class:`TextProgressBar`: command-line progress display.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from . import __version__
from .progress import TextProgressBar, format_bytes  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, Optional[int]], None]
CancelCallback = Callable[[], bool]

CACHE_ENV = "ROBUSTMEDSAM_CACHE"
#: automatic resume attempts after a connection is cut mid-transfer, and the base back-off in seconds
#: (attempt ``k`` waits ``k * RETRY_BACKOFF``). Module-level so tests and callers can change them.
RETRIES = 3
RETRY_BACKOFF = 1.0
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".sha256"


# --------------------------------------------------------------------------------------------- errors
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


class _ConnectionCut(Exception):
    """Internal: the transfer stopped early; retrying with a Range request may finish it."""


# ------------------------------------------------------------------------------------------- registry
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


# ------------------------------------------------------------------------------------------- hashing
def sha256_file(path: os.PathLike, progress: Optional[ProgressCallback] = None, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file; ``progress(done, total)`` is called after every chunk."""
    digest = hashlib.sha256()
    _hash_file_into(digest, Path(path), progress, chunk_size)
    return digest.hexdigest()


def _hash_file_into(digest, path: Path, progress: Optional[ProgressCallback] = None,
                    chunk_size: int = 1 << 22) -> None:
    """Feed the bytes of ``path`` to ``digest`` (a ``hashlib`` object), with optional progress."""
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "file": path.name}
    tmp = _sidecar(path).with_name(_sidecar(path).name + ".tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, _sidecar(path))
    except OSError as e:  # a read-only cache still works, it just re-hashes next time
        log.debug("could not write %s: %s", _sidecar(path), e)


def _cached_digest(path: Path, progress: Optional[ProgressCallback] = None) -> str:
    """SHA-256 of ``path``, reusing the sidecar record while the file's size and mtime are unchanged."""
    st = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
            digest = str(record["sha256"]).lower()
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = sha256_file(path, progress)
    _write_sidecar(path, digest)
    return digest


# ------------------------------------------------------------------------------------------- download
def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def _content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total) of a ``Content-Range`` header; None where absent or ``*``."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "", re.I)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _reason(exc: BaseException) -> str:
    """Readable reason of a urllib / socket failure."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _reason(inner)
        return str(inner)
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "timeout":
        return f"the connection timed out ({exc})" if str(exc) else "the connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc}); the server is down or unreachable"
    text = str(exc) or type(exc).__name__
    if "getaddrinfo" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return f"the host name could not be resolved ({text}); are you offline?"
    return text


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _check_cancel(cancel: Optional[CancelCallback], url: str, part: Path) -> None:
    if cancel is not None and cancel():
        raise DownloadCancelled(url, part, part.stat().st_size if part.exists() else 0)


def _attempt(url: str, dest: Path, part: Path, *, sha256: Optional[str], expected_size: Optional[int],
             progress: Optional[ProgressCallback], cancel: Optional[CancelCallback], timeout: float,
             chunk_size: int) -> Tuple["hashlib._Hash", int]:
    """One HTTP transfer into ``part`` (resuming it if present). Returns (digest of the whole part, size).

    Raises _ConnectionCut when the transfer stops early (the part keeps what arrived), DownloadError for
    failures a retry cannot fix, DownloadCancelled when ``cancel()`` says so.
    """
    restarts = 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        if expected_size is not None and offset > expected_size:
            log.info("%s is larger than the expected %d bytes; starting over", part, expected_size)
            _unlink(part)
            offset = 0
        if offset and offset == expected_size:  # complete already (e.g. interrupted before the rename)
            digest = hashlib.sha256()
            _hash_file_into(digest, part)
            return digest, offset
        headers = {"User-Agent": f"RobustMedSAM/{__version__} (weights downloader)",
                   "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                cr_total = _content_range(e.headers.get("Content-Range") if e.headers else None)[1]
            finally:
                e.close()
            if e.code == 416 and offset:
                total = cr_total if cr_total is not None else expected_size
                digest = hashlib.sha256()
                _hash_file_into(digest, part)
                if total == offset or (total is None and sha256 and digest.hexdigest() == sha256.lower()):
                    log.info("%s is already complete (%d bytes)", part, offset)
                    return digest, offset
                if restarts:
                    raise DownloadError(url, dest, "the server rejected the range request twice (HTTP 416)")
                log.info("the server rejected resuming %s at byte %d (HTTP 416); starting over", part, offset)
                _unlink(part)
                restarts += 1
                continue
            raise DownloadError(url, dest, _reason(e)) from e
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DownloadError(url, dest, _reason(e)) from e

        with response:
            status = getattr(response, "status", None) or response.getcode()
            ctype = (response.headers.get("Content-Type") or "").lower()
            if ctype.startswith("text/html"):
                raise DownloadError(url, dest, "the server sent a web page instead of the file (a login, "
                                    "quota or confirmation page?)")
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    if restarts:
                        raise DownloadError(url, dest, f"the server resumed at byte {start} instead of {offset}")
                    log.info("the server resumed at byte %s instead of %d; starting over", start, offset)
                    _unlink(part)
                    restarts += 1
                    continue
                mode = "ab"
            else:
                if offset:
                    log.info("the server ignored the range request; downloading %s from the start", url)
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.strip().isdigit() else None
            if expected_size is not None and total is not None and total != expected_size:
                _unlink(part)
                raise ChecksumError(url, dest, "size (according to the server)", expected_size, total)

            digest = hashlib.sha256()
            if mode == "ab":
                _hash_file_into(digest, part)
            done = offset
            if offset:
                log.info("resuming %s at %s", url, format_bytes(offset))
            try:
                f = open(part, mode)
            except OSError as e:
                raise DownloadError(url, dest, f"cannot write {part}: {e}") from e
            with f:
                if progress is not None:
                    progress(done, total)
                while True:
                    if cancel is not None and cancel():
                        raise DownloadCancelled(url, part, done)
                    try:
                        block = response.read(chunk_size)
                    except (http.client.HTTPException, OSError, ValueError) as e:
                        raise _ConnectionCut(f"the connection broke after {format_bytes(done)}"
                                             f"{' of ' + format_bytes(total) if total else ''} ({_reason(e)})")
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as e:
                        raise DownloadError(url, dest, f"cannot write {part}: {e}") from e
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise DownloadError(url, dest, f"cannot write {part}: {e}") from e
            if total is not None and done < total:
                raise _ConnectionCut(f"the connection closed after {format_bytes(done)} of {format_bytes(total)}")
            return digest, done


def _sleep(seconds: float, cancel: Optional[CancelCallback], url: str, part: Path) -> None:
    end = time.monotonic() + seconds
    while True:
        _check_cancel(cancel, url, part)
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def _download(url: str, dest: os.PathLike, *, sha256: Optional[str] = None, expected_size: Optional[int] = None,
              progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None,
              timeout: float = 30, chunk_size: int = 1 << 20, retries: Optional[int] = None,
              backoff: Optional[float] = None) -> Tuple[Path, str]:
    """:func:`download`, also returning the file's SHA-256."""
    dest = Path(os.path.abspath(os.path.expanduser(os.fspath(dest))))
    part = _part_path(dest)
    retries = RETRIES if retries is None else max(0, int(retries))
    backoff = RETRY_BACKOFF if backoff is None else max(0.0, float(backoff))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(url, dest, f"cannot create the folder {dest.parent}: {e}") from e
    attempt = 0
    while True:
        _check_cancel(cancel, url, part)
        try:
            digest, size = _attempt(url, dest, part, sha256=sha256, expected_size=expected_size,
                                    progress=progress, cancel=cancel, timeout=timeout, chunk_size=chunk_size)
            break
        except _ConnectionCut as e:
            if attempt >= retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(url, dest, f"{e}; gave up after {attempt + 1} attempt(s)",
                                    hint=f"The {format_bytes(kept)} received so far are kept in {part}; "
                                         f"downloading again resumes from there.") from None
            attempt += 1
            wait = backoff * attempt
            log.warning("%s; resuming in %.1f s (attempt %d of %d)", e, wait, attempt, retries)
            _sleep(wait, cancel, url, part)
    actual = digest.hexdigest()
    if expected_size is not None and size != expected_size:
        _unlink(part)
        raise ChecksumError(url, dest, "size", f"{expected_size} bytes", f"{size} bytes")
    if sha256 and actual != sha256.strip().lower():
        _unlink(part)
        raise ChecksumError(url, dest, "SHA-256", sha256.strip().lower(), actual)
    try:
        os.replace(part, dest)
    except OSError as e:
        raise DownloadError(url, dest, f"cannot move {part} to {dest}: {e}") from e
    log.info("downloaded %s (%s, sha256 %s)", dest, format_bytes(size), actual)
    return dest, actual


def download(url: str, dest: os.PathLike, *, sha256: Optional[str] = None, expected_size: Optional[int] = None,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None,
             timeout: float = 30, chunk_size: int = 1 << 20, retries: Optional[int] = None,
             backoff: Optional[float] = None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest`` (absolute).

    The data go to ``<dest>.part`` first; an existing part is resumed with a ``Range`` request (a server
    that ignores it is handled by starting over). Only after the size and SHA-256 (when given) match is
    the part renamed to ``dest``, so ``dest`` is never half-written; on a mismatch the part is deleted and
    :class:`ChecksumError` raised. A connection cut mid-transfer is resumed up to ``retries`` times
    (default :data:`RETRIES`, waiting ``k * backoff`` seconds before attempt ``k``); after that, and for
    any other network failure, :class:`DownloadError` names the URL, the reason and where to put the
    file by hand, and the part is kept. ``progress(done, total_or_None)`` is called as data arrive (it
    goes back to 0 if the server ignores a resume request); ``cancel()`` returning True stops with
    :class:`DownloadCancelled`, keeping the part.
    """
    return _download(url, dest, sha256=sha256, expected_size=expected_size, progress=progress, cancel=cancel,
                     timeout=timeout, chunk_size=chunk_size, retries=retries, backoff=backoff)[0]


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
        digest = _cached_digest(path)
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
        _, digest = _download(entry.url, path, sha256=entry.sha256, expected_size=entry.size,
                              progress=progress, cancel=cancel)
    except DownloadError as e:
        raise _not_available(entry, path, f"downloading {e.url} failed: {e.reason}") from e
    _write_sidecar(path, digest)
    return path


# -------------------------------------------------------------------------------------------- display
__all__ = [
    "CACHE_ENV", "RETRIES", "RETRY_BACKOFF", "REGISTRY", "WeightsFile", "WeightsError", "UnknownWeightsError",
    "DownloadError", "ChecksumError", "DownloadCancelled", "WeightsNotAvailableError", "names", "get",
    "default_cache_dir", "cache_dir", "cached_path", "download_instructions", "sha256_file", "download",
    "ensure_weights", "format_bytes", "TextProgressBar",
]
