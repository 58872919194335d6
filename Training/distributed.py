"""torchrun set-up, the sample order of every process, and BatchNorm running statistics under DDP.

The sample order is ``DistributedSampler``'s (also with one process), so a global batch is the same set
whatever the number of processes. The robust decoder's BatchNorm layers normalise every sample with its own
statistics in training (``robust_blocks``), so gradients do not depend on how samples are split across
processes; only the running statistics would (each process would update them with its shard only). Buffers
are therefore not broadcast; after every step :class:`BatchNormSync` gathers the per-sample statistics of all
processes and recomputes the running statistics in the global sample order, which equals one process over
the global batch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn


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


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
    from RobustMedSAMLib.batch import shard_from_env
    from RobustMedSAMLib.device import select_device

    rank, world = shard_from_env()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, world_size=world, rank=rank)
    return Dist(rank, world, local, dev)


def wrap_ddp(module: nn.Module, dist: Dist) -> nn.Module:
    """``module`` in DistributedDataParallel without buffer broadcasts (see the module docstring); itself alone."""
    if not dist.enabled:
        return module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False)


def epoch_batches(sampler, epoch: int, batch_size: int) -> List[List[int]]:
    """This process's batches of ``epoch`` (incomplete last batch dropped, as the official loader)."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    n = len(indices) // batch_size
    return [indices[i * batch_size:(i + 1) * batch_size] for i in range(n)]


def reduce_mean(values: Dict[str, float], dist: Dist) -> Dict[str, float]:
    """The mean of each value over all processes."""
    if not dist.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / dist.world for k, v in zip(keys, t.tolist())}


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
