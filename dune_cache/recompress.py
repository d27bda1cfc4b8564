"""``dune-cache recompress``: re-encode the teacher groups of a cache into a new cache root, without the teacher.

For each teacher group: the new encoding is calibrated on the source's decoded features (images spread
evenly over the done ones, as extraction does over the image list), then blocks of whole work units are
decoded, encoded and written by dask tasks (threads), each followed by its units' ``status`` and failure
records, so memory stays at a few blocks whatever the cache size. The new group keeps the source's
provenance except ``storage`` (the new settings) and adds ``recompressed`` (the source cache and its
storage section); manifest, status, failures and view boxes/flips are copied. When the source has
``stats/``, they are computed again from the new group's decoded values (what a student trains on; a lossy
encoding shifts them slightly). The source is only read.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from . import __version__, location
from .encodings import Encoding, EncodingConfig, calibration_indices
from .inspect import select_teachers
from .stats import compute_stats, read_stats, write_stats
from .store import STATUS_DONE, StorageConfig, StoreError, TeacherStore, ViewRows, open_root, unit_bounds

log = logging.getLogger(__name__)


@dataclass
class RecompressConfig:
    """What ``dune-cache recompress`` does. ``dtype``/``codec``/``level``/``unit_size``/``shard_images``:
    ``None`` keeps the source group's value. ``block_images``: images per task (rounded to whole work
    units of the new group); ``workers``: dask threads."""

    cache: str
    out: str
    encoding: EncodingConfig
    dtype: str | None = None
    codec: str | None = None
    level: int | None = None
    unit_size: int | None = None
    shard_images: int | None = None
    teachers: list[str] | None = None
    overwrite: bool = False
    block_images: int = 64
    workers: int = 2
    progress: bool = True


@dataclass
class RecompressResult:
    teacher: str
    images: int
    done: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        """Stored bytes of the source group over those of the new one."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0


def target_storage(source: dict, cfg: RecompressConfig) -> StorageConfig:
    """The new group's storage: the source's ``storage`` section with the requested changes."""
    overrides = {key: getattr(cfg, key) for key in ("dtype", "codec", "level", "unit_size", "shard_images")
                 if getattr(cfg, key) is not None}
    return replace(StorageConfig.from_json(source), encoding=cfg.encoding, **overrides)


def target_provenance(source: TeacherStore, cache: str, storage: StorageConfig) -> dict:
    """The source's provenance with the new ``storage`` and a ``recompressed`` record of where it came from."""
    meta = dict(source.provenance)
    meta["recompressed"] = {"from": cache, "storage": meta["storage"], "by": f"dune_cache {__version__}",
                            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    meta["storage"] = storage.to_json()
    return meta


def calibrate(source: TeacherStore, config: EncodingConfig, dtype: str) -> Encoding:
    """``config`` calibrated on the decoded features of ``calibration_images`` done images of ``source``."""
    if not config.needs_calibration:
        return Encoding.calibrate(config, source.dim, dtype)
    done = np.flatnonzero(source.read_status() == STATUS_DONE)
    if not len(done):
        raise StoreError(f"teacher group {source.group.basename!r} has no done images to calibrate {config} on")
    rows = done[calibration_indices(len(done), config.calibration_images)]
    samples = {kind: source.read_features(kind, rows) for kind in ("cls", "patch")}
    return Encoding.calibrate(config, source.dim, dtype, samples)


def copy_units(source: TeacherStore, target: TeacherStore, status: np.ndarray, failures: dict[int, list[dict]],
               units: range) -> int:
    """Decode, encode and write the done images of ``units`` (of ``target``), then their failure records and
    status chunks. Returns the number of images covered."""
    lo = unit_bounds(units.start, target.images_per_unit, target.count)[0]
    hi = unit_bounds(units.stop - 1, target.images_per_unit, target.count)[1]
    rows = lo + np.flatnonzero(status[lo:hi] == STATUS_DONE)
    if len(rows):
        views = None
        if source.views is not None:
            views = ViewRows(cls=source.read_features("views/cls", rows), patch=source.read_features("views/patch", rows),
                             boxes=source.views["boxes"].oindex[rows], flip=source.views["flip"].oindex[rows])
        target.write_rows(rows, source.read_features("cls", rows), source.read_features("patch", rows), views)
    for unit in units:
        target.write_unit_failures(unit, failures.get(unit, []))
        target.write_unit_status(unit, status)
    return hi - lo


class ImagesDone(Callback):
    """dask callback: advance a progress callable by the images each finished task covered."""

    def __init__(self, advance: Callable[[int], object]):
        super().__init__()
        self.advance = advance

    def _posttask(self, key, result, dsk, state, worker_id):  # noqa: D401 - dask's hook signature
        if isinstance(result, (int, np.integer)):
            self.advance(int(result))


def recompress_teacher(cfg: RecompressConfig, name: str) -> RecompressResult:
    """Re-encode teacher group ``name`` of ``cfg.cache`` into ``cfg.out``."""
    source = TeacherStore.open(cfg.cache, name, mode="r")
    storage = target_storage(source.provenance["storage"], cfg)
    if name in open_root(cfg.out) and not cfg.overwrite:
        raise StoreError(f"{cfg.out} already has a teacher group {name!r}; pass --overwrite to replace it")
    encoding = calibrate(source, cfg.encoding, storage.dtype)
    grid = tuple(source.provenance["geometry"]["grid"])
    target = TeacherStore.open_or_create(cfg.out, name, target_provenance(source, cfg.cache, storage),
                                         source.manifest(), grid, source.dim, storage, overwrite=True,
                                         views=source.num_views, encoding=encoding)
    status = source.read_status()
    failures: dict[int, list[dict]] = {}
    for record in source.read_failures():
        failures.setdefault(record["index"] // target.images_per_unit, []).append(record)
    per_block = max(1, cfg.block_images // target.images_per_unit)
    tasks = [dask.delayed(copy_units)(source, target, status, failures, range(u, min(u + per_block, target.num_units)))
             for u in range(0, target.num_units, per_block)]
    with tqdm(total=target.count, unit="img", desc=f"recompress {name} -> {encoding.name}", disable=not cfg.progress,
              dynamic_ncols=True) as bar, ImagesDone(bar.update):
        dask.compute(*tasks, scheduler="threads", num_workers=cfg.workers)
    if read_stats(cfg.cache, name) is not None:
        log.info("%s: statistics of the re-encoded values (the source has statistics)", name)
        write_stats(cfg.out, name, compute_stats(cfg.out, name, cfg.block_images))
    return RecompressResult(teacher=name, images=source.count, done=int((status == STATUS_DONE).sum()),
                            bytes_before=source.nbytes_stored(), bytes_after=target.nbytes_stored())


def canonical_root(root: str) -> str:
    """A cache root location for comparison: local paths (or ``file://`` URLs) resolved, URLs as given."""
    path = location.local_path(root)
    return str(Path(path).resolve()) if path is not None else root.rstrip("/")


def recompress(cfg: RecompressConfig) -> list[RecompressResult]:
    """Re-encode the requested teacher groups (all by default) of ``cfg.cache`` into ``cfg.out``."""
    if canonical_root(cfg.cache) == canonical_root(cfg.out):
        raise StoreError(f"--out {cfg.out} is the source cache; recompress writes a new cache root and never "
                         "modifies its source")
    return [recompress_teacher(cfg, name) for name in select_teachers(cfg.cache, cfg.teachers or None)]
