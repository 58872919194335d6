"""``training_state.pt``: everything ``--resume`` needs to continue a run bit-identically.

Every random choice of a sample is seeded by (seed, epoch, dataset index) and every per-step choice by
(seed, epoch, step); the state adds what is left: the trained tensors (decoder with its BatchNorm buffers,
adapters), optimizer, scheduler, grad scaler, the global RNG states, the position (epoch, step in epoch,
global step), the configuration and the number of processes. It is written atomically (temporary file,
fsync, rename) and read with ``torch.load(weights_only=True)``: it holds only tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

from Training.train_config import STATE_FILE, TrainConfig, TrainingError

STATE_FORMAT = "robustmedsam-train-state/1"
# options that may change between a run and its resumption
RESUME_FREE = {"output", "resume", "overwrite", "stop_after_steps", "checkpoint_every", "workers", "progress",
               "device", "save_grads", "offline"}


def trainable_state(model: nn.Module, cfg: TrainConfig) -> Dict[str, torch.Tensor]:
    """Everything training changes: decoder parameters and buffers, and the adapters."""
    state = {f"mask_decoder.{k}": v for k, v in model.mask_decoder.state_dict().items()}
    if cfg.adapters:
        from Training.adapters import adapter_state_dict

        state.update(adapter_state_dict(model))
    return state


def save_state(path: Path, model: nn.Module, cfg: TrainConfig, optimizer, scheduler, scaler, epoch: int,
               step_in_epoch: int, global_step: int, world: int) -> None:
    """Write the state of a run that continues at (``epoch``, ``step_in_epoch``)."""
    atomic_torch_save({
        "format": STATE_FORMAT,
        "trainable": {k: v.detach().cpu() for k, v in trainable_state(model, cfg).items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "rng": rng_state(), "config": cfg.to_json(), "world_size": world}, path)


def load_state(path: Path, cfg: TrainConfig, world: int) -> dict:
    """The state in ``path``, checked against the options and the number of processes of this run."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{cfg.output}/{STATE_FILE} is not a training state of this trainer")
    saved = json.loads(state["config"])
    now = asdict(cfg)
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diffs:
        raise TrainingError("--resume with different options than the run being resumed: " + "; ".join(diffs))
    if int(state["world_size"]) != world:
        raise TrainingError(f"the run was trained with {state['world_size']} processes; resume it with the same "
                            f"number (now {world}) so the global batch and sample order stay the same")
    return state


def restore(model: nn.Module, cfg: TrainConfig, optimizer, scheduler, scaler, state: dict) -> Tuple[int, int, int]:
    """Put ``state`` back into the model, optimizer, scheduler, scaler and RNGs; (epoch, step in epoch, global step)."""
    own = trainable_state(model, cfg)
    saved = state["trainable"]
    if set(own) != set(saved):
        raise TrainingError("the training state does not fit this model")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k].to(v.device, v.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["epoch"], state["step_in_epoch"], state["global_step"]


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) global RNG states in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
