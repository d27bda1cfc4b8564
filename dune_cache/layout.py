"""How a teacher group's arrays are laid out when created: codecs, chunks, shards (docs/cache-format.md, "Arrays").

Only core zarr v3 codecs are used, so zarr-python, tensorstore and other v3 readers all open the store.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import zarr
import zarr.codecs

from .config import StorageConfig
from .encodings import Encoding

FLIP_UNWRITTEN = 255  # fill value of ``views/flip``: never written


def build_compressors(storage: StorageConfig) -> tuple:
    """Core zarr v3 codecs only, so zarr-python, tensorstore and other v3 readers all open the store; with
    ``storage.checksum`` a final ``crc32c`` codec, so a corrupted chunk fails to decode instead of reading
    as wrong values (in sharded arrays it checks each inner chunk; the shard index has its own crc32c)."""
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
    """The stored parts of feature array ``name`` (``cls``, ``patch``, ``views/...``): each
    ``name + part.suffix`` of shape ``(*prefix, part.last)``, chunks ``(*inner, part.last)`` and, when
    ``shards`` is given, shards ``(*shards, part.last)``."""
    for part in encoding.parts(name):
        group.create_array(name.rpartition("/")[2] + part.suffix, shape=(*prefix, part.last),
                           chunks=(*inner, part.last), shards=(*shards, part.last) if shards else None,
                           dtype=part.dtype, fill_value=part.fill, compressors=part_compressors(storage, part.dtype),
                           dimension_names=dimension_names)


def create_view_arrays(group: zarr.Group, n: int, views: int, grid: tuple[int, int], storage: StorageConfig,
                       encoding: Encoding) -> None:
    """The arrays of a ``views/`` subgroup. Features (each part of them, see :func:`create_feature_array`):
    one object per image (or per shard of ``S`` images) holding its K views, one inner chunk per view, so
    reading one view decodes only that view. Boxes and flips: one chunk per work unit, like ``status``."""
    per = storage.images_per_unit
    shard_images = storage.shard_images or 1
    create_feature_array(group, "views/cls", (n, views), (1, 1), (shard_images, views),
                         ("image", "view", "channel"), storage, encoding)
    create_feature_array(group, "views/patch", (n, views, *grid), (1, 1, *grid), (shard_images, views, *grid),
                         ("image", "view", "y", "x", "channel"), storage, encoding)
    small_args = dict(compressors=(zarr.codecs.ZstdCodec(level=3),))
    group.create_array("boxes", shape=(n, views, 4), chunks=(per, views, 4), dtype="float32",
                       fill_value=float("nan"), dimension_names=("image", "view", "coordinate"), **small_args)
    group.create_array("flip", shape=(n, views), chunks=(per, views), dtype="uint8", fill_value=FLIP_UNWRITTEN,
                       dimension_names=("image", "view"), **small_args)
