"""``dune-cache show``: pictures of cached features, each teacher's patch tokens as a PCA-RGB map beside the input.

For a few images of a cache, one PNG row per image: the input image as the teachers saw it (resized per
the first shown group's geometry), then one map per teacher group; plus ``grid.png`` stacking all rows.
A map colours every patch token by its first three principal components -> R, G, B. The PCA of a teacher
is fitted jointly over the patch tokens of all the images shown, so colours compare across images (not
across teachers); each component is scaled from its 1st..99th percentile to 0..255 and the map is
upsampled (nearest) to the cell. Features are read through :class:`~dune_cache.read.reader.CacheReader`, so
every storage encoding is shown decoded.

Input images are found where the cache's provenance says they were read from (``source.images`` of the
first group holding the image, a directory or list file; ids resolve against it as at extraction) or
under ``image_root`` (a folder; or a list file of the user's own, whose paths are taken as they are). Ids come
from the cache, so one that would leave the folder (absolute, ``..``) is never read. An unreachable
image is reported and drawn as a placeholder cell; its features are still shown.

The layout helpers (:func:`feature_columns`, :class:`Panel`, :func:`write_pictures`) are shared with
``dune-student show``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ImageDecodeError
from ..images.decode import open_rgb, resize_image
from ..read.reader import CacheReader
from ..viz.pictures import (
    Panel,
    ShowResult,
    cell_shape,
    feature_columns,
    placeholder,
    sample_paths,
    select_samples,
    unreachable,
    write_pictures,
)

log = logging.getLogger(__name__)


def input_panel(path: Path | None, geometry: dict, label: str) -> tuple[Panel, str | None]:
    """The image at ``path`` resized like the cache's ``geometry`` (resolution, resize mode) and a note
    (``None`` if it was read, else why not: the panel is then a placeholder). ``path`` ``None``: the image is not
    reachable (:func:`~dune_cache.viz.pictures.sample_paths`), nothing is read."""
    if path is None:
        return placeholder("image not\nreachable", label), f"{label}: input image not drawn: {unreachable(label)}"
    try:
        pixels = resize_image(open_rgb(path), tuple(geometry["resolution"]), geometry["resize"])
    except ImageDecodeError as exc:
        note = f"{label}: input image not drawn ({exc}); pass --image-root to point at the images"
        return placeholder("image not\nreachable", label), note
    return Panel(pixels, label, nearest=False), None


def show_cache(cache: str, out: str | Path, images: Sequence[str] | None = None, first: int | None = None,
               teachers: Sequence[str] | None = None, image_root: str | Path | None = None,
               cell: int = 224) -> ShowResult:
    """Write the pictures of ``images`` (ids) or the ``first`` images of ``cache`` to ``out`` (see module doc).

    Row layout: ``[input image, teacher 1 map, ..., teacher T map]``, each panel ``cell`` pixels high
    under a :data:`LABEL_HEIGHT` label; images lacking a teacher's features get a placeholder there.
    """
    reader = CacheReader(cache, teachers or None, allow_partial=True)
    indices = select_samples(reader, images, first)
    ids = [reader.image_ids[i] for i in indices]
    geometry = reader.provenance[reader.teachers[0]]["geometry"]
    if len({p["geometry"]["resize"] for p in reader.provenance.values()}) > 1:
        log.warning("teacher groups were resized differently; the input shown is %s's (%s)",
                    reader.teachers[0], geometry["resize"])
    inputs = [input_panel(path, geometry, image_id)
              for path, image_id in zip(sample_paths(reader, indices, image_root), ids)]
    missing = [note for _, note in inputs if note is not None]
    targets = reader.read(np.asarray(indices))
    columns = []
    for k, teacher in enumerate(reader.teachers):
        have = targets.mask[:, k].numpy()
        maps = {r: targets.patch[teacher][r].numpy() for r in range(len(ids)) if have[r]}
        columns += feature_columns([maps], [[teacher] * len(ids)], len(ids))
    rows = [[panel, *(column[r] for column in columns)] for r, (panel, _) in enumerate(inputs)]
    return write_pictures(rows, ids, out, cell_shape(cell, geometry["resolution"]), missing)
