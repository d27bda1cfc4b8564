"""K cached views per image: extraction (boxes, flips, exact features), resume, identity, verify, reader,
the documented plain-zarr recipe, and training with ``augment.mode=views`` (exact targets, exact resume)."""
from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dune_cache.cli import app as cache_app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import open_rgb
from dune_cache.commands.verify import verify_cache
from dune_cache.read.backends import BACKENDS, backend_installed
from dune_cache.read.reader import CacheReader
from dune_cache.errors import ReaderError
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_cache.config import StorageConfig
from dune_cache.errors import StoreMismatchError
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import create_teacher
from dune_cache.config import ViewSampling
from dune_cache.images.views import crop_view, decode_size, sample_views
from dune_student.config import AugmentConfig, DataConfig
from dune_student.data.augment import crop_view_pixels
from dune_student.config import load_config
from dune_student.data.batches import BatchSource
from dune_student.errors import DataError
from dune_student.training.trainer import Trainer, train
from test_train import TINY_STUDENT

TEACHER = "tiny_test_teacher"
SPEC = Path(__file__).parents[1] / "docs" / "cache-format.md"


def config(images: Path, out: Path, checkpoint: Path, **kw) -> ExtractConfig:
    """Two views per image on the tiny teacher's 4x4 grid (a 32x32 student with patch 8)."""
    base = ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=checkpoint, views=2,
                         student_patch=8, student_resolution="32", batch_size=4, num_workers=0, progress=False,
                         storage=StorageConfig(unit_size=4))
    return replace(base, **kw)


def stored_views(out: Path, name: str = TEACHER) -> dict[str, np.ndarray]:
    store = TeacherStore.open(str(out), name)
    return {"status": store.read_status(), "cls": store.cls[:], "patch": store.patch[:],
            **{f"views/{k}": store.views[k][:] for k in ("cls", "patch", "boxes", "flip")}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, real_image_dir, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("views") / "cache.zarr"
    run_extraction(config(real_image_dir, out, tiny_checkpoint))
    write_stats(str(out), TEACHER, compute_stats(str(out), TEACHER))
    return out


def test_views_hold_the_teacher_applied_to_their_crops(cache, real_image_dir, tiny_checkpoint, tmp_path):
    arrays = stored_views(cache)
    boxes, flips = arrays["views/boxes"], arrays["views/flip"]
    assert boxes.shape == (6, 2, 4) and boxes.dtype == np.float32 and flips.shape == (6, 2)
    y0, x0, y1, x1 = np.moveaxis(boxes, -1, 0)
    assert ((0 <= y0) & (y0 < y1) & (y1 <= 1) & (0 <= x0) & (x0 < x1) & (x1 <= 1)).all()
    area, ratio = (y1 - y0) * (x1 - x0), (x1 - x0) / (y1 - y0)
    assert ((area > 0.4 - 1e-6) & (area < 1 + 1e-6) & (ratio > 0.75 - 1e-6) & (ratio < 4 / 3 + 1e-6)).all()
    assert set(np.unique(flips)) == {0, 1} and len({tuple(b) for b in boxes.reshape(-1, 4)}) == 12

    teacher = create_teacher(TEACHER, tiny_checkpoint)
    manifest = load_manifest(real_image_dir)
    for i, image_id in enumerate(manifest.ids):
        expected_boxes, expected_flips = sample_views(image_id, 2, ViewSampling())
        np.testing.assert_array_equal(boxes[i], expected_boxes)  # a pure function of (seed, id, view)
        np.testing.assert_array_equal(flips[i], expected_flips)
        image = open_rgb(manifest.path(i), draft_size=decode_size((32, 32)))
        crops = torch.stack([crop_view_pixels(image, box, bool(flip), (32, 32))
                             for box, flip in zip(boxes[i], flips[i])])
        with torch.inference_mode():
            out = teacher(crops)  # recomputed on the student's crop code path
        np.testing.assert_allclose(arrays["views/cls"][i], out.cls.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(arrays["views/patch"][i], out.patch.numpy(), rtol=2e-3, atol=2e-3)
        mirrored = crop_view(image, boxes[i, 0], not flips[i, 0], (32, 32))
        np.testing.assert_array_equal(mirrored[..., ::-1], crops[0].numpy())

    plain = tmp_path / "plain.zarr"  # the whole-image targets do not depend on the views
    run_extraction(config(real_image_dir, plain, tiny_checkpoint, views=0))
    no_views = TeacherStore.open(str(plain), TEACHER)
    assert no_views.views is None and no_views.num_views == 0
    np.testing.assert_array_equal(no_views.patch[:], arrays["patch"])
    np.testing.assert_array_equal(no_views.cls[:], arrays["cls"])


def test_view_extraction_resumes_to_the_same_result(cache, real_image_dir, tiny_checkpoint, tmp_path, monkeypatch):
    real_write_rows = TeacherStore.write_rows
    calls = {"n": 0}

    def crash_on_second_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk went away")
        return real_write_rows(self, *args)

    monkeypatch.setattr(TeacherStore, "write_rows", crash_on_second_batch)
    out = tmp_path / "cache.zarr"
    with pytest.raises(RuntimeError, match="disk went away"):
        run_extraction(config(real_image_dir, out, tiny_checkpoint))
    assert (stored_views(out)["status"] == 1).sum() == 4
    monkeypatch.setattr(TeacherStore, "write_rows", real_write_rows)
    assert run_extraction(config(real_image_dir, out, tiny_checkpoint)).processed == 2
    resumed, straight = stored_views(out), stored_views(cache)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def test_another_view_count_or_seed_is_refused(cache, real_image_dir, tiny_checkpoint):
    cases = {"views.count": {"views": 3}, r"views.count: store has 2, this run has '<absent>'": {"views": 0},
             "views.seed": {"view_sampling": ViewSampling(seed=1)}}
    for message, change in cases.items():
        with pytest.raises(StoreMismatchError, match=message.replace(".", r"\.")):
            run_extraction(config(real_image_dir, cache, tiny_checkpoint, **change))


def test_info_shows_views_and_verify_checks_them(real_image_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "cache.zarr"
    run_extraction(config(real_image_dir, out, tiny_checkpoint))
    runner = CliRunner()
    info = runner.invoke(cache_app, ["info", str(out)])
    assert info.exit_code == 0 and "views      2 per image, patch [6, 2, 4, 4, 16]" in info.output, info.output
    assert runner.invoke(cache_app, ["verify", str(out), "--no-progress"]).exit_code == 0
    ids = load_manifest(real_image_dir).ids
    views = out / TEACHER / "views"
    (views / "patch" / "c" / "1" / "0" / "0" / "0" / "0").write_bytes(b"garbage bytes")  # image 1's views
    (views / "cls" / "c" / "4" / "0" / "0").unlink()  # image 4's views, missing
    [report] = verify_cache(str(out))
    problems = "\n".join(report.problems)
    assert f"image 1 ({ids[1]}): views/patch: chunk does not decode" in problems
    assert f"image 4 ({ids[4]}): views/cls: non-finite values" in problems
    assert len(report.problems) == 2


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]


@pytest.mark.parametrize("backend", installed_backends())
def test_reader_returns_the_chosen_views_and_their_boxes(cache, backend):
    reader = CacheReader(str(cache), backend=backend)
    stored = stored_views(cache)
    row = {image_id: i for i, image_id in enumerate(TeacherStore.open(str(cache), TEACHER).manifest().ids)}
    assert reader.num_views == {TEACHER: 2} and reader.views_per_image() == 2
    indices, views = np.array([3, 0, 5, 3, 1, 2]), np.array([1, -1, 0, 0, 1, -1])
    batch = reader.read(indices, views)
    boxes, flips = reader.view_boxes(indices, views)
    for k, (sample, view) in enumerate(zip(indices, views)):
        i = row[reader.image_ids[sample]]
        cls, patch = (stored["cls"][i], stored["patch"][i]) if view < 0 else \
            (stored["views/cls"][i, view], stored["views/patch"][i, view])
        np.testing.assert_array_equal(batch.cls[TEACHER][k].numpy(), cls.astype(np.float32))
        np.testing.assert_array_equal(batch.patch[TEACHER][k].numpy(), patch.astype(np.float32))
        box, flip = ((0, 0, 1, 1), 0) if view < 0 else (stored["views/boxes"][i, view], stored["views/flip"][i, view])
        np.testing.assert_array_equal(boxes[k], box)
        assert flips[k] == bool(flip)
    whole = reader.read(indices)
    assert torch.equal(whole.patch[TEACHER], reader.read(indices, np.full(6, -1)).patch[TEACHER])
    with pytest.raises(IndexError, match=r"\[-1, 2\)"):
        reader.read(indices, np.full(6, 2))


def test_teachers_with_different_views_are_not_read_together(cache, real_image_dir, tiny_checkpoint, tmp_path):
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache, root)
    run_extraction(config(real_image_dir, root, tiny_checkpoint, name="three", views=3))
    run_extraction(config(real_image_dir, root, tiny_checkpoint, name="none", views=0))
    both = CacheReader(str(root), [TEACHER, "three"], backend="zarr")
    assert both.num_views == {TEACHER: 2, "three": 3}
    both.read(np.arange(3))  # whole images are fine
    with pytest.raises(ReaderError, match="different views"):
        both.read(np.arange(3), np.zeros(3))
    with pytest.raises(ReaderError, match=r"none have no cached views.*--views K"):
        CacheReader(str(root), [TEACHER, "none"], backend="zarr").view_boxes(np.arange(3), np.zeros(3))


def recipe(heading: str) -> str:
    section = SPEC.read_text().split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_plain_zarr_views_recipe(cache):
    scope = {"CACHE": str(cache), "TEACHER": TEACHER}
    exec(recipe("Reading cached views with plain zarr"), scope)
    stored = stored_views(cache)
    result = scope["result"]
    np.testing.assert_array_equal(result["patch"], stored["views/patch"][result["image"], result["view"]])
    np.testing.assert_array_equal(result["box"], stored["views/boxes"][result["image"], result["view"]])
    assert result["flip"] == bool(stored["views/flip"][result["image"], result["view"]])


# ---------------------------------------------------------------------------------------
# Training with augment.mode=views
# ---------------------------------------------------------------------------------------
def train_config(cache: Path, images: Path, out: Path, *extra: str):
    return load_config(None, [f"data.cache={cache}", f"data.images={images}", f"out={out}", "steps=4",
                              "checkpoint_every=2", "augment.mode=views", "student.drop_path=0.1", *TINY_STUDENT,
                              *extra])


def test_student_sees_the_crop_the_teacher_saw(cache, real_image_dir, tiny_checkpoint):
    """With the teacher's resolution as the student's, the teacher on the student's pixels gives the targets."""
    data = DataConfig(images=str(real_image_dir), batch_size=6, shuffle_block=2, shuffle_buffer=4)
    source = BatchSource(CacheReader(str(cache), backend="zarr"), data, AugmentConfig(mode="views"), 0, np.arange(6),
                         32)
    teacher = create_teacher(TEACHER, tiny_checkpoint)
    chosen = []
    for step in range(3):
        batch = source[step]
        assert ((0 <= batch.views) & (batch.views < 2)).all()
        chosen.append(batch.views)
        with torch.inference_mode():
            out = teacher(batch.clean_pixels)
        torch.testing.assert_close(out.patch, batch.patch[TEACHER].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out.cls, batch.cls[TEACHER].float(), rtol=2e-3, atol=2e-3)
        assert not torch.equal(batch.pixels, batch.clean_pixels)  # photometric: student input only
    assert len(np.unique(np.concatenate(chosen))) == 2
    np.testing.assert_array_equal(source[1].views, chosen[1])  # a pure function of (seed, step, sample)


def test_views_mode_trains_and_resumes_bit_for_bit(tmp_path, cache, real_image_dir, monkeypatch):
    straight = Trainer(train_config(cache, real_image_dir, tmp_path / "straight"))
    straight.run()

    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash_after_three(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        Trainer(train_config(cache, real_image_dir, tmp_path / "resumed")).run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(train_config(cache, real_image_dir, tmp_path / "resumed"))
    resumed.run()  # continues from the step-2 checkpoint
    assert resumed.step == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_views_mode_needs_a_cache_with_views(tmp_path, real_image_dir, tiny_checkpoint):
    plain = tmp_path / "plain.zarr"
    run_extraction(config(real_image_dir, plain, tiny_checkpoint, views=0))
    write_stats(str(plain), TEACHER, compute_stats(str(plain), TEACHER))
    with pytest.raises(DataError, match="augment.mode=views.*--views K"):
        train(train_config(plain, real_image_dir, tmp_path / "run"))
