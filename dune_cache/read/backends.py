"""Reader backends: open a cache's arrays read-only and read several at once, each at an index ``(rows,)`` (whole
rows) or ``(rows, views)`` (view ``views[j]`` of row ``rows[j]``, int64 arrays).

``tensorstore`` (driver ``zarr3``), ``zarrs`` (the Rust codec pipeline of the ``zarrs`` package plugged into
zarr-python), ``zarr`` (plain zarr-python ``oindex``) and ``memory`` (whole arrays decoded into RAM) all decode the
same Zarr v3 arrays; :func:`resolve_backend` picks one (:class:`dune_cache.read.reader.CacheReader` uses them).
"""
from __future__ import annotations

import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
import zarr

from ..errors import ReaderError
from ..storage import location

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
REMOTE_BACKENDS = ("zarrs", "zarr", "memory")  # zarr-python based: they read over fsspec (dune_cache.storage.location)


class TensorstoreRows:
    """tensorstore ``zarr3`` driver; reads of all arrays are issued as futures, then awaited.
    The cast to the output dtype runs inside tensorstore's thread pool."""

    name = "tensorstore"

    def __init__(self) -> None:
        import tensorstore

        self.ts = tensorstore

    def open(self, url: str, dtype: torch.dtype | None) -> Any:
        """The array read-only, cast to ``dtype`` (``None``: the stored dtype). Local paths only: its s3
        driver is not verified against our test server, so remote caches are read with ``zarr``."""
        path = location.local_path(url)
        if path is None:
            raise ReaderError(f"backend tensorstore reads local caches only, not {url}; use backend zarr")
        array = self.ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, read=True).result()
        return array if dtype is None else self.ts.cast(array, self.ts.dtype(str(dtype).removeprefix("torch.")))

    def read(self, requests: list[tuple[Any, tuple]]) -> list[np.ndarray]:
        futures = [array[index].read() for array, index in requests]
        return [f.result() for f in futures]


class ZarrRows:
    """zarr-python ``oindex`` (optionally with another codec pipeline, e.g. zarrs); arrays are
    read concurrently from a thread pool, cast to the output dtype by torch."""

    def __init__(self, name: str, codec_pipeline: str | None) -> None:
        self.name, self.codec_pipeline = name, codec_pipeline
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-reader")

    def open(self, url: str, dtype: torch.dtype | None) -> Any:
        """The array read-only (values come out in the stored dtype; the reader casts them). zarrs decodes
        local arrays; zarr-python's own pipeline takes over for remote ones."""
        settings = {"codec_pipeline.path": self.codec_pipeline} if self.codec_pipeline else {}
        with zarr.config.set(settings):  # the pipeline is bound to the array when it is opened
            return location.open_array(url, mode="r")

    def read(self, requests: list[tuple[Any, tuple]]) -> list[np.ndarray]:
        futures = [self.pool.submit(self.read_one, array, index) for array, index in requests]
        return [f.result() for f in futures]

    @staticmethod
    def read_one(array: Any, index: tuple) -> np.ndarray:
        """``array[index]``; zarr-python has no vectorised indexing over the leading dimensions only, so
        ``(rows, views)`` is read as one orthogonal read per distinct view."""
        if len(index) == 1:
            return array.oindex[index]
        rows, views = index
        out = np.empty((len(rows), *array.shape[2:]), dtype=array.dtype)
        for view in np.unique(views).tolist():
            at = views == view
            out[at] = array.oindex[rows[at], view]
        return out


class MemoryRows:
    """Whole feature arrays decoded into RAM when opened (per process), then indexed: for caches that
    fit in memory, and the in-memory upper bound the disk readers are benchmarked against."""

    name = "memory"

    def open(self, url: str, dtype: torch.dtype | None) -> np.ndarray:
        return location.open_array(url, mode="r")[...]

    def read(self, requests: list[tuple[np.ndarray, tuple]]) -> list[np.ndarray]:
        return [array[index] for array, index in requests]


BACKEND_FACTORIES: dict[str, Callable[[], Any]] = {
    "tensorstore": TensorstoreRows,
    "zarrs": lambda: ZarrRows("zarrs", ZARRS_PIPELINE),
    "zarr": lambda: ZarrRows("zarr", None),
    "memory": MemoryRows,
}


def backend_installed(name: str) -> bool:
    """Whether the backend's package can be imported (each disk backend is named after its package)."""
    return name == "memory" or importlib.util.find_spec(name) is not None


def resolve_backend(backend: str, dtype: torch.dtype, remote: bool = False, chunk_cache: bool = False,
                    sharded_checksums: bool = False) -> str:
    """The named backend if installed, or for ``"auto"`` the first installed one of
    :data:`AUTO_BACKEND_ORDER` for the output ``dtype``. A ``remote`` cache (a URL) is read by one of
    :data:`REMOTE_BACKENDS`; ``auto`` takes zarrs when a ``chunk_cache`` keeps local copies (it decodes
    those, zarr-python's pipeline the remote objects), else zarr. ``sharded_checksums`` (a sharded group with
    crc32c): ``auto`` never takes zarrs, which skips the crc32c of the inner chunks it reads (docs/sharing.md)."""
    if backend == "auto" and remote:
        use_zarrs = chunk_cache and not sharded_checksums and backend_installed("zarrs")
        chosen = "zarrs" if use_zarrs else "zarr"
        log.info("remote cache: backend %s (tensorstore reads local paths only here; remote objects are decoded "
                 "by zarr-python over fsspec%s)", chosen, ", chunk-cache copies by zarrs" if chosen == "zarrs" else "")
        return chosen
    if backend == "auto":
        order = [name for name in AUTO_BACKEND_ORDER.get(dtype, BACKENDS) if name != "zarrs" or not sharded_checksums]
        return next(name for name in order if backend_installed(name))  # zarr always is
    if backend not in BACKENDS:
        raise ReaderError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if remote and backend not in REMOTE_BACKENDS:
        raise ReaderError(f"reader backend {backend!r} reads local caches only; for a remote cache use "
                          f"{', '.join(REMOTE_BACKENDS)} (or auto)")
    if not backend_installed(backend):
        raise ReaderError(f"reader backend {backend!r} is not installed (pip install {backend})")
    return backend
