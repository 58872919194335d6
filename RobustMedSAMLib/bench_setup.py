"""The seeded set-up shared by the benchmark's parts (``bench.py`` in process, ``bench_memory.py`` in fresh
subprocesses, ``bench_reference.py`` in the reference worker): encoders, input image, volume, prompt and a
propagation run. Everything is seeded (``seeded.py``), so every part measures the same work.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict

import numpy as np
import torch


def model_name(quick: bool) -> str:
    """The model configuration benchmarked: ``tiny`` with ``--quick``, else the full ``robustmedsam``."""
    return "tiny" if quick else "robustmedsam"


def encoder_kwargs(arch) -> Dict[str, Any]:
    """The ``ImageEncoderViT`` arguments of ``modeling.model.build_model``."""
    return dict(depth=arch.depth, embed_dim=arch.embed_dim, img_size=arch.image_size, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.num_heads,
                patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=arch.global_attn_indexes, window_size=arch.window_size,
                out_chans=arch.prompt_dim)


def seeded_encoder(kind: str, arch, seed: int = 0):
    """segment_anything's ``ImageEncoderViT`` ("reference") or ours ("fast"), seeded like the full model."""
    from segment_anything.modeling import ImageEncoderViT

    from .modeling.image_encoder import ImageEncoder
    from .seeded import seed_module

    enc = (ImageEncoderViT if kind == "reference" else ImageEncoder)(**encoder_kwargs(arch))
    seed_module(enc, seed, prefix="image_encoder.")
    return enc.eval()


def seeded_input(arch, device=None) -> torch.Tensor:
    """The encoder input ``(1, 3, S, S)`` of one seeded RGB image, preprocessed as for SAM."""
    from .preprocess import Preprocessing, prepare_image
    from .seeded import seeded_image

    side = max(arch.image_size // 2, 64)
    x, _ = prepare_image(seeded_image((side, side, 3), seed=3), Preprocessing("sam", arch.image_size), device)
    return x


def ellipse(shape, frac: float = 0.25) -> np.ndarray:
    """A centred ellipse mask ``(H, W)`` bool with semi-axes ``frac`` of the height and width."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (frac * h)) ** 2 + ((xx - w / 2) / (frac * w)) ** 2 <= 1.0


def seeded_volume(slices: int, side: int) -> np.ndarray:
    """A seeded uint8 volume ``(slices, side, side)``."""
    from .seeded import seeded_image

    return np.stack([seeded_image((side, side), seed=100 + z) for z in range(slices)])


def box_prompt(side: int):
    """A box prompt ``(x0, y0, x1, y1)`` in the middle of a ``side`` x ``side`` slice."""
    from .prompts import Prompt

    return Prompt(box=[side * 0.25, side * 0.3, side * 0.7, side * 0.75])


def run_propagation(predictor, slices: int, side: int):
    """Propagate through ``slices`` slices between two seed slices; returns (seconds, result)."""
    from .propagation import propagate
    from .volume_segmentation import VolumeSegmenter

    volume = seeded_volume(slices + 2, side)
    segmenter = VolumeSegmenter(predictor, volume, axis=0)
    seed = ellipse((side, side))
    t0 = time.perf_counter()
    result = propagate(segmenter, {0: seed, slices + 1: seed}, iou_threshold=0.0)
    return time.perf_counter() - t0, result
