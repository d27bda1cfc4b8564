"""K cached views per image (FKD-style): where each view's box lies, and the pixels it shows.

A view is a RandomResizedCrop box of the *whole original image* in relative coordinates
``(y0, x0, y1, x1)`` (``0 <= y0 < y1 <= 1``, same for x) plus a horizontal flip flag. Boxes are drawn
in the unit square the whole image is squashed to (the framing of the ``squash`` geometry): the box
covers a fraction ``scale`` of the image's area and has width / height ``ratio`` in relative units
(``ratio · W / H`` in pixels). They are a pure function of ``(seed, image id, view)``, independent of
the image's size and of the teacher, so every teacher group extracted with the same view sampling has
the same boxes for an image, whatever its resolution or manifest order.

The teacher's input for a view and the student's input for the same view both come from
:func:`crop_view`, so the two see the same region of the same pixels (docs/augmentation.md).
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from PIL import Image

from ..config import ViewSampling

# Torchvision's RandomResizedCrop tries this many boxes before falling back to a centred one.
MAX_ATTEMPTS = 10
# Views are cut from the image decoded (JPEG DCT draft) at no less than this multiple of the output size,
# so that the smallest default crop (scale 0.4, ratio 3/4: sides >= 0.55 of the image) is downscaled too.
DECODE_OVERSAMPLE = 2


def view_generator(seed: int, image_id: str, view: int) -> np.random.Generator:
    """The random stream of one view of one image, keyed by the SHA-256 of the id's bytes (``os.fsencode``: its
    UTF-8, or a non-UTF-8 file name's own bytes), not by its manifest index."""
    key = int.from_bytes(hashlib.sha256(os.fsencode(image_id)).digest()[:8], "little")
    return np.random.default_rng([seed, key, view])


def fallback_box(ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """Torchvision's fallback: the largest centred box whose ratio is clamped into ``ratio``."""
    height, width = 1.0, 1.0
    if ratio[0] > 1:
        height = 1 / ratio[0]
    elif ratio[1] < 1:
        width = ratio[1]
    top, left = (1 - height) / 2, (1 - width) / 2
    return top, left, top + height, left + width


def sample_box(rng: np.random.Generator, sampling: ViewSampling) -> tuple[float, float, float, float]:
    """One RandomResizedCrop box ``(y0, x0, y1, x1)`` of the unit square (torchvision's algorithm)."""
    log_ratio = (math.log(sampling.ratio[0]), math.log(sampling.ratio[1]))
    for _ in range(MAX_ATTEMPTS):
        area = rng.uniform(*sampling.scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if width <= 1 and height <= 1:
            top, left = rng.uniform(0, 1 - height), rng.uniform(0, 1 - width)
            return top, left, top + height, left + width
    return fallback_box(sampling.ratio)


def sample_views(image_id: str, count: int, sampling: ViewSampling) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(K, 4)`` float32 ``(y0, x0, y1, x1)`` and flips ``(K,)`` bool of the ``count`` views of an image.

    The boxes are rounded to float32 here, so the teacher's crop uses exactly the stored values.
    """
    boxes, flips = np.zeros((count, 4), dtype=np.float32), np.zeros(count, dtype=bool)
    for view in range(count):
        rng = view_generator(sampling.seed, image_id, view)
        boxes[view] = sample_box(rng, sampling)
        flips[view] = rng.random() < sampling.flip_p
    return boxes, flips


def decode_size(out_size: tuple[int, int]) -> tuple[int, int]:
    """JPEG draft size ``(W, H)`` for decoding an image whose views are resized to ``out_size`` ``(H, W)``."""
    return out_size[1] * DECODE_OVERSAMPLE, out_size[0] * DECODE_OVERSAMPLE


def crop_view(image: Image.Image, box: np.ndarray | tuple[float, ...], flip: bool,
              out_size: tuple[int, int]) -> np.ndarray:
    """The pixels of one view: the ``box`` region of the whole RGB ``image``, resized (PIL bicubic with
    antialiasing, sub-pixel box edges) to ``out_size`` ``(H, W)``, then mirrored left-right if ``flip``.

    Returns uint8 ``(3, H, W)``. The box ``(0, 0, 1, 1)`` without flip is the ``squash`` full view.
    """
    width, height = image.size
    y0, x0, y1, x1 = (float(v) for v in box)
    region = (x0 * width, y0 * height, x1 * width, y1 * height)
    out = image.resize((out_size[1], out_size[0]), Image.BICUBIC, box=region)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))
