"""Where work runs: device choice, DataLoader worker counts and pinned host memory, shared by extraction and
training."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch


def pick_device(device: str) -> torch.device:
    """``"auto"``: this process's GPU (torchrun's ``LOCAL_RANK``) when CUDA is available, else CPU. A CUDA device
    becomes the process's current one (``torch.cuda.set_device``), so that everything it allocates without naming a
    device, NCCL's communicators and pinned-memory events land on it, not on GPU 0."""
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is not None:
        torch.cuda.set_device(chosen)
    return chosen


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: on CPU one (measured, docs/benchmarks.md: more workers steal cores from the
    model); on GPU this process's share of the cores (torchrun's LOCAL_WORLD_SIZE per node), at most 8."""
    if device.type == "cpu":
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def pinned(value: Any) -> Any:
    """``value`` with every tensor in it (also inside dicts, lists, tuples and dataclasses) copied to pinned host
    memory; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return pin_fields(value)
    if isinstance(value, dict):
        return {key: pinned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(pinned(item) for item in value)
    return value


def pin_fields(batch: Any) -> Any:
    """A copy of dataclass ``batch`` whose tensor fields (and tensors inside its dict/list fields) are pinned."""
    return dataclasses.replace(batch, **{f.name: pinned(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
