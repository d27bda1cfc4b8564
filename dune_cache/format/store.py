"""The on-disk cache: one Zarr v3 group per teacher under a cache root (docs/cache-format.md).

Per teacher group ``<root>/<name>/``:

- ``cls``      ``(N, D)``        float16/32, one image per chunk (or ``S`` images per shard)
- ``patch``    ``(N, h, w, D)``  float16/32, one image per chunk (or ``S`` images per shard)
- ``status``   ``(N,)`` uint8    0 pending, 1 done, 2 failed; one chunk per work unit
- ``manifest`` ``(L,)`` uint8    UTF-8 text, one ``id`` or ``id<TAB>tag`` line per image (escaped, see images.py)
- ``failures/records_<u>``        group whose attributes hold the unit's failure records ``{"index", "image_id",
  "reason", "message"}`` (``failures/unit_<u>`` arrays of earlier versions are read and replaced)
- ``views/``   only with K cached views per image (``dune-cache extract --views K``):
  ``cls (N, K, D)``, ``patch (N, K, h, w, D)`` (one object per image or shard, one inner chunk per view),
  ``boxes (N, K, 4)`` float32 and ``flip (N, K)`` uint8, one chunk per work unit
- ``levels/b<k>/`` only with intermediate blocks (``dune-cache extract --blocks``): ``cls``, ``patch`` of block k
  laid out like the group's (and ``views/levels/b<k>/`` like ``views/``), ``encoding/`` its own calibration

Every object is written by exactly one work unit's owner, so concurrent writers never collide.

:class:`TeacherStore` opens and creates a group and reads its features; what it writes is in
:class:`~dune_cache.format.writes.FeatureWrites` (feature rows) and :class:`~dune_cache.format.unit_state.UnitState`
(status and failure records), the format's names and values in :mod:`dune_cache.format.constants`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from functools import partial

import numpy as np
import zarr
import zarr.codecs

from ..config import StorageConfig
from ..encodings import Encoding
from ..errors import CacheNotFoundError, DamagedFeaturesError, StoreError, StoreMismatchError
from ..images.manifest import ImageManifest
from ..storage import location
from .checks import (
    MAX_CALIBRATION_BYTES,
    MAX_LINE_BYTES,
    MAX_MANIFEST_BYTES,
    check_bounds,
    check_layout,
    check_provenance,
    check_whole_read,
)
from .constants import (
    ATTR_KEY,
    ENCODING_GROUP,
    FEATURES,
    FORMAT_VERSION,
    STATUS_DONE,
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
from .unit_state import UnitState
from .writes import FeatureWrites

log = logging.getLogger(__name__)

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


class TeacherStore(UnitState, FeatureWrites):
    """Read/write access to one teacher group of a cache."""

    def __init__(self, group: zarr.Group):
        self.group = group
        meta = group.attrs.get(ATTR_KEY)
        if not meta or "teacher" not in meta:
            raise StoreError(f"{group.path or group.store}: not a dune_cache teacher group (no provenance)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{group.path}: format version {meta.get('format_version')}, "
                             f"this package reads {FORMAT_VERSION}")
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
        array; ``(..., D)``). Chunks never written decode to NaN: that is what pending and failed images hold, while a
        done image holding any is damaged, a :class:`DamagedFeaturesError` naming it (``check=False``: returned as read,
        for ``verify``)."""
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
