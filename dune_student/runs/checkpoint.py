"""A run's ``checkpoint.pt``: which fields it holds and how it is read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RunCheckpointError

RUN_KEYS = ("config", "step", "teachers", "resolution", "dims", "grids", "provenance", "student", "heads",
            "standardizer")  # what a training checkpoint (RUN/checkpoint.pt) holds, among others


def read_run_checkpoint(path: Path) -> dict:
    """The contents of a training checkpoint; a file that is none is a :class:`RunCheckpointError` saying what
    it holds instead."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.load makes of a file that is not a checkpoint
        raise RunCheckpointError(f"{path} is not a training checkpoint: torch.load cannot read it "
                                 f"({type(exc).__name__}: {exc})") from None
    missing = [key for key in RUN_KEYS if key not in ckpt] if isinstance(ckpt, dict) else list(RUN_KEYS)
    if missing:
        held = (f"a dict with keys {', '.join(map(str, list(ckpt)[:12]))}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise RunCheckpointError(f"{path} is not a training checkpoint (RUN/checkpoint.pt of `dune-student train`): "
                                 f"it holds {held}, without {', '.join(missing)}")
    return ckpt
