"""Image manifests (which images, in which order, with which dataset tag) and robust decoding.

A manifest is built from a directory (recursive, sorted, image extensions) or from a list file
with one ``path`` or ``path<TAB>tag`` per line. Its canonical text -- one ``id`` or ``id<TAB>tag``
line per image, ``\\n``-terminated, UTF-8 -- is stored in every cache and hashed for provenance.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
RESIZE_MODES = ("squash", "center_crop")
ALPHA_BACKGROUND = (255, 255, 255)


class ManifestError(ValueError):
    """The image directory or list cannot be turned into a manifest."""


class ImageDecodeError(Exception):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageManifest:
    """Ordered images: ``ids[i]`` is image ``i`` of every array in a cache."""

    ids: tuple[str, ...]
    tags: tuple[str, ...]
    base: Path | None  # relative ids resolve against this folder

    def path(self, index: int) -> Path:
        p = Path(self.ids[index])
        return p if p.is_absolute() or self.base is None else self.base / p

    def __len__(self) -> int:
        return len(self.ids)

    def to_text(self) -> str:
        """Canonical text: one ``id`` or ``id<TAB>tag`` line per image."""
        return "".join(f"{i}\t{t}\n" if t else f"{i}\n" for i, t in zip(self.ids, self.tags))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    @classmethod
    def from_text(cls, text: str, base: Path | None = None) -> "ImageManifest":
        ids, tags = [], []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            image_id, _, tag = line.partition("\t")
            ids.append(image_id)
            tags.append(tag.strip())
        return cls(ids=tuple(ids), tags=tuple(tags), base=base)


def load_manifest(images: str | Path) -> ImageManifest:
    """Manifest from a directory (recursive) or a list file (``path[<TAB>tag]`` lines, ``#`` comments)."""
    src = Path(images)
    if src.is_dir():
        ids = sorted(
            p.relative_to(src).as_posix()
            for p in src.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        manifest = ImageManifest(ids=tuple(ids), tags=("",) * len(ids), base=src.resolve())
    elif src.is_file():
        manifest = ImageManifest.from_text(src.read_text(encoding="utf-8"), base=src.resolve().parent)
    else:
        raise ManifestError(f"--images {src}: no such directory or list file")
    if not manifest.ids:
        raise ManifestError(f"--images {src}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    duplicates = len(manifest.ids) - len(set(manifest.ids))
    if duplicates:
        raise ManifestError(f"--images {src}: {duplicates} duplicate image ids")
    return manifest


def open_rgb(path: Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode any still image to 8-bit RGB, upright per EXIF.

    Grayscale is replicated, CMYK/YCbCr/LAB converted, 16/32-bit integer scaled to 8 bits,
    alpha composited over white. ``draft_size`` ``(W, H)`` lets JPEG decode at a reduced scale
    no smaller than it. Raises :class:`ImageDecodeError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb8(img)
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing", f"{path}: file not found") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", f"{path}: not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"{path}: {exc}") from exc
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "unreadable"
        raise ImageDecodeError(reason, f"{path}: {exc}") from exc
    except (ValueError, SyntaxError) as exc:  # PIL raises these on malformed headers
        raise ImageDecodeError("unreadable", f"{path}: {exc}") from exc


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit data (PNG/TIFF decode to "I;16*" or "I"): map 0..65535 to 0..255
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_image(img: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """RGB image -> uint8 ``(H, W, 3)`` of ``size=(H, W)``; bicubic with antialiasing (PIL).

    ``squash`` resizes the whole image to H x W; ``center_crop`` scales the shorter side to fit
    and crops the centre.
    """
    h, w = size
    if mode == "squash":
        out = img.resize((w, h), Image.BICUBIC)
    elif mode == "center_crop":
        out = ImageOps.fit(img, (w, h), Image.BICUBIC, centering=(0.5, 0.5))
    else:
        raise ValueError(f"resize mode {mode!r}; choose one of {RESIZE_MODES}")
    return np.asarray(out, dtype=np.uint8)


def load_pixels(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    """Decode and resize one image file to uint8 ``(3, H, W)``. Raises :class:`ImageDecodeError`."""
    h, w = size
    img = open_rgb(path, draft_size=(w, h))
    if min(img.size) < 1:
        raise ImageDecodeError("empty", f"{path}: image has size {img.size}")
    return np.ascontiguousarray(resize_image(img, size, mode).transpose(2, 0, 1))
