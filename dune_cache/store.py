"""The on-disk cache: one Zarr v3 group per teacher under a cache root (docs/cache-format.md).

Per teacher group ``<root>/<name>/``:

- ``cls``      ``(N, D)``        float16/32, one image per chunk (or ``S`` images per shard)
- ``patch``    ``(N, h, w, D)``  float16/32, one image per chunk (or ``S`` images per shard)
- ``status``   ``(N,)`` uint8    0 pending, 1 done, 2 failed; one chunk per work unit
- ``manifest`` ``(L,)`` uint8    UTF-8 text, one ``id`` or ``id<TAB>tag`` line per image
- ``failures/unit_<u>`` uint8    UTF-8 JSON lines ``{"index", "image_id", "reason", "message"}``
- ``views/``   only with K cached views per image (``dune-cache extract --views K``):
  ``cls (N, K, D)``, ``patch (N, K, h, w, D)`` (one object per image or shard, one inner chunk per view),
  ``boxes (N, K, 4)`` float32 and ``flip (N, K)`` uint8, one chunk per work unit

Every object is written by exactly one work unit's owner, so concurrent writers never collide.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import zarr
import zarr.codecs
from zarr.errors import ContainsArrayError, ContainsGroupError

from .images import ImageManifest

FORMAT_VERSION = 1
ATTR_KEY = "dune_cache"
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
CODECS = ("blosc-zstd", "blosc-lz4", "zstd", "gzip", "none")
DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0
# Provenance sections that define what a store *is*; a run that differs in any of them is refused.
# ``views`` is absent in groups without cached views.
IDENTITY_SECTIONS = ("teacher", "checkpoint", "images", "geometry", "storage", "views")
VIEW_ARRAYS = ("cls", "patch", "boxes", "flip")
FLIP_UNWRITTEN = 255  # fill value of ``views/flip``: never written
CREATION_WAIT_S = 120.0


class StoreError(RuntimeError):
    """A cache store cannot be used as asked."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different teacher, checkpoint, image list, geometry or storage."""


@dataclass(frozen=True)
class StorageConfig:
    """How features are stored. ``unit_size`` images form one work unit (one ``status`` chunk);
    with ``shard_images > 0`` arrays are sharded with that many images per shard and the unit
    equals the shard."""

    dtype: str = "float16"
    codec: str = "blosc-zstd"
    level: int = 5
    unit_size: int = 64
    shard_images: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise StoreError(f"codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.unit_size < 1 or self.shard_images < 0:
            raise StoreError("unit_size must be >= 1 and shard_images >= 0")

    @property
    def images_per_unit(self) -> int:
        return self.shard_images or self.unit_size

    def to_json(self) -> dict:
        return asdict(self)


def build_compressors(storage: StorageConfig) -> tuple:
    """Core zarr v3 codecs only, so zarr-python, tensorstore and other v3 readers all open the store."""
    itemsize = np.dtype(storage.dtype).itemsize
    if storage.codec == "none":
        return ()
    if storage.codec == "zstd":
        return (zarr.codecs.ZstdCodec(level=storage.level),)
    if storage.codec == "gzip":
        return (zarr.codecs.GzipCodec(level=storage.level),)
    cname = storage.codec.split("-", 1)[1]
    return (zarr.codecs.BloscCodec(cname=cname, clevel=storage.level, shuffle="shuffle", typesize=itemsize),)


@dataclass
class ViewRows:
    """The K cached views of B images: cls ``(B, K, D)``, patch ``(B, K, h, w, D)`` in the storage dtype,
    boxes ``(B, K, 4)`` float32 ``(y0, x0, y1, x1)`` relative to the original image, flip ``(B, K)`` uint8."""

    cls: np.ndarray
    patch: np.ndarray
    boxes: np.ndarray
    flip: np.ndarray


def unit_bounds(unit: int, images_per_unit: int, count: int) -> tuple[int, int]:
    """Image index range ``[lo, hi)`` of a work unit."""
    lo = unit * images_per_unit
    return lo, min(lo + images_per_unit, count)


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted indices -> ``[(start_index, stop_index, offset_in_input)]`` runs of consecutive values."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def provenance_differences(stored: dict, requested: dict) -> list[str]:
    """Human-readable ``field: store has X, this run has Y`` lines over the identity sections."""
    def identity(meta: dict) -> dict:  # JSON round trip: tuples and lists compare equal
        return flatten(json.loads(json.dumps({k: meta.get(k, {}) for k in IDENTITY_SECTIONS})))

    a, b = identity(stored), identity(requested)
    return [
        f"{key}: store has {a.get(key, '<absent>')!r}, this run has {b.get(key, '<absent>')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def create_view_arrays(group: zarr.Group, n: int, views: int, grid: tuple[int, int], dim: int,
                       storage: StorageConfig) -> None:
    """The arrays of a ``views/`` subgroup. Features: one object per image (or per shard of ``S`` images)
    holding its K views, one inner chunk per view, so reading one view decodes only that view. Boxes and
    flips: one chunk per work unit, like ``status``."""
    per = storage.images_per_unit
    feature_args = dict(dtype=storage.dtype, compressors=build_compressors(storage), fill_value=float("nan"))
    shard_images = storage.shard_images or 1
    group.create_array("cls", shape=(n, views, dim), chunks=(1, 1, dim), shards=(shard_images, views, dim),
                       dimension_names=("image", "view", "channel"), **feature_args)
    group.create_array("patch", shape=(n, views, *grid, dim), chunks=(1, 1, *grid, dim),
                       shards=(shard_images, views, *grid, dim),
                       dimension_names=("image", "view", "y", "x", "channel"), **feature_args)
    small_args = dict(compressors=(zarr.codecs.ZstdCodec(level=3),))
    group.create_array("boxes", shape=(n, views, 4), chunks=(per, views, 4), dtype="float32",
                       fill_value=float("nan"), dimension_names=("image", "view", "coordinate"), **small_args)
    group.create_array("flip", shape=(n, views), chunks=(per, views), dtype="uint8", fill_value=FLIP_UNWRITTEN,
                       dimension_names=("image", "view"), **small_args)


def open_root(root: str, mode: str = "a") -> zarr.Group:
    """Open (``mode="a"`` creating if needed) a cache root group."""
    try:
        group = zarr.open_group(root, mode=mode)
    except FileNotFoundError as exc:
        raise StoreError(f"no cache at {root}") from exc
    if mode != "r" and ATTR_KEY not in group.attrs:
        group.attrs[ATTR_KEY] = {"format_version": FORMAT_VERSION, "kind": "cache_root"}
    return group


class TeacherStore:
    """Read/write access to one teacher group of a cache."""

    def __init__(self, group: zarr.Group):
        self.group = group
        meta = group.attrs.get(ATTR_KEY)
        if not meta or "teacher" not in meta:
            raise StoreError(f"{group.path or group.store}: not a dune_cache teacher group (no provenance)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{group.path}: format version {meta.get('format_version')}, this package reads {FORMAT_VERSION}")
        self.provenance: dict = meta
        self.cls = group["cls"]
        self.patch = group["patch"]
        self.status = group["status"]
        self.count = int(self.cls.shape[0])
        self.images_per_unit = int(meta["storage"]["shard_images"] or meta["storage"]["unit_size"])
        self.num_views = int(meta["views"]["count"]) if "views" in meta else 0
        self.views: zarr.Group | None = group["views"] if self.num_views else None

    # ---- creation / opening ---------------------------------------------------------
    @classmethod
    def open(cls, root: str, name: str, mode: str = "r", wait_s: float = 0.0) -> "TeacherStore":
        """Open teacher group ``name``; waits up to ``wait_s`` for another process to finish creating it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                group = zarr.open_group(root, path=name, mode="r+" if mode != "r" else "r")
                if ATTR_KEY in group.attrs or time.monotonic() >= deadline:
                    return cls(group)
            except FileNotFoundError as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"cache {root} has no teacher group {name!r}") from exc
            time.sleep(0.5)

    @classmethod
    def create(cls, root: str, name: str, provenance: dict, manifest: ImageManifest,
               grid: tuple[int, int], dim: int, storage: StorageConfig, views: int = 0) -> "TeacherStore":
        """Create teacher group ``name`` (with a ``views/`` subgroup of ``views`` views per image when > 0);
        provenance is written last and marks the group complete."""
        parent = open_root(root)
        group = parent.create_group(name)
        n, per = len(manifest), storage.images_per_unit
        compressors = build_compressors(storage)
        feature_args = dict(dtype=storage.dtype, compressors=compressors, fill_value=float("nan"))
        shards = (lambda *rest: (storage.shard_images, *rest)) if storage.shard_images else (lambda *rest: None)
        group.create_array("cls", shape=(n, dim), chunks=(1, dim), shards=shards(dim),
                           dimension_names=("image", "channel"), **feature_args)
        group.create_array("patch", shape=(n, *grid, dim), chunks=(1, *grid, dim), shards=shards(*grid, dim),
                           dimension_names=("image", "y", "x", "channel"), **feature_args)
        group.create_array("status", shape=(n,), chunks=(per,), dtype="uint8", fill_value=STATUS_PENDING,
                           compressors=(zarr.codecs.ZstdCodec(level=3),), dimension_names=("image",))
        if views:
            create_view_arrays(group.create_group("views"), n, views, grid, dim, storage)
        text = np.frombuffer(manifest.to_text().encode("utf-8"), dtype=np.uint8)
        group.create_array("manifest", data=text, chunks=(min(max(len(text), 1), 1 << 22),),
                           compressors=(zarr.codecs.ZstdCodec(level=3),))
        group.create_group("failures")
        group.attrs[ATTR_KEY] = provenance
        return cls(group)

    @classmethod
    def open_or_create(cls, root: str, name: str, provenance: dict, manifest: ImageManifest,
                       grid: tuple[int, int], dim: int, storage: StorageConfig,
                       overwrite: bool = False, views: int = 0) -> "TeacherStore":
        """Resume a matching store, create a missing one, or refuse a mismatching one (unless ``overwrite``)."""
        parent = open_root(root)
        if name in parent and overwrite:
            del parent[name]
        if name not in parent:
            try:
                return cls.create(root, name, provenance, manifest, grid, dim, storage, views)
            except (ContainsGroupError, ContainsArrayError):
                pass  # another process created it concurrently: open and compare below
        store = cls.open(root, name, mode="a", wait_s=CREATION_WAIT_S)
        diffs = provenance_differences(store.provenance, provenance)
        if diffs:
            raise StoreMismatchError(
                f"cache {root}/{name} was made with different settings; refusing to mix them "
                f"(use --overwrite to replace it, or another --out/--name):\n  " + "\n  ".join(diffs))
        return store

    # ---- reading ------------------------------------------------------------------------
    def manifest(self) -> ImageManifest:
        return ImageManifest.from_text(bytes(self.group["manifest"][:]).decode("utf-8"))

    def read_status(self) -> np.ndarray:
        return np.asarray(self.status[:], dtype=np.uint8)

    def read_failures(self) -> list[dict]:
        """All failure records, sorted by image index."""
        records: list[dict] = []
        for _, arr in self.group["failures"].arrays():
            records.extend(json.loads(line) for line in bytes(arr[:]).decode("utf-8").splitlines() if line)
        return sorted(records, key=lambda r: r["index"])

    @property
    def num_units(self) -> int:
        return -(-self.count // self.images_per_unit)

    # ---- writing (one writer per unit) -------------------------------------------------
    def write_rows(self, indices: np.ndarray, cls: np.ndarray, patch: np.ndarray,
                   views: ViewRows | None = None) -> None:
        """Write features of sorted image ``indices``: cls ``(B, D)``, patch ``(B, h, w, D)`` and, in a
        group with cached views, their ``views``."""
        if (views is None) != (self.views is None):
            raise StoreError(f"{self.group.path}: has {self.num_views} views per image; "
                             f"got {'no' if views is None else views.cls.shape[1]} views to write")
        for start, stop, offset in contiguous_runs(indices):
            rows = slice(offset, offset + stop - start)
            if views is not None:
                for name in VIEW_ARRAYS:
                    self.views[name][start:stop] = getattr(views, name)[rows]
            self.patch[start:stop] = patch[rows]
            self.cls[start:stop] = cls[rows]

    def write_unit_status(self, unit: int, status: np.ndarray) -> None:
        """Rewrite the status chunk of ``unit`` from the full in-memory ``status`` ``(N,)``."""
        lo, hi = unit_bounds(unit, self.images_per_unit, self.count)
        self.status[lo:hi] = status[lo:hi]

    def write_unit_failures(self, unit: int, records: Iterable[dict]) -> None:
        """Replace the failure records of ``unit`` (removes the object when there are none)."""
        key = f"unit_{unit:08d}"
        failures = self.group["failures"]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        if not text:
            if key in failures:
                del failures[key]
            return
        failures.create_array(key, data=np.frombuffer(text, dtype=np.uint8), chunks=(len(text),),
                              compressors=(), overwrite=True)

    def nbytes_stored(self) -> int:
        """Bytes the feature arrays (and cached views) occupy in the store."""
        views = [self.views[name] for name in VIEW_ARRAYS] if self.views is not None else []
        return int(sum(array.nbytes_stored() for array in [self.cls, self.patch, *views]))
