"""Data parallelism through torch.distributed, launched with torchrun (gloo on CPU, NCCL on GPUs).

Every process builds the same model from the same seed and reads the same data; the rows of each optimizer
step are split by rank. DDP averages gradients over ranks, so each rank scales its loss (a sum over its tokens
divided by the token count of the whole global step) by the world size: the update equals one process running
the same global batch. Without torchrun's environment (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), torch.device(device)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters (frozen base weights are not communicated)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def all_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
