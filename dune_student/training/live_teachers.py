"""The live-teacher baseline (``live_teachers=true``): the cache's teachers run in the training loop on the same
clean crops the student sees, as DUNE does, instead of targets read from the cache."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dune_cache import CacheReader, create_teacher

from ..config import TrainConfig
from ..data.batches import TrainBatch
from ..errors import DataError

log = logging.getLogger("dune_student.training.trainer")  # its messages belong to the training log


def load_live_teachers(cfg: TrainConfig, reader: CacheReader, device: torch.device) -> dict[str, nn.Module]:
    """The cache's teachers, from checkpoints whose sha256 must equal the cache's provenance."""
    from dune_cache import checkpoint_sha256, file_sha256

    teachers = {}
    for t in reader.teachers:
        prov = reader.provenance[t]
        path = cfg.teacher_checkpoints.get(t)
        if path is None and prov["checkpoint"]["sha256"] == "random-weights":
            log.warning("teacher %s: the cache was extracted with random weights (speed tests only); the live "
                        "teacher gets other random weights, so its targets differ from the cache's", t)
            teachers[t] = create_teacher(prov["teacher"]["name"]).to(device)
            continue
        if path is None:
            raise DataError(f"teacher_checkpoints.{t}: required with live_teachers "
                            f"(the cache was made from {prov['checkpoint']['file']})")
        if checkpoint_sha256(Path(path), file_sha256) != prov["checkpoint"]["sha256"]:
            raise DataError(f"teacher_checkpoints.{t}: {path} is not the checkpoint the cache was made with "
                            f"(sha256 differs from {prov['checkpoint']['sha256']})")
        teachers[t] = create_teacher(prov["teacher"]["name"], path).to(device)
    return teachers


def live_targets(teachers: dict[str, nn.Module], batch: TrainBatch, student_patch: int, device: torch.device,
                 amp: bool) -> None:
    """Fill ``batch`` targets by running each teacher on the clean crops at ``S · p_t / p_s`` (DUNE)."""
    pixels = batch.clean_pixels.to(device, non_blocking=True)
    for t, teacher in teachers.items():
        size = pixels.shape[-1] * teacher.spec.patch_size // student_patch
        view = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 255)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                    enabled=amp and device.type == "cuda"):
            out = teacher(view)
        batch.cls[t] = out.cls.float().clone()
        batch.patch[t] = out.patch.float().clone()
    batch.mask = torch.ones(len(pixels), len(teachers), dtype=torch.bool, device=device)
