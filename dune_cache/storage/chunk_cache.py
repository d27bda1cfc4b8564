"""Local read-through copy of a remote cache's feature chunks, to train from object storage at disk speed.

``CacheReader(url, chunk_cache=DIR)`` keeps, per per-image array of a remote cache (``s3://``, ``gs://``,
...), an :class:`ArrayMirror`: a folder holding the array's ``zarr.json`` and the chunk objects fetched
so far, in the store's own layout, so it is itself a Zarr array that the fast local backends (zarrs)
read. Before a batch is read, its missing objects are downloaded concurrently and written atomically;
later reads (also by other DataLoader workers and later runs) come from local disk.

**What is kept**: only chunk objects (``c/...``) of per-image arrays (first dimension named ``image``)
whose images were all *done* when the reader was built, and those arrays' ``zarr.json`` (shape, chunks,
codecs: fixed when the group is created). Such an object never changes afterwards: extraction writes an
image's chunk before marking it done and never recomputes done images. Group attributes (provenance),
``status``, ``manifest``, ``failures`` and ``stats`` are always read from the remote store (they change
while a cache is filled), and so are objects that also hold pending or failed images (a shard being
filled). An object missing remotely is not kept (it reads as the fill value either way).

**Invalidation**: ``dune-cache repair`` rewrites only objects that are missing (never kept) or that do not
decode; when a kept object fails to decode (crc32c mismatch, truncated file), the reader drops the copies
of the rows it was reading and fetches them again once (:meth:`ArrayMirror.forget`). The folder of a group
is keyed by its URL, provenance ``created`` time and manifest hash, so a group replaced with
``--overwrite`` gets a new folder.

**Size limit**: with ``limit`` bytes (:class:`SpaceLedger`; ``--chunk-cache-limit-gb``), the folder fills until
it holds ``limit`` bytes, then objects not yet kept are read from the remote store on every epoch; nothing is
evicted (training reads every sample once per epoch, so evicting the least recently used object to keep the
next one would make every read a miss). The bytes kept are counted in ``DIR/usage`` (re-measured by walking
``DIR`` when a reader with a limit is built), shared by every reading process under a file lock; each process
may pass the limit by at most one batch of objects. Delete ``DIR`` (or one folder, each with a ``source.json``
naming its group) to reclaim space.

Layout: ``DIR/<sha256(group URL, created, manifest sha256)[:16]>/<array>/{zarr.json, c/...}``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.sync import sync

from . import location

METADATA_KEY = "zarr.json"
FETCH_CONCURRENCY = 64  # simultaneous downloads of chunk objects


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/dune_cache/chunks`` (``~/.cache/dune_cache/chunks`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dune_cache" / "chunks"


def resolve_chunk_cache(value: str | os.PathLike | None) -> Path | None:
    """A chunk-cache setting as a folder: ``""``/``None`` off, ``"default"`` :func:`default_directory`."""
    if not value:
        return None
    return default_directory() if str(value) == "default" else Path(value).expanduser()


def group_directory(base: str | os.PathLike, group_url: str, provenance: dict) -> Path:
    """The folder of one teacher group's kept chunks (created, with a ``source.json``, on first use)."""
    identity = "\n".join([group_url, str(provenance.get("created")), str(provenance["images"]["manifest_sha256"])])
    folder = Path(base).expanduser() / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    if not (folder / "source.json").exists():
        source = {"url": location.redact(group_url), "created": provenance.get("created"),
                  "manifest_sha256": provenance["images"]["manifest_sha256"]}
        write_atomically(folder / "source.json", json.dumps(source, indent=2).encode("utf-8"))
    return folder


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path`` (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def folder_bytes(folder: Path, leave_out: Path | None = None) -> int:
    """Bytes of the files under ``folder`` (``leave_out``: a file not counted)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f != leave_out)


class SpaceLedger:
    """Bytes held by the chunk-cache folder ``base``, counted in ``base/usage`` and shared by every process
    reading through it (file lock); ``limit``: bytes it may hold. Without a limit (0) nothing is counted."""

    FILE = "usage"

    def __init__(self, base: Path, limit: int):
        self.path, self.limit = Path(base) / self.FILE, int(limit)

    @classmethod
    def measured(cls, base: Path, limit: int) -> "SpaceLedger":
        """The ledger of ``base``; with a limit, its count is set to the bytes the folder holds now (a walk)."""
        ledger = cls(base, limit)
        if ledger.limit > 0:
            held = folder_bytes(base, leave_out=ledger.path)
            ledger._update(lambda _: held)
        return ledger

    def _update(self, change) -> int:
        """Apply ``change(bytes held) -> bytes held`` under the lock; returns the new count."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            held = change(int(f.read().strip() or 0))
            f.seek(0)
            f.truncate()
            f.write(str(held).encode("ascii"))
            return held

    def has_room(self) -> bool:
        return self.limit <= 0 or self._update(lambda held: held) < self.limit

    def add(self, nbytes: int) -> None:
        if self.limit > 0:
            self._update(lambda held: max(0, held + nbytes))


class ArrayMirror:
    """Local copy, in ``folder``, of the remote per-image array at ``url``; ``done``: bool ``(N,)`` images done
    when the reader was built. Build with :meth:`create` (``None`` for arrays that cannot be mirrored)."""

    def __init__(self, url: str, folder: Path, done: np.ndarray, rows_per_object: int, ndim: int,
                 ledger: SpaceLedger):
        self.url, self.folder, self.done, self.ledger = url, folder, done, ledger
        self.rows_per_object = rows_per_object  # chunk (or shard) extent along the image axis
        self.key_tail = "/0" * (ndim - 1)  # objects span every other dimension whole
        objects = -(-len(done) // rows_per_object)
        padded = np.ones(objects * rows_per_object, dtype=bool)
        padded[:len(done)] = done
        self.complete = padded.reshape(objects, rows_per_object).all(axis=1)  # (objects,) every image done
        self.present: set[int] = set()  # objects known to be in the folder (this process)

    @classmethod
    def create(cls, url: str, folder: Path, done: np.ndarray, ledger: SpaceLedger) -> "ArrayMirror | None":
        """The mirror of the array at ``url`` (its ``zarr.json`` copied into ``folder`` on first use), or ``None``
        when it is not a per-image array whose objects are ``c/<i>/0/...`` (one row of objects per image block)."""
        path = folder / METADATA_KEY
        if not path.exists():
            value = sync(location.open_store(url, "r").get(METADATA_KEY, default_buffer_prototype()))
            if value is None:
                raise location.CacheNotFoundError(f"no array at {url}")
            write_atomically(path, value.to_bytes())
        meta = json.loads(path.read_bytes())
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding", {})
        if ((meta.get("dimension_names") or [None])[0] != "image" or list(chunks[1:]) != list(shape[1:])
                or encoding.get("name") != "default" or encoding.get("configuration", {}).get("separator", "/") != "/"):
            return None
        return cls(url, folder, done, int(chunks[0]), len(shape), ledger)

    def key(self, index: int) -> str:
        return f"c/{index}{self.key_tail}"

    def kept(self, rows: np.ndarray) -> np.ndarray:
        """Bool ``(B,)``: rows served from the mirror (their object holds done images only)."""
        return self.complete[np.asarray(rows) // self.rows_per_object]

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        """Download the objects of ``rows`` (all :meth:`kept`) that the folder lacks, concurrently, while the
        ledger has room. Bool ``(B,)``: rows to read from the folder (the others: from the remote store)."""
        objects = np.asarray(rows) // self.rows_per_object
        wanted = set(np.unique(objects).tolist()) - self.present
        missing = [o for o in sorted(wanted) if not (self.folder / self.key(o)).exists()]
        self.present |= wanted - set(missing)
        if not missing or self.ledger.has_room():
            self.present |= self.download(missing)
            return np.ones(len(objects), dtype=bool)  # an object missing remotely reads as the fill value here too
        return ~np.isin(objects, missing)

    def download(self, objects: list[int]) -> set[int]:
        """Copy ``objects`` from the remote store into the folder; returns those that exist remotely."""
        if not objects:
            return set()
        store = location.open_store(self.url, "r")
        prototype = default_buffer_prototype()

        async def get(index: int):
            return index, await store.get(self.key(index), prototype)

        written: dict[int, int] = {}
        for index, value in sync(concurrent_map([(o,) for o in objects], get, limit=FETCH_CONCURRENCY)):
            if value is not None:  # missing remotely: reads as the fill value, nothing to keep
                data = value.to_bytes()
                write_atomically(self.folder / self.key(index), data)
                written[index] = len(data)
        self.ledger.add(sum(written.values()))
        return set(written)

    def forget(self, rows: np.ndarray) -> int:
        """Drop the kept objects holding image ``rows``; returns how many were removed."""
        removed = 0
        for index in np.unique(np.asarray(rows) // self.rows_per_object).tolist():
            self.present.discard(index)
            folder = self.folder / "c" / str(index)
            if folder.exists():
                freed = folder_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                self.ledger.add(-freed)
                removed += 1
        return removed
