"""The engine's request handlers: what the worker process does for each request of the Slicer side.

:class:`EngineService` owns one loaded model, its :class:`~RobustMedSAMLib.predictor.Predictor` (encoding
cache) and the volumes sent to it; :meth:`EngineService.handle` runs one request. Requests and results are
plain values and the dataclasses of :mod:`.protocol`; every handler calls the engine's own functions
(``load_model``, ``Predictor``, ``VolumeSegmenter``, ``propagate``, ``repropagate``, ``segment_volume``,
``robustness_check``), so the worker adds no second implementation of anything.

Requests (``kind``: fields -> result):

* ``hello``: -> ``{pid, python, torch}``; ``devices``: -> list of device names ("auto", "cpu", "cuda"...).
* ``load``: ``model, checkpoint, device, robust, cache_mb, fp16_cache, allow_download, seed, precision`` ->
  ``{description, device, robust, model, precision, precision_reason}``. Downloads (progress in bytes,
  cancellable) and loads unless the same is loaded.
* ``set_volume``: ``key, ijk_to_lps`` and ``path`` (a ``.npy`` file, memory-mapped) or ``array`` ``(K, J, I)``;
  ``drop_volume``: ``key``. Volumes are referenced by ``key`` afterwards; ``mapping`` fields say how their
  intensities become uint8 (:func:`mapping_spec`), computed once per volume and mapping.
* ``prefetch``: ``volume, mapping, axis, index, neighbours`` -> ``{encoded}`` (encode ahead, nothing returned).
* ``predict``: ``volume, mapping, axis, index, prompt, multimask`` -> ``Prediction`` (all candidate masks;
  ``logits`` dropped unless ``logits=True``).
* ``propagate``: ``volume, mapping, axis, seeds {index: (H, W) mask}, options`` -> ``PropagationResult``.
* ``repropagate``: ``volume, mapping, axis, previous, changes [(index, mask)], options`` -> ``PropagationResult``.
* ``segment_volume``: ``volume, mapping, axis, objects, options`` -> ``VolumeResult``.
* ``robustness``: ``volume, mapping, axis, objects, reference {name: mask}, corruptions, severity, seed,
  options`` -> list of ``RobustnessRow``.
* ``status``: -> ``{loaded, description, cache, encoder_calls, rss_bytes}``; ``clear_cache``: -> None.

Axes are array axes of ``(K, J, I)`` volumes (0 = k, 1 = j, 2 = i); slice pixels follow docs/coordinates.md.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

Progress = Callable[[float, Optional[float], str], None]


class RequestError(ValueError):
    """A request that cannot be served as sent (unknown volume, model not loaded, bad field)."""


class JobContext:
    """What a handler may use while it runs: ``progress(done, total, message)`` and ``cancelled()``."""

    def __init__(self, progress: Optional[Progress] = None, cancelled: Optional[Callable[[], bool]] = None) -> None:
        self._progress = progress
        self._cancelled = cancelled

    def progress(self, done: float, total: Optional[float] = None, message: str = "") -> None:
        if self._progress is not None:
            self._progress(done, total, message)

    def cancelled(self) -> bool:
        return bool(self._cancelled is not None and self._cancelled())


def mapping_spec(spec: Any):
    """A request's ``mapping`` -> keyword arguments of :func:`~RobustMedSAMLib.intensity.intensity_mapping`.

    ``"auto"`` (modality guessed: CT window or percentiles), a window preset (``"lung"``...), a modality
    (``"CT"``, ``"MR"``, ``"other"``), ``[level, width]`` or ``"LEVEL,WIDTH"``.
    """
    from RobustMedSAMLib.intensity import MODALITIES, Window

    if spec is None or spec == "auto":
        return {}
    if isinstance(spec, str) and "," in spec:
        spec = [float(v) for v in spec.split(",")]
    if isinstance(spec, (list, tuple)):
        level, width = (float(v) for v in spec)
        return {"window": Window(level, max(width, 1e-6))}
    if isinstance(spec, str) and spec in MODALITIES:
        return {"modality": spec}
    if isinstance(spec, str):
        return {"window": spec}
    raise RequestError(f"unknown intensity mapping {spec!r}")


@dataclass
class _VolumeState:
    volume: Any                                   # RobustMedSAMLib.volume_io.Volume
    images: Dict[str, np.ndarray] = field(default_factory=dict)


class EngineService:
    """One model and its encoding cache, the volumes sent so far, and a handler per request kind.

    ``loaded``: inject an already loaded model (tests); otherwise the ``load`` request loads one.
    """

    def __init__(self, loaded=None) -> None:
        self.loaded = loaded
        self.load_key: Optional[tuple] = ("injected",) if loaded is not None else None
        self.robust: Optional[bool] = None
        self.predictor = None
        self.volumes: Dict[str, _VolumeState] = {}
        self._cache_settings = (1024.0, False)
        self.load_error: Optional[str] = None

    def handle(self, kind: str, fields: Dict[str, Any], ctx: Optional[JobContext] = None) -> Any:
        handler = getattr(self, f"do_{kind}", None)
        if handler is None or kind.startswith("_"):
            raise RequestError(f"unknown request {kind!r}")
        return handler(ctx or JobContext(), **fields)

    def close(self) -> None:
        if self.predictor is not None:
            self.predictor.close()
        self.predictor = None

    # -- process and model ---------------------------------------------------------------------------
    def do_hello(self, ctx) -> dict:
        import torch

        return {"pid": os.getpid(), "python": sys.version.split()[0], "torch": torch.__version__}

    def do_devices(self, ctx) -> list:
        import torch

        out = ["auto", "cpu"]
        if torch.cuda.is_available():
            out += ["cuda"] + [f"cuda:{n}" for n in range(1, torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            out.append("mps")
        return out

    def do_load(self, ctx, model: str = "robustmedsam", checkpoint: str = "", device: str = "auto",
                robust: Optional[bool] = None, cache_mb: float = 1024.0, fp16_cache: bool = False,
                allow_download: bool = True, seed: int = 0, precision: Optional[str] = "auto") -> dict:
        key = (model, checkpoint, device, seed, precision)
        if self.loaded is None or (self.load_key != key and self.load_key != ("injected",)):
            self.close()
            self.loaded, self.load_key = None, None
            try:
                self._load(ctx, model, checkpoint, device, allow_download, seed, precision)
            except Exception as e:
                self.load_error = str(e) or type(e).__name__
                raise
            self.load_key, self.load_error = key, None
        if self.robust != robust or self.predictor is None or self._cache_settings != (cache_mb, fp16_cache):
            self._new_predictor(robust, cache_mb, fp16_cache)
        return self._describe()

    def _load(self, ctx, model, checkpoint, device, allow_download, seed, precision) -> None:
        from RobustMedSAMLib.models import get_config, load_model, seeded_model
        from RobustMedSAMLib.weights import ensure_weights

        if model == "custom checkpoint" or (checkpoint and not model):
            if not checkpoint:
                raise RequestError("choose a checkpoint file (.pth or .safetensors) for 'custom checkpoint'")
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
            self.loaded = load_model(None, checkpoint, device=device, precision=precision)
        elif checkpoint:
            self.loaded = load_model(model, checkpoint, device=device, precision=precision)
        elif get_config(model).weights is None and get_config(model).family == "sam":
            # test configurations (tiny): seeded weights
            self.loaded = seeded_model(model, seed=int(seed), device=device, precision=precision)
        elif get_config(model).weights is None:
            self.loaded = load_model(model, device=device, precision=precision)  # weights from a package
        else:
            def progress(done, total=None):
                ctx.progress(done, total, "downloading the model weights")

            ensure_weights(get_config(model).weights, allow_download=allow_download, progress=progress,
                           cancel=ctx.cancelled)
            ctx.progress(0, None, "loading the model")
            self.loaded = load_model(model, device=device, allow_download=False, precision=precision)

    def _new_predictor(self, robust, cache_mb, fp16_cache) -> None:
        from RobustMedSAMLib.predictor import EncodingCache, Predictor

        old = self.predictor
        if old is not None and self.robust == robust and old.cache.fp16 == fp16_cache:
            old.cache.max_bytes = int(float(cache_mb) * 1e6)  # same path: keep the cached encodings
        else:
            self.close()
            cache = EncodingCache(max_bytes=int(float(cache_mb) * 1e6), fp16=bool(fp16_cache))
            self.predictor = Predictor(self.loaded, cache, robust=robust)
        self.robust = robust
        self._cache_settings = (cache_mb, fp16_cache)

    def _describe(self) -> dict:
        p = self._require_predictor()
        cfg = self.loaded.config
        precision = getattr(self.loaded, "precision", "fp32")
        reason = getattr(self.loaded, "precision_reason", "")
        return {"model": cfg.name, "device": str(self.loaded.device), "robust": bool(p.robust),
                "precision": precision, "precision_reason": reason,
                "description": f"{cfg.name} on {self.loaded.device}, {precision} "
                               f"({'robust' if p.robust else 'SAM'} decoder path)"}

    def _require_predictor(self):
        if self.loaded is None:
            why = f" (loading it failed: {self.load_error})" if self.load_error else ""
            raise RequestError(f"no model is loaded{why}; load one first")
        if self.predictor is None:
            self._new_predictor(None, *self._cache_settings)
        return self.predictor

    def do_status(self, ctx) -> dict:
        p = self.predictor
        out = {"loaded": self.loaded is not None, "description": self._describe()["description"] if self.loaded
               else "model not loaded", "encoder_calls": 0 if p is None else p.encoder_calls,
               "rss_bytes": _rss_bytes(), "volumes": sorted(self.volumes)}
        if p is None:
            out["cache"] = "empty"
        else:
            c = p.cache
            out["cache"] = (f"{len(c)} slice encodings, {c.bytes / 1e6:.0f} of {c.max_bytes / 1e6:.0f} MB; "
                            f"{p.encoder_calls} encoded, {c.hits} reused")
        return out

    def do_clear_cache(self, ctx) -> None:
        if self.predictor is not None:
            self.predictor.cache.clear()
        for state in self.volumes.values():
            state.images.clear()

    # -- volumes -------------------------------------------------------------------------------------
    def do_set_volume(self, ctx, key: str, ijk_to_lps, path: Optional[str] = None, array=None) -> dict:
        from RobustMedSAMLib.volume_io import Volume

        if array is None:
            if not path:
                raise RequestError("set_volume needs a path or an array")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        array = np.asarray(array)
        if array.ndim != 3:
            raise RequestError(f"a volume must be (K, J, I), got shape {array.shape}")
        self.volumes[key] = _VolumeState(Volume(array, np.asarray(ijk_to_lps, dtype=np.float64)))
        return {"shape": list(array.shape)}

    def do_drop_volume(self, ctx, key: str) -> None:
        self.volumes.pop(key, None)

    def _volume(self, key: str):
        state = self.volumes.get(key)
        if state is None:
            raise RequestError(f"volume {key!r} was not sent to this engine process (set_volume first)")
        return state

    def images(self, key: str, mapping: Any = "auto") -> np.ndarray:
        """The volume's uint8 ``(K, J, I)`` images under ``mapping`` (computed once, then kept)."""
        from RobustMedSAMLib.volume_segmentation import uint8_volume

        state = self._volume(key)
        name = repr(mapping)
        if name not in state.images:
            state.images[name] = uint8_volume(state.volume, **mapping_spec(mapping))
        return state.images[name]

    def segmenter(self, volume: str, mapping: Any, axis: int):
        from RobustMedSAMLib.volume_segmentation import VolumeSegmenter

        return VolumeSegmenter(self._require_predictor(), self.images(volume, mapping), int(axis))

    # -- slices --------------------------------------------------------------------------------------
    def do_prefetch(self, ctx, volume: str, axis: int, index: int, mapping: Any = "auto",
                    neighbours: Optional[int] = 0) -> dict:
        segmenter = self.segmenter(volume, mapping, axis)
        before = self.predictor.encoder_calls
        order = [int(index)] + [z for d in range(1, int(neighbours or 0) + 1) for z in (index + d, index - d)]
        for z in order:
            if ctx.cancelled():
                break
            if 0 <= z < segmenter.num_slices:
                self.predictor.encode(segmenter.model_image(z), segmenter.context)
        return {"encoded": self.predictor.encoder_calls - before}

    def do_predict(self, ctx, volume: str, axis: int, index: int, prompt, mapping: Any = "auto",
                   multimask: bool = False, logits: bool = False):
        from RobustMedSAMLib.prompts import Prediction

        segmenter = self.segmenter(volume, mapping, axis)
        if not 0 <= int(index) < segmenter.num_slices:
            raise RequestError(f"slice {index} is outside the volume (0..{segmenter.num_slices - 1} along this axis)")
        pred = segmenter.predict_candidates(int(index), prompt, bool(multimask))
        if not logits:
            pred = Prediction(pred.masks, np.zeros((len(pred.iou), 0, 0), np.float32), pred.iou, pred.low_res_logits)
        return pred

    # -- volumes of slices ---------------------------------------------------------------------------
    @staticmethod
    def _slice_progress(ctx):
        return lambda done, total, index: ctx.progress(done, total, f"slice {index}")

    def do_propagate(self, ctx, volume: str, axis: int, seeds, mapping: Any = "auto", options=None):
        from RobustMedSAMLib.propagation import propagate

        segmenter = self.segmenter(volume, mapping, axis)
        return propagate(segmenter, {int(k): np.asarray(v, bool) for k, v in seeds.items()},
                         progress=self._slice_progress(ctx), cancel=ctx.cancelled, **dict(options or {}))

    def do_repropagate(self, ctx, volume: str, axis: int, previous, changes: Sequence, mapping: Any = "auto",
                       options=None):
        from RobustMedSAMLib.propagation import repropagate

        segmenter = self.segmenter(volume, mapping, axis)
        kwargs = dict(options or {})
        if kwargs.get("slice_range") is None:
            kwargs["slice_range"] = (0, segmenter.num_slices - 1)
        result = previous
        for index, mask in changes:
            result = repropagate(segmenter, result, int(index), np.asarray(mask, bool),
                                 progress=self._slice_progress(ctx), cancel=ctx.cancelled, **kwargs)
        return result

    def do_segment_volume(self, ctx, volume: str, axis: int, objects, mapping: Any = "auto", options=None):
        from RobustMedSAMLib.volume_segmentation import segment_volume

        state = self._volume(volume)
        images = self.images(volume, mapping)
        return segment_volume(state.volume, list(objects), self._require_predictor(), axis=int(axis), images=images,
                              progress=ctx.progress, cancel=ctx.cancelled, **dict(options or {}))

    def do_robustness(self, ctx, volume: str, axis: int, objects, mapping: Any = "auto", reference=None,
                      corruptions=None, severity: int = 3, seed: int = 0, options=None):
        from RobustMedSAMLib.robustness import robustness_check

        state = self._volume(volume)
        images = self.images(volume, mapping)
        return robustness_check(state.volume, list(objects), self._require_predictor(), corruption_names=corruptions,
                                severity=int(severity), seed=int(seed), axis=int(axis), images=images,
                                reference=reference, progress=ctx.progress, cancel=ctx.cancelled,
                                **dict(options or {}))


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0
