"""The engine as the module and both effects share it: one model, one predictor (encoding cache) and the
uint8 image of each source volume.

torch is imported only in :meth:`EngineSession.load`. The encoding cache is keyed by image content, model
and axis, so the 2D effect, the propagate effect and the module reuse each other's slice encodings.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from . import volumes

CUSTOM_CHECKPOINT = "custom checkpoint"
#: intensity mapping choices: "auto" (engine: CT soft-tissue window / MR percentiles), "display" (the volume's
#: current window/level in the slice views), a window preset name, or "LEVEL,WIDTH".
INTENSITY_CHOICES = ("auto", "display", "soft_tissue", "lung", "bone", "brain", "MR")


def model_names() -> Tuple[str, ...]:
    """Named models with released weights (the engine's ``MODELS`` minus test configurations)."""
    from RobustMedSAMLib.models import MODELS

    return tuple(name for name, cfg in MODELS.items() if cfg.weights is not None)


def weights_status(model: str) -> Tuple[bool, Optional[Path], str]:
    """``(cached, path, text)`` of a named model's weights in the engine's per-user cache."""
    from RobustMedSAMLib import weights
    from RobustMedSAMLib.models import get_config

    cfg = get_config(model)
    if cfg.weights is None:
        return False, None, "no released weights"
    path = weights.cached_path(cfg.weights)
    entry = weights.get(cfg.weights)
    if path.is_file() and path.stat().st_size > 0:
        return True, path, f"cached: {path}"
    if entry.url is None:
        return False, path, f"not downloaded; manual download needed, save it as {path}"
    return False, path, f"not downloaded yet (downloaded on first use into {path.parent})"


def available_devices() -> Tuple[str, ...]:
    """``("auto", "cpu", "cuda", ...)`` as the engine sees them (imports torch)."""
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{n}" for n in range(1, torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return tuple(out)


@dataclass(frozen=True)
class ModelChoice:
    model: str = "robustmedsam"          # a MODELS name, or CUSTOM_CHECKPOINT
    checkpoint: str = ""                 # file, when model == CUSTOM_CHECKPOINT (or any model: overrides)
    device: str = "auto"
    robust: Optional[bool] = None        # None: the configuration's decoder path
    cache_mb: float = 1024.0
    fp16_cache: bool = False

    @property
    def key(self) -> tuple:
        return (self.model, self.checkpoint, self.device, self.robust)


class EngineSession:
    """Lazily loaded model + predictor, and per-volume uint8 images.

    ``loaded``: inject an already loaded model (tests use the engine's seeded tiny model).
    """

    def __init__(self, choice: Optional[ModelChoice] = None, loaded=None) -> None:
        self.choice = choice or ModelChoice()
        self._loaded = loaded
        self._predictor = None
        self._lock = threading.RLock()
        self._images: Dict[tuple, np.ndarray] = {}

    # model ------------------------------------------------------------------------------------------
    def configure(self, choice: ModelChoice) -> None:
        """Change model/device/cache settings; the model is reloaded on next use if they changed."""
        with self._lock:
            if choice.key != self.choice.key:
                self.close()
                self._loaded = None
            elif self._predictor is not None and (choice.cache_mb, choice.fp16_cache) != (
                    self.choice.cache_mb, self.choice.fp16_cache):
                self._predictor.cache.max_bytes = int(choice.cache_mb * 1e6)
            self.choice = choice

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def ensure_weights(self, progress: Optional[Callable] = None, cancel: Optional[Callable[[], bool]] = None,
                       allow_download: bool = True) -> Optional[Path]:
        """Download the named model's weights if needed (``progress(done, total)``, ``cancel()``); returns the
        file (None for a custom checkpoint). Raises the engine's ``WeightsNotAvailableError`` (with the
        how-to message) or ``DownloadCancelled``."""
        from RobustMedSAMLib.models import get_config
        from RobustMedSAMLib.weights import ensure_weights

        if self.choice.model == CUSTOM_CHECKPOINT or self.choice.checkpoint:
            return None
        cfg = get_config(self.choice.model)
        if cfg.weights is None:
            return None
        return ensure_weights(cfg.weights, allow_download=allow_download, progress=progress, cancel=cancel)

    def load(self, progress: Optional[Callable] = None, cancel: Optional[Callable[[], bool]] = None,
             allow_download: bool = True):
        """Load the model (downloading its weights first if needed); returns the engine ``LoadedModel``."""
        from RobustMedSAMLib.models import load_model

        with self._lock:
            if self._loaded is not None:
                return self._loaded
            checkpoint = self.choice.checkpoint or None
            if self.choice.model == CUSTOM_CHECKPOINT:
                if not checkpoint:
                    raise ValueError("choose a checkpoint file (.pth or .safetensors) for 'custom checkpoint'")
                if not Path(checkpoint).is_file():
                    raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
                self._loaded = load_model(None, checkpoint, device=self.choice.device)
            elif checkpoint:
                self._loaded = load_model(self.choice.model, checkpoint, device=self.choice.device)
            else:
                self.ensure_weights(progress, cancel, allow_download)
                self._loaded = load_model(self.choice.model, device=self.choice.device, allow_download=False)
            return self._loaded

    @property
    def predictor(self):
        """The shared :class:`~RobustMedSAMLib.predictor.Predictor` (loads the model on first use)."""
        from RobustMedSAMLib.predictor import EncodingCache, Predictor

        with self._lock:
            if self._predictor is None:
                loaded = self.load()
                cache = EncodingCache(max_bytes=int(self.choice.cache_mb * 1e6), fp16=self.choice.fp16_cache)
                self._predictor = Predictor(loaded, cache, robust=self.choice.robust)
            return self._predictor

    def describe(self) -> str:
        if self._loaded is None:
            return "model not loaded"
        cfg = self._loaded.config
        return f"{cfg.name} on {self._loaded.device} ({'robust' if self.predictor.robust else 'SAM'} decoder path)"

    def cache_text(self) -> str:
        if self._predictor is None:
            return "empty"
        c = self._predictor.cache
        return (f"{len(c)} slice encodings, {c.bytes / 1e6:.0f} of {c.max_bytes / 1e6:.0f} MB; "
                f"{self._predictor.encoder_calls} encoded, {c.hits} reused")

    def clear_cache(self) -> None:
        with self._lock:
            if self._predictor is not None:
                self._predictor.cache.clear()
            self._images.clear()

    def close(self) -> None:
        with self._lock:
            if self._predictor is not None:
                self._predictor.close()
            self._predictor = None

    # images -----------------------------------------------------------------------------------------
    def images(self, volume_node, intensity: Union[str, Tuple[float, float]] = "auto") -> np.ndarray:
        """The volume mapped to uint8 ``(K, J, I)`` once (cached until the voxels or the mapping change)."""
        key, mapping = self._mapping_key(volume_node, intensity)
        with self._lock:
            cached = self._images.get(key)
            if cached is not None:
                return cached
        array = volumes.volume_array(volume_node)
        images = mapping(array)
        with self._lock:
            stale = [k for k in self._images if k[0] == key[0]]
            for k in stale:
                del self._images[k]
            self._images[key] = images
        return images

    def _mapping_key(self, volume_node, intensity):
        from RobustMedSAMLib.intensity import Window, intensity_mapping

        image = volume_node.GetImageData()
        base = (volume_node.GetID() or str(id(volume_node)), image.GetMTime() if image is not None else 0)
        if isinstance(intensity, str) and intensity == "display":
            display = volume_node.GetDisplayNode()
            if display is None:
                intensity = "auto"
            else:
                intensity = (float(display.GetWindowLevelMin() + display.GetWindowLevelMax()) / 2.0,
                             float(display.GetWindowLevelMax() - display.GetWindowLevelMin()))
        if isinstance(intensity, str) and "," in intensity:
            level, width = (float(v) for v in intensity.split(","))
            intensity = (level, width)
        if isinstance(intensity, tuple):
            level, width = intensity
            window = Window(level, max(float(width), 1e-6))
            return base + ("window", level, width), (lambda a: intensity_mapping(a, window=window).apply(a))
        if intensity in ("MR", "other"):
            return base + (intensity,), (lambda a: intensity_mapping(a, modality=intensity).apply(a))
        if intensity == "auto":
            return base + ("auto",), (lambda a: intensity_mapping(a).apply(a))
        return base + ("preset", intensity), (lambda a: intensity_mapping(a, window=intensity).apply(a))

    def segmenter(self, volume_node, axis: int, intensity="auto"):
        """An engine ``VolumeSegmenter`` over ``axis`` of the volume's uint8 images."""
        from RobustMedSAMLib.volume_segmentation import VolumeSegmenter

        return VolumeSegmenter(self.predictor, self.images(volume_node, intensity), int(axis))


_SHARED: Optional[EngineSession] = None


def shared_session(choice: Optional[ModelChoice] = None) -> EngineSession:
    """The process-wide session shared by the module and both effects (one model in memory, one encoding
    cache); ``choice`` reconfigures it (the model is reloaded only if model/checkpoint/device changed)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = EngineSession(choice)
    elif choice is not None:
        _SHARED.configure(choice)
    return _SHARED
