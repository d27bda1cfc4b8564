"""The on-disk cache: one Zarr v3 group per teacher under a cache root (docs/cache-format.md).

Per teacher group ``<root>/<name>/``:

- ``cls``      ``(N, D)``        float16/32, one image per chunk (or ``S`` images per shard)
- ``patch``    ``(N, h, w, D)``  float16/32, one image per chunk (or ``S`` images per shard)
- ``status``   ``(N,)`` uint8    0 pending, 1 done, 2 failed; one chunk per work unit
- ``manifest`` ``(L,)`` uint8    UTF-8 text, one ``id`` or ``id<TAB>tag`` line per image (escaped, see images.py)
- ``failures/unit_<u>`` uint8    UTF-8 JSON lines ``{"index", "image_id", "reason", "message"}``
- ``views/``   only with K cached views per image (``dune-cache extract --views K``):
  ``cls (N, K, D)``, ``patch (N, K, h, w, D)`` (one object per image or shard, one inner chunk per view),
  ``boxes (N, K, 4)`` float32 and ``flip (N, K)`` uint8, one chunk per work unit
- ``levels/b<k>/`` only with intermediate blocks (``dune-cache extract --blocks``): ``cls``, ``patch`` of block k
  laid out like the group's (and ``views/levels/b<k>/`` like ``views/``), ``encoding/`` its own calibration

Every object is written by exactly one work unit's owner, so concurrent writers never collide.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable

import numpy as np
import zarr
import zarr.codecs

from ..config import StorageConfig
from ..encodings import Encoding
from ..encodings.base import check_range
from ..errors import CacheNotFoundError, DamagedFeaturesError, StoreError, StoreMismatchError
from ..images.manifest import ImageManifest
from ..storage import location
from .checks import (
    MAX_CALIBRATION_BYTES,
    MAX_LINE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_RECORD_BYTES,
    check_bounds,
    check_layout,
    check_provenance,
    check_whole_read,
)
from .layout import (
    ArrayLayout,
    create_arrays,
    create_image_features,
    create_level_arrays,
    create_view_arrays,
    group_layouts,
    status_layout,
)
from .levels import block_of, level_names, level_prefix
from .provenance import provenance_differences
from .rows import contiguous_runs, disjoint_parts, run_all

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTR_KEY = "dune_cache"
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
FLOAT16_MAX = 65504.0
VIEW_ARRAYS = ("cls", "patch", "boxes", "flip")
FEATURES = ("cls", "patch", "views/cls", "views/patch")  # feature arrays, stored through the group's encoding
ENCODING_GROUP = "encoding"  # calibration arrays of the group's encoding (docs/cache-format.md, "Encodings")
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}  # zarr array config of feature writes (TeacherStore.write_features)
CREATION_WAIT_S = 600.0  # how long a non-creator slot waits for slot 0 to create a teacher group
CREATION_POLL_S = 0.5
FRESH_GROUP_S = 10.0  # with --overwrite, a group this much older than a slot's own provenance is the old one


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """Bool ``(B,)``: rows of ``values`` ``(B, ...)`` holding any NaN or infinity."""
    return ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)


def damaged_message(teacher: str, array: str, image_ids: list[str], root: str, opt_in: str = "") -> str:
    """One paragraph naming the damaged images (the first 10) and the fix."""
    shown = ", ".join(image_ids[:10]) + (f" and {len(image_ids) - 10} more" if len(image_ids) > 10 else "")
    return (f"teacher {teacher}: {array} of {len(image_ids)} image(s) marked done decode to NaN/inf, i.e. their "
            f"chunks are missing or damaged: {shown}. Nothing was trained or computed on them. Find every damaged "
            f"image with `dune-cache verify {root}` and re-extract just those with `dune-cache repair {root}`"
            f"{opt_in}.")


def take_rows(values, rows):
    """Rows ``rows`` (a slice, an index or a bool array) of float rows or of every part of encoded ones."""
    return {suffix: part[rows] for suffix, part in values.items()} if isinstance(values, dict) else values[rows]


def concat_rows(values: list, order: np.ndarray | None = None):
    """Float rows, or encoded parts suffix by suffix, of ``values`` end to end (then in ``order``, if given)."""
    pick = (lambda joined: joined) if order is None else (lambda joined: joined[order])
    if isinstance(values[0], dict):
        return {suffix: pick(np.concatenate([v[suffix] for v in values])) for suffix in values[0]}
    return pick(np.concatenate(values))


def row_count(values) -> int:
    """How many images (or views) float rows or encoded parts hold."""
    return len(next(iter(values.values()))) if isinstance(values, dict) else len(values)


@dataclass
class ViewRows:
    """The K cached views of B images: cls ``(B, K, D)``, patch ``(B, K, h, w, D)`` in the storage dtype (or their
    encoded parts by suffix), boxes ``(B, K, 4)`` float32 ``(y0, x0, y1, x1)`` relative to the original image, flip
    ``(B, K)`` uint8; levels: level feature name (``levels/b{k}/cls|patch``) -> the views' values ``(B, K, ...)`` at
    that block (or their parts)."""

    cls: np.ndarray
    patch: np.ndarray
    boxes: np.ndarray
    flip: np.ndarray
    levels: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, rows: slice | np.ndarray) -> "ViewRows":
        """The views of the images at batch positions ``rows``."""
        return ViewRows(cls=take_rows(self.cls, rows), patch=take_rows(self.patch, rows), boxes=self.boxes[rows],
                        flip=self.flip[rows], levels={name: take_rows(v, rows) for name, v in self.levels.items()})


def unit_bounds(unit: int, images_per_unit: int, count: int) -> tuple[int, int]:
    """Image index range ``[lo, hi)`` of a work unit."""
    lo = unit * images_per_unit
    return lo, min(lo + images_per_unit, count)


RECORDS_PREFIX, LEGACY_PREFIX = "records", "unit"  # failures/records_<u> groups; unit_<u> arrays of earlier versions


def failure_key(unit: int) -> str:
    """Name of the failure-record group of ``unit`` under ``<teacher>/failures/``."""
    return f"{RECORDS_PREFIX}_{unit:08d}"


def legacy_failure_key(unit: int) -> str:
    """Name of the failure-record array earlier versions wrote for ``unit`` (read, and removed on rewrite)."""
    return f"{LEGACY_PREFIX}_{unit:08d}"


def open_root(root: str, mode: str = "a") -> zarr.Group:
    """Open a cache root (a path or URL, see :mod:`dune_cache.storage.location`): ``mode="r"`` read-only, never
    writing (:class:`CacheNotFoundError` when there is none); ``"a"`` creating it if needed (a
    :class:`StoreError` when the location refuses writes)."""
    group = location.open_group(root, mode=mode)
    if mode != "r" and ATTR_KEY not in group.attrs:
        group.attrs[ATTR_KEY] = {"format_version": FORMAT_VERSION, "kind": "cache_root"}
    return group


def is_fresh(created: str | None, own_created: str | None) -> bool:
    """Whether a group ``created`` (ISO-8601) at most :data:`FRESH_GROUP_S` before ``own_created``."""
    if not created or not own_created:
        return False
    age = dt.datetime.fromisoformat(own_created) - dt.datetime.fromisoformat(created)
    return age.total_seconds() <= FRESH_GROUP_S


def check_same_settings(store: "TeacherStore", provenance: dict, url: str) -> None:
    """Refuse (:class:`StoreMismatchError`, listing each difference) a group made with other settings."""
    diffs = provenance_differences(store.provenance, provenance)
    if diffs:
        raise StoreMismatchError(
            f"cache {url} was made with different settings; refusing to mix them "
            f"(use --overwrite to replace it, or another --out/--name):\n  " + "\n  ".join(diffs))


class TeacherStore:
    """Read/write access to one teacher group of a cache."""

    def __init__(self, group: zarr.Group):
        self.group = group
        meta = group.attrs.get(ATTR_KEY)
        if not meta or "teacher" not in meta:
            raise StoreError(f"{group.path or group.store}: not a dune_cache teacher group (no provenance)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{group.path}: format version {meta.get('format_version')}, this package reads {FORMAT_VERSION}")
        where = str(group.path or group.store)
        check_provenance(meta, where)  # numbers in range before any layout is computed from them
        meta["storage"].setdefault("checksum", False)  # groups made before checksums (in memory only)
        self.provenance: dict = meta
        self.dim = int(meta["teacher"]["embed_dim"])
        self.encoding = Encoding.load(meta["storage"].get("encoding"), self.dim, meta["storage"]["dtype"],
                                      partial(read_calibration, group, ENCODING_GROUP))
        self.count = int(meta["images"]["count"])
        self.images_per_unit = int(meta["storage"]["shard_images"] or meta["storage"]["unit_size"])
        self.images_per_object = int(meta["storage"]["shard_images"] or 1)  # of each feature array
        self.num_views = int(meta["views"]["count"]) if "views" in meta else 0
        levels = meta.get("levels") or {}
        self.blocks: tuple[int, ...] = tuple(levels.get("blocks", ()))  # intermediate blocks stored (levels/b{k})
        self.level_encodings: dict[int, Encoding] = {  # each level's own calibration, under levels/b{k}/encoding
            k: Encoding.load(levels.get("encodings", {}).get(f"b{k}"), self.dim, meta["storage"]["dtype"],
                             partial(read_calibration, group, f"{level_prefix(k)}/{ENCODING_GROUP}"))
            for k in self.blocks}
        check_layout(group, self.layouts(), where)  # every array as this format lays it out, before any read
        self.cls = group["cls"]  # stored values (codes under an encoding with a decode step): see read_features
        self.patch = group["patch"]
        self.status = group["status"]
        self.views: zarr.Group | None = group["views"] if self.num_views else None

    def layouts(self) -> list[ArrayLayout]:
        """The arrays its provenance implies (:func:`.layout.group_layouts`)."""
        storage = StorageConfig.from_json(self.provenance["storage"])
        return group_layouts(self.count, tuple(self.provenance["geometry"]["grid"]), storage, self.encoding,
                             self.num_views, self.blocks, self.level_encodings)

    # ---- creation / opening ---------------------------------------------------------
    @classmethod
    def open(cls, root: str, name: str, mode: str = "r") -> "TeacherStore":
        """Open teacher group ``name`` of cache ``root`` (a path or URL); ``mode="r"`` never writes."""
        try:
            group = location.open_group(root, path=name, mode="r+" if mode != "r" else "r")
        except CacheNotFoundError as exc:
            raise CacheNotFoundError(f"cache {root} has no teacher group {name!r}") from exc
        return cls(group)

    @classmethod
    def create(cls, root: str, name: str, provenance: dict, manifest: ImageManifest,
               grid: tuple[int, int], dim: int, storage: StorageConfig, views: int = 0,
               encoding: Encoding | None = None, level_encodings: dict[int, Encoding] | None = None
               ) -> "TeacherStore":
        """Create teacher group ``name`` (with a ``views/`` subgroup of ``views`` views per image when > 0).
        ``encoding``: ``storage.encoding`` calibrated (:meth:`Encoding.calibrate`; may be omitted for
        encodings that need no calibration); its arrays go to ``encoding/`` and its description to provenance
        ``storage.encoding``. Provenance ``levels.blocks`` (if any) adds the ``levels/b{k}`` arrays, each block
        with its encoding ``level_encodings[k]`` (calibrated on that block's features, arrays under
        ``levels/b{k}/encoding/``, described in provenance ``levels.encodings``). Provenance is written last and
        marks the group complete."""
        encoding = encoding or Encoding.calibrate(storage.encoding, dim, storage.dtype)
        blocks = tuple((provenance.get("levels") or {}).get("blocks", ()))
        level_encodings = {k: (level_encodings or {}).get(k) or Encoding.calibrate(storage.encoding, dim, storage.dtype)
                           for k in blocks}
        for enc in (encoding, *level_encodings.values()):
            if enc.config != storage.encoding:
                raise StoreError(f"encoding {enc} differs from the storage's {storage.encoding}")
        n = len(manifest)
        where = location.join(root, name)
        check_provenance(provenance, where)  # what readers would refuse is never written
        check_bounds(group_layouts(n, grid, storage, encoding, views, blocks, level_encodings), where)
        parent = open_root(root)
        group = parent.create_group(name)
        create_image_features(group, n, grid, storage, encoding)
        create_arrays(group, [status_layout(n, storage)])
        if views:
            create_view_arrays(group.create_group("views"), n, views, grid, storage, encoding)
        create_level_arrays(group, blocks, n, views, grid, storage, level_encodings)
        write_calibration(group.create_group(ENCODING_GROUP), encoding)
        for k, level_encoding in level_encodings.items():
            write_calibration(group.require_group(f"{level_prefix(k)}/{ENCODING_GROUP}"), level_encoding)
        text = np.frombuffer(manifest.to_text().encode("utf-8"), dtype=np.uint8)
        group.create_array("manifest", data=text, chunks=(min(max(len(text), 1), 1 << 22),),
                           compressors=(zarr.codecs.ZstdCodec(level=3),), attributes=manifest.text_attributes())
        group.create_group("failures")
        section = {k: v for k, v in provenance["storage"].items() if k != "encoding"}
        levels = {k: v for k, v in (provenance.get("levels") or {}).items() if k != "encodings"}
        if encoding.name != "none":
            section["encoding"] = encoding.to_json()
            levels["encodings"] = {f"b{k}": e.to_json() for k, e in level_encodings.items()}
        group.attrs[ATTR_KEY] = {**provenance, "storage": section, **({"levels": levels} if blocks else {})}
        return cls(group)

    @classmethod
    def open_or_create(cls, root: str, name: str, provenance: dict, manifest: ImageManifest,
                       grid: tuple[int, int], dim: int, storage: StorageConfig,
                       overwrite: bool = False, views: int = 0, encoding: Encoding | None = None,
                       creator: bool = True, wait_s: float = CREATION_WAIT_S,
                       level_encodings: dict[int, Encoding] | None = None) -> "TeacherStore":
        """Resume a matching store, create a missing one, or refuse a mismatching one (unless ``overwrite``).
        ``encoding``: the calibrated encoding for a group created here (see :meth:`create`); a resumed
        group keeps its stored one.

        Several processes filling one store (``--shard i/n``, torchrun ranks) never race on creation, also on
        object stores, which have no atomic create-if-absent: only the ``creator`` (slot 0) creates, or with
        ``overwrite`` replaces, the group; every other process writes no metadata and waits up to ``wait_s``
        for the creator's provenance (written last), see :meth:`wait_for_creator`."""
        if not creator:
            store = cls.wait_for_creator(root, name, provenance, overwrite, wait_s)
        else:
            parent = open_root(root)
            if name in parent and not overwrite and ATTR_KEY not in parent[name].attrs:
                log.warning("%s has no provenance: its creation was interrupted (nothing is written into a group "
                            "before its provenance); creating it again", location.join(root, name))
            if name in parent and (overwrite or ATTR_KEY not in parent[name].attrs):
                del parent[name]
            if name not in parent:
                return cls.create(root, name, provenance, manifest, grid, dim, storage, views, encoding,
                                  level_encodings)
            store = cls.open(root, name, mode="a")
        check_same_settings(store, provenance, location.join(root, name))
        return store

    @classmethod
    def wait_for_creator(cls, root: str, name: str, provenance: dict, overwrite: bool, wait_s: float
                         ) -> "TeacherStore":
        """A non-creator's view of group ``name``: polls until it exists with its provenance (written last),
        logging once what it waits for; a :class:`StoreError` after ``wait_s``. With ``overwrite`` it takes
        only a group the creator (re)made for this run, one that appeared or changed while polling or was
        created at most :data:`FRESH_GROUP_S` before this process's own provenance: an older group is about
        to be replaced, and writing into it would lose work."""
        url = location.join(root, name)
        deadline = time.monotonic() + wait_s
        first_seen: str | None = None
        poll = 0
        while True:
            store = cls.open_if_complete(root, name)
            created = store.provenance.get("created") if store is not None else None
            first_seen = created if poll == 0 else first_seen
            if store is not None and (not overwrite or created != first_seen
                                      or is_fresh(created, provenance.get("created"))):
                return store
            waiting_for = (f"slot 0 to replace the group created {created} (--overwrite)" if store is not None
                           else "slot 0 (--shard 0/n, torchrun rank 0) to create it")
            if time.monotonic() >= deadline:
                hint = ", or run this slot without --overwrite to join the existing group" if store is not None else ""
                raise StoreError(f"gave up after {wait_s:.0f} s waiting for {waiting_for}: {url}. Start the "
                                 f"slot-0 process (only it creates groups){hint}.")
            if poll == 0:
                log.info("waiting up to %.0f s for %s: %s", wait_s, waiting_for, url)
            poll += 1
            time.sleep(CREATION_POLL_S)

    @classmethod
    def open_if_complete(cls, root: str, name: str, mode: str = "a") -> "TeacherStore | None":
        """Group ``name`` opened (for writing unless ``mode="r"``), or ``None`` while it is missing, has no
        provenance yet, or its metadata is being rewritten (some object stores serve a partly uploaded object:
        truncated JSON)."""
        try:
            complete = ATTR_KEY in location.open_group(root, path=name, mode="r").attrs
        except (CacheNotFoundError, json.JSONDecodeError):
            return None
        return cls.open(root, name, mode=mode) if complete else None

    # ---- reading ------------------------------------------------------------------------
    def manifest(self) -> ImageManifest:
        """The group's image list; the ``manifest`` array's attributes say how its text is escaped (none: raw)."""
        where = f"{self.group.path}/manifest"
        bound = min(MAX_MANIFEST_BYTES, max(1, self.count) * MAX_LINE_BYTES)
        array = check_whole_read(self.group["manifest"], where, bound, kinds="u", ndim=1)
        manifest = ImageManifest.from_stored_text(bytes(array[:]).decode("utf-8"), array.attrs)
        if len(manifest) != self.count:
            raise StoreError(f"{where}: lists {len(manifest)} images, its provenance {self.count}; the group is "
                             "damaged: re-extract it with --overwrite")
        return manifest

    def feature_names(self) -> list[str]:
        """The group's feature arrays: ``cls``, ``patch``, each stored block's ``levels/b{k}/cls|patch`` and, with
        cached views, the same under ``views/``."""
        names = [*FEATURES[:2], *level_names(self.blocks)]
        return names + ([f"views/{name}" for name in names] if self.views is not None else [])

    def encoding_of(self, name: str) -> Encoding:
        """The encoding feature array ``name`` is stored with: its level's own for ``[views/]levels/b{k}/...``."""
        block = block_of(name)
        return self.encoding if block is None else self.level_encodings[block]

    def stored_arrays(self, name: str) -> dict[str, zarr.Array]:
        """``{part suffix: zarr array}`` of feature array ``name`` (one of :meth:`feature_names`)."""
        group = self.group if "/" not in name else self.group[name.rpartition("/")[0]]
        base = name.rpartition("/")[2]
        return {part.suffix: group[base + part.suffix] for part in self.encoding_of(name).parts(name)}

    def read_features(self, name: str, rows: int | slice | np.ndarray, check: bool = True) -> np.ndarray:
        """Decoded float32 features of feature array ``name`` (``cls``, ``patch``, ``views/cls``,
        ``views/patch``, ``[views/]levels/b{k}/cls|patch``) at image ``rows`` (an index, a slice or an index
        array; ``(..., D)``). Chunks never written decode to NaN: that is what pending and failed images hold, while a done image holding any is
        damaged, a :class:`DamagedFeaturesError` naming it (``check=False``: returned as read, for ``verify``)."""
        if name not in self.feature_names():
            raise StoreError(f"{self.group.path}: no feature array {name!r} (it has {', '.join(self.feature_names())})")
        parts = {suffix: array.oindex[rows] for suffix, array in self.stored_arrays(name).items()}
        values = self.encoding_of(name).decode_numpy(name, parts)
        if check:
            single = isinstance(rows, (int, np.integer))
            self.refuse_damaged(name, rows, nonfinite_rows(values[None] if single else values))
        return values

    def refuse_damaged(self, name: str, rows: int | slice | np.ndarray, nonfinite: np.ndarray) -> None:
        """A :class:`DamagedFeaturesError` when an image of ``rows`` whose features ``name`` read as non-finite
        (bool ``nonfinite``, one per row) is marked done (the status of those images is read only then)."""
        if not nonfinite.any():
            return
        indices = np.arange(*rows.indices(self.count)) if isinstance(rows, slice) else np.atleast_1d(rows)
        suspects = indices[nonfinite]
        damaged = suspects[self.status.oindex[suspects] == STATUS_DONE]
        if len(damaged):
            ids = self.manifest().ids
            root = str(self.group.store).removeprefix("file://")
            raise DamagedFeaturesError(damaged_message(self.group.basename, name, [ids[i] for i in damaged], root))

    def read_status(self, units: Iterable[int] | None = None) -> np.ndarray:
        """Status ``(N,)`` of every image; with ``units``, only those units' chunks are read and the other
        entries are :data:`STATUS_PENDING` (an extraction slot reads only what it owns: other slots may be
        writing the rest)."""
        if units is None:
            return np.asarray(self.status[:], dtype=np.uint8)
        status = np.full(self.count, STATUS_PENDING, dtype=np.uint8)
        spans = [np.arange(*unit_bounds(unit, self.images_per_unit, self.count)) for unit in units]
        if spans:
            owned = np.concatenate(spans)
            status[owned] = self.status.oindex[owned]  # one call: zarr fetches the units' chunks concurrently
        return status

    def read_unit_state(self, units: list[int]) -> tuple[np.ndarray, list[dict], list[dict]]:
        """Status ``(N,)`` (see :meth:`read_status`), failure records of the images of ``units`` marked failed, and
        every record the store holds for them (what :meth:`commit_unit` replaces). Records land before the status
        that marks their images failed and go after the status that stops doing so (:meth:`commit_unit`), so every
        image marked failed has one. A group written by an earlier version (which replaced a unit's record array in
        two steps) may have lost some to a kill: such an image reads as pending and is extracted again (failing
        again, it gets its record back)."""
        status = self.read_status(units)
        stored = self.read_failures(units, stale=True)
        records = [r for r in stored if status[r["index"]] == STATUS_FAILED]
        orphans = np.flatnonzero(status == STATUS_FAILED)
        orphans = orphans[~np.isin(orphans, [r["index"] for r in records])]
        if len(orphans):
            log.warning("%d image(s) of %s were marked failed but their failure records were lost to an interrupted "
                        "write: extracting them again", len(orphans), self.group.path)
            status[orphans] = STATUS_PENDING
        return status, records, stored

    def read_failures(self, units: Iterable[int] | None = None, status: np.ndarray | None = None,
                      stale: bool = False) -> list[dict]:
        """Failure records of every unit (or of ``units`` only) of images marked failed in ``status`` (read when not
        given), sorted by image index: a record of an image not marked failed is one an update has not removed yet,
        and ignored (``stale=True``: every record stored, whatever the status). A unit's records are the attributes
        of its ``records_<unit>`` group; groups written by earlier versions hold them in a ``unit_<unit>`` array
        instead (read when there is no ``records_<unit>``)."""
        wanted = None if units is None else set(units)
        nodes = dict(self.group["failures"].members())  # one listing
        found: dict[int, Any] = {}
        for name, node in nodes.items():
            prefix, _, number = name.partition("_")
            unit = int(number) if number.isdigit() else None
            if unit is None or (wanted is not None and unit not in wanted):
                continue
            if prefix == RECORDS_PREFIX or (prefix == LEGACY_PREFIX and unit not in found):
                found[unit] = node
        records = sorted((r for unit, node in found.items() for r in self.unit_records(node, unit)),
                         key=lambda r: r["index"])
        if stale:
            return records
        status = self.read_status(wanted) if status is None else status
        return [r for r in records if status[r["index"]] == STATUS_FAILED]

    def unit_records(self, node: zarr.Group | zarr.Array, unit: int) -> list[dict]:
        """The records of ``unit`` held by ``node`` (a ``records_<unit>`` group, or an earlier version's
        ``unit_<unit>`` array, whose data reads as none while another process is still writing it), those of images
        outside the unit (a damaged or forged record) left out."""
        where = f"{self.group.path}/failures/{node.basename}"
        if isinstance(node, zarr.Group):
            records = (node.attrs.get(ATTR_KEY) or {}).get("records", [])
        else:
            text = bytes(check_whole_read(node, where, MAX_RECORD_BYTES, kinds="u", ndim=1)[:]).rstrip(b"\0")
            records = [json.loads(line) for line in text.decode("utf-8").splitlines() if line]
        lo, hi = unit_bounds(unit, self.images_per_unit, self.count)
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("index"), int)
                and not isinstance(r["index"], bool) and lo <= r["index"] < hi]

    @property
    def num_units(self) -> int:
        return -(-self.count // self.images_per_unit)

    # ---- writing (one writer per unit) -------------------------------------------------
    def write_rows(self, indices: np.ndarray, cls: np.ndarray, patch: np.ndarray, views: ViewRows | None = None,
                   executor: Executor | None = None, parts: int = 1, levels: dict[str, np.ndarray] | None = None
                   ) -> None:
        """Write features of sorted image ``indices``: cls ``(B, D)``, patch ``(B, h, w, D)``, in a group with
        stored blocks their ``levels`` (``levels/b{k}/cls|patch`` -> ``(B, ...)``, every one of the group's) and,
        in a group with cached views, their ``views`` (with the same levels). With an ``executor``, the features
        are encoded and written in up to ``parts`` tasks that own disjoint objects (whole images, or whole shards), all but one on the
        executor; either way this returns once every write has finished, raising the first error."""
        levels = levels or {}
        self.check_rows(views, levels)
        if views is not None:  # one chunk per work unit: written here, in order
            for start, stop, offset in contiguous_runs(indices):
                for name in ("boxes", "flip"):
                    self.views[name][start:stop] = getattr(views, name)[offset:offset + stop - start]
        slices = disjoint_parts(indices // self.images_per_object, parts if executor is not None else 1)
        features = {"cls": cls, "patch": patch, **levels}
        run_all([partial(self.write_feature_rows, indices[s], {n: take_rows(v, s) for n, v in features.items()},
                         None if views is None else views.take(s)) for s in slices], executor)

    def check_rows(self, views: ViewRows | None, levels: dict[str, np.ndarray]) -> None:
        """Refuse rows to write that do not match the group: views for a group without (or the reverse), or other
        levels than the group stores."""
        if (views is None) != (self.views is None):
            raise StoreError(f"{self.group.path}: has {self.num_views} views per image; "
                             f"got {'no' if views is None else views.cls.shape[1]} views to write")
        wanted = set(level_names(self.blocks))
        if set(levels) != wanted or (views is not None and set(views.levels) != wanted):
            raise StoreError(f"{self.group.path}: stores blocks {list(self.blocks)}; got levels "
                             f"{sorted(levels)} to write")

    def write_unit_block(self, lo: int, hi: int, indices: np.ndarray, cls: np.ndarray, patch: np.ndarray,
                         views: ViewRows | None = None, executor: Executor | None = None,
                         levels: dict[str, np.ndarray] | None = None) -> None:
        """Write images ``lo .. hi`` (a whole work unit: whole shards) of every array at once, from the rows of
        sorted ``indices`` in ``[lo, hi)`` (cls ``(B, D)``, patch ``(B, h, w, D)``, ``levels``, ``views`` as in
        :meth:`write_rows`); images without rows (they failed to decode) are stored as each array's fill value. One
        write per array: zarr-python rewrites a whole shard on every partial write of it (docs/scale.md, "Writes"),
        so assembling the unit first writes each byte once. With an ``executor``, the arrays are written in parallel."""
        self.check_rows(views, levels or {})
        position = np.asarray(indices) - lo
        features = {"cls": cls, "patch": patch, **(levels or {})}
        tasks = [partial(self.write_block, name, lo, hi, position, values) for name, values in features.items()]
        if views is not None:
            tasks += [partial(self.write_block, f"views/{name}", lo, hi, position, values)
                      for name, values in {"cls": views.cls, "patch": views.patch, **views.levels}.items()]
            tasks += [partial(write_filled, self.views[name], lo, hi, position, getattr(views, name))
                      for name in ("boxes", "flip")]
        run_all(tasks, executor)

    def write_block(self, name: str, lo: int, hi: int, position: np.ndarray, values) -> None:
        """Store ``values`` (see :meth:`encoded`) at images ``lo + position`` of feature array ``name``, images
        ``lo .. hi`` written at once (the others as fill values); see :meth:`write_features`."""
        arrays = self.stored_arrays(name)
        for suffix, encoded in self.encoded(name, values).items():
            write_filled(arrays[suffix].with_config(WRITE_EVERY_CHUNK), lo, hi, position, encoded)

    def write_feature_rows(self, indices: np.ndarray, features: dict[str, np.ndarray], views: ViewRows | None) -> None:
        """Encode and write the feature arrays (not the view boxes and flips) of sorted image ``indices``:
        ``features`` name -> ``(B, ...)`` (``cls``, ``patch``, levels)."""
        for start, stop, offset in contiguous_runs(indices):
            rows = slice(offset, offset + stop - start)
            if views is not None:
                for name, values in {"cls": views.cls, "patch": views.patch, **views.levels}.items():
                    self.write_features(f"views/{name}", start, take_rows(values, rows))
            for name, values in features.items():
                self.write_features(name, start, take_rows(values, rows))

    def encoded(self, name: str, values) -> dict[str, np.ndarray]:
        """The parts of feature array ``name`` to store for ``values``: float rows ``(B, ..., D)`` encoded here, or
        parts encoded already (e.g. on the extraction's GPU), their float parts checked to lie in the storage
        dtype's range (:func:`dune_cache.encodings.base.check_range`)."""
        if not isinstance(values, dict):
            return self.encoding_of(name).encode(name, values)
        scheme = self.encoding_of(name).scheme(name)
        return values if scheme.passthrough else check_range(values, scheme.dtype)

    def write_features(self, name: str, start: int, values) -> None:
        """Store ``values`` (float ``(B, ..., D)`` or their encoded parts, see :meth:`encoded`) at images
        ``start .. start + B``. zarr's check for chunks equal to the fill value is skipped
        (:data:`WRITE_EVERY_CHUNK`): encoded features never are (finite values, int8 codes in [-127, 127]), and the
        check is a pass over every chunk, in software for float16 with a NaN fill (~7 ms CPU per 2 MB image, more
        than half of writing it uncompressed)."""
        arrays = self.stored_arrays(name)
        for suffix, encoded in self.encoded(name, values).items():
            arrays[suffix].with_config(WRITE_EVERY_CHUNK)[start:start + len(encoded)] = encoded

    def write_unit_status(self, unit: int, status: np.ndarray) -> None:
        """Rewrite the status chunk of ``unit`` from the full in-memory ``status`` ``(N,)``."""
        lo, hi = unit_bounds(unit, self.images_per_unit, self.count)
        self.status[lo:hi] = status[lo:hi]

    def commit_unit(self, unit: int, status: np.ndarray, records: list[dict], stored: list[dict]) -> None:
        """Write the status chunk of ``unit`` (from the full in-memory ``status``) and its failure ``records``, which
        replace ``stored`` (what the store holds now), so that at every instant each image marked failed has its
        record: records that come land (with those that stay) before the status, records that go are removed after
        it. Every object write is atomic (zarr's LocalStore renames a temporary file; an object store puts a whole
        object), so a kill between two writes leaves one of these consistent states (docs/reliability.md)."""
        union = {r["index"]: r for r in stored} | {r["index"]: r for r in records}
        before = [union[i] for i in sorted(union)]
        if before != stored:
            self.write_unit_failures(unit, before)
        self.write_unit_status(unit, status)
        if list(records) != before:
            self.write_unit_failures(unit, records)

    def write_unit_failures(self, unit: int, records: Iterable[dict]) -> None:
        """Replace the failure records of ``unit`` in one object write: the attributes of group
        ``failures/records_<unit>`` (created, or its ``zarr.json`` rewritten; removed when there are none). A record
        array an earlier version wrote for the unit is removed afterwards. Use :meth:`commit_unit` to change records
        and status together."""
        key, legacy = failure_key(unit), legacy_failure_key(unit)
        failures = self.group["failures"]
        records = list(records)
        attributes = {ATTR_KEY: {"kind": "failure_records", "unit": unit, "records": records}}
        if records:
            try:
                node = failures[key]
            except KeyError:
                failures.create_group(key, attributes=attributes)
            else:
                node.attrs.put(attributes)
        elif key in failures:
            del failures[key]
        if legacy in failures:
            del failures[legacy]

    def nbytes_stored(self) -> int:
        """Bytes the feature arrays (every stored part), the encodings' calibration arrays and cached views
        (with boxes and flips) occupy in the store."""
        return sum(self.nbytes_by_array().values())

    def nbytes_by_array(self) -> dict[str, int]:
        """Stored bytes per feature array (:meth:`feature_names`, every part), per calibration group
        (``encoding``, ``levels/b{k}/encoding``) and of ``views/boxes``, ``views/flip``: one listing."""
        arrays = {name: list(self.stored_arrays(name).values()) for name in self.feature_names()}
        if self.views is not None:
            arrays.update({f"views/{name}": [self.views[name]] for name in ("boxes", "flip")})
        for path in [ENCODING_GROUP, *(f"{level_prefix(k)}/{ENCODING_GROUP}" for k in self.blocks)]:
            if path in self.group:
                arrays[path] = [array for _, array in self.group[path].arrays()]
        sizes = location.object_sizes(self.group.store, self.group.path)
        return {name: sum(size for key, size in sizes.items() if key.startswith(tuple(a.path + "/" for a in group)))
                for name, group in arrays.items()}


def write_filled(array: zarr.Array, lo: int, hi: int, position: np.ndarray, values: np.ndarray) -> None:
    """``array[lo:hi]`` written in one call: ``values`` ``(B, ...)`` at rows ``position`` (relative to ``lo``), the
    array's fill value elsewhere."""
    block = np.full((hi - lo, *values.shape[1:]), array.fill_value, dtype=values.dtype)
    block[position] = values
    array[lo:hi] = block


def read_calibration(group: zarr.Group, path: str, key: str) -> np.ndarray:
    """Calibration array ``key`` of an encoding stored under ``group``/``path`` (at most
    :data:`.checks.MAX_CALIBRATION_BYTES`, checked before it is read)."""
    array = group[f"{path}/{key}"]
    return check_whole_read(array, f"{group.path}/{path}/{key}", MAX_CALIBRATION_BYTES)[...]


def write_calibration(group: zarr.Group, encoding: Encoding) -> None:
    """The calibration arrays of ``encoding`` into ``group`` (one chunk each, zstd)."""
    for key, value in encoding.arrays().items():
        group.create_array(key, data=value, chunks=tuple(max(1, s) for s in value.shape),
                           compressors=(zarr.codecs.ZstdCodec(level=3),))
