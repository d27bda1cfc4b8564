"""An optional copy of the cache's images inside the cache (``<root>/images/``), so that a cache is self-contained:
a team trains from it without the original image files (``dune-cache add-images``).

Every image of the teacher groups' manifest is decoded, squashed to ``R × R`` (the ``squash`` framing training
reads, so the token grid's cells cover the same parts of the copy as of the original) and stored as JPEG bytes:

- ``images/bytes``   ``(total,)`` uint8, the JPEG files one after another, :data:`CHUNK_BYTES` per chunk, a crc32c
  checksum and no compression codec (JPEG is compressed already)
- ``images/offsets`` ``(N + 1,)`` int64: image ``i`` (manifest row ``i``) is ``bytes[offsets[i]:offsets[i + 1]]``;
  an empty range: the image could not be read when the copy was made
- attributes ``dune_cache`` of ``images/``: ``kind`` ``image_copy``, ``resolution`` R, ``quality``, ``count`` N,
  ``manifest_sha256`` (the teacher groups' manifest the rows follow), ``complete`` (false while being written)

Plain zarr reads it (docs/cache-format.md, "Image copy"). Cost: one JPEG of ``R × R`` per image (measured by
``tools/bench_input_pipeline.py``, docs/scale.md §2b).
"""
from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import location
from .errors import StoreError
from .images import ImageDecodeError, load_manifest, load_pixels
from .inspect import select_teachers
from .store import ATTR_KEY, TeacherStore

log = logging.getLogger(__name__)

GROUP = "images"
KIND = "image_copy"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 16   # a ~30 KB JPEG spans one or two 64 KiB chunks
OFFSET_CHUNK = 1 << 16  # offsets per chunk (512 KiB)
WRITE_BATCH = 256       # images encoded, then appended, at a time


class ImageCopyError(StoreError):
    """An image copy that cannot be made or used as asked (mismatched images or resolution, incomplete copy)."""


@dataclass(frozen=True)
class ImageCopyInfo:
    """What ``<root>/images`` holds (its attributes)."""

    resolution: int
    quality: int
    count: int
    manifest_sha256: str
    complete: bool


def cache_manifest_sha256(root: str) -> str:
    """The manifest hash all teacher groups of ``root`` share (an :class:`ImageCopyError` when they differ: a copy
    follows one manifest's rows)."""
    hashes = {name: TeacherStore.open(root, name).provenance["images"]["manifest_sha256"]
              for name in select_teachers(root, None, ImageCopyError)}
    if len(set(hashes.values())) != 1:
        raise ImageCopyError(f"cache {root}: teacher groups were extracted from different image lists "
                             f"({', '.join(hashes)}), so one image copy cannot follow their rows")
    return next(iter(hashes.values()))


def read_info(root: str) -> ImageCopyInfo | None:
    """The copy's attributes, ``None`` when ``root`` has no ``images`` group."""
    group = location.open_group(root, mode="r")
    if GROUP not in group:
        return None
    attrs = dict(group[GROUP].attrs.get(ATTR_KEY, {}))
    if attrs.get("kind") != KIND:
        raise ImageCopyError(f"{location.join(root, GROUP)} is not an image copy (attributes {attrs})")
    return ImageCopyInfo(resolution=int(attrs["resolution"]), quality=int(attrs["quality"]), count=int(attrs["count"]),
                         manifest_sha256=str(attrs["manifest_sha256"]), complete=bool(attrs["complete"]))


def encode_image(path: Path, resolution: int, quality: int) -> bytes:
    """JPEG bytes of the image at ``path`` squashed to ``resolution × resolution`` (empty when unreadable)."""
    try:
        pixels = load_pixels(path, (resolution, resolution), "squash")  # (3, R, R)
    except ImageDecodeError as exc:
        log.warning("image copy: %s left empty (%s)", path, exc)
        return b""
    out = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def add_images(root: str, images: str, resolution: int, quality: int = 90, workers: int = 4,
               overwrite: bool = False) -> ImageCopyInfo:
    """Write ``<root>/images``: every image of ``images`` (the directory or list the cache was extracted from) at
    ``resolution``. Refuses an image set whose manifest is not the cache's, and an existing copy unless
    ``overwrite``. Returns the copy's attributes."""
    import zarr.codecs

    if resolution < 1 or not 1 <= quality <= 100:
        raise ImageCopyError(f"--resolution must be >= 1 and --quality in [1, 100]; got {resolution}, {quality}")
    manifest = load_manifest(images)
    expected = cache_manifest_sha256(root)
    if manifest.sha256 != expected:
        raise ImageCopyError(f"--images {images} is not the image set cache {root} was extracted from (its manifest "
                             f"hash {manifest.sha256[:12]} differs from the cache's {expected[:12]}); give the same "
                             "directory or list file")
    existing = read_info(root)
    if existing is not None and not overwrite:
        raise ImageCopyError(f"cache {root} already holds an image copy ({existing.resolution} px, "
                             f"{'complete' if existing.complete else 'incomplete'}); pass --overwrite to replace it")
    group = location.open_group(root, mode="r+").require_group(GROUP, overwrite=True)
    attrs = {"kind": KIND, "format_version": FORMAT_VERSION, "resolution": resolution, "quality": quality,
             "count": len(manifest), "manifest_sha256": expected, "complete": False}
    group.attrs[ATTR_KEY] = attrs
    data = group.create_array("bytes", shape=(0,), chunks=(CHUNK_BYTES,), dtype="uint8",
                              compressors=[zarr.codecs.Crc32cCodec()], fill_value=0)  # JPEG: checksum, no codec
    offsets = np.zeros(len(manifest) + 1, dtype=np.int64)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding and encoding
        for start in range(0, len(manifest), WRITE_BATCH):
            rows = range(start, min(start + WRITE_BATCH, len(manifest)))
            encoded = list(pool.map(lambda i: encode_image(manifest.path(i), resolution, quality), rows))
            sizes = np.cumsum([len(e) for e in encoded])
            offsets[start + 1:rows.stop + 1] = offsets[start] + sizes
            end = int(offsets[rows.stop])
            data.resize((end,))
            if end > offsets[start]:
                data[int(offsets[start]):end] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    group.create_array("offsets", data=offsets, chunks=(OFFSET_CHUNK,))
    group.attrs[ATTR_KEY] = {**attrs, "complete": True}
    return read_info(root)


class ImageCopy:
    """Reads JPEG bytes of manifest rows from ``<root>/images`` (plain zarr-python; opened on first read, so a
    reader built before forking DataLoader workers is safe to use in them)."""

    def __init__(self, root: str, info: ImageCopyInfo):
        self.root, self.info = root, info
        self._arrays = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def read(self, rows: np.ndarray) -> list[bytes]:
        """The JPEG bytes of manifest ``rows`` ``(B,)`` (an :class:`ImageCopyError` naming a row left empty)."""
        if self._arrays is None:
            self._arrays = (location.open_array(location.join(self.root, GROUP, "offsets")),
                            location.open_array(location.join(self.root, GROUP, "bytes")))
        offsets, data = self._arrays
        rows = np.asarray(rows, dtype=np.int64)
        ends = offsets.get_coordinate_selection(np.concatenate([rows, rows + 1])).reshape(2, -1)
        empty = rows[ends[1] <= ends[0]]
        if empty.size:
            raise ImageCopyError(f"image copy of {self.root}: row(s) {empty[:5].tolist()} hold no image (unreadable "
                                 "when the copy was made); re-run `dune-cache add-images --overwrite`")
        return [data[int(a):int(b)].tobytes() for a, b in ends.T]


def stored_bytes(root: str) -> int:
    """Bytes the image copy's JPEGs occupy (``offsets[-1]``; 0 without a copy)."""
    if read_info(root) is None:
        return 0
    return int(location.open_array(location.join(root, GROUP, "offsets"))[-1])
