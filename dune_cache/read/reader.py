"""Public reader of a cache: teacher groups aligned by image id, batches of float targets.

The trainer touches caches only through :class:`CacheReader`. Sample ``i`` is image
``reader.image_ids[i]``; a teacher group that has no done features for that image gets zeros and
``mask[:, t] == False``. Reading opens everything read-only and never writes to the cache. Caches
extracted with ``--views K`` also serve, per sample, one of its K cached views (``read(indices, views)``)
and that view's crop box and flip (``view_boxes``), so the trainer can show the student the same crop.

Groups stored with an encoding (docs/cache-format.md, "Encodings") are read as their stored parts and
decoded to float targets with torch: in the reading process (``read``), or later on the training device
(``read(..., decode=False)`` in DataLoader workers, then ``decode(batch, device)``).

Backends decode the same Zarr v3 arrays: ``tensorstore`` (driver ``zarr3``), ``zarrs`` (the Rust
codec pipeline of the ``zarrs`` package plugged into zarr-python) and ``zarr`` (plain
zarr-python ``oindex``), see :mod:`dune_cache.read.backends`. ``backend="auto"`` takes the fastest installed one for
the output dtype (``AUTO_BACKEND_ORDER``, measured).

Targets of images marked done that decode to NaN (a chunk lost or never written) are never returned: see
:class:`CacheReader`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from ..encodings import Encoding, Part
from ..errors import DamagedFeaturesError, ReaderError
from ..format.image_copy import ImageCopy, read_info
from ..format.levels import block_of, level_name, level_names
from ..format.stats import TeacherStats, read_stats
from ..format.store import damaged_message
from ..storage import location
from .alignment import align_groups, done_rows, open_teacher_stores
from .backends import resolve_backend
from .batches import FULL_IMAGE, EncodedBatch, TargetBatch, gather_flags, split_reads, unwritten_rows
from .routing import ArrayReads

log = logging.getLogger(__name__)

FEATURE_ARRAYS = ("cls", "patch")


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is a floating point dtype (the reader returns float targets), else a :class:`ReaderError`."""
    if not dtype.is_floating_point:
        raise ReaderError(f"dtype {dtype} is not a floating point dtype")
    return dtype


class CacheReader:
    """Aligned, read-only access to the teacher groups of a cache root.

    ``teachers``: group names to read (all groups when ``None``); a name the cache lacks is an error
    listing the available ones. A group with pending images is an error unless ``allow_partial``
    (then only its done images are used). ``backend``: ``auto`` | ``tensorstore`` | ``zarrs`` |
    ``zarr`` | ``memory`` (whole arrays in RAM); the one used is in ``self.backend`` and logged. ``dtype``: dtype of the
    returned tensors; ``torch.float16`` skips the host-side widening of float16 caches (about half the CPU
    cost of a batch, docs/benchmarks.md) when the conversion can happen on the GPU instead.

    ``root`` is a path or an fsspec URL (``s3://bucket/cache.zarr``, see :mod:`dune_cache.storage.location`); a
    remote cache is read by zarr-python over fsspec. ``chunk_cache``: a local folder keeping copies of the remote
    cache's feature chunks as they are read, decoded by zarrs (:mod:`dune_cache.storage.chunk_cache`; e.g.
    ``chunk_cache.default_directory()``); ignored for local caches and the memory backend. How reads are routed
    there and retried: :mod:`dune_cache.read.routing`.
    ``chunk_cache_limit``: bytes the chunk cache folder may hold (0: no limit); once full, chunks not yet kept
    are read from the remote store.

    Targets of done images that decode to NaN/inf (a lost or never-written chunk reads as the NaN fill value)
    are a :class:`DamagedFeaturesError` naming teacher, array and image; with ``skip_damaged`` they are dropped
    instead (mask False, zeros, counted in ``TargetBatch.damaged``) and logged.

    ``levels``: also read the intermediate blocks each group stores (``dune-cache extract --blocks``; which ones:
    ``self.blocks``) into ``TargetBatch.level_cls`` / ``level_patch``, decoded with each level's encoding.
    """

    def __init__(self, root: str, teachers: Sequence[str] | None = None, backend: str = "auto",
                 allow_partial: bool = False, dtype: torch.dtype = torch.float32,
                 chunk_cache: str | os.PathLike | None = None, chunk_cache_limit: int = 0,
                 skip_damaged: bool = False, levels: bool = False):
        self.root = str(root)
        self.levels = levels
        self.skip_damaged = skip_damaged
        remote = location.is_remote(self.root)
        stores = open_teacher_stores(self.root, teachers)
        self.teachers: list[str] = list(stores)
        self.provenance: dict[str, dict] = {name: s.provenance for name, s in stores.items()}
        self.grids: dict[str, tuple[int, int]] = {name: tuple(s.patch.shape[1:3]) for name, s in stores.items()}
        self.dims: dict[str, int] = {name: s.dim for name, s in stores.items()}  # the teacher's embed dim
        self.encodings: dict[str, Encoding] = {name: s.encoding for name, s in stores.items()}
        self.blocks: dict[str, tuple[int, ...]] = {name: s.blocks for name, s in stores.items()}  # () when none
        self.level_encodings: dict[str, dict[int, Encoding]] = {name: s.level_encodings for name, s in stores.items()}
        self.num_views: dict[str, int] = {name: s.num_views for name, s in stores.items()}  # K, 0 without views
        self.done_counts: dict[str, int] = {}
        kept = os.fspath(chunk_cache) if chunk_cache and remote else None  # the chunk cache, for a remote root
        done_masks: dict[str, np.ndarray] = {}  # group rows done now: the chunk cache keeps only those
        groups = []
        for name, store in stores.items():
            done = done_rows(store, name, allow_partial)
            manifest = store.manifest()
            self.done_counts[name] = len(done)
            if kept:
                done_masks[name] = np.zeros(store.count, dtype=bool)
                done_masks[name][done] = True
            groups.append((list(manifest.ids), list(manifest.tags), done))
        alignment = align_groups(groups)
        self.image_ids: list[str] = alignment.image_ids
        self.tags: list[str] = alignment.tags
        self.rows: np.ndarray = alignment.rows
        self._sharded_checksums = any(store.images_per_object > 1 and store.provenance["storage"]["checksum"]
                                      for store in stores.values())
        self.dtype = check_dtype(dtype)
        self.backend: str = resolve_backend(backend, dtype, remote, kept is not None, self._sharded_checksums)
        self._requested_backend = backend
        self._io = ArrayReads(self.root, self.backend, kept, chunk_cache_limit, done_masks, self.provenance)
        info = read_info(self.root)  # the cache's own copy of its images (dune-cache add-images), if any
        self.image_copy: ImageCopy | None = ImageCopy(self.root, info) if info is not None else None
        limit = f" (limit {chunk_cache_limit / 1e9:.1f} GB)" if chunk_cache_limit > 0 else ""
        log.info("CacheReader %s: %d samples, teachers %s, backend %s%s",
                 location.redact(self.root), len(self.image_ids),
                 ", ".join(f"{t} ({self.done_counts[t]} done)" for t in self.teachers), self.backend,
                 f", chunk cache {kept}{limit}" if kept else "")
        if chunk_cache and not remote:
            log.info("chunk cache %s not used: %s is a local cache", chunk_cache, self.root)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def chunk_cache(self) -> str | None:
        """The local folder keeping copies of this remote cache's chunks (``None``: none)."""
        return self._io.chunk_cache

    def with_options(self, dtype: torch.dtype | None = None, levels: bool | None = None) -> "CacheReader":
        """The same reader returning ``dtype`` targets and reading levels or not (``None``: as this one), without
        reading the cache's metadata again; ``backend="auto"`` is resolved again for ``dtype`` (the fastest backend
        depends on it), and nothing opened is shared with this reader."""
        other = copy.copy(self)
        other.dtype = check_dtype(self.dtype if dtype is None else dtype)
        other.levels = self.levels if levels is None else levels
        other.backend = resolve_backend(self._requested_backend, other.dtype, location.is_remote(self.root),
                                        self.chunk_cache is not None, self._sharded_checksums)
        other._io = self._io.for_backend(other.backend)
        return other

    def _read_checked(self, requests: list[tuple[str, str, torch.dtype | None, tuple]]) -> list[np.ndarray]:
        """The values of each request (see :mod:`dune_cache.read.routing`), a chunk that does not decode named by its
        image."""
        return self._io.read(requests, self._image_of)

    def _image_of(self, teacher: str, row: int) -> str:
        """The image id of ``teacher``'s group row ``row``."""
        column = self.teachers.index(teacher)
        return self.image_ids[int(np.flatnonzero(self.rows[:, column] == row)[0])]

    def _part_dtype(self, teacher: str, kind: str, part: Part) -> torch.dtype:
        """Dtype a stored part of ``kind`` is read in: ``self.dtype`` for encodings without a decode step (the
        backend casts), the stored dtype otherwise."""
        return self.dtype if self._encoding(teacher, kind).passthrough else getattr(torch, part.dtype)

    def _kinds(self, teacher: str) -> list[str]:
        """Feature arrays read per sample of ``teacher``: ``cls``, ``patch`` and, with ``levels``, its levels'."""
        return [*FEATURE_ARRAYS, *(level_names(self.blocks[teacher]) if self.levels else ())]

    def _encoding(self, teacher: str, kind: str) -> Encoding:
        """The encoding ``kind`` (``cls``, ``patch``, ``levels/b{k}/...``) of ``teacher`` is stored with."""
        block = block_of(kind)
        return self.encodings[teacher] if block is None else self.level_encodings[teacher][block]

    def views_per_image(self) -> int:
        """K, the number of cached views per image, shared by all teachers read (with the same boxes: the
        same ``views`` provenance); an error naming the groups otherwise."""
        sections = {name: self.provenance[name].get("views") for name in self.teachers}
        without = [name for name, section in sections.items() if section is None]
        if without:
            raise ReaderError(f"teacher group(s) {', '.join(without)} have no cached views "
                              f"(extract them with `dune-cache extract --views K`)")
        if len({json.dumps(section, sort_keys=True) for section in sections.values()}) > 1:
            raise ReaderError("teacher groups were extracted with different views (count K, seed or sampling), so "
                              f"their boxes differ and they cannot be read together with views: {sections}")
        return int(next(iter(sections.values()))["count"])

    def _check_views(self, indices: np.ndarray, views: np.ndarray | None) -> np.ndarray:
        """``(B,)`` int64 view index per sample (``FULL_IMAGE`` everywhere when ``views`` is None)."""
        if views is None:
            return np.full(len(indices), FULL_IMAGE, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        if views.shape != indices.shape:
            raise ReaderError(f"views {views.shape} must have the shape of indices {indices.shape}")
        if views.size and views.max() > FULL_IMAGE:
            count = self.views_per_image()
            if views.max() >= count:
                raise IndexError(f"view indices must lie in [-1, {count})")
        if views.size and views.min() < FULL_IMAGE:
            raise IndexError("view indices must be >= -1 (-1: the whole image)")
        return views

    def _sample_rows(self, indices: np.ndarray) -> np.ndarray:
        """``(B, T)`` row of each sample in each group (-1: none), for sample ``indices`` ``(B,)``."""
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)})")
        return self.rows[indices]

    def read(self, indices: np.ndarray, views: np.ndarray | None = None,
             decode: bool = True) -> TargetBatch | EncodedBatch:
        """Targets of samples ``indices`` ``(B,)`` (any order, repeats allowed), returned in that order.

        views: ``(B,)`` which cached view of each sample (``0 .. K-1``; ``-1`` the whole image); ``None``:
        the whole images. Every teacher then returns the targets of that view.
        decode: ``False`` returns the stored parts (:class:`EncodedBatch`), e.g. in DataLoader workers, for
        :meth:`decode` on the training device.
        """
        indices = np.asarray(indices, dtype=np.int64)
        rows = self._sample_rows(indices)  # (B, T)
        views = self._check_views(indices, views)
        reads = [(name, prefix, kind, part, selected, index) for t, name in enumerate(self.teachers)
                 for prefix, selected, index in split_reads(rows[:, t], views) for kind in self._kinds(name)
                 for part in self._encoding(name, kind).parts(kind)]
        values = self._read_checked([(name, prefix + kind + part.suffix, self._part_dtype(name, kind, part), index)
                                     for name, prefix, kind, part, _, index in reads])
        gathered: dict[tuple[str, str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
        for (name, _, kind, part, selected, _), value in zip(reads, values):
            gathered.setdefault((name, kind, part.suffix), []).append((value, selected))
        n = len(indices)
        stored = {name: {kind: {part.suffix: self.assemble(gathered.get((name, kind, part.suffix), []),
                                                           part.stored_shape((n,), self._token_shape(name, kind)),
                                                           self._part_dtype(name, kind, part))
                                for part in self._encoding(name, kind).parts(kind)}
                         for kind in self._kinds(name)}
                  for name in self.teachers}
        batch = EncodedBatch(cls={name: stored[name]["cls"] for name in self.teachers},
                             patch={name: stored[name]["patch"] for name in self.teachers},
                             mask=torch.from_numpy(rows >= 0), indices=indices, views=views,
                             **self._by_level(stored))
        return self.decode(batch) if decode else batch

    def _by_level(self, values: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[int, Any]]]:
        """``level_cls`` and ``level_patch`` (teacher -> block -> value) out of teacher -> kind -> value."""
        if not self.levels:
            return {"level_cls": {}, "level_patch": {}}
        return {f"level_{kind}": {name: {k: values[name][level_name(k, kind)] for k in self.blocks[name]}
                                  for name in self.teachers}
                for kind in FEATURE_ARRAYS}

    def _token_shape(self, teacher: str, kind: str) -> tuple[int, ...]:
        """Per-sample shape of ``kind`` without the channels: ``()`` for cls, the grid for patch (also of levels)."""
        return () if kind.endswith("cls") else self.grids[teacher]

    def decode(self, batch: EncodedBatch, device: torch.device | str | None = None,
               defer_damage: bool = False) -> TargetBatch:
        """Float targets (``self.dtype``) of an :class:`EncodedBatch` on ``device`` (default: where the parts
        are), zeros where the mask is False; only the calibration arrays of the encodings are needed, so any
        process holding a reader of the same cache can decode (e.g. the trainer on its GPU). Damaged targets
        (:func:`unwritten_rows`) are an error, or dropped with ``skip_damaged``.

        ``defer_damage``: never wait for the device (a trainer decoding on its GPU): damaged targets are zeroed and
        masked out there and returned in ``TargetBatch.damaged`` ``(B, T)`` on ``device``; the caller reads them with
        its metrics and raises unless it skips them. Copies to ``device`` are non-blocking."""
        decoded: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.teachers}  # teacher -> kind -> values
        unwritten: dict[tuple[str, str], torch.Tensor] = {}  # (teacher, kind) -> bool (B,), where decoded
        for t, name in enumerate(self.teachers):
            stored = {"cls": batch.cls[name], "patch": batch.patch[name]}
            for kind in FEATURE_ARRAYS:
                stored.update({level_name(k, kind): parts for k, parts in
                               getattr(batch, f"level_{kind}").get(name, {}).items()})
            for kind, parts in stored.items():
                encoding = self._encoding(name, kind)
                if encoding.passthrough:  # read in self.dtype, absent rows already zero
                    values = parts[""].to(device, self.dtype, non_blocking=True)
                else:
                    values = encoding.decode(kind, parts, device).to(self.dtype)
                    absent = ~batch.mask[:, t].to(values.device, non_blocking=True)
                    values = values.masked_fill(absent.view(-1, *[1] * (values.dim() - 1)), 0)
                decoded[name][kind] = values
                unwritten[name, kind] = unwritten_rows(values)
        if defer_damage:
            found = self.damaged_on_device(decoded, unwritten)
            mask = batch.mask.to(found.device, non_blocking=True) & ~found
            return TargetBatch(cls={name: decoded[name]["cls"] for name in self.teachers},
                               patch={name: decoded[name]["patch"] for name in self.teachers},
                               mask=mask, damaged=found, **self._by_level(decoded))
        dropped = self.drop_damaged(batch, decoded, gather_flags(unwritten))
        return TargetBatch(cls={name: decoded[name]["cls"] for name in self.teachers},
                           patch={name: decoded[name]["patch"] for name in self.teachers},
                           mask=batch.mask & ~dropped, damaged=dropped, **self._by_level(decoded))

    def damaged_on_device(self, decoded: dict[str, dict[str, torch.Tensor]],
                          unwritten: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
        """Bool ``(B, T)`` on the decoding device: targets damaged in any of a teacher's arrays (``unwritten``:
        (teacher, kind) -> bool ``(B,)``), zeroed in ``decoded`` (teacher -> kind -> values) there."""
        found = torch.stack([torch.stack([rows for (teacher, _), rows in unwritten.items() if teacher == name]).any(0)
                             for name in self.teachers], dim=1)
        for t, name in enumerate(self.teachers):
            for kind, values in decoded[name].items():
                decoded[name][kind] = values.masked_fill(found[:, t].view(-1, *[1] * (values.dim() - 1)), 0)
        return found

    def drop_damaged(self, batch: EncodedBatch, decoded: dict[str, dict[str, torch.Tensor]],
                     damaged: dict[tuple[str, str], np.ndarray]) -> torch.Tensor:
        """Bool ``(B, T)`` targets found damaged in any of a teacher's arrays (``decoded``: teacher -> kind -> values,
        ``damaged``: (teacher, kind) -> bool ``(B,)``), zeroed in ``decoded`` (``skip_damaged``, logged); without
        ``skip_damaged`` a :class:`DamagedFeaturesError` naming the first damaged teacher, array and images."""
        found = torch.from_numpy(np.stack([np.any([rows for (teacher, _), rows in damaged.items() if teacher == name],
                                                  axis=0) for name in self.teachers], axis=1))
        if not found.any():
            return found
        if not self.skip_damaged:
            (name, kind), rows = next((key, rows) for key, rows in damaged.items() if rows.any())
            views = batch.views if batch.views is not None else np.full(len(rows), FULL_IMAGE)
            array = ("views/" if (views[rows] != FULL_IMAGE).any() else "") + kind
            ids = [self.image_ids[i] for i in batch.indices[rows]] if batch.indices is not None else ["<unknown>"]
            raise DamagedFeaturesError(damaged_message(name, array, ids, self.root,
                                                       " (or set data.skip_damaged=true to train without them)"))
        for t, name in enumerate(self.teachers):
            for values in decoded[name].values():
                values[found[:, t].to(values.device)] = 0
        ids = [self.image_ids[i] for i in batch.indices[found.any(dim=1).numpy()]] if batch.indices is not None else []
        log.warning("skipped %d damaged target(s) (data.skip_damaged) of image(s) %s; `dune-cache verify %s` lists "
                    "them and `dune-cache repair %s` re-extracts them", int(found.sum()), ", ".join(ids[:10]),
                    self.root, self.root)
        return found

    def assemble(self, parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, ...],
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``shape`` of ``dtype`` (default ``self.dtype``): each part's values ``(selected.sum(), ...)``
        at its ``selected`` rows (bool ``(B,)``), zeros elsewhere."""
        dtype = dtype or self.dtype
        if len(parts) == 1 and parts[0][1].all():
            return torch.from_numpy(parts[0][0]).to(dtype)
        out = torch.empty(shape, dtype=dtype)
        uncovered = np.ones(shape[0], dtype=bool)
        for values, selected in parts:  # index_copy_: several times faster than boolean-mask assignment
            out.index_copy_(0, torch.from_numpy(np.flatnonzero(selected)), torch.from_numpy(values).to(dtype))
            uncovered &= ~selected
        return out.index_fill_(0, torch.from_numpy(np.flatnonzero(uncovered)), 0)

    def view_boxes(self, indices: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop box ``(B, 4)`` float32 ``(y0, x0, y1, x1)``, relative to the whole original image, and flip
        ``(B,)`` bool of each sample's view (``-1``: the whole image ``(0, 0, 1, 1)``, no flip).

        Read from the first teacher group holding the sample (all groups have the same boxes, see
        :meth:`views_per_image`).
        """
        indices = np.asarray(indices, dtype=np.int64)
        rows = self._sample_rows(indices)
        views = self._check_views(indices, views)
        boxes = np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (len(indices), 1))
        flips = np.zeros(len(indices), dtype=bool)
        first = (rows >= 0).argmax(axis=1)  # every sample is done in at least one group
        parts = [(name, selected, index) for t, name in enumerate(self.teachers)
                 for prefix, selected, index in split_reads(np.where(first == t, rows[:, t], -1), views)
                 if prefix == "views/"]
        values = self._read_checked([(name, f"views/{array}", None, index) for name, _, index in parts
                                     for array in ("boxes", "flip")])  # stored dtypes
        for (_, selected, _), box, flip in zip(parts, values[::2], values[1::2]):
            boxes[selected], flips[selected] = box, flip.astype(bool)
        return boxes, flips

    def check_image_copy(self, resolution: int) -> None:
        """A :class:`ReaderError` unless the cache holds a complete image copy (``dune-cache add-images``) of the
        images its teacher groups were extracted from, at no less than ``resolution`` pixels."""
        fix = f"run `dune-cache add-images {self.root} --images DIR --resolution {resolution}`"
        if self.image_copy is None:
            raise ReaderError(f"cache {self.root} holds no copy of its images; {fix}, or give the image files")
        info = self.image_copy.info
        if not info.complete:
            raise ReaderError(f"the image copy of {self.root} is incomplete (its writing stopped); {fix} --overwrite")
        other = [t for t in self.teachers if self.provenance[t]["images"]["manifest_sha256"] != info.manifest_sha256]
        if other:
            raise ReaderError(f"the image copy of {self.root} holds other images than teacher group(s) "
                              f"{', '.join(other)} were extracted from; {fix} --overwrite")
        if info.resolution < resolution:
            raise ReaderError(f"the image copy of {self.root} is {info.resolution} px, less than the student's "
                              f"{resolution} px; {fix} --overwrite")

    def image_bytes(self, indices: np.ndarray) -> list[bytes]:
        """The encoded image (JPEG bytes, squashed to the copy's resolution) of each sample of ``indices`` ``(B,)``,
        from the cache's image copy (call :meth:`check_image_copy` first)."""
        rows = self._sample_rows(np.asarray(indices, dtype=np.int64))
        first = rows[np.arange(len(rows)), (rows >= 0).argmax(axis=1)]  # groups share the copy's manifest rows
        return self.image_copy.read(first)

    def stats(self, teacher: str) -> TeacherStats | None:
        """Statistics written by ``dune-cache stats`` for ``teacher``; ``None`` if not computed.
        Logs a warning when they cover a different number of images than are done now."""
        if teacher not in self.teachers:
            raise ReaderError(f"teacher {teacher!r} is not read by this reader ({', '.join(self.teachers)})")
        stats = read_stats(self.root, teacher)
        if stats is not None and stats.done != self.done_counts[teacher]:
            log.warning("stats of %s were computed when %d images were done, %d are done now: re-run "
                        "`dune-cache stats`", teacher, stats.done, self.done_counts[teacher])
        return stats
