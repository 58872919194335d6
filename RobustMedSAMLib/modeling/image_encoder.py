"""SAM's ViT image encoder that also returns the early feature map read by RobustSAM's decoder.

Subclass of ``segment_anything.modeling.ImageEncoderViT``: same modules and parameter names (a plain SAM /
MedSAM ``image_encoder.*`` state dict loads unchanged). :meth:`forward` returns the neck output and the
output of the first global-attention block (block 2 of ViT-B), taken before the neck, channels-last.
"""
from __future__ import annotations

from typing import Tuple

import torch

from segment_anything.modeling import ImageEncoderViT


class ImageEncoder(ImageEncoderViT):
    """``forward(x: (B, 3, S, S)) -> (embeddings (B, 256, S/16, S/16), early (B, S/16, S/16, embed_dim))``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        global_blocks = [i for i, blk in enumerate(self.blocks) if blk.window_size == 0]
        if not global_blocks:
            raise ValueError("the encoder needs at least one global-attention block")
        self.early_block = global_blocks[0]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.early_block:
                early = x
        return self.neck(x.permute(0, 3, 1, 2)), early
