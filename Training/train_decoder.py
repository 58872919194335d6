"""Fine-tune the RobustSAM mask decoder on clean/degraded pairs (RobustMedSAM training).

Usage (one process, or one per GPU/CPU shard with torchrun)::

    python Training/train_decoder.py --checkpoint fused.safetensors --npz kvasir --npz busi --output runs/a
    torchrun --nproc_per_node 4 Training/train_decoder.py --model robustmedsam --images imgs --masks masks \\
        --output runs/b --batch-size 2 --epochs 10 --lr 5e-4
    python Training/train_decoder.py ... --output runs/a --resume      # continue a stopped run exactly

What is trained (RobustSAM ``engine.py`` / RobustMedSAM): the image encoder and prompt encoder are frozen
and run under ``no_grad``; the mask decoder is trained with Adam (weight decay 1e-5), gradient clipping at
1.0 and NaN gradients zeroed, as the official code. Each sample runs the decoder twice: the **clean** image
through the SAM path (``clear=True``) and the **degraded** image through the robust path; the loss is
``losses.robust_objective`` (focal 20 + Dice 1 against the ground truth on the degraded branch, token MSE 2 and
mask-feature MSE 100 between the branches, gradients through both branches as in the official code). The SAM
path's ``output_hypernetworks_mlps`` and (except for the iterative objective) ``iou_prediction_head`` get no
gradient in the official objective; they are frozen here, which changes nothing but lets DDP run without
``find_unused_parameters``. ``--objective iterative`` replaces the mask terms by MedicoSAM's iterative
prompting loss (see ``losses``): the degraded branch is decoded ``--sub-iterations`` times, each time with one
more positive point from the false negatives and one negative point from the false positives (seeded per
sample and sub-iteration); whether the previous logits are also given as a mask prompt is drawn once per
step with ``--mask-prob`` (micro-sam's multi-GPU rule, zero logits in the first sub-iteration), so one
process and ``torchrun`` agree; the token/feature consistency terms use the first sub-iteration.
``--adapters`` adds trainable encoder adapters (``adapters``).

Determinism and resume: every random choice of a sample is seeded by (seed, epoch, dataset index), every
per-step choice by (seed, epoch, step); the sample order is ``DistributedSampler``'s (also with one process),
so a run is reproducible and a global batch is the same set whatever the number of processes. The state
(decoder/adapter weights with BatchNorm buffers, optimizer, scheduler, grad scaler, RNG states, epoch, step,
configuration) is written atomically at the end of every epoch and every ``--checkpoint-every`` steps;
``--resume`` restarts from it, skipping the batches already done, and ends bit-identical to an uninterrupted run.

BatchNorm under DDP: the robust decoder's BatchNorm layers normalise every sample with its own statistics in
training (``robust_blocks``), so gradients do not depend on how samples are split across processes; only the
running statistics would (each process would update them with its shard only). Buffers are therefore not
broadcast; after every step the per-sample statistics of all processes are gathered and the running
statistics recomputed in the global sample order, which equals one process over the global batch.

Outputs in ``--output``: ``model.safetensors`` (full model in the official key layout, metadata
``preprocessing``, base checkpoint and sha256s; loads with ``load_model(checkpoint=...)`` and the CLI),
``adapters.safetensors`` (with ``--adapters``), ``training_state.pt``, ``log.csv``, ``config.json`` and
TensorBoard logs under ``tensorboard/`` when tensorboard is installed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Training import datasets as D  # noqa: E402
from Training import losses as L  # noqa: E402

log = logging.getLogger("robustmedsam.train")

STATE_FILE = "training_state.pt"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapters.safetensors"
LOG_FILE = "log.csv"
CONFIG_FILE = "config.json"
GRADS_FILE = "grads_step1.safetensors"
OUTPUTS = (STATE_FILE, MODEL_FILE, ADAPTER_FILE, LOG_FILE, CONFIG_FILE, GRADS_FILE)
STATE_FORMAT = "robustmedsam-train-state/1"
TRAINED_FORMAT = "robustmedsam-trained/1"
EXIT_STOPPED = 75  # --stop-after-steps
PROMPTS = ("points", "box", "points+box", "alternate")
LOG_FIELDS = ["phase", "epoch", "step", "lr", "total", "focal", "dice", "token", "feature", "mask", "iou",
              "grad_norm", "seconds"]
# options that may change between a run and its resumption
RESUME_FREE = {"output", "resume", "overwrite", "stop_after_steps", "checkpoint_every", "workers", "progress",
               "device", "save_grads", "offline"}


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


# ================================================================================================ options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_decoder.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model to start from (one of)")
    g.add_argument("--model", help="named model with a RobustSAM decoder (robustmedsam, robustsam)")
    g.add_argument("--checkpoint", help="checkpoint file with a RobustSAM decoder (e.g. from `robustmedsam fuse`)")
    g.add_argument("--seeded-tiny", action="store_true", help="tiny seeded test model (tests, smoke runs)")
    g.add_argument("--offline", action="store_true", help="never download weights")
    g = p.add_argument_group("data")
    g.add_argument("--npz", action="append", default=[], help="MedSegBench .npz file or dataset name (repeat)")
    g.add_argument("--images", action="append", default=[], help="images folder (repeat, paired with --masks)")
    g.add_argument("--masks", action="append", default=[], help="masks folder matched to --images by file stem")
    g.add_argument("--split", default="train", choices=D.SPLITS, help="MedSegBench split to train on")
    g.add_argument("--category", help="MedSegBench sub-category (C1, C2, ...)")
    g.add_argument("--npz-size", type=int, default=256, help="MedSegBench image size for dataset names")
    g.add_argument("--npz-root", help="folder of MedSegBench files ($MEDSEGBENCH_ROOT or ~/.medsegbench)")
    g.add_argument("--download", action="store_true", help="download missing MedSegBench files (needs medsegbench)")
    g.add_argument("--mask-suffix", default="", help="mask stem = image stem + this (e.g. _mask)")
    g.add_argument("--slice-axis", type=int, default=0, choices=[0, 1, 2], help="3D volumes: array axis to slice")
    g.add_argument("--modality", help="3D volumes: CT, MR or other (default: guessed)")
    g.add_argument("--window", help="CT window preset or LEVEL,WIDTH")
    g.add_argument("--val-split", choices=D.SPLITS, help="also report the loss on this MedSegBench split")
    g.add_argument("--val-images", action="append", default=[], help="validation images folder")
    g.add_argument("--val-masks", action="append", default=[], help="validation masks folder")
    g.add_argument("--label-mode", default="semantic", choices=D.LABEL_MODES, help="how labels become objects")
    g.add_argument("--train-size", type=int, default=512, help="images and masks are resized to this square")
    g.add_argument("--num-points", type=int, default=3, help="positive points per object")
    g.add_argument("--bbox-shift", type=int, default=20, help="max random box enlargement per side (px)")
    g.add_argument("--severity", type=int, default=3, help="corruption severity")
    g.add_argument("--corruptions", nargs="+", help="degradation choices (default: clear + the 12 corruptions)")
    g.add_argument("--prompt", default="points", choices=PROMPTS,
                   help="training prompt (paper: points); alternate = points and box on alternating steps")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="robust", choices=["robust", "iterative"])
    g.add_argument("--focal-weight", type=float, default=20.0)
    g.add_argument("--dice-weight", type=float, default=1.0)
    g.add_argument("--token-weight", type=float, default=2.0)
    g.add_argument("--feature-weight", type=float, default=100.0)
    g.add_argument("--detach-clean", action="store_true", help="no gradient through the clean branch")
    g.add_argument("--sub-iterations", type=int, default=8, help="iterative objective: prompt refinements")
    g.add_argument("--mask-prob", type=float, default=0.5, help="iterative objective: mask-prompt probability")
    g.add_argument("--adapters", action="store_true", help="train bottleneck adapters in the image encoder")
    g.add_argument("--adapter-ratio", type=float, default=0.25)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=4, help="samples per process and step")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper 5e-4, code default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-5)
    g.add_argument("--scheduler", default="step", choices=["step", "cosine", "none"])
    g.add_argument("--step-size", type=int, default=10, help="step scheduler: epochs between decays")
    g.add_argument("--gamma", type=float, default=0.1, help="step scheduler: decay factor")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision; auto = on CUDA (bf16 if supported, else fp16 with loss scaling)")
    g.add_argument("--fixed-views", action="store_true",
                   help="one degraded view per sample for the whole run (corruptions precomputed once, as the paper)")
    g.add_argument("--cache-embeddings", action="store_true",
                   help="keep encoder outputs in memory (implies --fixed-views)")
    g.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    g.add_argument("--resume", action="store_true", help="continue the run in --output")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also save the state every N steps")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="exit abruptly (code 75) after N steps, for testing --resume")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--save-grads", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


# ================================================================================================ checks
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
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test"):
            pass
    except OSError as e:
        raise TrainingError(f"output folder {out} is not writable ({e.strerror or e})") from None
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if cfg.resume:
        if not (out / STATE_FILE).is_file():
            raise TrainingError(f"--resume: no {STATE_FILE} in {out} to resume from")
    elif existing and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds outputs of a run ({', '.join(existing)}); pass --overwrite to "
                              "replace them or --resume to continue that run")
    return out


def build_data(cfg: TrainConfig, val: bool = False) -> List[D.Source]:
    if val:
        if not (cfg.val_split or cfg.val_images):
            return []
        return D.build_sources(npz=cfg.npz if cfg.val_split else (), images=cfg.val_images, masks=cfg.val_masks,
                               split=cfg.val_split or "val", category=cfg.category, npz_size=cfg.npz_size,
                               npz_root=cfg.npz_root, download=cfg.download, mask_suffix=cfg.mask_suffix,
                               axis=cfg.slice_axis, modality=cfg.modality, window=_window(cfg.window))
    sources = D.build_sources(npz=cfg.npz, images=cfg.images, masks=cfg.masks, split=cfg.split,
                              category=cfg.category, npz_size=cfg.npz_size, npz_root=cfg.npz_root,
                              download=cfg.download, mask_suffix=cfg.mask_suffix, axis=cfg.slice_axis,
                              modality=cfg.modality, window=_window(cfg.window))
    if not any(s.candidates() for s in sources):
        raise D.DatasetError("the dataset is empty: no image with a non-empty mask in "
                             + ", ".join(s.name for s in sources))
    return sources


def _window(text: Optional[str]):
    if not text:
        return None
    if "," in text:
        level, width = (float(v) for v in text.split(","))
        return (level, width)
    return text


def pair_config(cfg: TrainConfig) -> D.PairConfig:
    return D.PairConfig(train_size=cfg.train_size, num_points=cfg.num_points, bbox_shift=cfg.bbox_shift,
                        label_mode=cfg.label_mode, severity=cfg.severity, corruptions=cfg.corruptions,
                        fixed_views=cfg.fixed_views or cfg.cache_embeddings, seed=cfg.seed)


# ================================================================================================ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(cfg: TrainConfig) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
    from RobustMedSAMLib.device import select_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, world_size=world, rank=rank)
    return Dist(rank, world, local, device)


class BatchNormSync:
    """Running statistics of :class:`SampleBatchNorm2d` under DDP equal to one process over the global batch.

    Forward pre-hooks record each sample's (mean, unbiased variance) exactly as the layer computes them; after
    the step the records of all ranks are gathered and the running statistics recomputed from the values
    before the step, in the global order (per decoder call: local sample j of rank r is global sample
    ``j * world + r``, the order of ``DistributedSampler``).
    """

    def __init__(self, module: nn.Module, dist: Dist) -> None:
        from RobustMedSAMLib.modeling.robust_blocks import SampleBatchNorm2d

        self.dist = dist
        self.layers = [m for m in module.modules() if isinstance(m, SampleBatchNorm2d) and m.track_running_stats]
        self.records: List[list] = [[] for _ in self.layers]
        self.snapshot: list = []
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._hook(i))

    def _hook(self, i: int):
        def record(module, inputs):
            if module.training:
                with torch.no_grad():
                    x = inputs[0]
                    n = x.shape[2] * x.shape[3]
                    mean = x.mean(dim=(2, 3))
                    var = x.var(dim=(2, 3), unbiased=False) * (n / max(n - 1, 1))
                    self.records[i].append((mean.detach().clone(), var.detach().clone()))
        return record

    def begin(self) -> None:
        self.records = [[] for _ in self.layers]
        self.snapshot = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                         for m in self.layers]

    def finish(self) -> None:
        if not self.layers:
            return
        local = [torch.stack([torch.stack([m, v]) for m, v in recs]) if recs else None for recs in self.records]
        flat = torch.cat([t.float().flatten() for t in local if t is not None]) if any(
            t is not None for t in local) else torch.zeros(0, device=self.dist.device)
        gathered = [torch.empty_like(flat) for _ in range(self.dist.world)]
        torch.distributed.all_gather(gathered, flat)
        offset = 0
        for layer, t, (rm, rv, nbt) in zip(self.layers, local, self.snapshot):
            if t is None:
                continue
            size = t.numel()
            per_rank = [g[offset: offset + size].view(t.shape) for g in gathered]  # (calls, 2, B, C)
            offset += size
            calls, _, batch, _ = t.shape
            with torch.no_grad():
                layer.running_mean.copy_(rm)
                layer.running_var.copy_(rv)
                mom = layer.momentum
                for c in range(calls):
                    for j in range(batch):
                        for r in range(self.dist.world):
                            mean, var = per_rank[r][c, 0, j], per_rank[r][c, 1, j]
                            layer.running_mean.mul_(1 - mom).add_(mom * mean.to(rm.dtype))
                            layer.running_var.mul_(1 - mom).add_(mom * var.to(rv.dtype))
                layer.num_batches_tracked.copy_(nbt + calls * batch * self.dist.world)


# ================================================================================================ model
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
    """Decoder submodules that no term of the objective reaches (frozen; see module docstring)."""
    parts = ["output_hypernetworks_mlps"]
    if cfg.objective == "robust":
        parts.append("iou_prediction_head")
    if cfg.detach_clean or (cfg.token_weight == 0 and cfg.feature_weight == 0):
        parts.append("mask_tokens")  # only the clean branch reads them
    return parts


def select_trainable(model: nn.Module, cfg: TrainConfig) -> List[nn.Parameter]:
    model.requires_grad_(False)
    frozen = tuple(f"{p}." for p in frozen_decoder_parts(cfg))
    for name, p in model.mask_decoder.named_parameters():
        p.requires_grad_(not (name + ".").startswith(frozen) and not name.startswith(frozen))
    if cfg.adapters:
        from Training.adapters import add_adapters

        add_adapters(model, cfg.adapter_ratio)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module, cfg: TrainConfig) -> Dict[str, torch.Tensor]:
    """Everything training changes: decoder parameters and buffers, and the adapters."""
    state = {f"mask_decoder.{k}": v for k, v in model.mask_decoder.state_dict().items()}
    if cfg.adapters:
        from Training.adapters import adapter_state_dict

        state.update(adapter_state_dict(model))
    return state


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


class TrainStep(nn.Module):
    """One training forward: (cached) encodings -> decoder branches -> loss terms. Wrapped by DDP."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, frame) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.frame = frame
        self.weights = L.LossWeights(cfg.focal_weight, cfg.dice_weight, cfg.token_weight, cfg.feature_weight)
        self.scale_xy = torch.as_tensor(frame.scale_xy, dtype=torch.float32)

    def encode(self, images: torch.Tensor):
        with torch.set_grad_enabled(self.cfg.adapters and torch.is_grad_enabled()):
            return self.model.image_encoder(images)

    def _prompt_embeddings(self, points, boxes, masks):
        with torch.no_grad():  # frozen prompt encoder
            return self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def decode(self, emb, early, points, boxes, robust: bool, masks=None, multimask=False, features=None):
        sparse, dense = self._prompt_embeddings(points, boxes, masks)
        return self.model.mask_decoder(emb, self.model.prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                                       robust=robust, image_features=features, early_features=early,
                                       return_features=True)

    def forward(self, enc: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], kind: str,
                use_mask: bool, epoch: int) -> Dict[str, torch.Tensor]:
        if enc.get("deg_emb") is None:
            enc = dict(enc)
            enc["deg_emb"], enc["deg_early"] = self.encode(batch["degraded"])
            enc["clean_emb"], enc["clean_early"] = self.encode(batch["clean"])
        points = (batch["points"], batch["point_labels"]) if kind in ("points", "points+box") else None
        boxes = batch["box"] if kind in ("box", "points+box") else None
        target = batch["mask"]
        need_clean = self.cfg.token_weight != 0 or self.cfg.feature_weight != 0
        if self.cfg.objective == "robust":
            deg = self.decode(enc["deg_emb"], enc["deg_early"], points, boxes, robust=True)
            clean = self.decode(enc["clean_emb"], enc["clean_early"], points, boxes, robust=False) if need_clean \
                else None
            logits = self.frame.logits_to_image(deg.masks)
            return L.robust_objective(logits, target, deg.tokens, clean.tokens if clean else None,
                                      deg.mask_features, clean.mask_features if clean else None,
                                      self.weights, self.cfg.detach_clean)
        return self._iterative(enc, batch, points, boxes, target, kind, use_mask, epoch, need_clean)

    def _iterative(self, enc, batch, points, boxes, target, kind, use_mask, epoch, need_clean):
        cfg = self.cfg
        features = self.model.mask_decoder.image_features(enc["deg_emb"], enc["deg_early"], robust=True)
        b = target.shape[0]
        m = self.model.architecture.mask_size
        masks = target.new_zeros((b, 1, m, m)) if use_mask else None  # micro-sam multi-GPU: zeros first
        totals = {"mask": 0.0, "iou": 0.0}
        consistency = {"token": target.new_zeros(()), "feature": target.new_zeros(())}
        n = cfg.sub_iterations
        for s in range(n):
            multimask = s == 0 and kind == "points"
            out = self.decode(enc["deg_emb"], None, points, boxes, robust=True, masks=masks, multimask=multimask,
                              features=features)
            logits = self.frame.logits_to_image(out.masks)
            terms = L.min_dice_iou_loss(logits, out.iou, target)
            totals["mask"] = totals["mask"] + terms["mask"] / n
            totals["iou"] = totals["iou"] + terms["iou"] / n
            if s == 0 and need_clean:
                clean = self.decode(enc["clean_emb"], enc["clean_early"], points, boxes, robust=False,
                                    multimask=multimask)
                deg_tokens = out.tokens
                c_tokens = clean.tokens.detach() if cfg.detach_clean else clean.tokens
                c_feat = clean.mask_features.detach() if cfg.detach_clean else clean.mask_features
                consistency = {"token": nn.functional.mse_loss(deg_tokens, c_tokens),
                               "feature": nn.functional.mse_loss(out.mask_features, c_feat)}
            if s < n - 1:
                with torch.no_grad():
                    best = out.iou.argmax(dim=1)
                    rows = torch.arange(b, device=best.device)
                    pred = (logits[rows, best] > 0).cpu().numpy()
                    gt = target.bool().cpu().numpy()
                    new_pts, new_lbl = [], []
                    for i in range(b):
                        rng = np.random.default_rng([cfg.seed, epoch, int(batch["index"][i]), 100 + s])
                        p, lab = L.corrective_points(pred[i], gt[i], rng)
                        new_pts.append(p)
                        new_lbl.append(lab)
                    dev = target.device
                    pts = torch.as_tensor(np.stack(new_pts), dtype=torch.float32, device=dev) * self.scale_xy.to(dev)
                    lbl = torch.as_tensor(np.stack(new_lbl), dtype=torch.int64, device=dev)
                    if points is None:
                        points = (pts, lbl)
                    else:
                        points = (torch.cat([points[0], pts], 1), torch.cat([points[1], lbl], 1))
                    masks = out.masks[rows, best].unsqueeze(1).detach() if use_mask else None
        total = (totals["mask"] + totals["iou"] + self.weights.token * consistency["token"]
                 + self.weights.feature * consistency["feature"])
        return {"mask": totals["mask"], "iou": totals["iou"], "token": consistency["token"],
                "feature": consistency["feature"], "total": total}


# ================================================================================================ state
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tensor_digest(state: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        if k.startswith(tuple(prefixes)):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class CsvLog:
    """``log.csv``: one row per step (train) and per epoch (val); on resume rows after the state are dropped."""

    def __init__(self, path: Path, keep_until_step: Optional[int]) -> None:
        self.path = path
        rows = []
        if keep_until_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow(r)
        self.file.flush()

    def write(self, row: Dict[str, object]) -> None:
        self.writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()
                              if k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard logs (the CSV log is written)")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# ================================================================================================ training
@dataclass
class TrainResult:
    output: Path
    model_path: Path
    adapter_path: Optional[Path]
    global_step: int
    last_loss: float


def make_lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "none":
        return lambda step: 1.0
    if cfg.scheduler == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return lambda step: cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_size))


def epoch_batches(sampler, epoch: int, batch_size: int) -> List[List[int]]:
    """This process's batches of ``epoch`` (incomplete last batch dropped, as the official loader)."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    n = len(indices) // batch_size
    return [indices[i * batch_size:(i + 1) * batch_size] for i in range(n)]


def _reduce_mean(values: Dict[str, float], dist: Dist) -> Dict[str, float]:
    if not dist.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / dist.world for k, v in zip(keys, t.tolist())}


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured (see module docstring); every input problem is raised before training starts."""
    check_config(cfg)
    dist = init_distributed(cfg)
    try:
        return _train(cfg, dist)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist) -> TrainResult:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    out = check_output(cfg)
    sources = build_data(cfg)
    val_sources = build_data(cfg, val=True)
    state = None
    if cfg.resume:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        _check_resume(cfg, state, dist)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    loaded, base_name, base_sha = load_start_model(cfg)
    model = loaded.model
    params = select_trainable(model, cfg)
    prep = loaded.config.preprocessing
    pairs = D.TrainingPairs(sources, prep, pair_config(cfg))
    val_pairs = D.TrainingPairs(val_sources, prep, pair_config(cfg)) if val_sources else None
    sampler = DistributedSampler(pairs, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(epoch_batches(sampler, 0, cfg.batch_size))
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(pairs)} training samples are fewer than one global batch "
                            f"({cfg.batch_size} x {dist.world} processes); lower --batch-size")
    if dist.main and cfg.overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    dist.barrier()

    model.to(dist.device)
    model.eval()
    model.mask_decoder.train()  # per-sample BatchNorm statistics, as the official training
    amp_dtype = None
    if cfg.amp in ("bf16", "fp16") or (cfg.amp == "auto" and dist.device.type == "cuda"):
        if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
            amp_dtype = torch.float16
        else:
            amp_dtype = torch.bfloat16
        _float32_fft(model.mask_decoder)
    use_scaler = amp_dtype == torch.float16 and dist.device.type == "cuda"
    if hasattr(torch.amp, "GradScaler"):
        scaler = torch.amp.GradScaler(dist.device.type, enabled=use_scaler)
    else:  # torch < 2.3
        scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)

    step_module = TrainStep(model, cfg, pairs.frame)
    bn_sync = None
    runner: nn.Module = step_module
    if dist.enabled:
        bn_sync = BatchNormSync(model.mask_decoder, dist)
        with warnings.catch_warnings():  # broadcast_buffers=False is what we want (see module docstring)
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            runner = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                broadcast_buffers=False)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch))
    start_epoch, start_step, global_step = 0, 0, 0
    if state is not None:
        _restore(model, cfg, optimizer, scheduler, scaler, state)
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        log.info("resuming at epoch %d, step %d (global step %d)", start_epoch, start_step, global_step)
    if dist.main:
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
    csv_log = CsvLog(out / LOG_FILE, global_step if state is not None else None) if dist.main else None
    tb = _tensorboard(out) if dist.main else None
    bar = _progress(cfg.epochs * steps_per_epoch, global_step, cfg.progress and dist.main)
    cache: Dict[int, tuple] = {}
    cache_dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    last_loss = float("nan")

    def save_state(epoch: int, step_in_epoch: int) -> None:
        if dist.main:
            _atomic_torch_save({
                "format": STATE_FORMAT,
                "trainable": {k: v.detach().cpu() for k, v in trainable_state(model, cfg).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "rng": _rng_state(), "config": cfg.to_json(), "world_size": dist.world}, out / STATE_FILE)
        dist.barrier()

    for epoch in range(start_epoch, cfg.epochs):
        pairs.set_epoch(epoch)
        batches = epoch_batches(sampler, epoch, cfg.batch_size)
        first = start_step if epoch == start_epoch else 0
        loader = DataLoader(pairs, batch_sampler=batches[first:], num_workers=cfg.workers,
                            persistent_workers=False)
        for step_in_epoch, batch in enumerate(loader, start=first):
            t0 = time.time()
            batch = {k: (v.to(dist.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            step_rng = np.random.default_rng([cfg.seed, epoch, step_in_epoch, 3])
            kind = cfg.prompt
            if kind == "alternate":
                kind = "points" if global_step % 2 == 0 else "box"
            use_mask = cfg.objective == "iterative" and bool(step_rng.random() < cfg.mask_prob)
            enc = _encodings(step_module, batch, cache, cfg, cache_dtype, dist.device)
            if bn_sync is not None:
                bn_sync.begin()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dist.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                terms = runner(enc, batch, kind, use_mask, epoch)
            scaler.scale(terms["total"]).backward()
            scaler.unscale_(optimizer)
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0)  # the official code zeroes NaN gradients
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if cfg.save_grads and global_step == 0 and dist.main:
                _save_grads(model, out)
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if bn_sync is not None:
                bn_sync.finish()
            global_step += 1
            values = _reduce_mean({k: float(v.detach()) for k, v in terms.items()}, dist)
            last_loss = values["total"]
            if dist.main:
                row = dict(values, phase="train", epoch=epoch, step=global_step, lr=lr, grad_norm=grad_norm,
                           seconds=round(time.time() - t0, 3))
                csv_log.write(row)
                if tb is not None:
                    for k, v in values.items():
                        tb.add_scalar(f"train/{k}", v, global_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.4f}", epoch=epoch)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch + 1 < len(batches):
                save_state(epoch, step_in_epoch + 1)
            if cfg.stop_after_steps and global_step >= cfg.stop_after_steps:
                dist.barrier()
                if bar is not None:
                    bar.close()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_STOPPED)  # abrupt, like a killed job: nothing more is written
        save_state(epoch + 1, 0)
        if val_pairs is not None:
            values = _validate(step_module, val_pairs, cfg, dist)
            if dist.main:
                csv_log.write(dict(values, phase="val", epoch=epoch, step=global_step))
                if tb is not None:
                    for k, v in values.items():
                        tb.add_scalar(f"val/{k}", v, global_step)
        start_step = 0
    if bar is not None:
        bar.close()
    if csv_log is not None:
        csv_log.close()
    if tb is not None:
        tb.close()
    model_path, adapter_path = out / MODEL_FILE, None
    if dist.main:
        model_path, adapter_path = write_outputs(model, cfg, loaded, base_name, base_sha, out, global_step, pairs)
    dist.barrier()
    return TrainResult(out, model_path, adapter_path, global_step, last_loss)


def _encodings(step: TrainStep, batch, cache, cfg: TrainConfig, dtype, device) -> Dict[str, torch.Tensor]:
    """Encoder outputs (no gradient): from the in-memory cache when enabled; computed in the step with adapters."""
    if cfg.adapters:
        return {}
    indices = [int(i) for i in batch["index"]]
    if cfg.cache_embeddings and all(i in cache for i in indices):
        parts = [cache[i] for i in indices]
        return {k: torch.stack([p[n] for p in parts]).to(device=device, dtype=torch.float32)
                for n, k in enumerate(("clean_emb", "clean_early", "deg_emb", "deg_early"))}
    with torch.no_grad():  # contiguous: the same memory layout as tensors served from the cache
        clean_emb, clean_early = (t.contiguous() for t in step.model.image_encoder(batch["clean"]))
        deg_emb, deg_early = (t.contiguous() for t in step.model.image_encoder(batch["degraded"]))
    if cfg.cache_embeddings:
        for n, i in enumerate(indices):
            cache[i] = tuple(t[n].detach().to("cpu", dtype) for t in (clean_emb, clean_early, deg_emb, deg_early))
    return {"clean_emb": clean_emb, "clean_early": clean_early, "deg_emb": deg_emb, "deg_early": deg_early}


def _validate(step: TrainStep, pairs: D.TrainingPairs, cfg: TrainConfig, dist: Dist) -> Dict[str, float]:
    """Mean loss on the validation samples (epoch-0 views; decoder in eval mode: running BatchNorm stats)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(pairs, num_replicas=dist.world, rank=dist.rank, shuffle=False)
    decoder = step.model.mask_decoder
    decoder.eval()
    sums: Dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for batch in DataLoader(pairs, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers):
            batch = {k: (v.to(dist.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            kind = "points" if cfg.prompt == "alternate" else cfg.prompt
            terms = step(_encodings(step, batch, {}, replace_cfg(cfg, cache_embeddings=False), torch.float32,
                                    dist.device), batch, kind, False, 0)
            n = int(batch["mask"].shape[0])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
    decoder.train()
    values = {k: v / max(count, 1) for k, v in sums.items()}
    return _reduce_mean(values, dist)


def replace_cfg(cfg: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def _save_grads(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(grads, str(out / GRADS_FILE))


def _check_resume(cfg: TrainConfig, state: dict, dist: Dist) -> None:
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{cfg.output}/{STATE_FILE} is not a training state of this trainer")
    saved = json.loads(state["config"])
    now = asdict(cfg)
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diffs:
        raise TrainingError("--resume with different options than the run being resumed: " + "; ".join(diffs))
    if int(state["world_size"]) != dist.world:
        raise TrainingError(f"the run was trained with {state['world_size']} processes; resume it with the same "
                            f"number (now {dist.world}) so the global batch and sample order stay the same")


def _restore(model, cfg, optimizer, scheduler, scaler, state) -> None:
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
    _set_rng_state(state["rng"])


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


# ================================================================================================ CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    from RobustMedSAMLib.checkpoints import CheckpointError

    try:
        result = train(cfg)
    except (TrainingError, D.DatasetError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"train_decoder: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {result.model_path}" + (f" and {result.adapter_path}" if result.adapter_path else "")
              + f" after {result.global_step} steps (last loss {result.last_loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
