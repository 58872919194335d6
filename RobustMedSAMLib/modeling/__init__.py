"""SAM-family modules: image encoder with early features, RobustSAM mask decoder, the full model."""
from .sam_package import defer_package_init

defer_package_init()  # segment_anything's modeling classes without its torchvision-importing __init__

from .image_encoder import ImageEncoder
from .mask_decoder import DecoderOutput, RobustMaskDecoder
from .model import TINY, VIT_B, VIT_B_SAM, Architecture, ImageEncoding, SegmentationModel, build_model

__all__ = ["Architecture", "DecoderOutput", "ImageEncoder", "ImageEncoding", "RobustMaskDecoder",
           "SegmentationModel", "TINY", "VIT_B", "VIT_B_SAM", "build_model"]
