"""Pictures of token grids: each map's patch tokens as a PCA-RGB image, labelled panels, rows and a grid sheet
written as PNGs. ``dune-cache show`` (teacher maps) and ``dune-student show`` (student beside teacher) draw with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ShowError
from ..images.manifest import confined_path, load_manifest
from ..read.reader import CacheReader

LABEL_HEIGHT = 16          # pixels of the label strip above every panel


STEM_CHARS = 40            # longest image name part of a row's file name


PERCENTILES = (1.0, 99.0)  # robust range of each principal component mapped to 0..255


PLACEHOLDER_GREY = 128


@dataclass
class Panel:
    """One cell of a row: ``pixels`` uint8 ``(h, w, 3)`` at any size (resized to the cell when drawn,
    nearest for feature maps, bicubic for photos) under a one-line ``label``."""

    pixels: np.ndarray
    label: str
    nearest: bool = True


@dataclass
class ShowResult:
    """Files written: one PNG per image row, the grid of all rows, and notes on unreachable images."""

    rows: list[Path]
    grid: Path
    missing_images: list[str]


def select_samples(reader: CacheReader, ids: Sequence[str] | None, first: int | None) -> list[int]:
    """Sample indices of ``reader`` for the image ``ids`` (in that order), or its first ``first`` samples
    (:data:`DEFAULT_FIRST` when both are empty). Unknown ids are an error listing some available ones."""
    if ids and first is not None:
        raise ShowError("give image ids or a count of first images, not both")
    if not ids:
        count = DEFAULT_FIRST if first is None else first
        if count < 1:
            raise ShowError(f"the number of images to show must be >= 1, got {count}")
        if not len(reader):
            raise ShowError(f"cache {reader.root} has no done images to show")
        return list(range(min(count, len(reader))))
    sample_of = {image_id: i for i, image_id in enumerate(reader.image_ids)}
    return [resolve_image_id(reader, sample_of, image_id) for image_id in ids]


def resolve_image_id(reader: CacheReader, sample_of: dict[str, int], image_id: str) -> int:
    """Sample index of ``image_id``: an id as written in the manifest, else a unique file name (``x.jpg``) or
    file name without extension (``x``) of one id. Unknown or ambiguous names are a :class:`ShowError`
    naming the matching (or some available) ids."""
    if image_id in sample_of:
        return sample_of[image_id]
    matches = [i for i, known in enumerate(reader.image_ids)
               if image_id in (PurePath(known).name, PurePath(known).stem)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ShowError(f"image name {image_id!r} matches {len(matches)} images of cache {reader.root}: "
                        f"{', '.join(reader.image_ids[i] for i in matches[:5])}; give the id as written there")
    raise ShowError(f"image {image_id!r} is not among the done images of cache {reader.root} (neither an id nor "
                    f"a unique file name); available ({len(reader)}) e.g. {', '.join(reader.image_ids[:5])}")


def image_base(provenance: dict, image_root: str | Path | None) -> Path | None:
    """Folder image ids resolve against: ``image_root`` if given, else the provenance's ``source.images``
    (a directory, or a list file whose folder holds its relative paths); ``None`` if neither is known."""
    source = image_root if image_root is not None else provenance.get("source", {}).get("images")
    if source is None:
        return None
    source = Path(source)
    return source.parent if source.is_file() else source


def image_path(base: Path | None, image_id: str) -> Path | None:
    """File of ``image_id`` under ``base``; ``None`` when there is no base or the id would leave it (absolute,
    ``..``: ids come from the cache's manifest, :func:`dune_cache.images.manifest.confined_path`)."""
    return None if base is None else confined_path(base, image_id)


def sample_paths(reader: CacheReader, indices: Sequence[int], image_root: str | Path | None) -> list[Path | None]:
    """Image file of each sample (``None``: not reachable, see :func:`image_path`): with ``image_root`` a list file
    of the user's own, the path it gives the id (any path: the user's list is trusted); else the id under
    ``image_root``, or under the source of the first teacher group holding it (groups may come from different image
    folders)."""
    if image_root is not None and Path(image_root).is_file():
        manifest = load_manifest(image_root)
        listed = {image_id: manifest.path(k) for k, image_id in enumerate(manifest.ids)}
        return [listed.get(reader.image_ids[i]) for i in indices]
    bases = [image_base(reader.provenance[t], image_root) for t in reader.teachers]
    return [image_path(bases[int(np.argmax(reader.rows[i] >= 0))], reader.image_ids[i]) for i in indices]


def unreachable(image_id: str) -> str:
    """Why the image of ``image_id`` is not read (:func:`sample_paths` gave no path), and what to do."""
    return (f"{image_id!r} is not under the image folder (an absolute id, one with '..', or no image folder known), "
            "so it is not read; pass --image-root: a folder holding the ids, or a list file of yours naming them")


def placeholder(text: str, label: str) -> Panel:
    """A grey cell saying ``text`` (an input image that cannot be read, a teacher without features)."""
    image = Image.new("RGB", (160, 160), (PLACEHOLDER_GREY,) * 3)
    ImageDraw.Draw(image).multiline_text((8, 64), text, fill=(255, 255, 255))
    return Panel(np.asarray(image), label, nearest=False)


def fit_pca(tokens: np.ndarray, components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and the first ``components`` principal axes ``(k, D)`` of ``tokens`` ``(N, D)``
    (``k = min(components, N, D)``), each axis signed so its projections have positive skew
    (deterministic colours)."""
    mean = tokens.mean(axis=0)
    centred = tokens - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:components]
    skew = ((centred @ axes.T) ** 3).sum(axis=0)
    return mean, axes * np.where(skew < 0, -1.0, 1.0)[:, None]


def pca_rgb(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Token maps ``(h_i, w_i, D)`` of one feature space -> uint8 RGB maps ``(h_i, w_i, 3)``.

    One PCA over all maps' tokens; component ``c`` -> channel ``c``, scaled from its
    :data:`PERCENTILES` over all tokens to 0..255 (channels past the number of components stay 0).
    """
    tokens = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]).astype(np.float64)
    mean, axes = fit_pca(tokens)
    projected = (tokens - mean) @ axes.T  # (N, k)
    low, high = np.percentile(projected, PERCENTILES, axis=0)
    scaled = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    rgb = np.zeros((len(tokens), 3), dtype=np.uint8)
    rgb[:, :scaled.shape[1]] = np.round(scaled * 255).astype(np.uint8)
    sizes = np.cumsum([m.shape[0] * m.shape[1] for m in maps])[:-1]
    return [part.reshape(*m.shape[:2], 3) for part, m in zip(np.split(rgb, sizes), maps)]


def feature_columns(columns: Sequence[dict[int, np.ndarray]], labels: Sequence[Sequence[str]],
                    count: int) -> list[list[Panel]]:
    """Panels ``[column][row]`` of ``count`` rows for columns of maps in one feature space (each column:
    row -> ``(h, w, D)``), coloured by one PCA fitted jointly over all of them; ``labels[column][row]``.
    Rows a column has no map for get a placeholder."""
    keys = [(c, r) for c, column in enumerate(columns) for r in sorted(column)]
    colours = dict(zip(keys, pca_rgb([columns[c][r] for c, r in keys]))) if keys else {}
    return [[Panel(colours[c, r], labels[c][r]) if (c, r) in colours else placeholder("no features", labels[c][r])
             for r in range(count)] for c in range(len(columns))]


def fitted_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_panel(panel: Panel, cell: tuple[int, int]) -> np.ndarray:
    """uint8 ``(LABEL_HEIGHT + cell_h, cell_w, 3)``: the label strip over the panel resized to ``cell``."""
    height, width = cell
    canvas = Image.new("RGB", (width, LABEL_HEIGHT + height), (255, 255, 255))
    picture = Image.fromarray(np.ascontiguousarray(panel.pixels, dtype=np.uint8))
    canvas.paste(picture.resize((width, height), Image.NEAREST if panel.nearest else Image.BICUBIC),
                 (0, LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((3, 2), fitted_text(draw, panel.label, width - 6, font), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def render_row(panels: Sequence[Panel], cell: tuple[int, int]) -> np.ndarray:
    """uint8 ``(LABEL_HEIGHT + cell_h, len(panels) * cell_w, 3)``: the panels side by side."""
    return np.concatenate([render_panel(p, cell) for p in panels], axis=1)


def file_stem(position: int, image_id: str) -> str:
    """File name of a row: its position and the image's file name without extension, odd characters made
    ``_``, at most :data:`STEM_CHARS` long (the position keeps names unique; the full id is in the picture)."""
    return f"{position:02d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", PurePath(image_id).stem)[:STEM_CHARS]


def write_pictures(rows: Sequence[Sequence[Panel]], image_ids: Sequence[str], out: str | Path,
                   cell: tuple[int, int], missing: list[str]) -> ShowResult:
    """One PNG per row (``<out>/<NN>_<id>.png``) and ``<out>/grid.png`` with all rows stacked."""
    if cell[0] < 1 or cell[1] < 1:
        raise ShowError(f"cell size must be positive, got {cell}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rendered = [render_row(panels, cell) for panels in rows]
    paths = []
    for position, (image_id, row) in enumerate(zip(image_ids, rendered)):
        paths.append(out / f"{file_stem(position, image_id)}.png")
        Image.fromarray(row).save(paths[-1])
    grid = out / "grid.png"
    Image.fromarray(np.concatenate(rendered, axis=0)).save(grid)
    return ShowResult(rows=paths, grid=grid, missing_images=missing)


def cell_shape(cell: int, resolution: Sequence[int]) -> tuple[int, int]:
    """``(cell, cell · W / H)``: cells keep the aspect of the ``(H, W)`` input."""
    return cell, max(1, round(cell * resolution[1] / resolution[0]))


DEFAULT_FIRST = 4          # images shown when neither ids nor a count are given
