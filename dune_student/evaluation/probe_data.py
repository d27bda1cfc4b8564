"""Probe data as ``dune-student probe`` reads it from a folder (written by ``tools/prepare_probe_data.py``):
labelled images for classification, stereo pairs with ground-truth disparity and warp pairs (a photo and its copy
under a known homography) for correspondence, and the probe settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dune_cache import image_files

from ..errors import ProbeError

PAIR_FILES = ("left.png", "right.png", "disparity.npy", "meta.json")
WARP_FILES = ("source.png", "warped.png", "homography.json")


PREPARE_HINT = "python tools/prepare_probe_data.py --out DIR writes one"


@dataclass
class ProbeConfig:
    """What to probe and how."""

    checkpoint: str  # RUN/checkpoint.pt
    data: str  # probe data folder: classify/<class>/*, pairs/<pair>/{left.png, right.png, disparity.npy, meta.json}
    cache: str | None = None  # cache of the probe data folder's images: its teachers are probed too
    out: str | None = None  # JSON report (None: not written)
    seed: int = 0  # classification split, cross-validation folds, random-init student
    k: int = 20  # kNN neighbours
    temperature: float = 0.07  # kNN vote weight exp(similarity / temperature)
    test_fraction: float = 0.5  # share of each class held out for testing
    heads: bool = True  # also probe each teacher head's projection of the student
    batch_size: int = 16
    device: str = "auto"  # auto: the GPU when there is one
    backend: str = "auto"  # CacheReader backend

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or not 0 < self.test_fraction < 1 or self.batch_size < 1:
            raise ProbeError(f"need k >= 1, temperature > 0, 0 < test_fraction < 1 and batch_size >= 1: {self}")


@dataclass
class StereoPair:
    """A rectified pair: ``left`` and ``right`` are image ids (paths relative to the data folder)."""

    name: str
    left: str
    right: str
    disparity: np.ndarray  # (H, W) float32: the left pixel (y, x) is the right pixel (y, x - d); NaN unknown
    split: str  # train | test (of the disparity probe)


@dataclass
class WarpPair:
    """A photo and its warped copy (image ids), ``size x size`` both; ``homography`` ``(3, 3)`` maps a source pixel
    ``(x, y, 1)`` to the warped image."""

    name: str
    source: str
    warped: str
    homography: np.ndarray
    size: int


@dataclass
class ProbeData:
    """The probe data folder, read."""

    root: Path
    classes: list[str]
    images: list[str]  # ids of the classification images
    labels: np.ndarray  # (N,) int64, index into classes
    test: np.ndarray  # (N,) bool: held out (the rest trains)
    pairs: list[StereoPair]
    warps: list[WarpPair]

    def image_ids(self) -> list[str]:
        """Every image the probes read."""
        return (self.images + [p.left for p in self.pairs] + [p.right for p in self.pairs]
                + [w.source for w in self.warps] + [w.warped for w in self.warps])


def stratified_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """``(N,)`` bool: the first ``round(test_fraction * n_c)`` images of a seeded permutation of each class
    (at least one test and one training image per class)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[:min(max(round(test_fraction * len(members)), 1), len(members) - 1)]] = True
    return test


def read_classes(root: Path, test_fraction: float, seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Classes, image ids, labels and test split of ``root/classify/<class>/*``."""
    folder = root / "classify"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    members = {c: image_files(folder / c) for c in classes}
    if len(classes) < 2 or any(len(ids) < 2 for ids in members.values()):
        raise ProbeError(f"probe data {root}: classify/ needs at least 2 class folders of at least 2 images each, "
                         f"found {', '.join(f'{c} ({len(ids)})' for c, ids in members.items()) or 'none'} "
                         f"({PREPARE_HINT})")
    images = [f"classify/{c}/{name}" for c in classes for name in members[c]]
    labels = np.array([k for k, c in enumerate(classes) for _ in members[c]], dtype=np.int64)
    return classes, images, labels, stratified_test_split(labels, test_fraction, seed)


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file (its header only)."""
    with Image.open(path) as image:
        return image.height, image.width


def read_pair(folder: Path, root: Path) -> StereoPair:
    """One ``pairs/<pair>/`` folder, checked."""
    missing = [name for name in PAIR_FILES if not (folder / name).is_file()]
    if missing:
        raise ProbeError(f"probe pair {folder}: missing {', '.join(missing)} (a pair holds {', '.join(PAIR_FILES)})")
    disparity = np.load(folder / "disparity.npy").astype(np.float32)
    sizes = {name: image_size(folder / name) for name in ("left.png", "right.png")}
    if any(size != disparity.shape for size in sizes.values()):
        raise ProbeError(f"probe pair {folder}: disparity.npy is {disparity.shape} but the images (H, W) are "
                         f"{sizes['left.png']} and {sizes['right.png']}")
    split = json.loads((folder / "meta.json").read_text()).get("split")
    if split not in ("train", "test"):
        raise ProbeError(f"probe pair {folder}: meta.json needs \"split\": \"train\" or \"test\", has {split!r}")
    relative = folder.relative_to(root).as_posix()
    return StereoPair(folder.name, f"{relative}/left.png", f"{relative}/right.png", disparity, split)


def read_warp(folder: Path, root: Path) -> WarpPair:
    """One ``warps/<pair>/`` folder, checked: both images square and of one size, a finite invertible homography."""
    missing = [name for name in WARP_FILES if not (folder / name).is_file()]
    if missing:
        raise ProbeError(f"warp pair {folder}: missing {', '.join(missing)} "
                         f"(a warp pair holds {', '.join(WARP_FILES)})")
    sizes = {image_size(folder / name) for name in ("source.png", "warped.png")}
    homography = np.asarray(json.loads((folder / "homography.json").read_text()).get("homography"), np.float64)
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise ProbeError(f"warp pair {folder}: source.png and warped.png must be square and of one size, got {sizes}")
    if homography.shape != (3, 3) or not np.isfinite(homography).all() or abs(np.linalg.det(homography)) < 1e-12:
        raise ProbeError(f"warp pair {folder}: homography.json needs \"homography\": a finite invertible 3 x 3 "
                         f"matrix, has shape {homography.shape}")
    relative = folder.relative_to(root).as_posix()
    return WarpPair(folder.name, f"{relative}/source.png", f"{relative}/warped.png", homography, sizes.pop()[0])


def load_probe_data(root: str | Path, test_fraction: float = 0.5, seed: int = 0) -> ProbeData:
    """Read and check a probe data folder (layout in :mod:`dune_demo.probe_data`)."""
    root = Path(root)
    if not root.is_dir():
        raise ProbeError(f"probe data {root}: no such folder ({PREPARE_HINT})")
    classes, images, labels, test = read_classes(root, test_fraction, seed)
    folders = sorted(p for p in (root / "pairs").glob("*") if p.is_dir())
    pairs = [read_pair(folder, root) for folder in folders]
    splits = [p.split for p in pairs]
    if splits.count("train") < 2 or splits.count("test") < 1:
        raise ProbeError(f"probe data {root}: pairs/ needs at least 2 train and 1 test stereo pairs; found "
                         f"{', '.join(f'{p.name} ({p.split})' for p in pairs) or 'none'} ({PREPARE_HINT})")
    warps = [read_warp(folder, root) for folder in sorted(p for p in (root / "warps").glob("*") if p.is_dir())]
    if not warps:
        raise ProbeError(f"probe data {root}: warps/ holds no warp pair (source.png, warped.png, homography.json) "
                         f"for the correspondence probe ({PREPARE_HINT})")
    return ProbeData(root, classes, images, labels, test, pairs, warps)
