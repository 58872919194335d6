"""Volumetric segmentation: a volume + per-object prompts -> one mask per object (and a label volume).

The one 3D pipeline used by the CLI (``segment-volume``), the Slicer module's Logic and its batch script,
and evaluation:

1. intensities -> uint8 once for the whole volume (:mod:`RobustMedSAMLib.intensity`: CT window or
   percentiles), so every slice sees the same mapping;
2. each prompted slice of each object -> a seed mask (:class:`~RobustMedSAMLib.predictor.Predictor`;
   an ambiguous single-point prompt uses multimask output and keeps the mask with the best predicted IoU);
3. seeds -> propagation along one voxel axis (:mod:`RobustMedSAMLib.propagation`; stop rules in
   :mod:`RobustMedSAMLib.stop_rules`).

Slices are encoded only when propagation reaches them, once (the predictor's cache is shared by all
objects). Arrays are ``(K, J, I)``; see docs/coordinates.md for the slice axes. On request
(``square_pixels=True``) slices whose pixels are not square (a coronal or sagittal slice of a thick-slice CT)
are resampled in-plane to square pixels before they reach the model; prompts go along and results come back
on the voxel grid.
An object of a prompt file may name its own CT window (``ObjectPrompts.window``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .intensity import WindowLike, get_window
from .acceleration import LookaheadPlanner, prefetch_neighbours
from .predictor import Predictor
from .prompt_files import ObjectPrompts
from .prompts import Prediction, Prompt
from .propagation import PropagationResult, propagate
from .volume_io import AxisLike, Volume
from .segmentation_io import DEFAULT_COLORS
from .volume_results import ObjectResult, SeedError, VolumeResult, uint8_volume  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: ``progress(done, total, message)``: slices predicted so far and an estimate of the total.
Progress = Callable[[int, int, str], None]


class VolumeSegmenter:
    """A :class:`~RobustMedSAMLib.propagation.SliceSegmenter` over one voxel axis of a uint8 volume.

    Arguments:
        predictor: the cached predictor (shared across objects and runs).
        images: ``(K, J, I)`` uint8 volume (already intensity-mapped).
        axis: 0/1/2 = k/j/i (docs/coordinates.md); slices ``images.take(index, axis)``.
        lookahead: slices encoded together when propagation reaches an unencoded slice (the next ones in the
            same direction); default 4 on CUDA, 1 (no lookahead: encode only what is reached) elsewhere.
        voxel_spacing: ``(sk, sj, si)`` in mm, the spacing of ``images``' axes in array order (the reverse of
            ``Volume.spacing``). When the slice's two spacings differ by more than 1 %, each slice is
            resampled (linear) to square pixels of the finer spacing before it reaches the model; prompts
            and masks are converted both ways, so every input and output stays on the voxel grid.
    """

    def __init__(self, predictor: Predictor, images: np.ndarray, axis: int, lookahead: Optional[int] = None,
                 voxel_spacing: Optional[Sequence[float]] = None) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected a (K, J, I) uint8 volume, got {images.shape} {images.dtype}")
        self.predictor = predictor
        self.images = images
        self.axis = int(axis)
        self.num_slices = images.shape[self.axis]
        self.slice_shape: Tuple[int, int] = tuple(s for a, s in enumerate(images.shape) if a != self.axis)
        self.device = getattr(getattr(predictor, "model", None), "device", "cpu")
        if lookahead is None:
            self.planner = LookaheadPlanner.for_device(self.device, self.num_slices)
        else:
            self.planner = LookaheadPlanner(self.num_slices, max(1, int(lookahead)))
        self._last_index: Optional[int] = None
        self.model_shape = self.slice_shape
        if voxel_spacing is not None:
            sp = [float(v) for v in voxel_spacing]
            if len(sp) != 3 or min(sp) <= 0:
                raise ValueError(f"voxel_spacing must be 3 positive numbers (sk, sj, si), got {voxel_spacing!r}")
            rows, cols = (sp[a] for a in range(3) if a != self.axis)
            if max(rows, cols) / min(rows, cols) > 1.01:
                fine = min(rows, cols)
                self.model_shape = (max(1, int(round(self.slice_shape[0] * rows / fine))),
                                    max(1, int(round(self.slice_shape[1] * cols / fine))))
        config = getattr(getattr(predictor, "loaded", None), "config", None)
        self.default_projection: Optional[str] = None
        if config is not None:
            from .models import default_projection

            self.default_projection = default_projection(config)

    @property
    def resampled(self) -> bool:
        """True when slices are resampled to square pixels (``model_shape != slice_shape``)."""
        return self.model_shape != self.slice_shape

    def image(self, index: int) -> np.ndarray:
        """Slice ``index`` as an ``(H, W)`` uint8 image (rows/columns per docs/coordinates.md)."""
        return np.ascontiguousarray(np.take(self.images, index, axis=self.axis))

    def model_image(self, index: int) -> np.ndarray:
        """Slice ``index`` as the model sees it: :meth:`image`, resampled to square pixels if needed."""
        image = self.image(index)
        if not self.resampled:
            return image
        x = torch.from_numpy(image.astype(np.float32))[None, None]
        x = F.interpolate(x, self.model_shape, mode="bilinear", align_corners=False)
        return np.clip(np.rint(x[0, 0].numpy()), 0, 255).astype(np.uint8)

    def _resize(self, array: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return F.interpolate(x[None] if x.ndim == 3 else x[None, None], shape, mode="bilinear",
                             align_corners=False).numpy()[0 if x.ndim == 3 else (0, 0)]

    def _prompt_to_model(self, prompt: Prompt) -> Prompt:
        """A prompt on the voxel-grid slice -> the same prompt on the square-pixel image."""
        sy, sx = (m / s for m, s in zip(self.model_shape, self.slice_shape))
        points = None if prompt.points is None else (prompt.points + 0.5) * [sx, sy] - 0.5
        box = None if prompt.box is None else prompt.box * [sx, sy, sx, sy]
        mask = None if prompt.mask is None else self._resize(prompt.mask, self.model_shape) >= 0.5
        return Prompt(points=points, labels=prompt.labels, box=box, mask=mask, logits=prompt.logits)

    def _prediction_to_grid(self, pred: Prediction) -> Prediction:
        logits = self._resize(pred.logits, self.slice_shape).astype(np.float32)
        return Prediction(logits > 0.0, logits, pred.iou, pred.low_res_logits)

    @property
    def context(self) -> str:
        return f"axis={self.axis}" + (f"|square={self.model_shape}" if self.resampled else "")

    # -- what the consistency stop rule measures (stop_rules.py) -----------------------------------------
    def slice_values(self, index: int, mask: np.ndarray) -> np.ndarray:
        """Grey levels (uint8) of slice ``index`` inside ``mask`` (``(H, W)`` bool on the voxel grid)."""
        return self.image(index)[np.asarray(mask, bool)]

    def slice_descriptor(self, index: int, mask: np.ndarray) -> Optional[np.ndarray]:
        """Mean image-encoder embedding inside ``mask`` on slice ``index``: ``(C,)`` unit vector (None if the
        predictor has no encodings).

        The mask goes to the model input frame (``preprocess.Frame``: resized content, zero padding) and is
        averaged over each embedding cell (area weights), so cells half inside count half."""
        from .preprocess import model_frame

        if not hasattr(self.predictor, "encode") or not hasattr(self.predictor, "prep"):
            return None  # a stand-in predictor without encodings: the appearance test is skipped
        image = self.model_image(index)
        if self.resampled:
            mask = self._resize(mask, self.model_shape) >= 0.5
        emb = self.predictor.encode(image, self.context).embeddings[0].float()  # (C, E, E)
        frame = model_frame(image.shape[:2], self.predictor.prep)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        m = F.interpolate(m, frame.resized_size, mode="bilinear", align_corners=False)
        s = frame.image_size
        m = F.pad(m, (0, s - frame.resized_size[1], 0, s - frame.resized_size[0]))
        m = F.adaptive_avg_pool2d(m, emb.shape[-2:])[0, 0].to(emb.device)
        total = float(m.sum())
        if total <= 0:
            return np.zeros(emb.shape[0], dtype=np.float64)
        v = (emb * m).sum(dim=(1, 2)) / total
        return (v / v.norm().clamp(min=1e-12)).cpu().double().numpy()

    def predict_slice(self, index: int, prompt: Prompt, multimask: bool = False) -> Prediction:
        """One mask on slice ``index`` (with ``multimask``, the candidate of highest predicted IoU)."""
        pred = self.predict_candidates(index, prompt, multimask)
        return pred.select(pred.best) if multimask else pred

    def predict_candidates(self, index: int, prompt: Prompt, multimask: bool = False) -> Prediction:
        """The model's answer on slice ``index`` with every candidate mask (3 with ``multimask``), on the
        voxel grid (the Slicer prompt effect lets the user choose among them)."""
        step = index - self._last_index if self._last_index is not None else 1
        self._last_index = index
        if self.planner.batch_size > 1 and abs(step) == 1:
            cached = lambda z: self.predictor.key(self.model_image(z), self.context) in self.predictor.cache  # noqa: E731
            todo = self.planner.plan(index, step, cached)
            if len(todo) > 1:
                self.predictor.encode_many([self.model_image(z) for z in todo], self.context,
                                           self.planner.batch_size)
        if self.resampled:
            prompt.validate(self.slice_shape)
            prompt = self._prompt_to_model(prompt)
        pred = self.predictor.predict(prompt, multimask=multimask, image=self.model_image(index), context=self.context)
        return self._prediction_to_grid(pred) if self.resampled else pred

    def prefetch(self, index: int, neighbours: Optional[int] = None) -> None:
        """Start encoding slice ``index``, then ``neighbours`` slices on each side (nearest first), in the
        background (the Slicer effect calls this when the view moves). Default: ``prefetch_neighbours`` of the
        model's device (1 on CUDA, 0 on the CPU)."""
        if neighbours is None:
            neighbours = prefetch_neighbours(self.device)
        order = [index] + [z for d in range(1, int(neighbours) + 1) for z in (index + d, index - d)]
        for z in order:
            if 0 <= z < self.num_slices:
                self.predictor.prefetch(self.model_image(z), self.context)


def is_ambiguous(prompt: Prompt) -> bool:
    """One positive point and nothing else: SAM recommends multimask output for such prompts."""
    return (prompt.box is None and prompt.mask is None and prompt.logits is None and prompt.points is not None
            and len(prompt.points) == 1)


def segment_object(segmenter: VolumeSegmenter, obj: ObjectPrompts, *, propagate_volume: bool = True,
                   iou_threshold: Optional[float] = None, projection: Union[None, str, dict] = None,
                   box_extension: Optional[float] = None,
                   slice_range: Optional[Tuple[int, int]] = None, progress: Optional[Callable] = None,
                   cancel: Optional[Callable[[], bool]] = None, stop_rule: Any = None
                   ) -> Tuple[np.ndarray, Dict[int, Prediction], Optional[PropagationResult]]:
    """Seed masks from an object's prompts, then propagate them (options left as None: the defaults of
    :func:`~RobustMedSAMLib.propagation.propagate` for this segmenter's model).

    Returns ``(masks (num_slices, H, W) bool along the segmenter's axis, seed predictions, propagation
    result or None)``.
    """
    if not obj.slices:
        raise SeedError(f"object {obj.name!r} has no prompt")
    seeds: Dict[int, Prediction] = {}
    for index, prompt in sorted(obj.slices.items()):
        if cancel is not None and cancel():
            from .propagation import PropagationCancelled

            raise PropagationCancelled("cancelled")
        pred = segmenter.predict_slice(index, prompt, multimask=is_ambiguous(prompt))
        if not pred.mask.any():
            raise SeedError(f"the prompt of {obj.name!r} on slice {index} gave an empty mask; move the points "
                            "inside the object or draw a box around it")
        seeds[index] = pred
    seed_masks = {i: p.mask for i, p in seeds.items()}
    if not propagate_volume:
        stack = np.zeros((segmenter.num_slices, *segmenter.slice_shape), dtype=bool)
        for i, mask in seed_masks.items():
            stack[i] = mask
        return stack, seeds, None
    result = propagate(segmenter, seed_masks, iou_threshold=iou_threshold, projection=projection,
                       box_extension=box_extension, slice_range=obj.slice_range or slice_range,
                       progress=progress, cancel=cancel, stop_rule=stop_rule)
    return result.masks, seeds, result


def segment_volume(volume: Volume, objects: Sequence[ObjectPrompts], predictor: Predictor, *,
                   axis: AxisLike = 0, modality: Optional[str] = None, window: Optional[WindowLike] = None,
                   images: Optional[np.ndarray] = None, propagate_volume: bool = True,
                   iou_threshold: Optional[float] = None, projection: Union[None, str, dict] = None,
                   box_extension: Optional[float] = None,
                   slice_range: Optional[Tuple[int, int]] = None, progress: Optional[Progress] = None,
                   cancel: Optional[Callable[[], bool]] = None, stop_rule: Any = None,
                   square_pixels: bool = False) -> VolumeResult:
    """Segment every object of ``objects`` in ``volume``.

    Arguments:
        volume: the volume (``array`` ``(K, J, I)``, geometry used only by the caller for writing).
        objects: per-object prompts on slices along ``axis`` (see :mod:`RobustMedSAMLib.prompt_files`).
        predictor: a :class:`~RobustMedSAMLib.predictor.Predictor` (its cache is reused across calls).
        axis: slicing axis (0/1/2, k/j/i, axial/coronal/sagittal).
        modality, window: intensity mapping (``images`` may be given instead, already uint8 ``(K, J, I)``).
            An object with its own ``window`` (prompt file) is segmented on the volume mapped with it.
        propagate_volume: False segments only the prompted slices.
        iou_threshold, projection, box_extension, slice_range, stop_rule: propagation options
            (``propagation.py``; None: the defaults for the predictor's model).
        square_pixels: resample slices with non-square pixels to square ones for the model. Off by default:
            with LiteMedSAM on coronal slices of the sample CT (10 x 3.05 mm pixels) a reference box gives a
            lower Dice on square pixels (left lung 0.80 vs 0.93, right 0.87 vs 0.92, thoracic column 0.54 vs
            0.61; docs/propagation.md).
        progress: ``progress(done, total, message)``; cancel: returns True to stop (raises
            :class:`~RobustMedSAMLib.propagation.PropagationCancelled`; nothing is returned or changed).
    """
    ax = volume.resolve_axis(axis)
    if not objects:
        raise ValueError("no object to segment: give at least one prompt")
    if images is None:
        images = uint8_volume(volume, modality, window)
    spacing = tuple(float(v) for v in volume.spacing[::-1]) if square_pixels else None
    segmenters: Dict[Any, VolumeSegmenter] = {None: VolumeSegmenter(predictor, images, ax, voxel_spacing=spacing)}
    num_slices = segmenters[None].num_slices
    results: List[ObjectResult] = []
    budget = num_slices * len(objects)
    for n, obj in enumerate(objects):
        base = n * num_slices
        key = None if getattr(obj, "window", None) is None else get_window(obj.window)
        if key not in segmenters:
            segmenters[key] = VolumeSegmenter(predictor, uint8_volume(volume, "CT", key), ax, voxel_spacing=spacing)
        segmenter = segmenters[key]

        def report(done, total, index, _base=base, _name=obj.name):
            if progress is not None:
                progress(_base + done, max(budget, _base + total), f"{_name}: slice {index}")

        stack, seeds, prop = segment_object(
            segmenter, obj, propagate_volume=propagate_volume, iou_threshold=iou_threshold, projection=projection,
            box_extension=box_extension, slice_range=slice_range, progress=report, cancel=cancel,
            stop_rule=stop_rule)
        full = np.moveaxis(stack, 0, ax)  # (num_slices, H, W) -> (K, J, I)
        color = tuple(obj.color) if obj.color is not None else DEFAULT_COLORS[n % len(DEFAULT_COLORS)]
        results.append(ObjectResult(obj.name, color, full, prop, seeds))
    if progress is not None:
        progress(budget, budget, "done")
    return VolumeResult(results, ax)
