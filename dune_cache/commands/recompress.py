"""``dune-cache recompress``: re-encode the teacher groups of a cache into a new cache root, without the teacher.

For each teacher group: the new encoding is calibrated on the source's decoded features (images spread
evenly over the done ones, as extraction does over the image list), then blocks of whole work units are
decoded, encoded and written by dask tasks (threads), each followed by its units' ``status`` and failure
records, so memory stays at a few blocks whatever the cache size. The new group keeps the source's
provenance except ``storage`` (the new settings) and adds ``recompressed`` (the source cache and its
storage section); manifest, status, failures and view boxes/flips are copied. Intermediate blocks
(``levels/b{k}``, ``extract --blocks``) are carried over, each level's encoding calibrated on that level's
features like extraction does. When the source has ``stats/``, they are computed again from the new group's
decoded values (what a student trains on; a lossy encoding shifts them slightly). The source is only read;
a run that fails after creating the new group removes it again (recompress never resumes: a partial group
would only look like an extraction with pending images).
"""
from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from .. import __version__
from ..config import StorageConfig
from ..encodings import Encoding, EncodingConfig, calibration_indices
from ..errors import StoreError
from ..format.constants import STATUS_DONE
from ..format.levels import KINDS, level_name, level_names
from ..format.root import select_teachers
from ..format.rows import ViewRows
from ..format.stats import read_stats, write_stats
from ..format.store import TeacherStore, open_root
from ..format.unit_state import unit_bounds
from ..storage import location
from .stats import compute_stats

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
    """The new group's storage: the source's ``storage`` section with the requested changes; the codec, unless
    given, decided for the new encoding as extraction decides it (``auto``: :meth:`StorageConfig.with_codec`)."""
    overrides = {key: getattr(cfg, key) for key in ("dtype", "codec", "level", "unit_size", "shard_images")
                 if getattr(cfg, key) is not None}
    codec = {} if cfg.codec is not None else {"codec": "auto", "level": cfg.level}
    return replace(StorageConfig.from_json(source), encoding=cfg.encoding, **{**overrides, **codec}).with_codec()


def target_provenance(source: TeacherStore, cache: str, storage: StorageConfig) -> dict:
    """The source's provenance with the new ``storage`` and a ``recompressed`` record of where it came from."""
    meta = dict(source.provenance)
    meta["recompressed"] = {"from": location.redact(cache), "storage": meta["storage"],
                            "by": f"dune_cache {__version__}",
                            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    meta["storage"] = storage.to_json()
    return meta


def calibration_rows(source: TeacherStore, config: EncodingConfig) -> np.ndarray:
    """``config.calibration_images`` done images of ``source``, spread evenly over the done ones."""
    done = np.flatnonzero(source.read_status() == STATUS_DONE)
    if not len(done):
        raise StoreError(f"teacher group {source.group.basename!r} has no done images to calibrate {config} on")
    return done[calibration_indices(len(done), config.calibration_images)]


def calibrate(source: TeacherStore, config: EncodingConfig, dtype: str) -> tuple[Encoding, dict[int, Encoding]]:
    """``config`` calibrated on the decoded final features of :func:`calibration_rows`, and on each stored
    block's features (``levels/b{k}/cls|patch``), by block."""
    rows = calibration_rows(source, config) if config.needs_calibration else None

    def calibrated(prefix: str) -> Encoding:
        if rows is None:
            return Encoding.calibrate(config, source.dim, dtype)
        return Encoding.calibrate(config, source.dim, dtype,
                                  {kind: source.read_features(prefix + kind, rows) for kind in KINDS})

    return calibrated(""), {k: calibrated(level_name(k, "")) for k in source.blocks}


def copy_units(source: TeacherStore, target: TeacherStore, status: np.ndarray, failures: dict[int, list[dict]],
               units: range) -> int:
    """Decode, encode and write the done images of ``units`` (of ``target``), then their failure records and
    status chunks. Returns the number of images covered."""
    lo = unit_bounds(units.start, target.images_per_unit, target.count)[0]
    hi = unit_bounds(units.stop - 1, target.images_per_unit, target.count)[1]
    rows = lo + np.flatnonzero(status[lo:hi] == STATUS_DONE)
    if len(rows):
        levels = level_names(source.blocks)
        views = None
        if source.views is not None:
            views = ViewRows(cls=source.read_features("views/cls", rows),
                             patch=source.read_features("views/patch", rows),
                             boxes=source.views["boxes"].oindex[rows], flip=source.views["flip"].oindex[rows],
                             levels={n: source.read_features(f"views/{n}", rows) for n in levels})
        target.write_rows(rows, source.read_features("cls", rows), source.read_features("patch", rows), views,
                          levels={n: source.read_features(n, rows) for n in levels})
    for unit in units:
        target.commit_unit(unit, status, failures.get(unit, []), [])
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
    """Re-encode teacher group ``name`` of ``cfg.cache`` into ``cfg.out``. Everything that can refuse the run
    (an existing group without ``overwrite``, calibration) does so before the new group is made; a failure
    after that removes it (:func:`remove_incomplete`) and re-raises."""
    source = TeacherStore.open(cfg.cache, name, mode="r")
    storage = target_storage(source.provenance["storage"], cfg)
    if name in open_root(cfg.out) and not cfg.overwrite:
        raise StoreError(f"{cfg.out} already has a teacher group {name!r}; pass --overwrite to replace it")
    encoding, level_encodings = calibrate(source, cfg.encoding, storage.dtype)
    grid = tuple(source.provenance["geometry"]["grid"])
    try:
        target = TeacherStore.open_or_create(cfg.out, name, target_provenance(source, cfg.cache, storage),
                                             source.manifest(), grid, source.dim, storage, overwrite=True,
                                             views=source.num_views, encoding=encoding,
                                             level_encodings=level_encodings)
        done = copy_group(cfg, source, target, name)
    except BaseException:
        remove_incomplete(cfg.out, name)
        raise
    return RecompressResult(teacher=name, images=source.count, done=done,
                            bytes_before=source.nbytes_stored(), bytes_after=target.nbytes_stored())


def copy_group(cfg: RecompressConfig, source: TeacherStore, target: TeacherStore, name: str) -> int:
    """Every unit of ``source`` into the new ``target`` (dask tasks of ``cfg.block_images`` images on
    ``cfg.workers`` threads, all finished or cancelled before this returns or raises), then its statistics
    when the source has some. Returns the number of done images copied."""
    status = source.read_status()
    failures: dict[int, list[dict]] = {}
    for record in source.read_failures():
        failures.setdefault(record["index"] // target.images_per_unit, []).append(record)
    per_block = max(1, cfg.block_images // target.images_per_unit)
    tasks = [dask.delayed(copy_units)(source, target, status, failures, range(u, min(u + per_block, target.num_units)))
             for u in range(0, target.num_units, per_block)]
    pool = ThreadPoolExecutor(cfg.workers)
    try:
        with tqdm(total=target.count, unit="img", desc=f"recompress {name} -> {target.encoding.name}",
                  disable=not cfg.progress, dynamic_ncols=True) as bar, ImagesDone(bar.update):
            dask.compute(*tasks, scheduler="threads", pool=pool)
    finally:  # dask raises a task's error at once: no write may land after the caller removes the group
        pool.shutdown(wait=True, cancel_futures=True)
    if read_stats(cfg.cache, name) is not None:
        log.info("%s: statistics of the re-encoded values (the source has statistics)", name)
        write_stats(cfg.out, name, compute_stats(cfg.out, name, cfg.block_images))
    return int((status == STATUS_DONE).sum())


def remove_incomplete(root: str, name: str) -> None:
    """Remove the teacher group ``name`` a failed recompress left in ``root`` (logging it; a failure to remove
    is logged with the fix, never raised over the error that caused it)."""
    url = location.join(root, name)
    try:
        parent = open_root(root)
        if name in parent:
            log.error("recompress of %s failed: removing the incomplete group %s", name, url)
            del parent[name]
    except Exception as exc:  # noqa: BLE001 - the original error is what the caller must see
        log.error("could not remove the incomplete group %s (%s): delete it before using %s", url, exc, root)


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
