"""The model being trained: the start checkpoint, which parameters train, mixed precision, and the trained
``model.safetensors`` (full model in the official key layout) with ``adapters.safetensors``."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from Training import datasets as D
from Training.train_config import ADAPTER_FILE, MODEL_FILE, TrainConfig, TrainingError

TRAINED_FORMAT = "robustmedsam-trained/1"


def load_start_model(cfg: TrainConfig):
    """(LoadedModel, description, sha256 of the base file or '')."""
    from RobustMedSAMLib.checkpoints import sha256_of
    from RobustMedSAMLib.models import load_model, seeded_model

    if cfg.seeded_tiny:
        return seeded_model("tiny", seed=cfg.seed, device="cpu"), f"seeded-tiny(seed={cfg.seed})", ""
    loaded = load_model(cfg.model, cfg.checkpoint, device="cpu", allow_download=not cfg.offline)
    if not loaded.model.has_robust_decoder:
        raise TrainingError(f"{cfg.checkpoint or cfg.model} has a plain SAM decoder; training needs a RobustSAM "
                            "decoder: fuse one first (robustmedsam fuse --encoder medsam.pth --decoder robustsam.pth)")
    path = loaded.checkpoint
    return loaded, (path.name if path else str(cfg.model)), (sha256_of(path) if path else "")


def frozen_decoder_parts(cfg: TrainConfig) -> List[str]:
    """Decoder submodules that no term of the objective reaches (frozen; see :mod:`Training.objectives`)."""
    parts = ["output_hypernetworks_mlps"]
    if cfg.objective == "robust":
        parts.append("iou_prediction_head")
    if cfg.detach_clean or (cfg.token_weight == 0 and cfg.feature_weight == 0):
        parts.append("mask_tokens")  # only the clean branch reads them
    return parts


def select_trainable(model: nn.Module, cfg: TrainConfig) -> List[nn.Parameter]:
    """Freeze all but the reachable decoder parameters (and added adapters); the trainable parameters."""
    model.requires_grad_(False)
    frozen = tuple(f"{p}." for p in frozen_decoder_parts(cfg))
    for name, p in model.mask_decoder.named_parameters():
        p.requires_grad_(not (name + ".").startswith(frozen) and not name.startswith(frozen))
    if cfg.adapters:
        from Training.adapters import add_adapters

        add_adapters(model, cfg.adapter_ratio)
    return [p for p in model.parameters() if p.requires_grad]


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp`` (None: float32): ``auto`` = on CUDA only, bf16 where the GPU computes it
    natively (``acceleration.cuda_native_bf16``: not where it is only emulated, Volta/Turing), else fp16."""
    from RobustMedSAMLib.acceleration import cuda_native_bf16

    if amp == "fp16" or (amp == "auto" and device.type == "cuda" and not cuda_native_bf16(device)):
        return torch.float16
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def mixed_precision(amp: str, model: nn.Module, device: torch.device) -> Tuple[Optional[torch.dtype], object]:
    """(autocast dtype or None, GradScaler) for ``--amp`` (:func:`amp_dtype_for`); fp16 on CUDA gets loss
    scaling."""
    amp_dtype = amp_dtype_for(amp, device)
    if amp_dtype is not None:
        _float32_fft(model.mask_decoder)
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    if hasattr(torch.amp, "GradScaler"):
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    else:  # torch < 2.3
        scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)
    return amp_dtype, scaler


def _float32_fft(module: nn.Module) -> None:
    """Run the Fourier blocks in float32 under autocast (FFTs do not support bfloat16 / odd half sizes)."""
    from RobustMedSAMLib.modeling.robust_blocks import FGMBlock

    for m in module.modules():
        if isinstance(m, FGMBlock) and not getattr(m, "_fp32_fft", False):
            inner = m.forward

            def forward(x, _inner=inner):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return _inner(x.float())

            m.forward = forward
            m._fp32_fft = True


def write_outputs(model, cfg: TrainConfig, loaded, base_name: str, base_sha: str, out: Path, global_step: int,
                  pairs: D.TrainingPairs):
    """The full-model safetensors (official key layout) and, with adapters, the adapters file."""
    from RobustMedSAMLib.checkpoints import save_checkpoint, sha256_of
    from Training.adapters import base_state_dict, save_adapters

    state = {k: v.detach().cpu() for k, v in base_state_dict(model).items()}
    meta = {
        "format": TRAINED_FORMAT,
        "architecture": model.architecture.name,
        "decoder": "robust",
        "preprocessing": loaded.config.preprocessing.style,
        "base_model": loaded.config.name,
        "base_checkpoint": base_name,
        "base_sha256": base_sha,
        "encoder_sha256": _tensor_digest(state, ("image_encoder.", "prompt_encoder.")),
        "decoder_sha256": _tensor_digest(state, ("mask_decoder.",)),
        "objective": cfg.objective,
        "epochs": str(cfg.epochs),
        "steps": str(global_step),
        "datasets": pairs.describe(),
        "training_config": cfg.to_json(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    adapter_path = None
    if cfg.adapters:
        adapter_path = save_adapters(model, out / ADAPTER_FILE, {"base_checkpoint": base_name,
                                                                  "base_sha256": base_sha})
        meta["adapters"] = ADAPTER_FILE
        meta["adapters_sha256"] = sha256_of(adapter_path)
    model_path = save_checkpoint(state, out / MODEL_FILE, meta)
    return model_path, adapter_path


def _tensor_digest(state: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        if k.startswith(tuple(prefixes)):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
