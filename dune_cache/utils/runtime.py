"""Where work runs: device choice and DataLoader worker counts, shared by extraction and training."""
from __future__ import annotations

import os

import torch


def pick_device(device: str) -> torch.device:
    """``"auto"``: this process's GPU (torchrun's ``LOCAL_RANK``) when CUDA is available, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: on CPU one (measured, docs/benchmarks.md: more workers steal cores from the
    model); on GPU this process's share of the cores (torchrun's LOCAL_WORLD_SIZE per node), at most 8."""
    if device.type == "cpu":
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
