"""SAM's mask decoder, optionally extended with RobustSAM's anti-degradation modules.

Built on ``segment_anything.modeling.MaskDecoder`` so every SAM parameter keeps its name; with
``robust_modules=True`` the RobustSAM additions are created under their official names
(``custom_robust_token``, ``custom_token_block``, ``robust_mlp``, ``fourier_first_layer_features``,
``fourier_last_layer_features``, ``fourier_mask_features``): 209 tensors for ViT-B.

Two paths, as in the official code (``clear`` there is ``robust=False`` here):

* SAM path (``robust=False``): exactly SAM's decoder.
* Robust path (``robust=True``): the output tokens are the robust output tokens; their hypernetwork vectors
  come from AOTG + ``robust_mlp`` and multiply the robust mask features
  ``fourier_mask_features(upscaled) + image_features``, where ``image_features`` =
  ``fourier_first_layer_features(early) + fourier_last_layer_features(embeddings)`` depends on the image
  only (see :meth:`RobustMaskDecoder.image_features`; the predictor caches it).

Beyond the official code, both paths take any number of prompts per call (one prompt per batch element)
and support multimask output (masks of output tokens 1..3, as SAM). Batched calls equal one-at-a-time calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from segment_anything.modeling.mask_decoder import MLP, MaskDecoder

from .robust_blocks import FeatureBlock, TokenBlock


@dataclass
class DecoderOutput:
    """Mask decoder results for B prompts.

    Attributes:
        masks: ``(B, C, 256, 256)`` low-resolution logits (C = 1, or 3 with multimask output).
        iou: ``(B, C)`` predicted IoU.
        mask_features: ``(B, 32, 256, 256)`` robust mask features (RobustSAM's ``upscaled_embedding_robust``,
            used by the feature-consistency loss), or ``None`` when not requested.
        tokens: ``(B, 4, 256)`` transformer outputs at the 4 mask-token positions (token-consistency loss).
    """

    masks: torch.Tensor
    iou: torch.Tensor
    mask_features: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None


def _expand(x: torch.Tensor, b: int) -> torch.Tensor:
    """Per-image tensor of batch 1 or B -> batch B (one image for all prompts, or one image per prompt)."""
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise ValueError(f"image batch {x.shape[0]} does not match prompt batch {b} (must be 1 or {b})")


class RobustMaskDecoder(MaskDecoder):
    def __init__(self, *, transformer_dim: int, transformer: nn.Module, vit_dim: int,
                 robust_modules: bool = True, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__(transformer_dim=transformer_dim, transformer=transformer,
                         num_multimask_outputs=num_multimask_outputs, iou_head_depth=iou_head_depth,
                         iou_head_hidden_dim=iou_head_hidden_dim)
        self.has_robust_modules = robust_modules
        if robust_modules:
            n = self.num_mask_tokens
            self.custom_robust_token = nn.Embedding(n, transformer_dim)
            self.robust_mlp = MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            self.fourier_mask_features = FeatureBlock(transformer_dim // 8, transformer_dim, "downsample")
            self.fourier_first_layer_features = FeatureBlock(vit_dim, transformer_dim, "upsample")
            self.fourier_last_layer_features = FeatureBlock(transformer_dim, transformer_dim, "upsample")
            self.custom_token_block = TokenBlock(num_chunks=n, chunk_dim=transformer_dim // n)

    def image_features(self, image_embeddings: torch.Tensor, early_features: torch.Tensor,
                       robust: bool = True) -> torch.Tensor:
        """Image-only part of the robust decoder (cacheable per image).

        Arguments:
            image_embeddings: ``(N, 256, 64, 64)`` image encoder output.
            early_features: ``(N, 64, 64, vit_dim)`` channels-last output of the first global-attention
                encoder block (block 2 of ViT-B).
            robust: run the AMFG blocks (True) or only their resampling heads (the official ``clear`` mode).
        Returns:
            ``(N, 32, 256, 256)`` features added to the mask features.
        """
        if not self.has_robust_modules:
            raise RuntimeError("this decoder has no RobustSAM modules (a plain SAM decoder)")
        early = early_features.permute(0, 3, 1, 2)
        return (self.fourier_first_layer_features(early, robust=robust)
                + self.fourier_last_layer_features(image_embeddings, robust=robust))

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool, robust: bool = False,
                image_features: Optional[torch.Tensor] = None,
                early_features: Optional[torch.Tensor] = None,
                return_features: bool = False) -> DecoderOutput:
        """Predict masks for B prompts.

        Arguments:
            image_embeddings: ``(1 or B, 256, 64, 64)``: one image for all prompts or one per prompt.
            image_pe: ``(1, 256, 64, 64)`` dense positional encoding.
            sparse_prompt_embeddings: ``(B, N, 256)``; dense_prompt_embeddings: ``(B, 256, 64, 64)``.
            multimask_output: 3 masks (tokens 1..3) instead of 1 (token 0).
            robust: use the RobustSAM path (needs ``image_features`` or ``early_features``).
            image_features: ``(1 or B, 32, 256, 256)`` from :meth:`image_features` (cached), or
            early_features: ``(1 or B, 64, 64, vit_dim)`` to compute them here.
            return_features: also return robust mask features and mask tokens (training losses).
        """
        b = sparse_prompt_embeddings.shape[0]
        need_features = robust or (return_features and self.has_robust_modules)
        if need_features and image_features is None:
            if early_features is None:
                raise ValueError("the robust path needs image_features or early_features")
            image_features = self.image_features(image_embeddings, early_features, robust=robust)
        if robust and not self.has_robust_modules:
            raise RuntimeError("robust=True needs a decoder with RobustSAM modules")

        first = self.custom_robust_token.weight if robust else self.mask_tokens.weight
        output_tokens = torch.cat([self.iou_token.weight, first], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)

        # The transformer flattens (B, C, H, W) to tokens (B, H*W, C): for channels-last inputs that is a contiguous
        # view, so its (tokens + pe) adds and 4096-row projections run on contiguous memory (same numbers).
        cl = torch.channels_last
        src = (_expand(image_embeddings, b) + dense_prompt_embeddings).contiguous(memory_format=cl)
        pos_src = _expand(image_pe.contiguous(memory_format=cl), b)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1: 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))

        selected = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        if robust:
            hyper = [self.robust_mlp(self.custom_token_block(mask_tokens_out[:, i])) for i in selected]
        else:
            hyper = [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in selected]
        hyper_in = torch.stack(hyper, dim=1)  # (B, C, 32)
        h, w = upscaled.shape[-2:]
        mask_features = None
        if return_features and self.has_robust_modules:
            mask_features = self.fourier_mask_features(upscaled, robust=robust) + _expand(image_features, b)
        if robust and mask_features is None:
            # masks = hyper @ (mask features + image features), with the mask-feature block's last conv folded
            # into the projection (RobustMaskDecoder never needs the 32 feature channels themselves here)
            image_term = hyper_in @ _expand(image_features, b).reshape(b, -1, h * w)
            masks = self.fourier_mask_features.projected(upscaled, hyper_in) + image_term.view(b, -1, h, w)
        else:
            features = mask_features if robust else upscaled
            masks = (hyper_in @ features.reshape(b, -1, h * w)).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(iou_token_out)[:, list(selected)]
        if return_features:
            return DecoderOutput(masks, iou, mask_features, mask_tokens_out)
        return DecoderOutput(masks, iou)


def decoder_groups(robust_modules: bool) -> List[str]:
    """Top-level decoder submodule names (for inspection and freezing)."""
    names = ["transformer", "iou_token", "mask_tokens", "output_upscaling", "output_hypernetworks_mlps",
             "iou_prediction_head"]
    if robust_modules:
        names += ["custom_robust_token", "custom_token_block", "robust_mlp", "fourier_first_layer_features",
                  "fourier_last_layer_features", "fourier_mask_features"]
    return names
