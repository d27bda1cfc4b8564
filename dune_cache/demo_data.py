"""Real photographs that install offline: those bundled with scikit-image (and scikit-learn, if installed)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

# scikit-image photos shipped inside its wheel (the others, e.g. eagle or lily, need a download).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "clock", "moon", "brick", "grass", "gravel", "cell",
)


def _skimage_photos() -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    import skimage.data

    for name in SKIMAGE_PHOTOS:
        yield name, getattr(skimage.data, name)
    yield "motorcycle_left", lambda: skimage.data.stereo_motorcycle()[0]
    yield "motorcycle_right", lambda: skimage.data.stereo_motorcycle()[1]


def _sklearn_photos() -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images):
        yield f"sklearn_{Path(filename).stem}", lambda image=image: image


def demo_images(out_dir: str | Path, count: int | None = None) -> list[Path]:
    """Write up to ``count`` real photos (all when None) as RGB PNGs ``out_dir/<name>.png``, in a fixed order.

    Grayscale photos (camera, coins, ...) are stored with three identical channels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, load in [*_skimage_photos(), *_sklearn_photos()][:count]:
        path = out_dir / f"{name}.png"
        Image.fromarray(load()).convert("RGB").save(path)
        paths.append(path)
    return paths
