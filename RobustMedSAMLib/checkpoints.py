"""Checkpoint files: safe loading, architecture detection, inspection and module-wise fusion.

Never unpickles code: ``.pth`` files are read with ``torch.load(weights_only=True)``, our own files are
safetensors. Accepted layouts: a plain state dict, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers
(training checkpoints) and ``module.``-prefixed keys (DDP). Every failure raises :class:`CheckpointError`
with what is wrong, which file, and what to do.
"""
from __future__ import annotations

import datetime
import os
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .model_specs import TINY, VIT_B, Architecture

StateDict = Dict[str, torch.Tensor]
GROUPS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
FUSED_FORMAT = "robustmedsam-fused/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not a SAM ViT-B-family model."""


def sha256_of(path: os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in fused and trained checkpoints' metadata)."""
    from .weights import sha256_file

    return sha256_file(path)


def _sniff(path: Path) -> str:
    """'zip' (torch >= 1.6), 'pickle' (legacy torch), 'safetensors', or raise CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download failed; delete it and download again")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        raise CheckpointError(
            f"{path} is a web page, not a checkpoint (the download returned an HTML page, e.g. a login or "
            "virus-scan page). Download the file again from its official page and pass the .pth file.")
    raise CheckpointError(
        f"{path} is not a PyTorch (.pth) or safetensors checkpoint (unrecognised header {head[:8]!r}).")


def read_checkpoint(path: os.PathLike) -> Tuple[StateDict, Dict[str, str]]:
    """Read ``path`` safely -> ``(state_dict with 'module.' stripped and wrappers removed, metadata)``."""
    path = Path(path)
    kind = _sniff(path)
    metadata: Dict[str, str] = {}
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                obj = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=(kind == "zip"))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains pickled Python objects besides tensors; RobustMedSAM refuses to unpickle code "
            f"from checkpoint files ({str(e).splitlines()[0][:200]}). Save its state dict alone "
            "(torch.save(model.state_dict(), ...)) from a trusted environment.") from None
    except Exception as e:  # torch/zipfile/safetensors report damage with many exception types
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"it is {path.stat().st_size:,} bytes. Delete it and download it again.") from None
    return normalize_state_dict(obj, path), metadata


def normalize_state_dict(obj, path: os.PathLike = "<memory>") -> StateDict:
    """Unwrap ``{"model": ...}``-style wrappers and strip ``module.`` prefixes."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("model", "state_dict", "model_state_dict", "module")
                          if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__}).")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    if not state:
        raise CheckpointError(f"{path} contains no tensors.")
    return state


def _count_blocks(state: StateDict) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def detect_architecture(state: StateDict, path: os.PathLike = "<memory>") -> Architecture:
    """The :class:`Architecture` of a SAM-family state dict, or a :class:`CheckpointError` saying what it is."""
    keys = set(state)
    if any(k.startswith(("vision_encoder.", "shared_image_embedding")) for k in keys):
        raise CheckpointError(f"{path} is in Hugging Face transformers format; use the original PyTorch .pth "
                              "checkpoint of the model instead.")
    if any(k.startswith("image_encoder.trunk.") for k in keys) or any("sam_mask_decoder" in k for k in keys):
        raise CheckpointError(f"{path} is a SAM 2 checkpoint; RobustMedSAM uses SAM (ViT-B) checkpoints.")
    if any(k.startswith("image_encoder.layers.") for k in keys):
        raise CheckpointError(f"{path} has a TinyViT image encoder (LiteMedSAM / MobileSAM); RobustMedSAM "
                              "needs a ViT-B encoder (SAM, MedSAM, RobustSAM or RobustMedSAM).")
    missing = [g.rstrip(".") for g in GROUPS if not any(k.startswith(g) for k in keys)]
    if missing:
        raise CheckpointError(
            f"{path} lacks the {', '.join(missing)} part(s) of a SAM model (found prefixes: "
            f"{sorted({k.split('.')[0] for k in keys})[:8]}). Use a full SAM-family checkpoint.")
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        pos = state["image_encoder.pos_embed"]
        embed_dim, _, patch_size, _ = patch.shape
        grid = pos.shape[1]
        depth = _count_blocks(state)
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        head_dim = rel[0][1]
        prompt_dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
        mlp_dim = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        dec_depth = len({k.split(".")[3] for k in keys if k.startswith("mask_decoder.transformer.layers.")})
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path} does not have the layout of a SAM model (missing {e}).") from None
    global_idx = tuple(i for i, s in enumerate(rel) if s[0] == 2 * grid - 1)
    windowed = [s[0] for s in rel if s[0] != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 14
    robust = "mask_decoder.custom_robust_token.weight" in keys
    found = Architecture(name="custom", image_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth, num_heads=embed_dim // head_dim, global_attn_indexes=global_idx,
                         window_size=window, prompt_dim=prompt_dim, decoder_depth=dec_depth,
                         decoder_mlp_dim=mlp_dim, robust_decoder=robust)
    for known in (VIT_B, TINY):
        candidate = replace(known, robust_decoder=robust)
        if replace(found, name=known.name, decoder_heads=known.decoder_heads) == candidate:
            return candidate
    vit = {1024: "ViT-L", 1280: "ViT-H"}.get(embed_dim)
    what = vit or f"an unsupported encoder (embed dim {embed_dim}, {depth} blocks, {grid * patch_size} px input)"
    raise CheckpointError(f"{path} is {what}; RobustMedSAM supports SAM ViT-B-family checkpoints only "
                          "(sam_vit_b, medsam_vit_b, robustsam_checkpoint_b, robustmedsam_best).")


def load_into(model: torch.nn.Module, state: StateDict, path: os.PathLike = "<memory>") -> None:
    """Load ``state`` into ``model`` strictly; a clear error lists missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{len(items)} {title} (e.g. {', '.join(items[:5])})")
        raise CheckpointError(f"{path} does not match the model: {'; '.join(parts)}. Is it a complete "
                              "checkpoint of this model family? `robustmedsam inspect FILE` shows what it holds.")
    model.load_state_dict(state, strict=True)


def group_summary(state: StateDict) -> Dict[str, Tuple[int, int]]:
    """``{prefix: (tensor count, element count)}`` for image_encoder/prompt_encoder/mask_decoder/other."""
    out: Dict[str, Tuple[int, int]] = {}
    for key, value in state.items():
        group = next((g.rstrip(".") for g in GROUPS if key.startswith(g)), "other")
        n, numel = out.get(group, (0, 0))
        out[group] = (n + 1, numel + value.numel())
    return out


def inspect_checkpoint(path: os.PathLike, with_sha256: bool = True) -> dict:
    """A JSON-able summary: format, size, sha256, groups, architecture (or why it is unsupported), metadata."""
    path = Path(path)
    kind = _sniff(path)
    state, metadata = read_checkpoint(path)
    info = {"file": str(path), "format": kind, "bytes": path.stat().st_size,
            "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "groups": {k: {"tensors": n, "elements": e} for k, (n, e) in group_summary(state).items()},
            "metadata": metadata}
    if with_sha256:
        info["sha256"] = sha256_of(path)
    try:
        arch = detect_architecture(state, path)
        info["architecture"] = arch.name
        info["decoder"] = "robust (RobustSAM)" if arch.robust_decoder else "SAM"
    except CheckpointError as e:
        info["architecture"] = None
        info["problem"] = str(e)
    return info


def fuse_state_dicts(encoder_state: StateDict, decoder_state: StateDict) -> StateDict:
    """Image + prompt encoder from ``encoder_state``, mask decoder from ``decoder_state``; shapes checked."""
    enc_arch = detect_architecture(encoder_state, "the encoder checkpoint")
    dec_arch = detect_architecture(decoder_state, "the decoder checkpoint")
    if (enc_arch.embed_dim, enc_arch.prompt_dim) != (dec_arch.embed_dim, dec_arch.prompt_dim):
        raise CheckpointError(f"encoder ({enc_arch.name}) and decoder ({dec_arch.name}) checkpoints have "
                              "different sizes and cannot be fused.")
    fused = {k: v for k, v in encoder_state.items() if k.startswith(("image_encoder.", "prompt_encoder."))}
    fused.update({k: v for k, v in decoder_state.items() if k.startswith("mask_decoder.")})
    detect_architecture(fused, "the fused checkpoint")
    return fused


def save_checkpoint(state: StateDict, path: os.PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a safetensors file atomically (temporary file + rename); metadata values must be strings."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: RobustMedSAM writes .safetensors files; use that extension.")
    if not path.parent.exists():
        raise CheckpointError(f"output folder {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e}") from None
    return path


def fuse_checkpoints(encoder: os.PathLike, decoder: os.PathLike, output: os.PathLike,
                     preprocessing: str = "sam", extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Module-wise fusion of two checkpoint files into a safetensors file recording its sources.

    Metadata: ``format``, ``encoder_source``/``encoder_sha256`` (image + prompt encoder),
    ``decoder_source``/``decoder_sha256`` (mask decoder), ``preprocessing``, ``decoder``, ``created``.
    """
    encoder, decoder, output = Path(encoder), Path(decoder), Path(output)
    enc_state, _ = read_checkpoint(encoder)
    dec_state, _ = read_checkpoint(decoder)
    fused = fuse_state_dicts(enc_state, dec_state)
    arch = detect_architecture(fused)
    metadata = {
        "format": FUSED_FORMAT,
        "architecture": arch.name,
        "decoder": "robust" if arch.robust_decoder else "sam",
        "preprocessing": preprocessing,
        "encoder_source": encoder.name, "encoder_sha256": sha256_of(encoder),
        "prompt_encoder_source": encoder.name,
        "decoder_source": decoder.name, "decoder_sha256": sha256_of(decoder),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata.update(extra_metadata or {})
    return save_checkpoint(fused, output, metadata)


def state_dict_shapes(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}

