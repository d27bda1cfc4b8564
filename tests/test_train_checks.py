"""Training on a partial cache (--allow-partial), and the cache checks at start and on resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.errors import ReaderError
from dune_cache.config import StorageConfig
from dune_student.cli import app
from dune_student.errors import DataError
from dune_student.errors import RunMismatchError
from dune_student.training.trainer import Trainer, train
from test_train import TINY_STUDENT, config

EMA = "loss.standardize=ema"  # no `dune-cache stats` needed


def extract(images: Path, out: Path, checkpoint: Path, shard: str = "0/1", resolution: str = "32",
            name: str | None = None, overwrite: bool = False) -> None:
    """Tiny-teacher group on the student's grid; units of 2 images, so ``shard="0/2"`` leaves images 2-3 pending."""
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=checkpoint,
                                 name=name, student_patch=8, student_resolution=resolution, batch_size=6,
                                 num_workers=0, progress=False, storage=StorageConfig(unit_size=2), shard=shard,
                                 overwrite=overwrite))


class Stop(Exception):
    pass


def test_allow_partial_trains_on_the_done_images_and_resumes_over_more(tmp_path, real_image_dir, tiny_checkpoint,
                                                                       caplog, monkeypatch):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint, shard="0/2")  # 4 of 6 images done
    with pytest.raises(ReaderError, match="incomplete: 2 of 6 images pending"):
        train(config(cache, real_image_dir, tmp_path / "refused", EMA))

    args = ["train", "--cache", str(cache), "--images", str(real_image_dir), "--out", str(tmp_path / "cli"),
            "--steps", "1", "--allow-partial", *TINY_STUDENT, EMA]
    with caplog.at_level("INFO"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training on the done images only (4 samples): tiny_test_teacher 4 of 6" in caplog.text

    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash_at_two(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop
        return real_step(self, batch)

    partial = [EMA, "data.allow_partial=true", "steps=2", "checkpoint_every=1"]
    monkeypatch.setattr(Trainer, "train_step", crash_at_two)
    with pytest.raises(Stop):  # the step-1 checkpoint was trained on 4 done images
        Trainer(config(cache, real_image_dir, tmp_path / "run", *partial)).run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    extract(real_image_dir, cache, tiny_checkpoint, shard="1/2")  # the other 2 images are done now
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = Trainer(config(cache, real_image_dir, tmp_path / "run", *partial))
        resumed.run()
    assert resumed.step == 2 and len(resumed.reader) == 6
    assert "other done counts (then -> now: tiny_test_teacher 4 -> 6)" in caplog.text


@pytest.mark.parametrize("change, field", [
    (dict(images="fewer"), "images.manifest_sha256"),
    (dict(resolution="40"), "geometry.grid"),
])
def test_resume_refuses_a_cache_with_other_images_or_geometry(tmp_path, real_image_dir, tiny_checkpoint, change,
                                                               field):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint)
    train(config(cache, real_image_dir, tmp_path / "run", EMA, "steps=1"))
    images = real_image_dir
    if change.get("images"):
        images = tmp_path / "fewer"  # five of the six images
        images.mkdir()
        for path in sorted(real_image_dir.iterdir())[:5]:
            shutil.copy(path, images)
    extract(images, cache, tiny_checkpoint, resolution=change.get("resolution", "32"), overwrite=True)
    with pytest.raises(RunMismatchError, match=rf"trained on another cache(.|\n)*teacher tiny_test_teacher: "
                                               rf"{field}: the checkpoint was trained on .*, the cache has"):
        train(config(cache, real_image_dir, tmp_path / "run", EMA, "steps=1"))


def test_teacher_groups_that_disagree_are_refused_at_start(tmp_path, real_image_dir, tiny_checkpoint):
    cache = tmp_path / "cache.zarr"
    extract(real_image_dir, cache, tiny_checkpoint)
    extract(real_image_dir, cache, tiny_checkpoint, resolution="40", name="wider")
    with pytest.raises(DataError, match="extracted for different student resolutions"):
        train(config(cache, real_image_dir, tmp_path / "run", EMA, "data.resolution=0"))
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    for name in ("a.jpg", "b.png"):
        (unusable / name).write_bytes(b"not an image")
    extract(unusable, cache, tiny_checkpoint, name="failed")  # both images failed: nothing done
    with pytest.raises(DataError, match="teacher group.s. failed have no done images"):
        train(config(cache, real_image_dir, tmp_path / "run2", EMA))
