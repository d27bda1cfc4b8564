"""DDP plumbing of the trainer: process group set-up under ``torchrun``, and the agreements that make every rank take
the same decisions without waiting for the GPU.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

_HOST_GROUP: dist.ProcessGroup | None = None  # gloo group for host-side agreements (no GPU synchronisation)


def distributed_setup(device: torch.device) -> tuple[int, int]:
    """``(rank, world)``; under torchrun initialises the process group (NCCL on CUDA, with a gloo group beside it for
    host-side flags)."""
    global _HOST_GROUP
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _HOST_GROUP = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def agreed_signal(received: int | None, world: int) -> int | None:
    """The stop signal every rank acts on after this step: SIGINT if any rank received one, else SIGTERM if any did,
    else ``None``. Under DDP one all-reduce of two host flags over a gloo group, which does not wait for the GPU;
    every rank must call it after every step."""
    flags = [received == signal.SIGINT, received == signal.SIGTERM]
    if world > 1:
        total = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(total, group=_HOST_GROUP)
        flags = [bool(v) for v in total.tolist()]  # a CPU tensor: no device synchronisation
    return signal.SIGINT if flags[0] else signal.SIGTERM if flags[1] else None


def skip_update(loss: torch.Tensor, grad_norm: torch.Tensor, world: int) -> torch.Tensor:
    """float32 ``()`` on the device, 1 where the step's update must be skipped (the fused optimiser's ``found_inf``):
    its gradient norm is not finite, or (one process) its loss. Under DDP the gradients, hence their norm, are
    already the same on every rank, so every rank skips alike without a collective."""
    bad = ~torch.isfinite(grad_norm)
    if world == 1:
        bad |= ~torch.isfinite(loss)
    return bad.float()
