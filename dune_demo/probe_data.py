"""Labelled probe data that installs offline, for ``dune-student probe``: written from the data bundled in the
scikit-image wheel (nothing is downloaded).

Layout written by :func:`write_probe_data` (the layout :mod:`dune_student.evaluation.probe` reads)::

    out/classify/<class>/<name>.png     labelled images, one folder per class
    out/pairs/<pair>/left.png           rectified stereo pair, both (H, W) RGB
    out/pairs/<pair>/right.png
    out/pairs/<pair>/disparity.npy      (H, W) float32: the left pixel (y, x) is the right pixel (y, x - d); NaN unknown
    out/pairs/<pair>/meta.json          {"split": "train" | "test", "source": ..., "window": {"y", "x", "size"}}

Sources:

* **classify**: ``skimage.data.lfw_subset()`` — 200 grayscale 25 x 25 crops from Labeled Faces in the Wild,
  100 faces (``classify/face``) and 100 non-faces cut from the backgrounds of the same photos
  (``classify/nonface``). Written at their native 25 x 25: every model upscales them when it loads them
  (bicubic squash to its input size, as ``dune-cache extract`` and the student's evaluation do).
* **pairs**: ``skimage.data.stereo_motorcycle()`` — the Middlebury 2014 "Motorcycle" pair (rectified, 741 x 500,
  a quarter of the original resolution) with its ground-truth disparity (``inf`` where unknown, 7 % of the
  pixels, written as NaN). Checked convention: the left pixel (y, x) shows what the right pixel (y, x - d)
  shows (mean absolute grey difference 8 against 45 for x + d). The scene is cut into 12 square windows
  (:data:`WINDOW` px), the same window in both images so that rows stay aligned and the disparity stays valid
  within the crop: 6 windows (2 columns x 3 rows, not overlapping) in the left half of the scene make the
  ``train`` pairs and 6 in the right half the ``test`` pairs, so that no pixel of a held-out left image is in
  a training one. Matches that fall left of a crop's right image are not scored.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

WINDOW = 160  # side of the square stereo windows, pixels of the (quarter-resolution) Middlebury pair
WINDOW_COLUMNS, WINDOW_ROWS = 2, 3  # windows per half of the scene
LFW_CLASSES = ("face", "nonface")  # lfw_subset(): the first 100 images are faces, the next 100 non-faces


def window_starts(low: int, high: int, count: int) -> list[int]:
    """``count`` starts of :data:`WINDOW`-wide windows spread evenly over ``[low, high)``, not overlapping."""
    if count * WINDOW > high - low:
        raise ValueError(f"{count} windows of {WINDOW} px do not fit in [{low}, {high})")
    return [int(s) for s in np.linspace(low, high - WINDOW, count).round()]


def stereo_windows(height: int, width: int) -> list[tuple[str, int, int]]:
    """``(split, y, x)`` of every window: ``train`` in the left half of the scene, ``test`` in the right half."""
    halves = (("train", 0, width // 2), ("test", width // 2, width))
    return [(split, y, x) for split, low, high in halves for y in window_starts(0, height, WINDOW_ROWS)
            for x in window_starts(low, high, WINDOW_COLUMNS)]


def write_classify(out: Path) -> None:
    """The LFW subset as ``out/classify/{face,nonface}/lfw_NNN.png``."""
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) float in [0, 1]
    per_class = len(images) // len(LFW_CLASSES)
    for index, image in enumerate(images):
        folder = out / "classify" / LFW_CLASSES[index // per_class]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"lfw_{index:03d}.png")


def write_pairs(out: Path) -> None:
    """Aligned windows of the Motorcycle pair as ``out/pairs/<split>_yYYY_xXXX/``."""
    from skimage.data import stereo_motorcycle

    left, right, disparity = stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity), disparity, np.nan).astype(np.float32)
    windows = stereo_windows(*disparity.shape)
    for split, y, x in windows:
        folder = out / "pairs" / f"{split}_y{y:03d}_x{x:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows, columns = slice(y, y + WINDOW), slice(x, x + WINDOW)
        Image.fromarray(left[rows, columns]).save(folder / "left.png")
        Image.fromarray(right[rows, columns]).save(folder / "right.png")
        np.save(folder / "disparity.npy", disparity[rows, columns])
        meta = {"split": split, "source": "skimage.data.stereo_motorcycle (Middlebury 2014 Motorcycle)",
                "window": {"y": y, "x": x, "size": WINDOW}}
        (folder / "meta.json").write_text(json.dumps(meta) + "\n")


def write_probe_data(out: Path) -> Path:
    """Write the probe data folder (layout in the module docstring) to ``out``; returns ``out``. Deterministic:
    the same files on every machine. Needs scikit-image (the ``demo`` and ``test`` extras)."""
    out = Path(out)
    if importlib.util.find_spec("skimage") is None:
        raise ImportError("the probe data comes with scikit-image: pip install scikit-image "
                          "(part of this package's `demo` and `test` extras)")
    write_classify(out)
    write_pairs(out)
    return out
