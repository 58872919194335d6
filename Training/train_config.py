"""Options of a training run (:class:`TrainConfig`), the checks made before training starts, the output
folder and the data the options name."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from Training import datasets as D
from Training.cli_common import ensure_output_folder, require_objects, sources_from

STATE_FILE = "training_state.pt"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapters.safetensors"
LOG_FILE = "log.csv"
CONFIG_FILE = "config.json"
GRADS_FILE = "grads_step1.safetensors"
OUTPUTS = (STATE_FILE, MODEL_FILE, ADAPTER_FILE, LOG_FILE, CONFIG_FILE, GRADS_FILE)


class TrainingError(ValueError):
    """Bad input or output options, found before training starts."""


@dataclass
class TrainConfig:
    # model
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    seeded_tiny: bool = False
    offline: bool = False
    # data
    npz: List[str] = field(default_factory=list)
    images: List[str] = field(default_factory=list)
    masks: List[str] = field(default_factory=list)
    split: str = "train"
    category: Optional[str] = None
    npz_size: int = 256
    npz_root: Optional[str] = None
    download: bool = False
    mask_suffix: str = ""
    slice_axis: int = 0
    modality: Optional[str] = None
    window: Optional[str] = None
    val_split: Optional[str] = None
    val_images: List[str] = field(default_factory=list)
    val_masks: List[str] = field(default_factory=list)
    label_mode: str = "semantic"
    train_size: int = 512
    num_points: int = 3
    bbox_shift: int = 20
    severity: int = 3
    corruptions: Optional[List[str]] = None
    prompt: str = "points"
    # objective
    objective: str = "robust"
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    token_weight: float = 2.0
    feature_weight: float = 100.0
    detach_clean: bool = False
    sub_iterations: int = 8
    mask_prob: float = 0.5
    adapters: bool = False
    adapter_ratio: float = 0.25
    # optimisation
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "step"
    step_size: int = 10
    gamma: float = 0.1
    clip_grad: float = 1.0
    amp: str = "auto"
    fixed_views: bool = False
    cache_embeddings: bool = False
    cache_dtype: str = "float32"
    # run
    output: str = "runs/robustmedsam"
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    checkpoint_every: int = 0
    stop_after_steps: int = 0
    progress: bool = True
    save_grads: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def check_config(cfg: TrainConfig) -> None:
    """Option errors that need no file access."""
    starts = [bool(cfg.model), bool(cfg.checkpoint), cfg.seeded_tiny]
    if sum(starts) == 0:
        raise TrainingError("choose the model to start from: --model NAME, --checkpoint FILE or --seeded-tiny")
    if cfg.seeded_tiny and (cfg.model or cfg.checkpoint):
        raise TrainingError("--seeded-tiny cannot be combined with --model/--checkpoint")
    if cfg.resume and cfg.overwrite:
        raise TrainingError("--resume and --overwrite exclude each other")
    for name in ("epochs", "batch_size", "train_size", "num_points", "sub_iterations"):
        if getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.lr <= 0:
        raise TrainingError("--lr must be positive")
    if not 0.0 <= cfg.mask_prob <= 1.0:
        raise TrainingError("--mask-prob must be between 0 and 1")
    if cfg.adapters and cfg.cache_embeddings:
        raise TrainingError("--cache-embeddings cannot be used with --adapters (the encoder changes while training)")


def check_output(cfg: TrainConfig) -> Path:
    """The output folder exists (created) and is writable; earlier outputs are kept unless allowed."""
    out = Path(cfg.output)
    ensure_output_folder(out, TrainingError)
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if cfg.resume:
        if not (out / STATE_FILE).is_file():
            raise TrainingError(f"--resume: no {STATE_FILE} in {out} to resume from")
    elif existing and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds outputs of a run ({', '.join(existing)}); pass --overwrite to "
                              "replace them or --resume to continue that run")
    return out


def build_data(cfg: TrainConfig, val: bool = False) -> List[D.Source]:
    """The training sources (some image must hold an object), or the validation sources ([] without any)."""
    if val:
        if not (cfg.val_split or cfg.val_images):
            return []
        return sources_from(cfg, npz=cfg.npz if cfg.val_split else (), images=cfg.val_images,
                            masks=cfg.val_masks, split=cfg.val_split or "val")
    sources = sources_from(cfg, npz=cfg.npz, images=cfg.images, masks=cfg.masks, split=cfg.split)
    require_objects(sources)
    return sources


def pair_config(cfg: TrainConfig) -> D.PairConfig:
    return D.PairConfig(train_size=cfg.train_size, num_points=cfg.num_points, bbox_shift=cfg.bbox_shift,
                        label_mode=cfg.label_mode, severity=cfg.severity, corruptions=cfg.corruptions,
                        fixed_views=cfg.fixed_views or cfg.cache_embeddings, seed=cfg.seed)
