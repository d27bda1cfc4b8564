"""How a teacher group's arrays are laid out when created: codecs, chunks, shards (docs/cache-format.md, "Arrays").

Only core zarr v3 codecs are used, so zarr-python, tensorstore and other v3 readers all open the store.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import zarr
import zarr.codecs

from ..config import StorageConfig
from ..encodings import Encoding
from .levels import level_prefix

FLIP_UNWRITTEN = 255  # fill value of ``views/flip``: never written


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


def create_feature_array(group: zarr.Group, name: str, prefix: tuple[int, ...], inner: tuple[int, ...],
                         shards: tuple[int, ...] | None, dimension_names: tuple[str, ...], storage: StorageConfig,
                         encoding: Encoding) -> None:
    """The stored parts of feature array ``name`` (``cls``, ``patch``, ``views/...``): each ``name + part.suffix``
    of shape ``(*prefix, part.last)``, chunks ``(*inner, part.last)`` and, when ``shards`` is given, shards
    ``(*shards, part.last)``; a per-image part (``part.per_image``, patch arrays only) has ``part.rows`` in place of
    the token grid ``(h, w)`` that ends ``prefix``, ``inner`` and ``shards`` (:meth:`Part.stored_shape`)."""
    cut = len(prefix) - (2 if name.endswith("patch") else 0)
    for part in encoding.parts(name):
        names = (*dimension_names[:cut], "factor", "channel") if part.per_image else dimension_names
        group.create_array(name.rpartition("/")[2] + part.suffix,
                           shape=part.stored_shape(prefix[:cut], prefix[cut:]),
                           chunks=part.stored_shape(inner[:cut], inner[cut:]),
                           shards=part.stored_shape(shards[:cut], shards[cut:]) if shards else None,
                           dtype=part.dtype, fill_value=part.fill, compressors=part_compressors(storage, part.dtype),
                           dimension_names=names)


def create_image_features(group: zarr.Group, n: int, grid: tuple[int, int], storage: StorageConfig,
                          encoding: Encoding) -> None:
    """``cls`` ``(n, D)`` and ``patch`` ``(n, h, w, D)`` of ``group`` (a teacher group, or one of its
    ``levels/b{k}`` subgroups): one image per chunk, ``S`` images per shard with ``storage.shard_images``."""
    shards = (storage.shard_images,) if storage.shard_images else None
    create_feature_array(group, "cls", (n,), (1,), shards, ("image", "channel"), storage, encoding)
    create_feature_array(group, "patch", (n, *grid), (1, *grid), shards and (*shards, *grid),
                         ("image", "y", "x", "channel"), storage, encoding)


def create_view_features(group: zarr.Group, n: int, views: int, grid: tuple[int, int], storage: StorageConfig,
                         encoding: Encoding) -> None:
    """``cls`` ``(n, K, D)`` and ``patch`` ``(n, K, h, w, D)`` of ``group`` (``views/``, or one of its
    ``levels/b{k}`` subgroups), each part of them (see :func:`create_feature_array`): one object per image
    (or per shard of ``S`` images) holding its K views, one inner chunk per view, so reading one view decodes
    only that view."""
    shard_images = storage.shard_images or 1
    create_feature_array(group, "views/cls", (n, views), (1, 1), (shard_images, views),
                         ("image", "view", "channel"), storage, encoding)
    create_feature_array(group, "views/patch", (n, views, *grid), (1, 1, *grid), (shard_images, views, *grid),
                         ("image", "view", "y", "x", "channel"), storage, encoding)


def create_view_arrays(group: zarr.Group, n: int, views: int, grid: tuple[int, int], storage: StorageConfig,
                       encoding: Encoding) -> None:
    """The arrays of a ``views/`` subgroup: features (:func:`create_view_features`), and boxes and flips, one
    chunk per work unit, like ``status``."""
    per = storage.images_per_unit
    create_view_features(group, n, views, grid, storage, encoding)
    small_args = dict(compressors=(zarr.codecs.ZstdCodec(level=3),))
    group.create_array("boxes", shape=(n, views, 4), chunks=(per, views, 4), dtype="float32",
                       fill_value=float("nan"), dimension_names=("image", "view", "coordinate"), **small_args)
    group.create_array("flip", shape=(n, views), chunks=(per, views), dtype="uint8", fill_value=FLIP_UNWRITTEN,
                       dimension_names=("image", "view"), **small_args)


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
