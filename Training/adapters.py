"""Bottleneck adapters in the image encoder (Medical-SAM-Adapter style), stored apart from the base weights.

Per ViT block (Medical-SAM-Adapter ``AdapterBlock``, shared/REFERENCE.md section 8), with ``D`` the embed dim
and a bottleneck of ``ratio * D`` (0.25: 768 -> 192 -> 768 for ViT-B):

* ``space_adapter`` after attention, with its own skip connection: ``x = shortcut + A_s(Attn(LN1(x)))``
  where ``A_s(y) = y + fc2(GELU(fc1(y)))``;
* ``mlp_adapter`` parallel to the MLP, scaled by 0.5: ``x = x + MLP(LN2(x)) + 0.5 * A_m(LN2(x))``.

The adapters are attached with forward hooks on ``block.attn`` and ``block.mlp``, so every base key keeps its
name (``image_encoder.blocks.N.attn.qkv.weight``...) and adapter keys are ``...blocks.N.space_adapter.*`` /
``...blocks.N.mlp_adapter.*``. Deliberate difference: ``fc2`` starts at zero, so a freshly adapted model
computes exactly what the base model does (Medical-SAM-Adapter uses PyTorch's default initialisation).
The base encoder is frozen; :func:`save_adapters` writes only the adapter tensors (safetensors),
:func:`load_adapters` attaches and fills them on a model built from the base checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

ADAPTER_FORMAT = "robustmedsam-adapters/1"
_MARKERS = (".space_adapter.", ".mlp_adapter.")


class Adapter(nn.Module):
    """``fc2(GELU(fc1(x)))`` (+ ``x`` when ``skip``), bottleneck width ``round(ratio * dim)``."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.skip = skip
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(x)))
        return x + y if self.skip else y


def is_adapter_key(key: str) -> bool:
    return any(m in key for m in _MARKERS)


def has_adapters(model: nn.Module) -> bool:
    return getattr(model.image_encoder, "adapter_ratio", None) is not None


def add_adapters(model: nn.Module, ratio: float = 0.25, freeze_base: bool = True) -> int:
    """Attach adapters to every encoder block of ``model`` (a ``SegmentationModel``); returns the number of
    adapter parameters. With ``freeze_base`` every non-adapter encoder parameter stops requiring gradients."""
    encoder = model.image_encoder
    if has_adapters(model):
        raise ValueError("this model already has adapters")
    for block in encoder.blocks:
        dim = block.norm1.normalized_shape[0]
        device = block.norm1.weight.device
        block.space_adapter = Adapter(dim, ratio, skip=True).to(device)
        block.mlp_adapter = Adapter(dim, ratio, skip=False).to(device)
        block.attn.register_forward_hook(lambda _m, _inp, out, b=block: b.space_adapter(out))
        block.mlp.register_forward_hook(lambda _m, inp, out, b=block: out + 0.5 * b.mlp_adapter(inp[0]))
    encoder.adapter_ratio = float(ratio)
    if freeze_base:
        for name, p in encoder.named_parameters():
            p.requires_grad_(is_adapter_key("." + name))
    return sum(p.numel() for n, p in encoder.named_parameters() if is_adapter_key("." + n))


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors, with full-model key names."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict without adapters (the official key layout)."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}


def save_adapters(model: nn.Module, path: os.PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the adapters of ``model`` to a ``.safetensors`` file (ratio and format in its metadata)."""
    from RobustMedSAMLib.checkpoints import save_checkpoint

    if not has_adapters(model):
        raise ValueError("the model has no adapters")
    meta = {"format": ADAPTER_FORMAT, "ratio": str(model.image_encoder.adapter_ratio),
            "blocks": str(len(model.image_encoder.blocks))}
    meta.update(metadata or {})
    return save_checkpoint(adapter_state_dict(model), path, meta)


def load_adapters(model: nn.Module, path: os.PathLike) -> Dict[str, str]:
    """Attach the adapters stored in ``path`` to ``model`` (built from the matching base weights)."""
    from safetensors import safe_open

    from RobustMedSAMLib.checkpoints import CheckpointError

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable adapters file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not an adapters file (format {metadata.get('format')!r})")
    if not has_adapters(model):
        add_adapters(model, float(metadata["ratio"]))
    own = adapter_state_dict(model)
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise CheckpointError(f"{path}: its adapters do not fit this model (different encoder size or ratio)")
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    return metadata
