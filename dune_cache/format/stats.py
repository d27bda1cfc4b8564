"""Per-channel statistics of a teacher group, stored in its ``stats/`` subgroup (docs/cache-format.md, "Statistics"):
:class:`TeacherStats` and how it is written and read. ``dune-cache stats`` computes them
(:mod:`dune_cache.commands.stats`).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import zarr.codecs

from ..errors import CacheNotFoundError, StoreError
from ..storage import location
from .checks import MAX_DIM, MAX_IMAGES, bounded_int, check_whole_read
from .constants import ATTR_KEY
from .store import TeacherStore

STATS_GROUP = "stats"


STATS_ARRAYS = ("cls_mean", "cls_std", "patch_mean", "patch_std", "phis_mean", "phis_matrix")


@dataclass
class TeacherStats:
    """Statistics of one teacher group over its done images (float64).

    cls_mean, cls_std:     ``(D,)`` per channel over images (population std)
    patch_mean, patch_std: ``(D,)`` per channel over images × tokens
    phis_mean, phis_matrix: ``(D,)``, ``(D, D)``: PHI-S of the patch tokens, ``y = (x − mean) @ matrix.T``
    count: images used (a sample spread evenly over the done images, or all of them)
    done: images done in the group when they were computed (what the reader compares with to warn of new images)
    """

    cls_mean: np.ndarray
    cls_std: np.ndarray
    patch_mean: np.ndarray
    patch_std: np.ndarray
    phis_mean: np.ndarray
    phis_matrix: np.ndarray
    count: int
    done: int | None = None

    def __post_init__(self) -> None:
        if self.done is None:  # statistics over every done image (as all were before sampling existed)
            self.done = self.count


def write_stats(root: str, teacher: str, stats: TeacherStats) -> None:
    """(Re)write ``<root>/<teacher>/stats/``: one float64 array (one chunk, zstd) per field, ``count`` and ``done``
    in the attributes. Only explicit commands write statistics: ``dune-cache stats``, and ``dune-cache
    recompress`` into the new cache it makes."""
    store = TeacherStore.open(root, teacher, mode="a")
    group = store.group.create_group(STATS_GROUP, overwrite=True)
    for name in STATS_ARRAYS:
        value = np.asarray(getattr(stats, name), dtype=np.float64)
        group.create_array(name, data=value, chunks=value.shape, compressors=(zarr.codecs.ZstdCodec(level=3),))
    group.attrs[ATTR_KEY] = {"kind": "teacher_stats", "count": stats.count, "done": stats.done,
                             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def read_stats(root: str, teacher: str) -> TeacherStats | None:
    """The stored statistics of ``teacher``, or ``None`` if ``dune-cache stats`` has not written them. Each array
    must have the shape the group's embed dim ``D`` implies (``(D,)``, PHI-S matrix ``(D, D)``), float64, before it
    is read (a :class:`StoreError` otherwise)."""
    try:
        group = location.open_group(root, path=f"{teacher}/{STATS_GROUP}", mode="r")
    except CacheNotFoundError:
        return None
    meta = group.attrs.get(ATTR_KEY)
    if not meta:
        return None
    where = location.join(root, teacher, STATS_GROUP)
    provenance = location.open_group(root, path=teacher, mode="r").attrs.get(ATTR_KEY) or {}
    dim = bounded_int((provenance.get("teacher") or {}).get("embed_dim"), 1, MAX_DIM, "teacher.embed_dim", where)
    arrays = {}
    for name in STATS_ARRAYS:
        shape = (dim, dim) if name == "phis_matrix" else (dim,)
        array = group[name] if name in group else None
        if array is None:
            raise StoreError(f"{where}: no {name} array; run `dune-cache stats` again")
        arrays[name] = check_whole_read(array, f"{where}/{name}", 8 * MAX_DIM * MAX_DIM, kinds="f", shape=shape)[...]
    count = bounded_int(meta.get("count"), 0, MAX_IMAGES, "stats count", where)
    done = bounded_int(meta.get("done", count), 0, MAX_IMAGES, "stats done", where)
    return TeacherStats(**arrays, count=count, done=done)
