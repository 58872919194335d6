"""SHA-256 of files, and the ``.sha256`` sidecar that remembers a cached file's digest.

Pure standard library. The sidecar ``<file>.sha256`` is a JSON record ``{sha256, size, mtime_ns, file}``;
:func:`cached_digest` trusts it only while the file's size and mtime are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

#: ``progress(done_bytes, total_bytes_or_None)``
ProgressCallback = Callable[[int, Optional[int]], None]

SIDECAR_SUFFIX = ".sha256"


def sha256_file(path: os.PathLike, progress: Optional[ProgressCallback] = None, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file; ``progress(done, total)`` is called after every chunk."""
    digest = hashlib.sha256()
    hash_file_into(digest, Path(path), progress, chunk_size)
    return digest.hexdigest()


def hash_file_into(digest, path: Path, progress: Optional[ProgressCallback] = None,
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


def sidecar_path(path: Path) -> Path:
    """``<path>.sha256``: where the digest of ``path`` is remembered."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Path, digest: str) -> None:
    """Remember ``digest`` of ``path`` with its size and mtime (atomically; skipped if the folder is read-only)."""
    st = path.stat()
    record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "file": path.name}
    tmp = sidecar_path(path).with_name(sidecar_path(path).name + ".tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, sidecar_path(path))
    except OSError as e:  # a read-only cache still works, it just re-hashes next time
        log.debug("could not write %s: %s", sidecar_path(path), e)


def cached_digest(path: Path, progress: Optional[ProgressCallback] = None) -> str:
    """SHA-256 of ``path``, reusing the sidecar record while the file's size and mtime are unchanged."""
    st = path.stat()
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
            digest = str(record["sha256"]).lower()
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = sha256_file(path, progress)
    write_sidecar(path, digest)
    return digest


__all__ = ["ProgressCallback", "SIDECAR_SUFFIX", "sha256_file", "hash_file_into", "sidecar_path",
           "write_sidecar", "cached_digest"]
