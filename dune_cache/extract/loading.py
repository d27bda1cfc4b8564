"""What extraction feeds the teacher: a ``Dataset`` over a manifest's pending images (decoded and resized in
DataLoader workers, with ``--views K`` random views each) and the batches it collates, with the images that
failed to decode and why.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ViewSampling
from ..errors import ImageDecodeError
from ..images.decode import load_pixels, open_rgb
from ..images.manifest import ImageManifest
from ..images.views import crop_view, decode_size, sample_views
from ..teachers.geometry import Geometry
from ..utils.runtime import pin_fields


@dataclass
class ImageViews:
    """The views of one image (or, batched, of ``B`` images with a leading ``B``): pixels uint8
    ``(K, 3, H, W)``, boxes float32 ``(K, 4)``, flips bool ``(K,)``."""

    pixels: torch.Tensor
    boxes: np.ndarray
    flips: np.ndarray


class ManifestImages(Dataset):
    """Item ``k`` -> ``(image_index, uint8 (3, H, W) or None, ImageViews or None, failure reason or None,
    message)``; views only when ``views > 0``."""

    def __init__(self, manifest: ImageManifest, indices: np.ndarray, geometry: Geometry, views: int = 0,
                 view_sampling: ViewSampling = ViewSampling()):
        self.manifest, self.indices, self.geometry = manifest, indices, geometry
        self.views, self.view_sampling = views, view_sampling

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = int(self.indices[k])
        try:
            pixels = load_pixels(self.manifest.path(index), self.geometry.resolution, self.geometry.resize)
            views = self.load_views(index) if self.views else None
            return index, torch.from_numpy(pixels), views, None, None
        except ImageDecodeError as exc:
            return index, None, None, exc.reason, str(exc)

    def load_views(self, index: int) -> ImageViews:
        """The image's views at the teacher's resolution (decoded a second time, at ``decode_size``, so the
        whole-image view stays what an extraction without views computes)."""
        boxes, flips = sample_views(self.manifest.ids[index], self.views, self.view_sampling)
        size = self.geometry.resolution
        image = open_rgb(self.manifest.path(index), draft_size=decode_size(size))
        pixels = np.stack([crop_view(image, box, flip, size) for box, flip in zip(boxes, flips)])
        return ImageViews(pixels=torch.from_numpy(pixels), boxes=boxes, flips=flips)


@dataclass
class Batch:
    indices: np.ndarray  # (B,) images decoded
    pixels: torch.Tensor  # (B, 3, H, W) uint8
    views: ImageViews | None  # (B, K, ...) when extracting views
    failures: list[tuple[int, str, str]]  # (index, reason, message)

    def pin_memory(self) -> "Batch":
        """This batch with its pixels (and views' pixels) pinned: the hook a DataLoader with ``pin_memory=True`` calls,
        so that the copy to the GPU does not block."""
        return pin_fields(self)


def collate_views(views: list[ImageViews]) -> ImageViews:
    return ImageViews(pixels=torch.stack([v.pixels for v in views]), boxes=np.stack([v.boxes for v in views]),
                      flips=np.stack([v.flips for v in views]))


def collate_batch(items) -> Batch:
    ok = [(i, p, v) for i, p, v, _, _ in items if p is not None]
    return Batch(
        indices=np.array([i for i, _, _ in ok], dtype=np.int64),
        pixels=torch.stack([p for _, p, _ in ok]) if ok else torch.zeros(0, dtype=torch.uint8),
        views=collate_views([v for _, _, v in ok]) if ok and ok[0][2] is not None else None,
        failures=[(i, r, m) for i, p, _, r, m in items if p is None],
    )
