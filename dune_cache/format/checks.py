"""A cache from someone else's bucket is data: before anything sized by its metadata is read or allocated, the
metadata must describe what this format writes, within documented bounds (docs/security.md, docs/cache-format.md
"Limits").

- :func:`check_provenance`: the numbers provenance declares (images, token grid, embed dim, work units, shards,
  views, blocks, dtype) are integers in range.
- :func:`check_layout`: every array the group's provenance implies (:func:`.layout.group_layouts`) has exactly the
  shape, chunks, shards and dtype this format lays out, only the codecs it writes, and one chunk (and one shard)
  decodes to at most :data:`MAX_CHUNK_BYTES` (:data:`MAX_SHARD_BYTES`).
- :func:`check_whole_read`: an array read whole (manifest, calibration, statistics, failure records, image-copy
  offsets) is one-dimensional or as shaped as expected, of an allowed dtype and within a byte bound.

Each refusal is a :class:`~dune_cache.errors.StoreError` naming the array, what it declares and the bound.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from ..config import DTYPES
from ..errors import StoreError
from .layout import ArrayLayout

MAX_IMAGES = 1 << 31           # images of one teacher group (its status array: 2 GiB)
MAX_GRID_SIDE = 4096           # token rows or columns
MAX_DIM = 1 << 14              # channels of a teacher's features (its PHI-S statistics matrix: 2 GiB)
MAX_UNIT_IMAGES = 1 << 20      # images of one work unit (one status chunk)
MAX_VIEWS = 1024               # cached views per image
MAX_BLOCKS = 256               # intermediate blocks stored, and the highest block index
MAX_CHUNK_BYTES = 1 << 30      # decoded bytes of one chunk (one image's, or one view's, features)
MAX_SHARD_BYTES = 1 << 32      # decoded bytes of one shard (the default aims at 256 MiB, config.SHARD_TARGET_BYTES)
MAX_MANIFEST_BYTES = 1 << 32   # the manifest text (and at most MAX_LINE_BYTES per image)
MAX_LINE_BYTES = 1 << 16       # one manifest line: an escaped file path (PATH_MAX 4096 bytes, 4 chars per byte) and tag
MAX_CALIBRATION_BYTES = 1 << 30  # one calibration array of an encoding
MAX_RECORD_BYTES = 1 << 26     # the failure records of one work unit
MAX_COPY_IMAGE_BYTES = 1 << 26  # one JPEG of the image copy
ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed"})  # what the format writes


def refuse(where: str, what: str) -> StoreError:
    """The error of a metadata refusal: nothing sized by it was read or allocated."""
    return StoreError(f"{where}: {what}; refused before reading or allocating anything (a cache must be laid out as "
                      "this format lays it out, within its limits: docs/cache-format.md, \"Limits\")")


def bounded_int(value: Any, low: int, high: int, name: str, where: str) -> int:
    """``value`` if it is an integer in ``[low, high]``, else a refusal naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise refuse(where, f"provenance {name} is {value!r}, not an integer in [{low}, {high}]")
    return value


def check_provenance(meta: dict, where: str) -> None:
    """The numbers of a teacher group's provenance ``meta`` that size its arrays are integers in range (a
    :class:`StoreError` naming the field otherwise), so that no layout computed from them is absurd."""
    try:
        storage, geometry = meta["storage"], meta["geometry"]
        bounded_int(meta["images"]["count"], 0, MAX_IMAGES, "images.count", where)
        grid = geometry["grid"]
        dim = meta["teacher"]["embed_dim"]
        unit_size, shard_images, dtype = storage["unit_size"], storage["shard_images"], storage["dtype"]
    except (KeyError, TypeError) as exc:
        raise refuse(where, f"provenance lacks {exc}") from None
    if not isinstance(grid, list) or len(grid) != 2:
        raise refuse(where, f"provenance geometry.grid is {grid!r}, not [h, w]")
    for axis, side in zip("hw", grid):
        bounded_int(side, 1, MAX_GRID_SIDE, f"geometry.grid {axis}", where)
    bounded_int(dim, 1, MAX_DIM, "teacher.embed_dim", where)
    bounded_int(unit_size, 1, MAX_UNIT_IMAGES, "storage.unit_size", where)
    bounded_int(shard_images, 0, MAX_UNIT_IMAGES, "storage.shard_images", where)
    if dtype not in DTYPES:
        raise refuse(where, f"provenance storage.dtype is {dtype!r}, not one of {', '.join(DTYPES)}")
    if "views" in meta:
        bounded_int((meta["views"] or {}).get("count"), 1, MAX_VIEWS, "views.count", where)
    blocks = (meta.get("levels") or {}).get("blocks", [])
    if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
        raise refuse(where, f"provenance levels.blocks is not a list of at most {MAX_BLOCKS} blocks")
    for block in blocks:
        bounded_int(block, 0, MAX_BLOCKS, "levels.blocks[]", where)


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Decoded bytes of an array or chunk of ``shape`` and ``dtype`` (Python integers: no overflow)."""
    return math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize


def codec_names(array: zarr.Array) -> set[str]:
    """Names of every codec of ``array``, nested ones (a shard's inner and index codecs) included."""
    names: set[str] = set()

    def walk(codecs: Any) -> None:
        for codec in codecs or ():
            if isinstance(codec, dict):
                names.add(str(codec.get("name")))
                config = codec.get("configuration") or {}
                walk(config.get("codecs"))
                walk(config.get("index_codecs"))

    walk(array.metadata.to_dict().get("codecs"))
    return names


def check_codecs(array: zarr.Array, where: str) -> None:
    """Only the codecs this format writes (:data:`ALLOWED_CODECS`): nothing else decodes a cache's bytes."""
    others = sorted(codec_names(array) - ALLOWED_CODECS)
    if others:
        raise refuse(where, f"codecs {', '.join(others)} are not among those the format writes "
                            f"({', '.join(sorted(ALLOWED_CODECS))})")


def check_bounds(layouts: list[ArrayLayout], where: str) -> None:
    """One chunk of each of ``layouts`` decodes to at most :data:`MAX_CHUNK_BYTES`, one shard to at most
    :data:`MAX_SHARD_BYTES` (checked before a group is created, and before one is read)."""
    for layout in layouts:
        for label, size, bound in (("one chunk", nbytes(layout.chunks, layout.dtype), MAX_CHUNK_BYTES),
                                   ("one shard", nbytes(layout.shards or layout.chunks, layout.dtype),
                                    MAX_SHARD_BYTES)):
            if size > bound:
                raise refuse(f"{where}/{layout.path}", f"{label} decodes to {size} bytes, beyond the limit of {bound}")


def check_layout(group: zarr.Group, layouts: list[ArrayLayout], where: str) -> None:
    """Each array of ``layouts`` is within bounds (:func:`check_bounds`) and exists in ``group`` exactly as laid
    out, with allowed codecs (a :class:`StoreError` naming the first that is not)."""
    check_bounds(layouts, where)
    for layout in layouts:
        name = f"{where}/{layout.path}"
        try:
            array = group[layout.path]
        except KeyError:
            raise refuse(name, "the array is missing") from None
        except (ValueError, TypeError) as exc:  # zarr's own parse of the metadata failed
            raise refuse(name, f"its metadata does not parse ({exc})") from None
        if not isinstance(array, zarr.Array):
            raise refuse(name, "a group where the format has an array")
        declared = (tuple(array.shape), tuple(array.chunks), array.shards and tuple(array.shards),
                    np.dtype(array.dtype))
        expected = (layout.shape, layout.chunks, layout.shards, np.dtype(layout.dtype))
        if declared != expected:
            raise refuse(name, f"declares shape {declared[0]}, chunks {declared[1]}, shards {declared[2]}, dtype "
                               f"{declared[3]}; its provenance implies {expected[0]}, {expected[1]}, {expected[2]}, "
                               f"{expected[3]}")
        check_codecs(array, name)


def check_whole_read(array: Any, where: str, max_bytes: int | None, kinds: str = "iuf",
                     shape: tuple[int, ...] | None = None, ndim: int | None = None) -> zarr.Array:
    """``array`` if it may be read whole: an array (not a group) of a dtype of ``kinds`` (numpy kind codes), of
    ``shape`` or ``ndim`` dimensions when given, at most ``max_bytes`` decoded (``None``: an array only read in
    parts) and each chunk at most that and :data:`MAX_CHUNK_BYTES`, with allowed codecs; else a
    :class:`StoreError`. Returns ``array``."""
    if not isinstance(array, zarr.Array):
        raise refuse(where, "a group where the format has an array")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in kinds:
        raise refuse(where, f"dtype {dtype} is not one the format stores there")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise refuse(where, f"declares shape {tuple(array.shape)}, expected {tuple(shape)}")
    if ndim is not None and array.ndim != ndim:
        raise refuse(where, f"declares {array.ndim} dimensions, expected {ndim}")
    chunk_bound = min(max_bytes or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)
    for label, size, bound in (("the array", nbytes(array.shape, dtype), max_bytes),
                               ("one chunk", nbytes(array.chunks, dtype), chunk_bound)):
        if bound is not None and size > bound:
            raise refuse(where, f"{label} decodes to {size} bytes, beyond the limit of {bound}")
    check_codecs(array, where)
    return array
