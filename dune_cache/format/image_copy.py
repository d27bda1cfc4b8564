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

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ImageCopyError
from ..storage import location
from .checks import MAX_COPY_IMAGE_BYTES, MAX_GRID_SIDE, MAX_IMAGES, bounded_int, check_whole_read
from .constants import ATTR_KEY
from .root import select_teachers
from .store import TeacherStore

log = logging.getLogger(__name__)

GROUP = "images"
KIND = "image_copy"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 16   # a ~30 KB JPEG spans one or two 64 KiB chunks
OFFSET_CHUNK = 1 << 16  # offsets per chunk (512 KiB)


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
    where = location.join(root, GROUP)
    if attrs.get("kind") != KIND:
        raise ImageCopyError(f"{where} is not an image copy (attributes {attrs})")
    return ImageCopyInfo(resolution=bounded_int(attrs.get("resolution"), 1, MAX_GRID_SIDE * 64, "resolution", where),
                         quality=bounded_int(attrs.get("quality"), 1, 100, "quality", where),
                         count=bounded_int(attrs.get("count"), 0, MAX_IMAGES, "count", where),
                         manifest_sha256=str(attrs["manifest_sha256"]), complete=bool(attrs["complete"]))


class ImageCopy:
    """Reads JPEG bytes of manifest rows from ``<root>/images`` (plain zarr-python; opened on first read, so a
    reader built before forking DataLoader workers is safe to use in them)."""

    def __init__(self, root: str, info: ImageCopyInfo):
        self.root, self.info = root, info
        self._arrays = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> tuple:
        """``offsets`` and ``bytes``, opened on first use and checked before anything is read from them: offsets
        ``(count + 1,)`` integers, bytes one-dimensional uint8, chunks within bounds."""
        if self._arrays is None:
            where = location.join(self.root, GROUP)
            offsets = location.open_array(location.join(self.root, GROUP, "offsets"))
            data = location.open_array(location.join(self.root, GROUP, "bytes"))
            check_whole_read(offsets, f"{where}/offsets", 8 * (MAX_IMAGES + 1), kinds="i", shape=(self.info.count + 1,))
            check_whole_read(data, f"{where}/bytes", None, kinds="u", ndim=1)  # read in ranges, never whole
            self._arrays = (offsets, data)
        return self._arrays

    def read(self, rows: np.ndarray) -> list[bytes]:
        """The JPEG bytes of manifest ``rows`` ``(B,)``; an :class:`ImageCopyError` naming a row left empty, or one
        whose range is not within the stored bytes or longer than :data:`.checks.MAX_COPY_IMAGE_BYTES`."""
        offsets, data = self.arrays()
        rows = np.asarray(rows, dtype=np.int64)
        ends = offsets.get_coordinate_selection(np.concatenate([rows, rows + 1])).reshape(2, -1)
        empty = rows[ends[1] <= ends[0]]
        if empty.size:
            raise ImageCopyError(f"image copy of {self.root}: row(s) {empty[:5].tolist()} hold no image (unreadable "
                                 "when the copy was made); re-run `dune-cache add-images --overwrite`")
        bad = rows[(ends[0] < 0) | (ends[1] > data.shape[0]) | (ends[1] - ends[0] > MAX_COPY_IMAGE_BYTES)]
        if bad.size:
            raise ImageCopyError(f"image copy of {self.root}: row(s) {bad[:5].tolist()} point outside its bytes or "
                                 f"at more than {MAX_COPY_IMAGE_BYTES} bytes; the copy is damaged or forged: re-run "
                                 "`dune-cache add-images --overwrite`")
        return [data[int(a):int(b)].tobytes() for a, b in ends.T]


def stored_bytes(root: str) -> int:
    """Bytes the image copy's JPEGs occupy (``offsets[-1]``; 0 without a copy)."""
    if read_info(root) is None:
        return 0
    return int(location.open_array(location.join(root, GROUP, "offsets"))[-1])
