"""Keep glibc from unmapping and page-faulting the engine's large CPU buffers again and again.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on ``free``; the heap's top is trimmed above
twice that. The encoder and the robust decoder allocate and free blocks of 10-50 MB dozens of times per
slice or prompt (decoder activations ``32-64 x 256 x 256`` float32 are 8-17 MB), so each one is
page-faulted in again on every use. :func:`tune_cpu_allocator` raises both thresholds once per process
(``mallopt``): blocks up to ``mmap_threshold`` come from the heap and are reused, and up to
``trim_threshold`` of free memory at the top of the heap is kept for the next use instead of being returned.
Results are unchanged (only where memory comes from); measured on 2 AVX2 cores (``robustmedsam bench``):
prompt -> mask about 1.2-1.4x faster, the encoder a few percent.

Linux/glibc only (a no-op elsewhere: macOS and Windows allocators behave differently). The setting is
process-wide, so inside 3D Slicer it applies to the whole application; the cost is up to
``trim_threshold`` (64 MiB) of freed memory kept mapped per allocator arena. Set ``ROBUSTMEDSAM_MALLOC=default`` to leave the allocator
alone. This is the in-process counterpart of preloading jemalloc (REFERENCE.md section 0), which is not
possible inside Slicer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

ENV_SWITCH = "ROBUSTMEDSAM_MALLOC"
MMAP_THRESHOLD = 64 << 20  # bytes: larger blocks are still mmapped (e.g. the reference encoder's 800 MB)
# bytes of free heap top kept for reuse. Not more than glibc's 64 MiB heap size of thread arenas: above it,
# a worker thread's arena (Slicer's background encoding) would never give a whole free heap back.
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_lock = threading.Lock()
_state = {"tuned": None}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not support these mallopt options)
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring).

    Returns True if the thresholds are (now or already) set by this function; False on other platforms
    and C libraries, or when ``ROBUSTMEDSAM_MALLOC=default``. Never raises.
    """
    with _lock:
        if _state["tuned"] is not None:
            return _state["tuned"]
        tuned = False
        if os.environ.get(ENV_SWITCH, "").strip().lower() != "default":
            libc = _glibc()
            if libc is not None:
                tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
                if not tuned:
                    log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
        _state["tuned"] = tuned
        return tuned
