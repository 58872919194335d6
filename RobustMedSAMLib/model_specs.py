"""Torch-free descriptions of the models: architectures (hyper-parameters) and input conventions.

Importing this needs numpy at most, so the model tables (:mod:`.models`) are readable where torch is not
imported (the Slicer process: model names, weights status). ``modeling`` builds networks from these;
``preprocess`` implements the conventions (see its docstring for what each style does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

#: preprocessing styles (:mod:`.preprocess`): SAM / RobustSAM / RobustMedSAM, MedSAM, LiteMedSAM
STYLES = ("sam", "medsam", "litemedsam")


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of a SAM-family model. ``vit_b()`` is SAM ViT-B; ``tiny()`` a small test model."""

    name: str = "vit_b"
    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    robust_decoder: bool = True

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for ViT-B)."""
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits (256 for ViT-B)."""
        return 4 * self.embedding_size


VIT_B = Architecture()
VIT_B_SAM = Architecture(robust_decoder=False)
TINY = Architecture(name="tiny", image_size=256, embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3),
                    window_size=4, prompt_dim=64, decoder_mlp_dim=128, decoder_heads=2)


#: LiteMedSAM (:mod:`.modeling.lite_medsam`), the geometry that matters to the engine: 256 x 256 input,
#: 64 x 64 embedding, 256 x 256 mask logits (``mask_size`` = 4 x 64). The ViT fields of
#: :class:`Architecture` do not describe its TinyViT encoder.
LITE_MEDSAM = Architecture(name="lite_medsam", image_size=256, patch_size=4, embed_dim=320, depth=12,
                           num_heads=10, global_attn_indexes=(), window_size=7, robust_decoder=False)


@dataclass(frozen=True)
class Preprocessing:
    """A model's input convention: ``style`` (:data:`STYLES`) and input side ``image_size``."""

    style: str = "sam"
    image_size: int = 1024

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown preprocessing style {self.style!r}; use one of {STYLES}")
