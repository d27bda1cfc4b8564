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
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dune_cache import CacheReader, TargetBatch, load_pixels, pick_device

from ..data.batches import image_paths
from ..loss.distill import use_cls_from_provenance
from ..model.heads import TeacherHeads
from ..model.student import Student
from ..runs.loading import LoadedRun, check_same_teachers, load_run, project


class HeldOutBatches(Dataset):
    """Item ``k`` -> the ``k``-th batch of samples ``indices`` of ``reader``: uint8 pixels ``(B, 3, S, S)`` (the whole
    image, squashed to ``resolution``) and their :class:`TargetBatch`, made in DataLoader workers (the reader
    pickles; each worker opens its own handles)."""

    def __init__(self, reader: CacheReader, paths, indices: np.ndarray, batch_size: int, resolution: int):
        self.reader, self.paths, self.indices = reader, paths, np.asarray(indices)
        self.batch_size, self.size = batch_size, (resolution, resolution)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, TargetBatch]:
        batch = self.indices[k * self.batch_size:(k + 1) * self.batch_size]
        pixels = torch.stack([torch.from_numpy(load_pixels(self.paths[i], self.size, "squash")) for i in batch])
        return pixels, self.reader.read(batch)


Predictor = Callable[[torch.Tensor, dict[str, tuple[int, int]]], dict[str, tuple[torch.Tensor, torch.Tensor]]]
# uint8 pixels (B, 3, S, S) on the run's device, teacher grids -> teacher -> (CLS (B, D_t), patch (B, h_t, w_t, D_t)),
# in the run's standardised target space (``project`` of a run, or a baseline)


@torch.inference_mode()
def per_image_fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
                       batch_size: int = 16, workers: int = 0, predict: Predictor | None = None
                       ) -> dict[str, dict[str, np.ndarray]]:
    """``{teacher: {"cls": (N,), "patch": (N,), "have": (N,) bool}}``: cosine of ``predict``'s (default: the run's
    projection) CLS and mean patch cosine per sample of ``indices`` (``paths[i]``: image of sample ``i``) to the
    teacher's standardised cached targets; ``have`` marks the samples the teacher has features of. Images are
    decoded and targets read in ``workers`` DataLoader workers (0: here); the cosines stay on the device until the
    end (one copy to the host)."""
    predict = predict or (lambda pixels, grids: project(run, pixels, grids))
    dev = next(run.student.parameters()).device
    parts = {t: {"cls": [], "patch": [], "have": []} for t in run.teachers}
    batches = DataLoader(HeldOutBatches(reader, paths, indices, batch_size, run.resolution), batch_size=None,
                         num_workers=workers, pin_memory=dev.type == "cuda",
                         multiprocessing_context="forkserver" if workers else None,
                         generator=torch.Generator())  # its seed draw leaves the training's random stream alone
    for pixels, targets in batches:
        preds = predict(pixels.to(dev, non_blocking=True), reader.grids)
        for k, t in enumerate(run.teachers):
            cls_t, patch_t = run.standardizer.standardize(t, targets.cls[t].to(dev, non_blocking=True),
                                                          targets.patch[t].to(dev, non_blocking=True))
            parts[t]["cls"].append(F.cosine_similarity(preds[t][0].float(), cls_t, dim=-1))
            parts[t]["patch"].append(F.cosine_similarity(preds[t][1].float(), patch_t, dim=-1).flatten(1).mean(1))
            parts[t]["have"].append(targets.mask[:, k].to(dev, non_blocking=True))
    return {t: {key: torch.cat(values).cpu().numpy() for key, values in p.items()} for t, p in parts.items()}


def fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray, batch_size: int = 16,
             workers: int = 0, predict: Predictor | None = None) -> dict[str, dict]:
    """``{teacher: {"cls": mean cosine, "patch": mean cosine, "images": n, "cls_per_image": [...],
    "patch_per_image": [...]}}`` over the samples of ``indices`` the teacher has features of (see
    :func:`per_image_fidelity`), the modules as they are (call ``.eval()`` first). ``cls`` is None for teachers
    whose CLS was not distilled (e.g. a mean-of-patches CLS)."""
    per_image = per_image_fidelity(run, reader, paths, indices, batch_size, workers, predict)
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
        return {t: (cls.to(pixels.device).expand(batch, -1), patch.to(pixels.device).expand(batch, -1, -1, -1))
                for t, (cls, patch) in constants.items()}
    return predict


def snap_origin(vector: torch.Tensor, scale: float) -> torch.Tensor:
    """``vector`` or, when its norm is below ``1e-6 * scale`` (float rounding of an exact zero), zeros."""
    return torch.zeros_like(vector) if float(vector.norm()) < 1e-6 * scale else vector


def baseline_fidelity(run: LoadedRun, reader: CacheReader, paths: list[Path], indices: np.ndarray,
                      train_reader: CacheReader, seed: int = 0, batch_size: int = 16, workers: int = 0
                      ) -> dict[str, dict[str, dict]]:
    """``{"random-init student (seed S)": fidelity, "mean training target": fidelity}`` (:func:`fidelity` results)
    over the same held-out samples, in the run's standardised space; the mean target over ``train_reader``."""
    random_run = random_init_run(run, reader.dims, seed)
    constants = {}
    for t, (cls, patch) in mean_targets(run, train_reader).items():
        scale = float(np.sqrt(reader.dims[t]))  # a standardised target's norm is about sqrt(D)
        constants[t] = (snap_origin(cls, scale), torch.stack([snap_origin(v, scale) for v in patch.flatten(0, 1)])
                        .reshape(patch.shape))
    return {f"random-init student (seed {seed})": fidelity(random_run, reader, paths, indices, batch_size, workers),
            "mean training target": fidelity(run, reader, paths, indices, batch_size, workers,
                                             constant_predictor(constants))}


def evaluate(checkpoint: str | Path, cache: str, images: str, batch_size: int = 16, device: str = "auto",
             backend: str = "auto", workers: int = 0, baselines: bool = False, seed: int = 0) -> dict[str, dict]:
    """:func:`fidelity` of a run's checkpoint over all images of the eval ``cache`` (files in ``images``) on
    ``device`` (``auto``: the GPU when there is one); with ``baselines``, each teacher's entry also holds
    ``"baselines"``: :func:`baseline_fidelity`'s rows for it (the mean target over the run's training cache,
    ``data.cache`` of its config)."""
    run = load_run(checkpoint, pick_device(device))
    reader = CacheReader(cache, run.teachers, backend)
    check_same_teachers(run, reader)
    paths, indices = image_paths(reader, images), np.arange(len(reader))
    result = fidelity(run, reader, paths, indices, batch_size, workers)
    if baselines:
        rows = baseline_fidelity(run, reader, paths, indices, CacheReader(run.cfg.data.cache, run.teachers, backend),
                                 seed, batch_size, workers)
        for t in run.teachers:
            result[t]["baselines"] = {name: row[t] for name, row in rows.items()}
    return result
