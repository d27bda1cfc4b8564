"""``dune-student probe``: is the student any good? Cheap, standard probes of frozen features, side by side for
the student, a random-init student of the same architecture and each teacher.

Cosine fidelity (``dune-student eval``) says how close the student is to its teachers; these probes say what its
features are worth, as RADIO and UNIC report it, on a probe data folder (layout in :mod:`dune_demo.probe_data`,
which writes one from data that installs offline):

* **classification** of ``classify/<class>/*`` on CLS tokens and on mean patch tokens (teachers without a real
  CLS token, whose cached CLS is their mean patch — MobileNetV2, MASt3R — get mean-patch scores only): DINO's
  weighted kNN (cosine similarity, the ``k`` nearest training images vote with weight ``exp(sim / T)``) and a
  logistic-regression linear probe (standardised features, full-batch L-BFGS from zeros, L2 penalty chosen by
  3-fold cross-validation on the training split), top-1 accuracy on a stratified test split (a seeded
  permutation of each class, ``test_fraction`` of it held out);
* **disparity** (dense linear probe): per patch of the pairs' left images, ridge regression of the mean
  ground-truth disparity of its pixels (patches with at least half of them known) from its token (penalty by
  cross-validation over the training pairs), RMSE (pixels of the pair images) and R² on the ``test`` pairs;
* **correspondence** (zero-shot, HPatches / SuperPoint style): for each warp pair (a held-out photo and the same
  photo under a known homography and photometric change), each source patch's cosine nearest-neighbour patch in
  the warped image; PCK, the share whose centre lies within 0.5, 1 and 2 patches of the student's grid of where
  the homography takes the source patch's centre (source patches it takes out of the image are not scored), and
  the share among mutual nearest neighbours.

Two feature-free rows bound what the probes can give without a model: **raw pixels** (classification on a
16 x 16 thumbnail of the image, the dense probes on each patch's pixels minus their mean, i.e. normalised
cross-correlation) and, for correspondence, **identity** (every source patch matched to the patch at the same
position). Every score carries a bootstrap 95 % interval over its test items (images, warp pairs, stereo pairs).

Models are scored on the images as each saw them: the student and the random-init student on the images squashed
to the run's resolution (as ``dune-student eval`` feeds them), teachers from a cache extracted over the probe data
folder (image ids = paths relative to it, ``squash`` resize). Patch grids cover whole images, so patch ``(i, j)``
of an ``h x w`` grid is centred at ``((i + 0.5) H / h, (j + 0.5) W / w)`` in the pair images.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dune_cache import CacheReader, load_pixels, pick_device

from ..errors import ProbeError
from ..loss.distill import use_cls_from_provenance
from ..model.heads import TeacherHeads
from ..model.student import Student
from ..runs.loading import load_run
from .probe_data import ProbeConfig, ProbeData, load_probe_data
from .probe_scores import (
    ClassificationScores,
    CorrespondenceScores,
    DisparityScores,
    classification_scores,
    correspondence_scores,
    disparity_scores,
)

log = logging.getLogger(__name__)

THUMBNAIL = 16  # raw-pixel classification features: the image squashed to THUMBNAIL x THUMBNAIL


# ---------------------------------------------------------------------------------------
# Features of each model
# ---------------------------------------------------------------------------------------
Tokens = tuple[torch.Tensor | None, torch.Tensor]  # CLS (B, D) or None (no real CLS token), patches (B, h, w, D)


class FeatureSource(Protocol):
    """Models whose tokens one call gives, for a batch of image ids."""

    models: dict[str, str]  # model name -> kind (student | student head | random init | teacher), in table order

    def __call__(self, ids: list[str]) -> dict[str, Tokens]: ...


class StudentSource:
    """A student's encoder tokens (CLS and patches of the last block, registers dropped) and, with ``heads``,
    each head's projection (on the student's grid), of the images squashed to ``resolution``."""

    def __init__(self, name: str, kind: str, student: Student, root: Path, resolution: int,
                 heads: TeacherHeads | None = None, head_has_cls: dict[str, bool] | None = None):
        self.name, self.student, self.root, self.resolution = name, student, root, resolution
        self.heads, self.head_has_cls = heads, head_has_cls or {}
        self.models = {name: kind, **{self.head_name(t): "student head" for t in self.head_has_cls}}

    def head_name(self, teacher: str) -> str:
        return f"{self.name} → {teacher}"

    def __call__(self, ids: list[str]) -> dict[str, Tokens]:
        device = next(self.student.parameters()).device
        size = (self.resolution, self.resolution)
        pixels = torch.stack([torch.from_numpy(load_pixels(self.root / i, size, "squash")) for i in ids]).to(device)
        out = self.student(self.student.normalize(pixels), return_blocks=bool(self.heads and self.heads.needs_blocks))
        tokens = {self.name: (out.cls, out.patch)}
        if self.heads is not None:
            grid = tuple(out.patch.shape[1:3])
            projected = self.heads(out, {t: grid for t in self.head_has_cls})
            tokens |= {self.head_name(t): (cls if self.head_has_cls[t] else None, patch)
                       for t, (cls, patch) in projected.items()}
        return tokens


def random_init_student(like: Student, seed: int) -> Student:
    """A student of ``like``'s architecture with seeded initial weights (timm's init), in eval mode."""
    device = next(like.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return Student(like.cfg, device=device).eval()


class PixelSource:
    """Raw pixels as features (a model-free baseline), of the images squashed to ``resolution``: CLS = the image
    squashed further to ``THUMBNAIL`` px, flattened ``(B, 3 * THUMBNAIL²)``; patches = each ``patch x patch``
    cell's pixels ``(B, h, w, 3 * patch²)``; every vector minus its own mean (so cosine = normalised
    cross-correlation)."""

    name = "raw pixels"

    def __init__(self, root: Path, resolution: int, patch: int):
        self.root, self.resolution, self.patch = root, resolution, patch
        self.models = {self.name: "pixels"}

    def __call__(self, ids: list[str]) -> dict[str, Tokens]:
        size, p = (self.resolution, self.resolution), self.patch
        pixels = torch.stack([torch.from_numpy(load_pixels(self.root / i, size, "squash")) for i in ids]).float() / 255
        cells = pixels.unfold(2, p, p).unfold(3, p, p)  # (B, 3, h, w, p, p)
        patch = cells.permute(0, 2, 3, 1, 4, 5).flatten(3)
        thumbnail = torch.nn.functional.interpolate(pixels, size=(THUMBNAIL, THUMBNAIL), mode="area").flatten(1)
        return {self.name: (thumbnail - thumbnail.mean(dim=1, keepdim=True),
                            patch - patch.mean(dim=-1, keepdim=True))}


class CachedTeachers:
    """Every teacher group of a cache of the probe data folder; refuses a cache that lacks a probe image or was
    not extracted with ``squash`` resizing (the correspondence ground truth assumes whole images)."""

    def __init__(self, cache: str, data: ProbeData, backend: str):
        self.reader = CacheReader(cache, None, backend, allow_partial=True)
        self.sample = {image_id: i for i, image_id in enumerate(self.reader.image_ids)}
        self.has_cls = use_cls_from_provenance(self.reader.provenance)
        self.models = {t: "teacher" for t in self.reader.teachers}
        for column, teacher in enumerate(self.reader.teachers):
            resize = self.reader.provenance[teacher]["geometry"]["resize"]
            if resize != "squash":
                raise ProbeError(f"cache {cache}: teacher {teacher} saw the images with {resize!r} resizing; the "
                                 "probes need whole images (extract with --resize squash)")
            missing = [i for i in data.image_ids()
                       if i not in self.sample or self.reader.rows[self.sample[i], column] < 0]
            if missing:
                raise ProbeError(f"cache {cache}: teacher {teacher} has no features of {len(missing)} of the "
                                 f"{len(data.image_ids())} probe images (e.g. {', '.join(missing[:3])}); give a cache "
                                 f"extracted over the probe data folder: dune-cache extract --teacher {teacher} "
                                 f"--images {data.root} --out PROBE_CACHE, on the student's grid (--student-patch, "
                                 "--student-resolution)")

    def __call__(self, ids: list[str]) -> dict[str, Tokens]:
        batch = self.reader.read(np.array([self.sample[i] for i in ids]))
        return {t: (batch.cls[t] if self.has_cls[t] else None, batch.patch[t]) for t in self.reader.teachers}


@dataclass
class ModelFeatures:
    """One model's features of the probe data, float32 on the CPU."""

    cls: torch.Tensor | None  # (N, D) CLS tokens of the classification images; None: no real CLS token
    mean_patch: torch.Tensor  # (N, D) their mean patch tokens
    left: torch.Tensor  # (P, h, w, D) patch tokens of the pairs' left images
    right: torch.Tensor  # (P, h, w, D) and of their right images
    source: torch.Tensor  # (W, h, w, D) patch tokens of the warp pairs' source images
    warped: torch.Tensor  # (W, h, w, D) and of their warped images


@torch.no_grad()
def collect(source: FeatureSource, ids: list[str], batch_size: int, pool: bool) -> dict[str, Tokens]:
    """model -> (CLS ``(N, D)`` or None, patches ``(N, h, w, D)``, or with ``pool`` their mean ``(N, D)``)."""
    chunks: dict[str, list[Tokens]] = {name: [] for name in source.models}
    for lo in range(0, len(ids), batch_size):
        for name, (cls, patch) in source(ids[lo:lo + batch_size]).items():
            patch = patch.float().mean(dim=(1, 2)) if pool else patch.float()
            chunks[name].append((None if cls is None else cls.float().cpu(), patch.cpu()))
    return {name: (None if parts[0][0] is None else torch.cat([cls for cls, _ in parts]),
                   torch.cat([patch for _, patch in parts])) for name, parts in chunks.items()}


def model_features(source: FeatureSource, data: ProbeData, batch_size: int) -> dict[str, ModelFeatures]:
    """Features of every model of ``source`` over the probe data."""
    images = collect(source, data.images, batch_size, pool=True)
    pairs = collect(source, [p.left for p in data.pairs] + [p.right for p in data.pairs], batch_size, pool=False)
    warps = collect(source, [w.source for w in data.warps] + [w.warped for w in data.warps], batch_size, pool=False)
    count, warp_count = len(data.pairs), len(data.warps)
    return {name: ModelFeatures(cls=images[name][0], mean_patch=images[name][1], left=pairs[name][1][:count],
                                right=pairs[name][1][count:], source=warps[name][1][:warp_count],
                                warped=warps[name][1][warp_count:]) for name in source.models}


def identity_tokens(count: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(count, h, w, h * w)``: one-hot position codes, so that every patch's nearest neighbour in another image
    is the patch at the same position (the identity baseline of correspondence)."""
    return torch.eye(grid[0] * grid[1]).reshape(1, *grid, -1).expand(count, -1, -1, -1)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
IDENTITY = "identity (same position)"


@dataclass
class ModelScores:
    name: str
    kind: str  # student | student head | random init | teacher | pixels | identity
    cls: ClassificationScores | None  # None: no real CLS token (or the identity baseline)
    mean_patch: ClassificationScores | None  # None: the identity baseline (no features of an image)
    disparity: DisparityScores | None  # None: the identity baseline
    correspondence: CorrespondenceScores


def score_model(name: str, kind: str, features: ModelFeatures, data: ProbeData, cfg: ProbeConfig,
                unit_grid: tuple[int, int]) -> ModelScores:
    """Every probe of one model."""
    return ModelScores(
        name=name, kind=kind,
        cls=None if features.cls is None else classification_scores(features.cls, data, cfg),
        mean_patch=classification_scores(features.mean_patch, data, cfg),
        disparity=disparity_scores(features.left, data, cfg.seed),
        correspondence=correspondence_scores(features.source, features.warped, data, unit_grid))


def identity_scores(data: ProbeData, unit_grid: tuple[int, int]) -> ModelScores:
    """The identity baseline: correspondence when every source patch is matched to the same position."""
    tokens = identity_tokens(len(data.warps), unit_grid)
    return ModelScores(IDENTITY, "identity", None, None, None, correspondence_scores(tokens, tokens, data, unit_grid))


@dataclass
class DataSummary:
    folder: str
    classes: list[str]
    train_images: int
    test_images: int
    chance: float  # accuracy of always answering the test split's most frequent class
    train_pairs: int
    test_pairs: int
    warp_pairs: int
    unit_grid: list[int]  # the student's patch grid: correspondence distances are in its patches


def summarize(data: ProbeData, unit_grid: tuple[int, int]) -> DataSummary:
    test_labels = data.labels[data.test]
    chance = float(np.bincount(test_labels).max() / len(test_labels))
    return DataSummary(folder=str(data.root), classes=data.classes, train_images=int((~data.test).sum()),
                       test_images=int(data.test.sum()), chance=chance,
                       train_pairs=sum(p.split == "train" for p in data.pairs),
                       test_pairs=sum(p.split == "test" for p in data.pairs), warp_pairs=len(data.warps),
                       unit_grid=list(unit_grid))


TABLE_COLUMNS = ("model", "kNN CLS", "kNN mean-patch", "linear CLS", "linear mean-patch", "disparity RMSE (px)",
                 "disparity R²", "PCK ≤0.5 patch", "PCK ≤1 patch", "PCK ≤2 patches", "mutual PCK ≤1 patch")


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def percent_interval(value: float, interval: list[float]) -> str:
    """``value`` in % with its 95 % interval, e.g. ``84.0 [77.0, 91.0]``."""
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def table_cells(m: ModelScores) -> list[str]:
    """One model's row of :data:`TABLE_COLUMNS` (— where the model has no such score)."""
    c, d = m.correspondence, m.disparity
    knn_cls, linear_cls = (None, None) if m.cls is None else (m.cls.knn, m.cls.linear)
    knn_patch, linear_patch = (None, None) if m.mean_patch is None else (m.mean_patch.knn, m.mean_patch.linear)
    disparity = (["—", "—"] if d is None else
                 [f"{d.rmse:.2f}", f"{d.r2:.3f} [{d.r2_ci95[0]:.2f}, {d.r2_ci95[1]:.2f}]"])
    return [m.name, percent(knn_cls), percent(knn_patch), percent(linear_cls), percent(linear_patch), *disparity,
            percent(c.within_half_patch), percent_interval(c.within_1_patch, c.ci95["1"]), percent(c.within_2_patches),
            percent(c.mutual_within_1_patch)]


@dataclass
class ProbeReport:
    models: list[ModelScores]
    data: DataSummary
    settings: dict  # the ProbeConfig
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def table(self) -> str:
        """Markdown table, one row per model, accuracies and match shares in %, then what the columns mean."""
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(table_cells(m)) + " |" for m in self.models]
        d, s, first = self.data, self.settings, self.models[0]
        lines += ["", f"Classification: {', '.join(d.classes)}; {d.train_images} train / {d.test_images} test images "
                  f"(stratified, seed {s['seed']}); top-1 accuracy in %, chance {percent(d.chance)}; kNN k={s['k']} "
                  f"T={s['temperature']}; — = no real CLS token (its CLS is its mean patch); raw pixels: CLS = a "
                  f"{THUMBNAIL}x{THUMBNAIL} thumbnail. Disparity: ridge probe per patch, {d.train_pairs} train stereo "
                  f"pairs ({first.disparity.train_patches} patches), {d.test_pairs} held-out pairs "
                  f"({first.disparity.test_patches} patches), R² with a 95 % bootstrap interval over the held-out "
                  f"pairs. Correspondence: PCK, % of the source patches ({first.correspondence.queries}) of "
                  f"{d.warp_pairs} warp pairs (held-out photos under known homographies and photometric changes) whose "
                  f"cosine nearest neighbour in the warped image lies within 0.5 / 1 / 2 patches of the student's "
                  f"{d.unit_grid[0]}x{d.unit_grid[1]} grid of the true position, [95 % bootstrap interval over the "
                  "pairs]; mutual: among mutual nearest neighbours; identity: every patch matched to the same "
                  "position."]
        return "\n".join(lines)


def feature_sources(cfg: ProbeConfig, data: ProbeData) -> tuple[list[FeatureSource], tuple[int, int]]:
    """The student (and its heads), a random-init student and the cache's teachers; the student's patch grid at
    the run's resolution."""
    teachers = [CachedTeachers(cfg.cache, data, cfg.backend)] if cfg.cache else []  # checked before any model loads
    run = load_run(cfg.checkpoint, pick_device(cfg.device))
    heads = (run.heads, use_cls_from_provenance(run.provenance)) if cfg.heads else (None, None)
    sources: list[FeatureSource] = [
        StudentSource(f"student (step {run.step})", "student", run.student, data.root, run.resolution, *heads),
        StudentSource(f"random-init student (seed {cfg.seed})", "random init",
                      random_init_student(run.student, cfg.seed), data.root, run.resolution), *teachers,
        PixelSource(data.root, run.resolution, run.student.patch_size)]
    return sources, run.student.grid(run.resolution, run.resolution)


def run_probes(cfg: ProbeConfig) -> ProbeReport:
    """Probe the run's student, a random-init student of its architecture and the cache's teachers; writes the
    JSON report to ``cfg.out`` when set."""
    start = time.perf_counter()
    if not Path(cfg.checkpoint).is_file():
        raise ProbeError(f"checkpoint {cfg.checkpoint}: no such file (give a run's RUN/checkpoint.pt)")
    data = load_probe_data(cfg.data, cfg.test_fraction, cfg.seed)
    sources, unit_grid = feature_sources(cfg, data)
    models = []
    for source in sources:
        began = time.perf_counter()
        for name, features in model_features(source, data, cfg.batch_size).items():
            models.append(score_model(name, source.models[name], features, data, cfg, unit_grid))
        log.info("probed %s in %.1fs", ", ".join(source.models), time.perf_counter() - began)
    models.append(identity_scores(data, unit_grid))
    report = ProbeReport(models, summarize(data, unit_grid), asdict(cfg), time.perf_counter() - start)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(report.to_json() + "\n")
    return report
