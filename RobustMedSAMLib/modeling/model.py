"""The segmentation model: image encoder + prompt encoder + (robust) mask decoder.

State-dict keys are SAM's (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); with the robust
decoder they are RobustSAM's. Pixel normalisation is not part of the model: it is the job of
:mod:`RobustMedSAMLib.preprocess`, because SAM-style and MedSAM-style checkpoints expect different inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
from torch import nn

from segment_anything.modeling import PromptEncoder, TwoWayTransformer

from .image_encoder import ImageEncoder
from .mask_decoder import DecoderOutput, RobustMaskDecoder
from ..model_specs import TINY, VIT_B, VIT_B_SAM, Architecture  # noqa: F401 (re-exported)
from .robust_blocks import set_batchnorm_mode


@dataclass
class ImageEncoding:
    """Everything the decoder needs from one batch of images.

    Attributes:
        embeddings: ``(N, 256, 64, 64)`` neck output.
        early: ``(N, 64, 64, embed_dim)`` first global-attention block output (robust decoder input).
        features: ``(N, 32, 256, 256)`` robust image features (the decoder's image-only branches), or None.
    """

    embeddings: torch.Tensor
    early: Optional[torch.Tensor]
    features: Optional[torch.Tensor] = None


class SegmentationModel(nn.Module):
    def __init__(self, image_encoder: ImageEncoder, prompt_encoder: PromptEncoder,
                 mask_decoder: RobustMaskDecoder, architecture: Architecture) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.architecture = architecture

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    @property
    def has_robust_decoder(self) -> bool:
        return self.mask_decoder.has_robust_modules

    batchnorm_mode = "running"
    # "fp32", "bf16" or "fp16" once set by ``RobustMedSAMLib.precision.set_precision`` (load_model does); None:
    # float32 on the CPU, the default autocast on CUDA (``acceleration.encode_batched``)
    precision = None

    def set_batchnorm_mode(self, mode: str) -> None:
        """``"running"`` (default) or ``"per_sample"`` (official eval scripts); see ``robust_blocks``.

        Cached robust image features depend on it: encodings made in another mode must not be reused
        (the predictor's cache keys include this mode)."""
        set_batchnorm_mode(self, mode)
        self.batchnorm_mode = mode

    def encode(self, images: torch.Tensor, robust: Optional[bool] = None) -> ImageEncoding:
        """Encode preprocessed images ``(N, 3, S, S)``; with a robust decoder also its image-only branches.

        ``robust`` selects which image features to precompute (default: the robust path if available).
        """
        embeddings, early = self.image_encoder(images)
        encoding = ImageEncoding(embeddings, early if self.has_robust_decoder else None)
        if robust is None:
            robust = self.has_robust_decoder
        if robust:
            encoding.features = self.mask_decoder.image_features(embeddings, early, robust=True)
        return encoding

    def decode(self, encoding: ImageEncoding, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               boxes: Optional[torch.Tensor] = None, mask_logits: Optional[torch.Tensor] = None,
               multimask_output: bool = False, robust: Optional[bool] = None,
               return_features: bool = False) -> DecoderOutput:
        """Decode B prompts of the same structure in the model's input frame (pixels of the S x S input).

        Arguments:
            encoding: from :meth:`encode`, batch 1 (shared by all prompts) or B (one image per prompt).
            points: ``(coords (B, N, 2) as (x, y), labels (B, N))``; label -1 marks padding.
            boxes: ``(B, 4)`` XYXY. mask_logits: ``(B, 1, 256, 256)`` low-resolution logits.
            robust: RobustSAM path (default: if the decoder has the robust modules).
        Returns:
            :class:`DecoderOutput` with ``masks (B, C, 256, 256)`` logits and ``iou (B, C)``.
        """
        if robust is None:
            robust = self.has_robust_decoder
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        features = encoding.features if robust else None
        return self.mask_decoder(
            encoding.embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output,
            robust=robust, image_features=features, early_features=encoding.early,
            return_features=return_features)


def build_model(arch: Architecture = VIT_B) -> SegmentationModel:
    """An untrained model of the given architecture (weights come from a checkpoint)."""
    emb = arch.embedding_size
    encoder = ImageEncoder(
        depth=arch.depth, embed_dim=arch.embed_dim, img_size=arch.image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.num_heads,
        patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=arch.global_attn_indexes, window_size=arch.window_size, out_chans=arch.prompt_dim)
    prompt_encoder = PromptEncoder(embed_dim=arch.prompt_dim, image_embedding_size=(emb, emb),
                                   input_image_size=(arch.image_size, arch.image_size), mask_in_chans=16)
    decoder = RobustMaskDecoder(
        transformer_dim=arch.prompt_dim, vit_dim=arch.embed_dim, robust_modules=arch.robust_decoder,
        transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_dim,
                                      mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_heads),
        iou_head_depth=3, iou_head_hidden_dim=256)
    model = SegmentationModel(encoder, prompt_encoder, decoder, arch)
    model.eval()
    return model
