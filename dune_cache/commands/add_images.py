"""``dune-cache add-images``: write the cache's own copy of its images (``<root>/images/``, layout in
:mod:`dune_cache.format.image_copy`), each decoded, squashed to ``R × R`` and JPEG-encoded, so a team trains from the
cache without the original files.
"""
from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageCopyError, ImageDecodeError
from ..format.constants import ATTR_KEY
from ..format.image_copy import (
    CHUNK_BYTES,
    FORMAT_VERSION,
    GROUP,
    KIND,
    OFFSET_CHUNK,
    ImageCopyInfo,
    cache_manifest_sha256,
    read_info,
)
from ..images.decode import load_pixels
from ..images.manifest import load_manifest
from ..storage import location

log = logging.getLogger(__name__)


WRITE_BATCH = 256       # images encoded, then appended, at a time


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
