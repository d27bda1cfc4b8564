"""A trained run loaded for use: the student, its heads and standardiser rebuilt from ``checkpoint.pt``, and the
projection of pixels to each teacher's (de-standardised) features.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dune_cache import CacheReader, CheckpointError, load_state_dict_strict

from ..config import TrainConfig, set_field
from ..errors import DataError, RunCheckpointError
from ..loss.standardize import Standardizer
from ..model.heads import TeacherHeads
from ..model.student import Student
from .checkpoint import read_run_checkpoint


@dataclass
class LoadedRun:
    cfg: TrainConfig
    student: Student
    heads: TeacherHeads
    standardizer: Standardizer
    teachers: list[str]
    resolution: int
    provenance: dict
    step: int


def config_from_dict(data: dict) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in data.items():
        set_field(cfg, key, value)
    return cfg


def placeholder_stats(dim: int) -> types.SimpleNamespace:
    """Statistics of the right shapes, overwritten by the checkpoint's standardiser buffers."""
    zeros, ones = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    return types.SimpleNamespace(cls_mean=zeros, cls_std=ones, patch_mean=zeros, patch_std=ones, phis_mean=zeros,
                                 phis_matrix=np.eye(dim, dtype=np.float32))


def load_run(checkpoint: str | Path, device: torch.device) -> LoadedRun:
    """Student, heads and standardiser of a training checkpoint (read with ``weights_only=True``: nothing in it runs),
    in eval mode on ``device``. A file that is no checkpoint, or whose weights do not fit the modules its config
    builds, is a :class:`RunCheckpointError` naming the file and the mismatch."""
    path = Path(checkpoint)
    ckpt = read_run_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
        dims, grids = ckpt["dims"], {t: tuple(g) for t, g in ckpt["grids"].items()}
        student = Student(cfg.student, device=device)
        heads = TeacherHeads(student, {t: (dims[t], grids[t]) for t in ckpt["teachers"]}, cfg.heads)
        standardizer = Standardizer(dims, {t: placeholder_stats(dims[t]) for t in dims}, mode=cfg.loss.standardize)
        for name, module in (("student", student), ("heads", heads), ("standardizer", standardizer)):
            load_state_dict_strict(module, ckpt[name], f"{path} ({name})")
    except CheckpointError as exc:
        raise RunCheckpointError(f"{exc}. The modules were built as the checkpoint's own config describes them "
                                 f"(student: {ckpt['config'].get('student')}; heads: {ckpt['config'].get('heads')}): "
                                 "was it edited, or written by another version?") from None
    except ValueError as exc:  # a ConfigError, or a value the modules refuse
        raise RunCheckpointError(f"{path}: its config does not describe a run this version can build: {exc}") \
            from None
    except (KeyError, TypeError, AttributeError) as exc:  # e.g. dims without a teacher of ``teachers``
        raise RunCheckpointError(f"{path}: its fields do not fit together ({type(exc).__name__}: {exc}); it was "
                                 "edited or damaged: use the run's own checkpoint.pt, or train again") from None
    for module in (student, heads, standardizer):
        module.to(device).eval()
    return LoadedRun(cfg, student, heads, standardizer, list(ckpt["teachers"]), int(ckpt["resolution"]),
                     ckpt["provenance"], int(ckpt["step"]))


def check_same_teachers(run: LoadedRun, reader: CacheReader) -> None:
    """The held-out cache must come from the run's teachers, checkpoints and resize mode."""
    problems = []
    for t in run.teachers:
        trained, held_out = run.provenance[t], reader.provenance[t]
        for section, key in (("teacher", "name"), ("checkpoint", "sha256"), ("geometry", "resize")):
            if trained[section][key] != held_out[section][key]:
                problems.append(f"{t}.{section}.{key}: run trained on {trained[section][key]!r}, "
                                f"eval cache has {held_out[section][key]!r}")
    if problems:
        raise DataError("eval cache does not match the run's teachers:\n  " + "\n  ".join(problems))


def project(run: LoadedRun, pixels: torch.Tensor, grids: dict[str, tuple[int, int]]
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 pixels ``(B, 3, S, S)`` on the run's device -> teacher -> projected (CLS ``(B, D_t)``, patch
    ``(B, h_t, w_t, D_t)`` on ``grids[teacher]``), in the run's standardised target space."""
    out = run.student(run.student.normalize(pixels), return_blocks=run.heads.needs_blocks)
    return run.heads(out, grids)
