"""What a run resolves before its first step: does the cache fit the config, at which resolution the student
trains, where input stages run, and the target standardisation from the cache's statistics.
"""
from __future__ import annotations

import json

import torch

from dune_cache import CacheReader

from ..config import TrainConfig
from ..data.batches import InputPlan, common_grid, views_per_image
from ..errors import DataError
from ..loss.standardize import Standardizer


def student_resolution(cfg: TrainConfig, reader: CacheReader) -> int:
    """Student input size: the config's, else the one the caches were extracted for (shared grid)."""
    if cfg.data.resolution:
        return cfg.data.resolution
    recorded = {tuple(p["geometry"]["student_resolution"] or ()) for p in reader.provenance.values()}
    if len(recorded) == 1 and (res := recorded.pop()) and res[0] == res[1]:
        return int(res[0])
    grid = next(iter(reader.grids.values()))
    return grid[0] * cfg.student.patch_size


def check_cache_fits(cfg: TrainConfig, reader: CacheReader) -> None:
    """Refuse caches that cannot serve this run, saying what differs: one token grid (grid-crop) or the same cached
    views (views) for all teachers, their geometry, done images enough for a batch. It reads the caches' metadata
    only, so it runs before any model is built or feature chunk read."""
    problems = []
    resize = {t: p["geometry"]["resize"] for t, p in reader.provenance.items()}
    if set(resize.values()) != {"squash"}:
        problems.append(f"training reads caches extracted with --resize squash (the whole image); got {resize}")
    for t, p in reader.provenance.items():
        sp = p["geometry"].get("student_patch")
        if sp is not None and sp != cfg.student.patch_size:
            problems.append(f"{t}: cache made for student patch {sp}, config student.patch_size is "
                            f"{cfg.student.patch_size}")
    recorded = {t: p["geometry"].get("student_resolution") for t, p in reader.provenance.items()}
    if not cfg.data.resolution and len({json.dumps(r) for r in recorded.values() if r is not None}) > 1:
        problems.append(f"teacher groups were extracted for different student resolutions {recorded}: set "
                        "data.resolution to the one to train at")
    empty = [t for t, n in reader.done_counts.items() if n == 0]
    if empty:
        problems.append(f"teacher group(s) {', '.join(empty)} have no done images (nothing to train on): "
                        "extract some first, or leave them out with data.teachers")
    elif len(reader) - cfg.data.holdout < cfg.data.batch_size:
        problems.append(f"only {len(reader) - cfg.data.holdout} training images for data.batch_size "
                        f"{cfg.data.batch_size}")
    if problems:
        raise DataError("cache does not fit the config:\n  " + "\n  ".join(problems))
    if cfg.augment.mode == "grid-crop":
        common_grid(reader)
    elif cfg.augment.mode == "views":
        views_per_image(reader)


def images_from_cache(cfg: TrainConfig) -> bool:
    """Whether the student's images come from the cache's own copy (``data.image_source``; ``auto``: when
    ``data.images`` is not given)."""
    return cfg.data.image_source == "cache" or (cfg.data.image_source == "auto" and not cfg.data.images)


def input_plan(cfg: TrainConfig, device: torch.device) -> InputPlan:
    """Where each input stage of this run runs (:class:`InputPlan`): targets are decoded on a CUDA device, images
    per ``data.image_decode``, photometric augmentation per ``augment.photometric_on``."""
    return InputPlan(read_targets=not cfg.live_teachers, decode_targets_on_device=device.type == "cuda",
                     decode_images_on_device=(on_device(cfg.data.image_decode, device)
                                              and cfg.augment.mode != "views"),
                     photometric_on_device=on_device(cfg.augment.photometric_on, device),
                     images_from_cache=images_from_cache(cfg))


def on_device(place: str, device: torch.device) -> bool:
    """Whether an input stage set to ``place`` (``auto`` | ``loader`` | ``device``) runs on the training device:
    ``auto`` does when training on CUDA, where it frees loader CPU."""
    return place == "device" or (place == "auto" and device.type == "cuda")


def build_standardizer(cfg: TrainConfig, reader: CacheReader) -> Standardizer:
    """Target standardisation from the cache's statistics (``dune-cache stats``); a missing one is an error."""
    stats = {t: reader.stats(t) for t in reader.teachers}
    if cfg.loss.standardize in ("channel", "phis"):
        missing = [t for t, s in stats.items() if s is None]
        if missing:
            raise DataError(f"loss.standardize={cfg.loss.standardize} needs cache statistics for {missing}: "
                            f"run `dune-cache stats {cfg.data.cache}` first, or set loss.standardize=ema")
    return Standardizer(reader.dims, stats, mode=cfg.loss.standardize)
