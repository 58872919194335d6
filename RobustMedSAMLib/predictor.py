"""Slice predictor: encode an image once, then answer prompts from the cached encoding.

The expensive part (image encoder and, for robust decoders, the decoder's image-only AMFG branches) is
computed once per image and kept in an :class:`EncodingCache` (LRU, bounded in bytes, optional float16
storage and an optional on-disk copy). Keys combine the image content, the model signature, the
preprocessing and a caller-supplied context (e.g. the slice axis), so a prompt on a seen slice costs only
the prompt encoder + mask decoder. Thread-safe: :meth:`Predictor.prefetch` encodes in a background thread
(the Slicer effect encodes the current slice while the user places prompts).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .models import LoadedModel
from .modeling.model import ImageEncoding
from .preprocess import Frame, model_frame, prepare_image
from .prompts import Prediction, Prompt

_FIELDS = ("embeddings", "early", "features")


def _nbytes(encoding: ImageEncoding) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(encoding, f) for f in _FIELDS) if t is not None)


class EncodingCache:
    """LRU cache ``key -> ImageEncoding`` holding at most ``max_bytes`` (tensor bytes as stored).

    ``fp16`` stores tensors as float16 (half the memory; masks change on < 0.1 % of pixels) and returns
    them as float32. ``disk_dir`` keeps a safetensors copy of every entry so a later session (or an entry
    evicted from memory) is loaded instead of re-encoded.
    """

    def __init__(self, max_bytes: int = 1 << 30, fp16: bool = False, disk_dir: Optional[Path] = None) -> None:
        self.max_bytes = int(max_bytes)
        self.fp16 = fp16
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._items: "OrderedDict[str, ImageEncoding]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items or (self.disk_dir is not None and self._disk_path(key).exists())

    def _disk_path(self, key: str) -> Path:
        return self.disk_dir / f"{key}.safetensors"

    def _store(self, encoding: ImageEncoding) -> ImageEncoding:
        dtype = torch.float16 if self.fp16 else torch.float32
        return ImageEncoding(*[None if t is None else t.detach().to(dtype) for t in
                               (getattr(encoding, f) for f in _FIELDS)])

    @staticmethod
    def _restore(encoding: ImageEncoding) -> ImageEncoding:
        return ImageEncoding(*[None if t is None else t.float() for t in (getattr(encoding, f) for f in _FIELDS)])

    def get(self, key: str, device=None) -> Optional[ImageEncoding]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return self._restore(item)
        if self.disk_dir is not None and self._disk_path(key).exists():
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(self._disk_path(key)), device=str(device or "cpu"))
            except Exception:  # a damaged cache file is just a miss
                self._disk_path(key).unlink(missing_ok=True)
            else:
                encoding = ImageEncoding(*[tensors.get(f) for f in _FIELDS])
                self._put_memory(key, self._store(encoding))
                self.disk_hits += 1
                return self._restore(encoding)
        self.misses += 1
        return None

    def put(self, key: str, encoding: ImageEncoding) -> None:
        stored = self._store(encoding)
        self._put_memory(key, stored)
        if self.disk_dir is not None:
            from safetensors.torch import save_file

            self.disk_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._disk_path(key).with_suffix(".tmp")
            save_file({f: getattr(stored, f).cpu().contiguous() for f in _FIELDS if getattr(stored, f) is not None},
                      str(tmp))
            tmp.replace(self._disk_path(key))

    def _put_memory(self, key: str, stored: ImageEncoding) -> None:
        size = _nbytes(stored)
        with self._lock:
            if key in self._items:
                self.bytes -= _nbytes(self._items.pop(key))
            if size > self.max_bytes:
                return
            self._items[key] = stored
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def image_key(image: np.ndarray, context: str = "") -> str:
    """Content hash of an image (values, shape, dtype) plus a context string."""
    h = hashlib.sha1()
    h.update(f"{image.shape}|{image.dtype}|{context}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def _structure(prompt: Prompt) -> Tuple[int, bool, bool]:
    return (0 if prompt.points is None else len(prompt.points), prompt.box is not None,
            prompt.logits is not None or prompt.mask is not None)


class Predictor:
    """Prompt-based 2D segmentation with a cached image encoding.

    Arguments:
        loaded: a :class:`~RobustMedSAMLib.models.LoadedModel`.
        cache: an :class:`EncodingCache` (a 1 GiB one is created if omitted); may be shared.
        robust: decoder path; default: the configuration's (robust for RobustSAM-decoder checkpoints).
    """

    def __init__(self, loaded: LoadedModel, cache: Optional[EncodingCache] = None,
                 robust: Optional[bool] = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.prep = loaded.config.preprocessing
        self.robust = loaded.config.robust if robust is None else robust
        if self.robust and not self.model.has_robust_decoder:
            raise ValueError("robust=True needs a checkpoint with the RobustSAM decoder")
        self.cache = cache if cache is not None else EncodingCache()
        self.encoder_calls = 0
        self._model_lock = threading.RLock()
        self._pending: Dict[str, Future] = {}
        self._pending_lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._image: Optional[np.ndarray] = None
        self._context = ""

    # -- encoding -------------------------------------------------------------------------------------
    def key(self, image: np.ndarray, context: str = "") -> str:
        # the precision is part of the key unless float32 (so float32 keys, and disk caches, stay as they were)
        precision = getattr(self.model, "precision", None) or "fp32"
        extra = "" if precision == "fp32" else f"precision={precision}|"
        return image_key(image, f"{self.loaded.signature}|robust={self.robust}|bn={self.model.batchnorm_mode}|"
                                f"{extra}{context}")

    def encode(self, image: np.ndarray, context: str = "") -> ImageEncoding:
        """The (cached) encoding of a uint8 ``(H, W[, 3])`` image; encodes on a miss."""
        key = self.key(image, context)
        encoding = self.cache.get(key, self.model.device)
        if encoding is not None:
            return encoding
        pending = self._pending.get(key)
        if pending is not None:
            return pending.result()
        return self._encode_and_store(image, key)

    def _encode_and_store(self, image: np.ndarray, key: str) -> ImageEncoding:
        return self._encode_many([image], [key], batch_size=1)[0]

    def _encode_many(self, images: Sequence[np.ndarray], keys: Sequence[str], batch_size: int) -> List[ImageEncoding]:
        """Encode images in batches (``acceleration.encode_batched``: autocast, pinned memory and
        out-of-memory recovery on CUDA; plain float32 on the CPU) and cache each encoding."""
        from .acceleration import encode_batched

        inputs = [prepare_image(image, self.prep)[0] for image in images]  # on the host
        with self._model_lock:
            self.encoder_calls += len(inputs)
            precision = getattr(self.model, "precision", None)
            encodings = encode_batched(self.model, inputs, batch_size, robust=self.robust)
            # a CUDA out-of-memory fallback to the CPU relabels an autocast model fp32: the keys (made with the old
            # precision) would then name encodings that were partly computed in another one, so none is cached
            keep = getattr(self.model, "precision", None) == precision
        for key, encoding in zip(keys, encodings):
            if self.robust:
                encoding.early = None  # the cached robust features replace it
            if keep:
                self.cache.put(key, encoding)
        return encodings

    def encode_many(self, images: Sequence[np.ndarray], context: str = "", batch_size: int = 4) -> int:
        """Encode the images that are not cached yet, ``batch_size`` at a time (GPU batch runs and
        propagation lookahead); returns how many were encoded."""
        todo = {}
        for image in images:
            key = self.key(image, context)
            if key not in self.cache and key not in todo:
                todo[key] = image
        if todo:
            self._encode_many(list(todo.values()), list(todo), batch_size)
        return len(todo)

    def prefetch(self, image: np.ndarray, context: str = "") -> Future:
        """Encode ``image`` in a background thread (no-op if cached); returns a Future."""
        key = self.key(image, context)
        if key in self.cache:
            done: Future = Future()
            done.set_result(None)
            return done
        with self._pending_lock:
            future = self._pending.get(key)
            if future is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustmedsam-encode")
                future = self._executor.submit(self._encode_and_store, np.array(image, copy=True), key)
                self._pending[key] = future
                future.add_done_callback(lambda _f, k=key: self._pending.pop(k, None))
        return future

    def set_image(self, image: np.ndarray, context: str = "") -> "Predictor":
        """Make ``image`` the current image for :meth:`predict` (encodes it unless cached)."""
        self.encode(image, context)
        self._image, self._context = image, context
        return self

    # -- prompting ------------------------------------------------------------------------------------
    def predict(self, prompt: Prompt, multimask: bool = False, image: Optional[np.ndarray] = None,
                context: Optional[str] = None) -> Prediction:
        """Segment one object. ``image`` defaults to the one given to :meth:`set_image`."""
        return self.predict_batch([prompt], multimask, image, context)[0]

    def predict_batch(self, prompts: Sequence[Prompt], multimask: bool = False,
                      image: Optional[np.ndarray] = None, context: Optional[str] = None) -> List[Prediction]:
        """Segment several objects on one image; prompts of the same structure share one decoder call
        (the result equals one call per prompt)."""
        if image is None:
            if self._image is None:
                raise RuntimeError("no image: call set_image() first or pass image=")
            image, context = self._image, self._context if context is None else context
        frame = model_frame(image.shape[:2], self.prep)
        for prompt in prompts:
            prompt.validate(image.shape[:2])
        encoding = self.encode(image, context or "")
        groups: Dict[Tuple, List[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(_structure(prompt), []).append(i)
        results: List[Optional[Prediction]] = [None] * len(prompts)
        for indices in groups.values():
            for i, pred in zip(indices, self._decode([prompts[i] for i in indices], encoding, frame, multimask)):
                results[i] = pred
        return results  # type: ignore[return-value]

    def _decode(self, prompts: Sequence[Prompt], encoding: ImageEncoding, frame: Frame,
                multimask: bool) -> List[Prediction]:
        dev = self.model.device
        first = prompts[0]
        points = boxes = masks = None
        if first.points is not None:
            coords = np.stack([frame.points_to_model(p.points) for p in prompts])
            labels = np.stack([p.labels for p in prompts])
            points = (torch.as_tensor(coords, dtype=torch.float32, device=dev),
                      torch.as_tensor(labels, dtype=torch.int64, device=dev))
        if first.box is not None:
            boxes = torch.as_tensor(np.stack([frame.boxes_to_model(p.box) for p in prompts]),
                                    dtype=torch.float32, device=dev)
        if first.logits is not None or first.mask is not None:
            masks = torch.cat([torch.as_tensor(p.logits, dtype=torch.float32).reshape(1, 1, *p.logits.shape[-2:])
                               if p.logits is not None else frame.mask_to_logits(p.mask) for p in prompts]).to(dev)
        with self._model_lock, torch.inference_mode():
            out = self.model.decode(encoding, points=points, boxes=boxes, mask_logits=masks,
                                    multimask_output=multimask, robust=self.robust)
            logits = frame.logits_to_image(out.masks)
        logits_np = logits.float().cpu().numpy()
        low = out.masks.float().cpu().numpy()
        iou = out.iou.float().cpu().numpy()
        return [Prediction(logits_np[b] > 0.0, logits_np[b], iou[b], low[b]) for b in range(len(prompts))]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
