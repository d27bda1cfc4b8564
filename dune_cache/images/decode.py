"""Decoding any still image to 8-bit RGB (EXIF orientation, grayscale, CMYK, 16-bit, alpha) and resizing it to
the resolution a teacher sees (``squash`` or ``center_crop``, see :mod:`dune_cache.teachers.geometry`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError
from ..teachers.geometry import RESIZE_MODES

ALPHA_BACKGROUND = (255, 255, 255)
# Images of more pixels are recorded as failed (``too_large``), never decoded: a small file can declare a huge
# image (a decompression bomb). PIL's own default (``Image.MAX_IMAGE_PIXELS``, about 9459 x 9459), checked here
# whatever another library sets PIL's global to.
MAX_IMAGE_PIXELS = 89_478_485


def check_pixel_count(img: Image.Image, path: object) -> None:
    """An :class:`ImageDecodeError` (``too_large``) when the opened (not yet decoded) ``img`` declares more than
    :data:`MAX_IMAGE_PIXELS` pixels."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError("too_large",
                               f"{path}: {width}x{height} = {width * height} pixels, more than the "
                               f"{MAX_IMAGE_PIXELS} an image may have (a decompression bomb?); not decoded")


def check_image_header(data: bytes, name: str) -> None:
    """Read only the header of the image file ``data`` and refuse (:class:`ImageDecodeError`) one that declares
    more than :data:`MAX_IMAGE_PIXELS` pixels or is no image PIL recognises: what must hold before a decoder
    that allocates from the header (torchvision, nvJPEG) gets the bytes."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header, decodes nothing
                check_pixel_count(img, name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"{name}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError("unreadable", f"{name}: {exc}") from None


def open_rgb(path: Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode any still image to 8-bit RGB, upright per EXIF.

    Grayscale is replicated, CMYK/YCbCr/LAB converted, 16/32-bit integer scaled to 8 bits,
    alpha composited over white. ``draft_size`` ``(W, H)`` lets JPEG decode at a reduced scale
    no smaller than it. An image of more than :data:`MAX_IMAGE_PIXELS` pixels is refused from its header, before
    any decoding. Raises :class:`ImageDecodeError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            check_pixel_count(img, path)
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
