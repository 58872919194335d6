"""Fine-tune the RobustSAM mask decoder on clean/degraded pairs (RobustMedSAM training).

Usage (one process, or one per GPU/CPU shard with torchrun)::

    python Training/train_decoder.py --checkpoint fused.safetensors --npz kvasir --npz busi --output runs/a
    torchrun --nproc_per_node 4 Training/train_decoder.py --model robustmedsam --images imgs --masks masks \\
        --output runs/b --batch-size 2 --epochs 10 --lr 5e-4
    python Training/train_decoder.py ... --output runs/a --resume      # continue a stopped run exactly

The mask decoder (and with ``--adapters`` encoder adapters, ``adapters``) is trained with Adam (weight decay
1e-5), gradient clipping at 1.0 and NaN gradients zeroed, as RobustSAM's ``engine.py``; the encoders are
frozen. This file holds the command line and the training loop; the parts:

* ``train_config``: the options (:class:`TrainConfig`), their checks, the output folder, the data;
* ``train_model``: start model, trainable parameters, mixed precision, the trained model files;
* ``objectives``: the RobustMedSAM pair objective and iterative prompting (:class:`TrainStep`);
* ``distributed``: torchrun set-up, sample order, BatchNorm running statistics under DDP;
* ``train_state``: ``training_state.pt``, written atomically; ``--resume`` ends bit-identical to an
  uninterrupted run;
* ``train_logging``: ``log.csv``, TensorBoard, progress bar.

Every random choice of a sample is seeded by (seed, epoch, dataset index), every per-step choice by (seed,
epoch, step); the state is written at the end of every epoch and every ``--checkpoint-every`` steps.

Outputs in ``--output``: ``model.safetensors`` (full model in the official key layout, metadata
``preprocessing``, base checkpoint and sha256s; loads with ``load_model(checkpoint=...)`` and the CLI),
``adapters.safetensors`` (with ``--adapters``), ``training_state.pt``, ``log.csv``, ``config.json`` and
TensorBoard logs under ``tensorboard/`` when tensorboard is installed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Training import datasets as D  # noqa: E402
from Training.cli_common import add_source_args  # noqa: E402
from Training.distributed import (BatchNormSync, Dist, epoch_batches, init_distributed,  # noqa: E402
                                  reduce_mean, wrap_ddp)
from Training.objectives import TrainStep, prompt_kind  # noqa: E402
from Training.train_config import (CONFIG_FILE, GRADS_FILE, MODEL_FILE, OUTPUTS, STATE_FILE,  # noqa: E402
                                   TrainConfig, TrainingError, build_data, check_config, check_output, pair_config)
from Training.train_logging import RunLog  # noqa: E402
from Training.train_model import (load_start_model, mixed_precision, select_trainable,  # noqa: E402
                                  write_outputs)
from Training.train_state import load_state, restore, save_state  # noqa: E402

log = logging.getLogger("robustmedsam.train")

EXIT_STOPPED = 75  # --stop-after-steps
PROMPTS = ("points", "box", "points+box", "alternate")


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
    add_source_args(g, split="train", split_help="MedSegBench split to train on")
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
                   help="mixed precision; auto = on CUDA (bf16 where the GPU computes it natively, else fp16 with loss scaling)")
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


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured (see module docstring); every input problem is raised before training starts."""
    check_config(cfg)
    dist = init_distributed(cfg.device)
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
    state = load_state(out / STATE_FILE, cfg, dist.world) if cfg.resume else None
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
    amp_dtype, scaler = mixed_precision(cfg.amp, model, dist.device)
    step_module = TrainStep(model, cfg, pairs.frame)
    bn_sync = BatchNormSync(model.mask_decoder, dist) if dist.enabled else None
    runner = wrap_ddp(step_module, dist)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch))
    start_epoch, start_step, global_step = 0, 0, 0
    if state is not None:
        start_epoch, start_step, global_step = restore(model, cfg, optimizer, scheduler, scaler, state)
        log.info("resuming at epoch %d, step %d (global step %d)", start_epoch, start_step, global_step)
    if dist.main:
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
    run_log = RunLog(out, cfg.epochs * steps_per_epoch, global_step if state is not None else None,
                     cfg.progress, enabled=dist.main)
    cache: Optional[Dict[int, tuple]] = {} if cfg.cache_embeddings else None
    cache_dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    last_loss = float("nan")

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if dist.main:
            save_state(out / STATE_FILE, model, cfg, optimizer, scheduler, scaler, epoch, step_in_epoch,
                       global_step, dist.world)
        dist.barrier()

    for epoch in range(start_epoch, cfg.epochs):
        pairs.set_epoch(epoch)
        batches = epoch_batches(sampler, epoch, cfg.batch_size)
        first = start_step if epoch == start_epoch else 0
        loader = DataLoader(pairs, batch_sampler=batches[first:], num_workers=cfg.workers,
                            persistent_workers=False)
        for step_in_epoch, batch in enumerate(loader, start=first):
            t0 = time.time()
            batch = _to_device(batch, dist.device)
            step_rng = np.random.default_rng([cfg.seed, epoch, step_in_epoch, 3])
            kind = prompt_kind(cfg.prompt, global_step)
            use_mask = cfg.objective == "iterative" and bool(step_rng.random() < cfg.mask_prob)
            enc = step_module.encodings(batch, cache, cache_dtype)
            if bn_sync is not None:
                bn_sync.begin()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dist.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                terms = runner(enc, batch, kind, use_mask, epoch)
            grad_norm = _backward(terms["total"], params, optimizer, scaler)
            if cfg.save_grads and global_step == 0 and dist.main:
                _save_grads(model, out)
            lr = _optimizer_step(params, optimizer, scheduler, scaler, cfg.clip_grad)
            if bn_sync is not None:
                bn_sync.finish()
            global_step += 1
            values = reduce_mean({k: float(v.detach()) for k, v in terms.items()}, dist)
            last_loss = values["total"]
            run_log.train_step(values, epoch, global_step, lr, grad_norm, round(time.time() - t0, 3))
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch + 1 < len(batches):
                checkpoint(epoch, step_in_epoch + 1)
            if cfg.stop_after_steps and global_step >= cfg.stop_after_steps:
                dist.barrier()
                run_log.close_bar()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_STOPPED)  # abrupt, like a killed job: nothing more is written
        checkpoint(epoch + 1, 0)
        if val_pairs is not None:
            run_log.validation(_validate(step_module, val_pairs, cfg, dist), epoch, global_step)
        start_step = 0
    run_log.close()
    model_path, adapter_path = out / MODEL_FILE, None
    if dist.main:
        model_path, adapter_path = write_outputs(model, cfg, loaded, base_name, base_sha, out, global_step, pairs)
    dist.barrier()
    return TrainResult(out, model_path, adapter_path, global_step, last_loss)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _backward(total: torch.Tensor, params: List[nn.Parameter], optimizer, scaler) -> float:
    """Backward pass to unscaled gradients, NaNs zeroed (as the official code); their global norm."""
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0)
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _optimizer_step(params: List[nn.Parameter], optimizer, scheduler, scaler, clip_grad: float) -> float:
    """Clip, step the optimizer, scaler and scheduler; the learning rate the step used."""
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return lr


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
            batch = _to_device(batch, dist.device)
            terms = step(step.encodings(batch), batch, prompt_kind(cfg.prompt, 0), False, 0)
            n = int(batch["mask"].shape[0])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
    decoder.train()
    values = {k: v / max(count, 1) for k, v in sums.items()}
    return reduce_mean(values, dist)


def _save_grads(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(grads, str(out / GRADS_FILE))


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
