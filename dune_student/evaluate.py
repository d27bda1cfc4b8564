"""``dune-student eval``: per-teacher cosine fidelity of the projected student features on held-out images.

Fidelity = mean cosine similarity between the student's projected tokens and the teacher's cached
tokens, both in the run's standardised target space (what the loss optimises), for CLS and for
patch tokens (averaged over tokens, then images). Held-out images come from a cache extracted with
the same teachers and checkpoints (refused otherwise) over images the run did not train on.

What a number means depends on the space: with ``channel`` standardisation the training set's mean target is
the origin, so a constant prediction equal to it scores 0 (in the raw teacher space the same constant scores
high, e.g. 0.88 CLS cosine on DINOv2-S, because every token shares a large mean). :func:`baseline_fidelity`
scores two baselines in the same space: a **random-init student** (student and heads of the run's architecture,
seeded initial weights) and the **mean training target** (per teacher, the mean standardised CLS target and the
mean standardised patch target *at each grid position* of the run's training cache: the best constant a student
that ignores its input could learn).
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


Predictor = Callable[[torch.Tensor, dict[str, tuple[int, int]]], dict[str, tuple[torch.Tensor, torch.Tensor]]]
# uint8 pixels (B, 3, S, S) on the run's device, teacher grids -> teacher -> (CLS (B, D_t), patch (B, h_t, w_t, D_t)),
# in the run's standardised target space (``project`` of a run, or a baseline)


@torch.inference_mode()
def per_image_fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
                       batch_size: int = 16, predict: Predictor | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{teacher: {"cls": (N,), "patch": (N,), "have": (N,) bool}}``: cosine of ``predict``'s (default: the run's
    projection) CLS and mean patch cosine per sample of ``indices`` (``paths[i]``: image of sample ``i``) to the
    teacher's standardised cached targets; ``have`` marks the samples the teacher has features of."""
    predict = predict or (lambda pixels, grids: project(run, pixels, grids))
    dev = next(run.student.parameters()).device
    parts = {t: {"cls": [], "patch": [], "have": []} for t in run.teachers}
    size = (run.resolution, run.resolution)
    for lo in range(0, len(indices), batch_size):
        batch = np.asarray(indices[lo:lo + batch_size])
        pixels = torch.stack([torch.from_numpy(load_pixels(paths[i], size, "squash")) for i in batch]).to(dev)
        targets = reader.read(batch)
        preds = predict(pixels, reader.grids)
        for k, t in enumerate(run.teachers):
            cls_t, patch_t = run.standardizer.standardize(t, targets.cls[t].to(dev), targets.patch[t].to(dev))
            parts[t]["cls"].append(F.cosine_similarity(preds[t][0].float(), cls_t, dim=-1).cpu())
            parts[t]["patch"].append(F.cosine_similarity(preds[t][1].float(), patch_t, dim=-1).flatten(1).mean(1).cpu())
            parts[t]["have"].append(targets.mask[:, k].cpu())
    return {t: {key: torch.cat(values).numpy() for key, values in p.items()} for t, p in parts.items()}


def fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
             batch_size: int = 16, predict: Predictor | None = None) -> dict[str, dict]:
    """``{teacher: {"cls": mean cosine, "patch": mean cosine, "images": n, "cls_per_image": [...],
    "patch_per_image": [...]}}`` over the samples of ``indices`` the teacher has features of (see
    :func:`per_image_fidelity`), the modules as they are (call ``.eval()`` first). ``cls`` is None for teachers
    whose CLS was not distilled (e.g. a mean-of-patches CLS)."""
    per_image = per_image_fidelity(run, reader, paths, indices, batch_size, predict)
    distilled_cls = use_cls_from_provenance(run.provenance)
    result = {}
    for t, r in per_image.items():
        have = r["have"]
        cls, patch = r["cls"][have].astype(float), r["patch"][have].astype(float)
        result[t] = {"cls": float(cls.mean()) if distilled_cls[t] and have.any() else None,
                     "patch": float(patch.mean()) if have.any() else 0.0, "images": int(have.sum()),
                     "cls_per_image": cls.tolist() if distilled_cls[t] else None, "patch_per_image": patch.tolist()}
    return result


def random_init_run(run: LoadedRun, dims: dict[str, int], seed: int) -> LoadedRun:
    """``run`` with its student and heads replaced by seeded random-init ones of the same architecture (eval mode)."""
    device = next(run.student.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        student = Student(run.cfg.student, device=device).eval()
        heads = TeacherHeads(student, {t: (dims[t], run.heads.grids[t]) for t in run.teachers}, run.cfg.heads).eval()
    fresh = copy.copy(run)
    fresh.student, fresh.heads = student, heads
    return fresh


@torch.inference_mode()
def mean_targets(run: LoadedRun, reader: CacheReader, batch_size: int = 64
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """teacher -> (mean standardised CLS target ``(D,)``, mean standardised patch target per grid position
    ``(h, w, D)``) over the samples of ``reader`` (the run's training cache) the teacher has features of."""
    sums = {t: [0.0, 0.0, 0] for t in run.teachers}
    for lo in range(0, len(reader), batch_size):
        batch = reader.read(np.arange(lo, min(lo + batch_size, len(reader))))
        for k, t in enumerate(run.teachers):
            have = batch.mask[:, k]
            cls, patch = run.standardizer.standardize(t, batch.cls[t][have], batch.patch[t][have])
            cls_sum, patch_sum, count = sums[t]
            sums[t] = [cls_sum + cls.double().sum(0), patch_sum + patch.double().sum(0), count + int(have.sum())]
    return {t: ((c / n).float(), (p / n).float()) for t, (c, p, n) in sums.items()}


def constant_predictor(constants: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Predictor:
    """A :data:`Predictor` that answers ``constants[teacher]`` (CLS ``(D,)``, patch ``(h, w, D)``) for every image
    (an exact zero scores cosine 0; :func:`snap_origin` makes float rounding of the origin one)."""
    def predict(pixels: torch.Tensor, grids: dict[str, tuple[int, int]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        batch = len(pixels)
        return {t: (cls.expand(batch, -1), patch.expand(batch, -1, -1, -1)) for t, (cls, patch) in constants.items()}
    return predict


def snap_origin(vector: torch.Tensor, scale: float) -> torch.Tensor:
    """``vector`` or, when its norm is below ``1e-6 * scale`` (float rounding of an exact zero), zeros."""
    return torch.zeros_like(vector) if float(vector.norm()) < 1e-6 * scale else vector


def baseline_fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
                      train_reader: CacheReader, seed: int = 0, batch_size: int = 16) -> dict[str, dict[str, dict]]:
    """``{"random-init student (seed S)": fidelity, "mean training target": fidelity}`` (:func:`fidelity` results)
    over the same held-out samples, in the run's standardised space; the mean target over ``train_reader``."""
    random_run = random_init_run(run, reader.dims, seed)
    constants = {}
    for t, (cls, patch) in mean_targets(run, train_reader).items():
        scale = float(np.sqrt(reader.dims[t]))  # a standardised target's norm is about sqrt(D)
        constants[t] = (snap_origin(cls, scale), torch.stack([snap_origin(v, scale) for v in patch.flatten(0, 1)])
                        .reshape(patch.shape))
    return {f"random-init student (seed {seed})": fidelity(random_run, reader, paths, indices, batch_size,
                                                            lambda pixels, grids: project(random_run, pixels, grids)),
            "mean training target": fidelity(run, reader, paths, indices, batch_size, constant_predictor(constants))}


def evaluate(checkpoint: str | Path, cache: str, images: str, batch_size: int = 16, device: str = "cpu",
             backend: str = "auto", baselines: bool = False, seed: int = 0) -> dict[str, dict]:
    """:func:`fidelity` of a run's checkpoint over all images of the eval ``cache`` (files in ``images``); with
    ``baselines``, each teacher's entry also holds ``"baselines"``: :func:`baseline_fidelity`'s rows for it (the
    mean target over the run's training cache, ``data.cache`` of its config)."""
    run = load_run(checkpoint, torch.device(device))
    reader = CacheReader(cache, run.teachers, backend)
    check_same_teachers(run, reader)
    paths, indices = image_paths(reader, images), np.arange(len(reader))
    result = fidelity(run, reader, paths, indices, batch_size)
    if baselines:
        rows = baseline_fidelity(run, reader, paths, indices, CacheReader(run.cfg.data.cache, run.teachers, backend),
                                 seed, batch_size)
        for t in run.teachers:
            result[t]["baselines"] = {name: row[t] for name, row in rows.items()}
    return result
