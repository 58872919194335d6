"""What a front end keeps of the engine worker: the chosen model, the volumes it sent, debounced prefetching.

:class:`EngineConnection` wraps a :class:`~.client.WorkerClient` (or :class:`~.client.InProcessClient`) and
makes a fresh worker whole again: before a request it re-sends the model choice (as a ``load`` that does not
download) and every volume the request names, if the running worker has not got them (it was restarted
after a crash, or unloaded). Requests queue in the worker in order, so nothing waits for those replies here.

Volumes cross once: to a worker as a ``.npy`` file next to its log (memory-mapped there), to an in-process
service as the array itself. ``prefetch`` is debounced (only the slice the view rests on for
:attr:`debounce` seconds is sent) and latest-wins in the worker. numpy only.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .requests import Request
from .inprocess import InProcessClient


@dataclass(frozen=True)
class ModelSpec:
    """What the worker loads: a named ``model`` (or ``"custom checkpoint"``), optional ``checkpoint`` file,
    ``device``, decoder path (``robust`` None = the configuration's), encoding cache size and storage,
    numerical ``precision``."""

    model: str = "robustmedsam"
    checkpoint: str = ""
    device: str = "auto"
    robust: Optional[bool] = None
    cache_mb: float = 1024.0
    fp16_cache: bool = False
    seed: int = 0
    precision: str = "auto"   # RobustMedSAMLib.precision: auto (bf16 where measured to pay), fp32, bf16

    def fields(self) -> Dict[str, Any]:
        return asdict(self)


class EngineConnection:
    """A client, the model to have loaded and the volumes to have sent (see the module docstring).

    ``wake``: called after every submitted request (the Slicer side starts its poll timer there).
    """

    def __init__(self, client, spec: Optional[ModelSpec] = None, wake: Optional[Callable[[], None]] = None) -> None:
        self.client = client
        self.spec = spec
        self.wake = wake
        self.info: Dict[str, Any] = {}
        self.debounce = 0.12
        self._load_generation: Optional[int] = None
        self._load_spec: Optional[ModelSpec] = None
        self._volumes: Dict[str, Dict[str, Any]] = {}
        self._volume_generation: Dict[str, int] = {}
        self._files: Dict[str, Path] = {}
        self._trash: List[Path] = []
        self._wanted: Optional[Tuple[float, Dict[str, Any]]] = None
        self._last_prefetch: Optional[Dict[str, Any]] = None

    @property
    def in_process(self) -> bool:
        return isinstance(self.client, InProcessClient)

    # -- model ---------------------------------------------------------------------------------------
    def configure(self, spec: ModelSpec) -> None:
        """Use ``spec`` from the next request on (the worker reloads only if model/checkpoint/device changed)."""
        self.spec = spec

    @property
    def is_loaded(self) -> bool:
        """The chosen model is loaded (or being loaded, without download) in the running worker."""
        return (self.spec is not None and self._load_spec == self.spec and self.client.alive
                and self._load_generation == self.client.generation)

    def load(self, allow_download: bool = True, on_progress=None, on_done=None) -> Request:
        """Load the chosen model now (downloading its weights if allowed)."""
        if self.spec is None:
            raise RuntimeError("no model chosen")
        self._start()
        spec = self.spec
        self._load_generation, self._load_spec = self.client.generation, spec

        def done(request: Request) -> None:
            if request.ok:
                self.info = dict(request.result)
            elif self._load_spec == spec:
                self._load_generation, self._load_spec = None, None  # retry on the next request
            if on_done is not None:
                on_done(request)

        return self._submit("load", dict(spec.fields(), allow_download=allow_download), on_progress, done)

    def _start(self) -> None:
        if not self.client.alive and hasattr(self.client, "start"):
            self.client.start()

    # -- volumes -------------------------------------------------------------------------------------
    def set_volume(self, array: np.ndarray, ijk_to_lps: np.ndarray, key: Optional[str] = None) -> str:
        """Register a ``(K, J, I)`` volume (sent with the next request that names it); returns its key."""
        key = key or uuid.uuid4().hex
        self.drop_volume(key)
        fields: Dict[str, Any] = {"key": key, "ijk_to_lps": np.asarray(ijk_to_lps, dtype=np.float64)}
        if self.in_process:
            fields["array"] = np.asarray(array)
        else:
            folder = Path(self.client.log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"volume-{key}-{uuid.uuid4().hex[:8]}.npy"  # never a path still mapped by the worker
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, path)
            self._files[key] = path
            fields["path"] = str(path)
        self._volumes[key] = fields
        return key

    def drop_volume(self, key: str) -> None:
        if key in self._volumes:
            if self._volume_generation.get(key) == self.client.generation and self.client.alive:
                self._submit("drop_volume", {"key": key})
            del self._volumes[key]
            self._volume_generation.pop(key, None)
        path = self._files.pop(key, None)
        if path is not None:
            self._trash.append(path)
            self._empty_trash()

    def _empty_trash(self) -> None:
        """Delete the files of dropped volumes. On Windows a file the worker still has memory-mapped cannot
        be deleted until the worker has handled ``drop_volume`` (or ended): those wait for a later poll."""
        kept = []
        for path in self._trash:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(path)
        self._trash = kept

    def drop_all_volumes(self) -> None:
        """Forget every volume (and delete the files of those sent as arrays)."""
        for key in list(self._volumes):
            self.drop_volume(key)

    # -- requests ------------------------------------------------------------------------------------
    def _ensure(self, volume: Optional[str]) -> None:
        self._start()
        if self.spec is not None and not self.is_loaded:
            self.load(allow_download=False)
        if volume is not None:
            if volume not in self._volumes:
                raise KeyError(f"volume {volume!r} was never registered (set_volume first)")
            if self._volume_generation.get(volume) != self.client.generation:
                self._volume_generation[volume] = self.client.generation
                self._submit("set_volume", self._volumes[volume])

    def _submit(self, kind: str, fields: Dict[str, Any], on_progress=None, on_done=None) -> Request:
        request = self.client.submit(kind, fields, on_progress, on_done)
        if self.wake is not None:
            self.wake()
        return request

    def request(self, kind: str, volume: Optional[str] = None, on_progress=None, on_done=None, **fields) -> Request:
        """Submit ``kind`` (see :mod:`.service`) after making sure the worker has the model and ``volume``."""
        self._ensure(volume)
        if volume is not None:
            fields["volume"] = volume
        return self._submit(kind, fields, on_progress, on_done)

    def prefetch(self, volume: str, axis: int, index: int, mapping: Any = "auto", neighbours: int = 0) -> None:
        """Encode this slice soon (debounced; the newest wish replaces older ones)."""
        wish = {"volume": volume, "axis": int(axis), "index": int(index), "mapping": mapping,
                "neighbours": int(neighbours)}
        if (self.client.generation, wish) == self._last_prefetch:
            self._wanted = None  # already asked of this worker
            return
        self._wanted = (time.monotonic(), wish)
        if self.wake is not None:
            self.wake()

    def _send_prefetch(self) -> None:
        if self._wanted is None or time.monotonic() - self._wanted[0] < self.debounce:
            return
        wish = self._wanted[1]
        self._wanted = None
        if wish["volume"] not in self._volumes or not (self.spec is None or self.is_loaded):
            return  # nothing to encode with (the model is not loaded, or the volume went away)
        self._last_prefetch = (self.client.generation, wish)
        fields = dict(wish)
        self.request("prefetch", fields.pop("volume"), **fields)

    @property
    def pending(self) -> int:
        return self.client.pending + (self._wanted is not None)

    def poll(self, budget: float = 0.01) -> int:
        """Send a due prefetch and exchange with the worker without blocking; returns :attr:`pending`."""
        self._send_prefetch()
        self.client.poll(budget)
        if self._trash:
            self._empty_trash()
        return self.pending

    def wait(self, request: Request, timeout: Optional[float] = None) -> Request:
        return self.client.wait(request, timeout)

    def call(self, kind: str, volume: Optional[str] = None, timeout: Optional[float] = None, **fields) -> Any:
        """Blocking :meth:`request` (scripts, tests): the result, or the engine's error raised."""
        return self.wait(self.request(kind, volume, **fields), timeout).value()

    def unload(self, timeout: float = 30.0) -> None:
        """End the worker (its memory goes back to the system); the next request starts a new one. A worker
        still busy after ``timeout`` seconds is killed."""
        self._wanted, self._last_prefetch = None, None
        self.client.unload(timeout)
        self._load_generation, self._load_spec = None, None

    def close(self) -> None:
        self.unload()
        self.drop_all_volumes()
        self._empty_trash()  # the worker has ended: nothing maps them any more
