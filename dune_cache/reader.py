"""Public reader of a cache: teacher groups aligned by image id, batches of float targets.

The trainer touches caches only through :class:`CacheReader`. Sample ``i`` is image
``reader.image_ids[i]``; a teacher group that has no done features for that image gets zeros and
``mask[:, t] == False``. Reading opens everything read-only and never writes to the cache.

Backends decode the same Zarr v3 arrays: ``tensorstore`` (driver ``zarr3``), ``zarrs`` (the Rust
codec pipeline of the ``zarrs`` package plugged into zarr-python) and ``zarr`` (plain
zarr-python ``oindex``). ``backend="auto"`` takes the fastest installed one for the output dtype
(:data:`AUTO_BACKEND_ORDER`, measured).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

from .inspect import teacher_names
from .stats import TeacherStats, read_stats
from .store import STATUS_DONE, STATUS_PENDING, StoreError, TeacherStore

log = logging.getLogger(__name__)

BACKENDS = ("tensorstore", "zarrs", "zarr", "memory")
# Fastest first per output dtype, by `python tools/bench_reader.py` (docs/benchmarks.md, "Reader"):
# random 256-sample batches of a (2000, 16, 16, 1024) float16 blosc-zstd cache, 2-core VM, page cache
# warm; decoded GB/s (GB per CPU-second), quiet machine, plain zarr-python oindex 0.16 (0.13):
#   float32 out: tensorstore 0.78-0.79 (0.43; the cast runs inside tensorstore), zarrs 0.59-0.60 (0.38)
#   float16 out: zarrs 0.85-1.00 (0.59-0.71), tensorstore 0.87-0.91 (0.62-0.64); zarrs also led on a
#   busy machine (0.74-0.79 vs 0.64-0.66). zarr-python itself: 0.14-0.18 either way.
AUTO_BACKEND_ORDER = {torch.float32: ("tensorstore", "zarrs", "zarr"), torch.float16: ("zarrs", "tensorstore", "zarr")}
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
FEATURE_ARRAYS = ("cls", "patch")


class ReaderError(StoreError):
    """A cache cannot be read as asked (missing teacher group, incomplete group, unknown backend)."""


@dataclass
class TargetBatch:
    """Targets of ``B`` samples for ``T`` teacher groups.

    cls:   teacher -> ``(B, D_t)`` float32 (``CacheReader.dtype``), zeros where the mask is False
    patch: teacher -> ``(B, h_t, w_t, D_t)`` float32 (``CacheReader.dtype``), zeros where the mask is False
    mask:  ``(B, T)`` bool, columns in ``CacheReader.teachers`` order
    """

    cls: dict[str, torch.Tensor]
    patch: dict[str, torch.Tensor]
    mask: torch.Tensor


# ---------------------------------------------------------------------------------------
# Backends: open an array read-only; read lists of rows of several arrays concurrently
# ---------------------------------------------------------------------------------------
class TensorstoreRows:
    """tensorstore ``zarr3`` driver; reads of all arrays are issued as futures, then awaited.
    The cast to the output dtype runs inside tensorstore's thread pool."""

    name = "tensorstore"

    def __init__(self) -> None:
        import tensorstore

        self.ts = tensorstore

    def open(self, path: str, dtype: torch.dtype) -> Any:
        kvstore = path if "://" in path else {"driver": "file", "path": path}
        array = self.ts.open({"driver": "zarr3", "kvstore": kvstore}, read=True).result()
        return self.ts.cast(array, self.ts.dtype(str(dtype).removeprefix("torch.")))

    def read(self, requests: list[tuple[Any, np.ndarray]]) -> list[np.ndarray]:
        futures = [array[rows].read() for array, rows in requests]
        return [f.result() for f in futures]


class ZarrRows:
    """zarr-python ``oindex`` (optionally with another codec pipeline, e.g. zarrs); arrays are
    read concurrently from a thread pool, cast to the output dtype by torch."""

    def __init__(self, name: str, codec_pipeline: str | None) -> None:
        self.name, self.codec_pipeline = name, codec_pipeline
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-reader")

    def open(self, path: str, dtype: torch.dtype) -> Any:
        """The array read-only (values come out in the stored dtype; the reader casts them)."""
        settings = {"codec_pipeline.path": self.codec_pipeline} if self.codec_pipeline else {}
        with zarr.config.set(settings):  # the pipeline is bound to the array when it is opened
            return zarr.open_array(store=path, mode="r")

    def read(self, requests: list[tuple[Any, np.ndarray]]) -> list[np.ndarray]:
        futures = [self.pool.submit(lambda a, r: a.oindex[r], array, rows) for array, rows in requests]
        return [f.result() for f in futures]


class MemoryRows:
    """Whole feature arrays decoded into RAM when opened (per process), then indexed: for caches that
    fit in memory, and the in-memory upper bound the disk readers are benchmarked against."""

    name = "memory"

    def open(self, path: str, dtype: torch.dtype) -> np.ndarray:
        return zarr.open_array(store=path, mode="r")[...]

    def read(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [array[rows] for array, rows in requests]


BACKEND_FACTORIES: dict[str, Callable[[], Any]] = {
    "tensorstore": TensorstoreRows,
    "zarrs": lambda: ZarrRows("zarrs", ZARRS_PIPELINE),
    "zarr": lambda: ZarrRows("zarr", None),
    "memory": MemoryRows,
}


def backend_installed(name: str) -> bool:
    """Whether the backend's package can be imported (each disk backend is named after its package)."""
    return name == "memory" or importlib.util.find_spec(name) is not None


def resolve_backend(backend: str, dtype: torch.dtype) -> str:
    """The named backend if installed, or for ``"auto"`` the first installed one of
    :data:`AUTO_BACKEND_ORDER` for the output ``dtype``."""
    if backend == "auto":
        order = AUTO_BACKEND_ORDER.get(dtype, BACKENDS)
        return next(name for name in order if backend_installed(name))  # zarr always is
    if backend not in BACKENDS:
        raise ReaderError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if not backend_installed(backend):
        raise ReaderError(f"reader backend {backend!r} is not installed (pip install {backend})")
    return backend


# ---------------------------------------------------------------------------------------
# Alignment of teacher groups by image id
# ---------------------------------------------------------------------------------------
def open_teacher_stores(root: str, teachers: Sequence[str] | None) -> dict[str, TeacherStore]:
    """Read-only stores of the requested teacher groups (all when ``None``)."""
    available = teacher_names(root)
    wanted = list(teachers) if teachers is not None else available
    missing = [t for t in wanted if t not in available]
    if missing:
        raise ReaderError(f"cache {root} has no teacher group {', '.join(map(repr, missing))}; "
                          f"available: {', '.join(available) or '(none)'}")
    if not wanted:
        raise ReaderError(f"cache {root} has no teacher groups")
    return {name: TeacherStore.open(root, name, mode="r") for name in wanted}


def done_rows(store: TeacherStore, name: str, allow_partial: bool) -> np.ndarray:
    """Indices of done images of a group; refuses a group with pending images unless ``allow_partial``."""
    status = store.read_status()
    pending = int((status == STATUS_PENDING).sum())
    if pending and not allow_partial:
        raise ReaderError(f"teacher group {name!r} is incomplete: {pending} of {len(status)} images pending "
                          f"(finish the extraction, or pass allow_partial=True to use the done images only)")
    return np.flatnonzero(status == STATUS_DONE)


@dataclass
class Alignment:
    """Union of done image ids over groups; ``rows[i, t]`` = row of sample ``i`` in group ``t`` or -1."""

    image_ids: list[str]
    tags: list[str]
    rows: np.ndarray  # (N, T) int64


def align_groups(groups: list[tuple[list[str], list[str], np.ndarray]]) -> Alignment:
    """Align groups given as ``(manifest ids, manifest tags, done rows)``.

    Samples are ordered by first appearance: the first group's done images in manifest order, then
    images only later groups have. A sample's tag is the first non-empty tag among its groups.
    """
    sample_of: dict[str, int] = {}
    image_ids: list[str] = []
    tags: list[str] = []
    columns = []
    for ids, group_tags, done in groups:
        column = {}
        for row in done.tolist():
            image_id = ids[row]
            sample = sample_of.setdefault(image_id, len(image_ids))
            if sample == len(image_ids):
                image_ids.append(image_id)
                tags.append(group_tags[row])
            elif not tags[sample]:
                tags[sample] = group_tags[row]
            column[sample] = row
        columns.append(column)
    rows = np.full((len(image_ids), len(groups)), -1, dtype=np.int64)
    for t, column in enumerate(columns):
        rows[list(column.keys()), t] = list(column.values())
    return Alignment(image_ids=image_ids, tags=tags, rows=rows)


# ---------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------
class CacheReader:
    """Aligned, read-only access to the teacher groups of a cache root.

    ``teachers``: group names to read (all groups when ``None``); a name the cache lacks is an error
    listing the available ones. A group with pending images is an error unless ``allow_partial``
    (then only its done images are used). ``backend``: ``auto`` | ``tensorstore`` | ``zarrs`` |
    ``zarr`` | ``memory`` (whole arrays in RAM); the one used is in ``self.backend`` and logged. ``dtype``: dtype of the returned
    tensors; ``torch.float16`` skips the host-side widening of float16 caches (about half the CPU
    cost of a batch, docs/benchmarks.md) when the conversion can happen on the GPU instead.
    """

    def __init__(self, root: str, teachers: Sequence[str] | None = None, backend: str = "auto",
                 allow_partial: bool = False, dtype: torch.dtype = torch.float32):
        self.root = str(root)
        stores = open_teacher_stores(self.root, teachers)
        self.teachers: list[str] = list(stores)
        self.provenance: dict[str, dict] = {name: s.provenance for name, s in stores.items()}
        self.grids: dict[str, tuple[int, int]] = {name: tuple(s.patch.shape[1:3]) for name, s in stores.items()}
        self.dims: dict[str, int] = {name: int(s.patch.shape[3]) for name, s in stores.items()}
        self.done_counts: dict[str, int] = {}
        groups = []
        for name, store in stores.items():
            done = done_rows(store, name, allow_partial)
            manifest = store.manifest()
            self.done_counts[name] = len(done)
            groups.append((list(manifest.ids), list(manifest.tags), done))
        alignment = align_groups(groups)
        self.image_ids: list[str] = alignment.image_ids
        self.tags: list[str] = alignment.tags
        self.rows: np.ndarray = alignment.rows
        if not dtype.is_floating_point:
            raise ReaderError(f"dtype {dtype} is not a floating point dtype")
        self.dtype = dtype
        self.backend: str = resolve_backend(backend, dtype)
        self._handles: tuple[int, Any, dict[tuple[str, str], Any]] | None = None  # (pid, backend, arrays)
        log.info("CacheReader %s: %d samples, teachers %s, backend %s", self.root, len(self.image_ids),
                 ", ".join(f"{t} ({self.done_counts[t]} done)" for t in self.teachers), self.backend)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:
        """Pickles without open handles (spawn/forkserver workers reopen them on first read)."""
        return {**self.__dict__, "_handles": None}

    def _open_here(self) -> tuple[Any, dict[tuple[str, str], Any]]:
        """Backend and array handles of this process, opened on first use.

        tensorstore aborts and zarrs hangs in a forked child when the parent has opened arrays, so
        nothing is opened before the first :meth:`read`: a reader built in the main process can be
        handed to forked DataLoader workers as long as the main process has not read through it.
        """
        if self._handles is None or self._handles[0] != os.getpid():
            io = BACKEND_FACTORIES[self.backend]()
            arrays = {(name, array): io.open(f"{self.root}/{name}/{array}", self.dtype)
                      for name in self.teachers for array in FEATURE_ARRAYS}
            self._handles = (os.getpid(), io, arrays)
        return self._handles[1], self._handles[2]

    def read(self, indices: np.ndarray) -> TargetBatch:
        """Targets of samples ``indices`` ``(B,)`` (any order, repeats allowed), returned in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)})")
        rows = self.rows[indices]  # (B, T)
        mask = rows >= 0
        io, arrays = self._open_here()
        wanted = [(t, name, array) for t, name in enumerate(self.teachers) if mask[:, t].any()
                  for array in FEATURE_ARRAYS]
        values = io.read([(arrays[name, array], rows[mask[:, t], t]) for t, name, array in wanted])
        decoded = {(name, array): v for (_, name, array), v in zip(wanted, values)}
        n = len(indices)
        cls = {name: self.scatter(decoded.get((name, "cls")), mask[:, t], (n, self.dims[name]))
               for t, name in enumerate(self.teachers)}
        patch = {name: self.scatter(decoded.get((name, "patch")), mask[:, t], (n, *self.grids[name], self.dims[name]))
                 for t, name in enumerate(self.teachers)}
        return TargetBatch(cls=cls, patch=patch, mask=torch.from_numpy(mask))

    def scatter(self, values: np.ndarray | None, valid: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``shape`` of ``self.dtype``: ``values`` ``(valid.sum(), ...)`` at the ``valid`` rows,
        zeros elsewhere."""
        if values is not None and valid.all():
            return torch.from_numpy(values).to(self.dtype)
        out = torch.zeros(shape, dtype=self.dtype)
        if values is not None:
            out[torch.from_numpy(valid)] = torch.from_numpy(values).to(self.dtype)
        return out

    def stats(self, teacher: str) -> TeacherStats | None:
        """Statistics written by ``dune-cache stats`` for ``teacher``; ``None`` if not computed.
        Logs a warning when they cover a different number of images than are done now."""
        if teacher not in self.teachers:
            raise ReaderError(f"teacher {teacher!r} is not read by this reader ({', '.join(self.teachers)})")
        stats = read_stats(self.root, teacher)
        if stats is not None and stats.count != self.done_counts[teacher]:
            log.warning("stats of %s cover %d images, %d are done now: re-run `dune-cache stats`",
                        teacher, stats.count, self.done_counts[teacher])
        return stats
