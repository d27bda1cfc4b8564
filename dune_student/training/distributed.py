"""DDP plumbing of the trainer: process group set-up under ``torchrun`` and the one collective that makes every
rank take the same decisions.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def distributed_setup(device: torch.device) -> tuple[int, int]:
    """``(rank, world)``; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def summed_over_ranks(values: list[int], device: torch.device, world: int) -> list[int]:
    """``values`` summed over the DDP processes (one all-reduce; as given in a single process). Every rank
    must call it at the same point: decisions taken on its result (stop, skip) are then the same on all."""
    if world == 1:
        return values
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()
