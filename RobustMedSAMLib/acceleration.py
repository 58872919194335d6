"""GPU helpers: mixed-precision autocast, batched encoding with out-of-memory recovery, lookahead planning.

Nothing here changes results on the CPU: :func:`autocast` is a no-op there, and the CPU encoder has its own
fast path (``modeling/image_encoder.py``, float32 or bf16: ``precision.py``). These helpers are small on
purpose; their logic is tested on the CPU (``Testing/test_acceleration.py``, with an injected fake
out-of-memory error) and on a GPU by ``Testing/test_cuda.py`` (``scripts/gpu_check.sh``; not run yet).

Intended call sites (wired by the predictor / propagation owners):

* ``Predictor._encode_and_store``: ``with autocast(self.model.device): encoding = self.model.encode(x)``
  (in the model's ``precision``: bf16 where the GPU computes it natively, else fp16, or none for ``fp32``; outputs
  are cast back to float32 by :func:`encode_batched` and by the cache's ``_store``).
* Volume runs on a GPU (``VolumeSegmenter.predict_slice`` before predicting slice ``z`` in direction
  ``step``): ``todo = planner.plan(z, step, is_cached)`` with a :class:`LookaheadPlanner`; when ``todo`` is
  not empty, prepare those slices, ``encode_batched(model, inputs, planner.batch_size)`` and put each
  encoding in the cache under its slice key. On the CPU the planner returns at most the current slice
  (batching does not pay there, REFERENCE.md section 0: a batch of 4 costs 12.5 s per slice and 11 GB).
* A batch that does not fit halves itself; a single image that still does not fit on the GPU is encoded on
  the CPU (the model is moved there, with a logged warning) in float32, its precision relabelled "fp32" so
  that the encoding cache keys say what was computed -- see :func:`encode_batched`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device]


def cuda_native_bf16(device: DeviceLike) -> bool:
    """Whether the GPU ``device`` computes bfloat16 natively: compute capability 8.0 or later (Ampere on; ROCm
    builds: yes). Not ``torch.cuda.is_bf16_supported()``: by default it also says True where bf16 is only
    emulated (Volta, Turing: no bf16 tensor cores, far slower than their fp16), and it asks about the current
    device rather than ``device``."""
    if getattr(torch.version, "hip", None):
        return True
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def autocast_dtype(device: DeviceLike) -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: bfloat16 on CUDA GPUs that compute it natively
    (:func:`cuda_native_bf16`), else float16; None on CPU (the CPU's bf16 path is ``precision.py``'s)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if cuda_native_bf16(dev) else torch.float16


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: DeviceLike, enabled: bool = True, dtype: Optional[torch.dtype] = None) -> ContextManager:
    """``torch.autocast`` for CUDA in ``dtype`` (default :func:`autocast_dtype`); a do-nothing context
    elsewhere (the CPU's bf16 path is written out, ``modeling/bf16.py``, not autocast)."""
    default = autocast_dtype(device) if enabled else None
    if default is None or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype or default)


def model_autocast(model) -> Tuple[bool, Optional[torch.dtype]]:
    """(use autocast, dtype) for encoding with ``model`` on CUDA, from its ``precision``
    (``precision.set_precision``): "fp32" -> none, "bf16"/"fp16" -> that dtype, unset -> the default."""
    precision = getattr(model, "precision", None)
    if precision is None:
        return True, None
    return precision in _DTYPES, _DTYPES.get(precision)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (or other accelerator) out-of-memory errors."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy, through pinned memory (asynchronous) for CUDA. Unchanged if already there, or
    for "cuda" without CUDA (only stand-in models in tests claim such a device)."""
    if batch.device == device:
        return batch
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return batch
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


@dataclass
class BatchLog:
    """What :func:`encode_batched` did: ``batch_sizes`` actually run, out-of-memory ``retries``, whether it
    fell back to the CPU, and the device of the returned encodings."""

    batch_sizes: List[int] = field(default_factory=list)
    retries: int = 0
    cpu_fallback: bool = False
    device: Optional[torch.device] = None


def _default_encode(model, batch: torch.Tensor, robust: Optional[bool]):
    return model.encode(batch, robust=robust)


def _split(encoding, n: int, device: Optional[torch.device] = None) -> list:
    from .modeling.model import ImageEncoding

    def part(t, i):
        if t is None:
            return None
        t = t[i:i + 1].float()
        return t.to(device) if device is not None else t

    return [ImageEncoding(part(encoding.embeddings, i), part(encoding.early, i), part(encoding.features, i))
            for i in range(n)]


def _precision_after_cpu_fallback(model) -> None:
    """A model that autocast on the GPU (``precision`` "bf16" / "fp16") computes float32 once moved to the CPU
    (autocast is CUDA-only here, and the CPU bf16 path is chosen by ``precision.choose_precision``, not by a
    fallback): relabel it "fp32" so that what it computes and the cache keys that name its precision agree."""
    precision = getattr(model, "precision", None)
    if precision not in _DTYPES:
        return
    from .precision import set_precision

    set_precision(model, "fp32")
    log.warning("the GPU's %s autocast does not apply on the CPU: encoding in float32 there (precision fp32)",
                precision)


def encode_batched(model, images: Sequence[torch.Tensor], batch_size: int = 4, *, robust: Optional[bool] = None,
                   use_autocast: bool = True, cpu_fallback: bool = True,
                   encode_fn: Optional[Callable] = None, report: Optional[BatchLog] = None) -> list:
    """Encode prepared images (each ``(3, S, S)`` or ``(1, 3, S, S)``, on the host) in batches.

    On CUDA each batch goes through pinned host memory and runs under :func:`autocast` in the model's precision
    (:func:`model_autocast`; ``use_autocast=False`` turns it off). If a batch runs out
    of memory it is halved and retried (same precision); if one image alone does not fit, the model is moved to
    the CPU (``cpu_fallback``, logged) and the remaining images are encoded there, in float32: a model in "bf16"
    or "fp16" (GPU autocast) is relabelled "fp32" (logged; :func:`_precision_after_cpu_fallback`). Returns one float32
    :class:`~RobustMedSAMLib.modeling.model.ImageEncoding` (batch 1) per image, in order, all on the
    model's final device. ``encode_fn(model, batch, robust)`` replaces ``model.encode`` (tests).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encode = encode_fn or _default_encode
    report = report if report is not None else BatchLog()
    inputs = [img if img.dim() == 4 else img[None] for img in images]
    results: list = []
    size = int(batch_size)
    wanted, dtype = model_autocast(model)
    use_autocast = use_autocast and wanted
    i = 0
    while i < len(inputs):
        device = torch.device(model.device)
        chunk = inputs[i:i + size]
        try:
            batch = _to_device(torch.cat([c.cpu() for c in chunk]) if device.type == "cuda" else torch.cat(chunk),
                               device)
            with torch.inference_mode(), autocast(device, enabled=use_autocast, dtype=dtype):
                encoding = encode(model, batch, robust)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc):
                raise
            del exc
            _free_cached_memory()
            report.retries += 1
            if size > 1:
                size = max(1, size // 2)
                log.warning("out of memory on %s: retrying with batches of %d", device, size)
                continue
            if not cpu_fallback or device.type == "cpu":
                raise
            log.warning("out of memory on %s with a single image: encoding on the CPU from now on", device)
            model.to("cpu")
            _precision_after_cpu_fallback(model)
            report.cpu_fallback = True
            continue
        report.batch_sizes.append(len(chunk))
        results.extend(_split(encoding, len(chunk)))
        i += len(chunk)
    final = torch.device(model.device)
    report.device = final
    for enc in results:  # earlier batches may have been computed on the GPU before a CPU fallback
        for name in ("embeddings", "early", "features"):
            t = getattr(enc, name)
            if t is not None and t.device != final:
                setattr(enc, name, t.to(final))
    return results


def prefetch_neighbours(device: DeviceLike) -> int:
    """Slices on each side of the viewed one to encode in the background while the user places prompts:
    1 on CUDA (an encoding takes a fraction of a second), 0 elsewhere. On the CPU an encoding takes seconds
    and cannot be interrupted, so a neighbour in flight would hold up the next click on the viewed slice."""
    return 1 if torch.device(device).type == "cuda" else 0


@dataclass
class LookaheadPlanner:
    """Which slices to encode together when propagation reaches a slice that is not cached yet.

    ``plan(index, step, is_cached)`` returns up to ``batch_size`` slice indices, starting at ``index`` and
    going in the propagation direction ``step`` (+1 / -1) within ``[first, last]``, skipping cached ones;
    empty if ``index`` itself is cached (nothing to wait for). Slices encoded ahead may be wasted if the
    direction stops (IoU below the threshold), so use batches only on a GPU (:meth:`for_device`).
    """

    num_slices: int
    batch_size: int = 4
    first: int = 0
    last: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_slices < 1 or self.batch_size < 1:
            raise ValueError("num_slices and batch_size must be >= 1")
        if self.last is None:
            self.last = self.num_slices - 1
        if not 0 <= self.first <= self.last <= self.num_slices - 1:
            raise ValueError(f"bad slice range {self.first}..{self.last} for {self.num_slices} slices")

    @classmethod
    def for_device(cls, device: DeviceLike, num_slices: int, batch_size: int = 4, **kwargs) -> "LookaheadPlanner":
        """A planner with ``batch_size`` on CUDA and 1 (no lookahead) elsewhere."""
        return cls(num_slices, batch_size if torch.device(device).type == "cuda" else 1, **kwargs)

    def plan(self, index: int, step: int, is_cached: Callable[[int], bool]) -> List[int]:
        if step not in (1, -1):
            raise ValueError(f"step must be +1 or -1, got {step}")
        if not self.first <= index <= self.last:
            raise ValueError(f"slice {index} is outside {self.first}..{self.last}")
        if is_cached(index):
            return []
        todo: List[int] = []
        z = index
        while self.first <= z <= self.last and len(todo) < self.batch_size:
            if not is_cached(z):
                todo.append(z)
            z += step
        return todo
