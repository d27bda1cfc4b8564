"""How a teacher group's arrays are laid out when created: codecs, chunks, shards (docs/cache-format.md, "Arrays").

Only core zarr v3 codecs are used, so zarr-python, tensorstore and other v3 readers all open the store.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import zarr
import zarr.codecs

from ..config import StorageConfig
from ..encodings import Encoding
from .levels import level_prefix

FLIP_UNWRITTEN = 255  # fill value of ``views/flip``: never written
STATUS_FILL = 0  # fill value of ``status``: pending (store.STATUS_PENDING)


def build_compressors(storage: StorageConfig) -> tuple:
    """Core zarr v3 codecs only, so zarr-python, tensorstore and other v3 readers all open the store; with
    ``storage.checksum`` a final ``crc32c`` codec, so a corrupted chunk fails to decode instead of reading
    as wrong values (in sharded arrays it checks each inner chunk; the shard index has its own crc32c)."""
    storage = storage.with_codec()
    itemsize = np.dtype(storage.dtype).itemsize
    checksum = (zarr.codecs.Crc32cCodec(),) if storage.checksum else ()
    if storage.codec == "none":
        return checksum
    if storage.codec == "zstd":
        return (zarr.codecs.ZstdCodec(level=storage.level), *checksum)
    if storage.codec == "gzip":
        return (zarr.codecs.GzipCodec(level=storage.level), *checksum)
    cname = storage.codec.split("-", 1)[1]
    return (zarr.codecs.BloscCodec(cname=cname, clevel=storage.level, shuffle="shuffle", typesize=itemsize),
            *checksum)


def part_compressors(storage: StorageConfig, dtype: str) -> tuple:
    """:func:`build_compressors` for an encoded part of ``dtype`` (blosc's typesize follows the part)."""
    itemsize = np.dtype(dtype).itemsize
    return tuple(replace(codec, typesize=itemsize) if isinstance(codec, zarr.codecs.BloscCodec) else codec
                 for codec in build_compressors(storage))


@dataclass(frozen=True)
class ArrayLayout:
    """One array of a teacher group as the format lays it out: ``path`` relative to the group it is created in
    (``cls``, ``patch_basis``, ``views/boxes``, ``levels/b5/patch``...), shape, inner chunks, shards (``None``: not
    sharded), dtype, fill value, dimension names and compressors. What :func:`create_arrays` creates, and what
    :mod:`dune_cache.format.checks` requires of an existing group before reading it."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: str
    fill: float | int
    dimension_names: tuple[str, ...]
    compressors: tuple = ()


def within(folder: str, name: str) -> str:
    """``folder/name`` (``name`` when ``folder`` is empty)."""
    return f"{folder}/{name}" if folder else name


def feature_layouts(name: str, prefix: tuple[int, ...], inner: tuple[int, ...], shards: tuple[int, ...] | None,
                    dimension_names: tuple[str, ...], storage: StorageConfig, encoding: Encoding,
                    folder: str = "") -> list[ArrayLayout]:
    """The stored parts of feature array ``name`` (``cls``, ``patch``, ``views/...``), in ``folder``: each
    ``name + part.suffix`` of shape ``(*prefix, part.last)``, chunks ``(*inner, part.last)`` and, when ``shards`` is
    given, shards ``(*shards, part.last)``; a per-image part (``part.per_image``, patch arrays only) has ``part.rows``
    in place of the token grid ``(h, w)`` that ends ``prefix``, ``inner`` and ``shards`` (:meth:`Part.stored_shape`)."""
    cut = len(prefix) - (2 if name.endswith("patch") else 0)
    return [ArrayLayout(path=within(folder, name.rpartition("/")[2] + part.suffix),
                        shape=part.stored_shape(prefix[:cut], prefix[cut:]),
                        chunks=part.stored_shape(inner[:cut], inner[cut:]),
                        shards=part.stored_shape(shards[:cut], shards[cut:]) if shards else None,
                        dtype=part.dtype, fill=part.fill,
                        dimension_names=(*dimension_names[:cut], "factor", "channel") if part.per_image
                        else dimension_names,
                        compressors=part_compressors(storage, part.dtype))
            for part in encoding.parts(name)]


def image_feature_layouts(n: int, grid: tuple[int, int], storage: StorageConfig, encoding: Encoding,
                          folder: str = "") -> list[ArrayLayout]:
    """``cls`` ``(n, D)`` and ``patch`` ``(n, h, w, D)`` (of a teacher group, or one of its ``levels/b{k}``
    subgroups): one image per chunk, ``S`` images per shard with ``storage.shard_images``."""
    shards = (storage.shard_images,) if storage.shard_images else None
    return [*feature_layouts("cls", (n,), (1,), shards, ("image", "channel"), storage, encoding, folder),
            *feature_layouts("patch", (n, *grid), (1, *grid), shards and (*shards, *grid),
                             ("image", "y", "x", "channel"), storage, encoding, folder)]


def view_feature_layouts(n: int, views: int, grid: tuple[int, int], storage: StorageConfig, encoding: Encoding,
                         folder: str = "") -> list[ArrayLayout]:
    """``cls`` ``(n, K, D)`` and ``patch`` ``(n, K, h, w, D)`` (of ``views/``, or one of its ``levels/b{k}``
    subgroups), each part of them: one object per image (or per shard of ``S`` images) holding its K views, one
    inner chunk per view, so reading one view decodes only that view."""
    shard_images = storage.shard_images or 1
    return [*feature_layouts("views/cls", (n, views), (1, 1), (shard_images, views), ("image", "view", "channel"),
                             storage, encoding, folder),
            *feature_layouts("views/patch", (n, views, *grid), (1, 1, *grid), (shard_images, views, *grid),
                             ("image", "view", "y", "x", "channel"), storage, encoding, folder)]


SMALL_COMPRESSORS = (zarr.codecs.ZstdCodec(level=3),)  # status, view boxes and flips


def view_array_layouts(n: int, views: int, grid: tuple[int, int], storage: StorageConfig, encoding: Encoding,
                       folder: str = "") -> list[ArrayLayout]:
    """The arrays of a ``views/`` subgroup: features (:func:`view_feature_layouts`), and boxes and flips, one
    chunk per work unit, like ``status``."""
    per = storage.images_per_unit
    return [*view_feature_layouts(n, views, grid, storage, encoding, folder),
            ArrayLayout(within(folder, "boxes"), (n, views, 4), (per, views, 4), None, "float32", float("nan"),
                        ("image", "view", "coordinate"), SMALL_COMPRESSORS),
            ArrayLayout(within(folder, "flip"), (n, views), (per, views), None, "uint8", FLIP_UNWRITTEN,
                        ("image", "view"), SMALL_COMPRESSORS)]


def status_layout(n: int, storage: StorageConfig) -> ArrayLayout:
    """``status`` ``(n,)`` uint8, one chunk per work unit."""
    per = storage.images_per_unit
    return ArrayLayout("status", (n,), (per,), None, "uint8", STATUS_FILL, ("image",), SMALL_COMPRESSORS)


def group_layouts(n: int, grid: tuple[int, int], storage: StorageConfig, encoding: Encoding, views: int,
                  blocks: tuple[int, ...], level_encodings: dict[int, Encoding]) -> list[ArrayLayout]:
    """Every array of a teacher group but ``manifest``, the encodings' calibration and the failure records, with
    paths relative to the group."""
    layouts = [*image_feature_layouts(n, grid, storage, encoding), status_layout(n, storage)]
    if views:
        layouts += view_array_layouts(n, views, grid, storage, encoding, "views")
    for k in blocks:
        layouts += image_feature_layouts(n, grid, storage, level_encodings[k], level_prefix(k))
        if views:
            layouts += view_feature_layouts(n, views, grid, storage, level_encodings[k], f"views/{level_prefix(k)}")
    return layouts


def create_arrays(group: zarr.Group, layouts: list[ArrayLayout]) -> None:
    """Create each of ``layouts`` in ``group`` (their folders must exist)."""
    for layout in layouts:
        folder, _, name = layout.path.rpartition("/")
        (group[folder] if folder else group).create_array(
            name, shape=layout.shape, chunks=layout.chunks, shards=layout.shards, dtype=layout.dtype,
            fill_value=layout.fill, compressors=layout.compressors, dimension_names=layout.dimension_names)


def create_image_features(group: zarr.Group, n: int, grid: tuple[int, int], storage: StorageConfig,
                          encoding: Encoding) -> None:
    """The arrays of :func:`image_feature_layouts` in ``group`` (a teacher group, or a ``levels/b{k}`` subgroup)."""
    create_arrays(group, image_feature_layouts(n, grid, storage, encoding))


def create_view_features(group: zarr.Group, n: int, views: int, grid: tuple[int, int], storage: StorageConfig,
                         encoding: Encoding) -> None:
    """The arrays of :func:`view_feature_layouts` in ``group`` (``views/``, or a ``levels/b{k}`` subgroup of it)."""
    create_arrays(group, view_feature_layouts(n, views, grid, storage, encoding))


def create_view_arrays(group: zarr.Group, n: int, views: int, grid: tuple[int, int], storage: StorageConfig,
                       encoding: Encoding) -> None:
    """The arrays of :func:`view_array_layouts` in ``group`` (a ``views/`` subgroup)."""
    create_arrays(group, view_array_layouts(n, views, grid, storage, encoding))


def create_level_arrays(group: zarr.Group, blocks: tuple[int, ...], n: int, views: int, grid: tuple[int, int],
                        storage: StorageConfig, encodings: dict[int, Encoding]) -> None:
    """Per block ``k``: ``levels/b{k}/cls|patch`` shaped, chunked and sharded like the group's ``cls``/``patch``
    and, with ``views`` K > 0, ``views/levels/b{k}/cls|patch`` like ``views/cls|patch``, each through its own
    calibrated encoding ``encodings[k]``."""
    for k in blocks:
        create_image_features(group.require_group(level_prefix(k)), n, grid, storage, encodings[k])
        if views:
            create_view_features(group["views"].require_group(level_prefix(k)), n, views, grid, storage,
                                 encodings[k])
