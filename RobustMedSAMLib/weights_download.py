"""A resumable, verified HTTP downloader (pure standard library).

:func:`download` streams into ``<dest>.part``, resumes with HTTP ``Range`` requests, retries a cut
connection a few times, verifies size and SHA-256, and only then moves the file into place atomically.
``progress(done, total)`` reports bytes; ``cancel()`` returning True stops, keeping the part.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Tuple

from . import __version__
from .progress import format_bytes
from .weights_digest import ProgressCallback, hash_file_into
from .weights_errors import ChecksumError, DownloadCancelled, DownloadError

log = logging.getLogger(__name__)

CancelCallback = Callable[[], bool]

#: automatic resume attempts after a connection is cut mid-transfer, and the base back-off in seconds
#: (attempt ``k`` waits ``k * RETRY_BACKOFF``). Module-level so tests and callers can change them here
#: (``RobustMedSAMLib.weights`` re-exports their values for reading).
RETRIES = 3
RETRY_BACKOFF = 1.0
PART_SUFFIX = ".part"


class _ConnectionCut(Exception):
    """Internal: the transfer stopped early; retrying with a Range request may finish it."""


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
            hash_file_into(digest, part)
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
                hash_file_into(digest, part)
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
                hash_file_into(digest, part)
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


def download_with_digest(url: str, dest: os.PathLike, *, sha256: Optional[str] = None,
                         expected_size: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelCallback] = None, timeout: float = 30, chunk_size: int = 1 << 20,
                         retries: Optional[int] = None, backoff: Optional[float] = None) -> Tuple[Path, str]:
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
    return download_with_digest(url, dest, sha256=sha256, expected_size=expected_size, progress=progress,
                                cancel=cancel, timeout=timeout, chunk_size=chunk_size, retries=retries,
                                backoff=backoff)[0]


__all__ = ["CancelCallback", "ProgressCallback", "RETRIES", "RETRY_BACKOFF", "PART_SUFFIX", "download",
           "download_with_digest"]
