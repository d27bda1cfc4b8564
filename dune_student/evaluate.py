"""``dune-student eval``: per-teacher cosine fidelity of the projected student features on held-out images.

Fidelity = mean cosine similarity between the student's projected tokens and the teacher's cached
tokens, both in the run's standardised target space (what the loss optimises), for CLS and for
patch tokens (averaged over tokens, then images). Held-out images come from a cache extracted with
the same teachers and checkpoints (refused otherwise) over images the run did not train on.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dune_cache.images import load_pixels
from dune_cache.reader import CacheReader
from dune_cache.teachers.base import CheckpointError, load_state_dict_strict

from .config import TrainConfig, set_field
from .data import DataError, image_paths
from .heads import TeacherHeads
from .losses import Standardizer, use_cls_from_provenance
from .model import Student


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


RUN_KEYS = ("config", "step", "teachers", "resolution", "dims", "grids", "provenance", "student", "heads",
            "standardizer")  # what a training checkpoint (RUN/checkpoint.pt) holds, among others


class RunCheckpointError(ValueError):
    """A file is not a training checkpoint, or its weights do not fit the architecture its config describes."""


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


def load_run(checkpoint: str | Path, device: torch.device) -> LoadedRun:
    """Student, heads and standardiser of a training checkpoint, in eval mode on ``device``. A file that is no
    checkpoint, or whose weights do not fit the modules its config builds, is a :class:`RunCheckpointError` naming
    the file and the mismatch."""
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


@torch.inference_mode()
def fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
             batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{teacher: {"cls": mean cosine, "patch": mean cosine, "images": n}}`` over samples ``indices`` of
    ``reader`` (``paths[i]``: image of sample ``i``), the modules as they are (call ``.eval()`` first).
    ``cls`` is None for teachers whose CLS was not distilled (e.g. a mean-of-patches CLS)."""
    dev = next(run.student.parameters()).device
    sums = {t: {"cls": 0.0, "patch": 0.0, "images": 0} for t in run.teachers}
    size = (run.resolution, run.resolution)
    for lo in range(0, len(indices), batch_size):
        batch = np.asarray(indices[lo:lo + batch_size])
        pixels = torch.stack([torch.from_numpy(load_pixels(paths[i], size, "squash")) for i in batch]).to(dev)
        targets = reader.read(batch)
        preds = project(run, pixels, reader.grids)
        for k, t in enumerate(run.teachers):
            have = targets.mask[:, k].to(dev)
            cls_t, patch_t = run.standardizer.standardize(t, targets.cls[t].to(dev), targets.patch[t].to(dev))
            cls_cos = F.cosine_similarity(preds[t][0].float(), cls_t, dim=-1)
            patch_cos = F.cosine_similarity(preds[t][1].float(), patch_t, dim=-1).flatten(1).mean(dim=1)
            sums[t]["cls"] += float(cls_cos[have].sum())
            sums[t]["patch"] += float(patch_cos[have].sum())
            sums[t]["images"] += int(have.sum())
    distilled_cls = use_cls_from_provenance(run.provenance)
    return {t: {"cls": s["cls"] / max(s["images"], 1) if distilled_cls[t] else None,
                "patch": s["patch"] / max(s["images"], 1), "images": s["images"]} for t, s in sums.items()}


def evaluate(checkpoint: str | Path, cache: str, images: str, batch_size: int = 16, device: str = "cpu",
             backend: str = "auto") -> dict[str, dict[str, float]]:
    """:func:`fidelity` of a run's checkpoint over all images of the eval ``cache`` (files in ``images``)."""
    run = load_run(checkpoint, torch.device(device))
    reader = CacheReader(cache, run.teachers, backend)
    check_same_teachers(run, reader)
    return fidelity(run, reader, image_paths(reader, images), np.arange(len(reader)), batch_size)
