"""Stage-2 input pipeline levers give the training inputs of the loader path: photometric augmentation on the device
(same draws, same pixels), images decoded on the device (torchvision, within JPEG tolerance), JPEG draft at the size
the crop needs, the cache's own image copy (``dune-cache add-images``), and one device sync for the damage check."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dune_cache.errors import ImageCopyError
from dune_cache.commands.add_images import add_images
from dune_cache.format.image_copy import read_info
from dune_cache.images.decode import load_pixels, open_rgb
from dune_cache.read.reader import CacheReader
from dune_cache.errors import ReaderError
from dune_cache.read.batches import gather_flags
from dune_student.data.augment import GridCrop, crop_pixels, draft_size
from dune_student.config import AugmentConfig, DataConfig, load_config
from dune_student.errors import ConfigError
from dune_student.data.batches import BatchSource, InputPlan, finish_pixels
from dune_student.errors import DataError
from dune_student.training.trainer import Trainer

from test_train import TINY_STUDENT, cache  # noqa: F401 - cache: the tiny-teacher cache fixture

TEACHER = "tiny_test_teacher"


def source(cache: Path, images: str, jpeg_draft: str = "crop", **plan) -> BatchSource:
    data = DataConfig(images=images, batch_size=6, shuffle_block=2, shuffle_buffer=4, jpeg_draft=jpeg_draft)
    return BatchSource(CacheReader(str(cache), backend="zarr"), data, AugmentConfig(), 0, np.arange(6), 32,
                       InputPlan(**plan))


def test_photometric_on_the_device_gives_the_loader_pixels(cache, real_image_dir):
    loader = source(cache, str(real_image_dir))
    deferred = source(cache, str(real_image_dir), photometric_on_device=True)
    for step in range(2):
        expected, batch = loader[step], deferred[step]
        assert batch.photometric is not None and torch.equal(batch.pixels, batch.clean_pixels)
        finish_pixels(batch, "cpu")
        assert torch.equal(batch.pixels, expected.pixels) and torch.equal(batch.clean_pixels, expected.clean_pixels)


def test_images_decoded_on_the_device_match_the_loader_within_jpeg_tolerance(cache, real_image_dir):
    """torchvision's decode (CPU here; nvJPEG on CUDA, unmeasured) then the same crop: PNGs exactly, JPEGs within
    a few levels (other IDCT, and the loader's draft decode)."""
    loader = source(cache, str(real_image_dir), jpeg_draft="off")
    deferred = source(cache, str(real_image_dir), decode_images_on_device=True)
    expected, batch = loader[0], deferred[0]
    assert batch.images is not None and batch.clean_pixels.shape[0] == 0
    finish_pixels(batch, "cpu")
    assert batch.crops == expected.crops and batch.pixels.shape == expected.pixels.shape
    for k, index in enumerate(batch.indices):
        diff = (batch.clean_pixels[k].float() - expected.clean_pixels[k].float()).abs()
        if deferred.paths[index].suffix == ".png":
            assert diff.max() == 0
        else:
            assert diff.mean() < 1.0 and diff.max() <= 24, (deferred.paths[index], diff.mean(), diff.max())
    assert not torch.equal(batch.pixels, batch.clean_pixels)  # photometric applied there too


def test_draft_at_the_crop_size_stays_close_to_a_full_decode(tmp_path):
    """A large JPEG decoded at a reduced scale no smaller than the crop needs (as extraction drafts the teacher's
    input): within 3 levels on average of a full decode (2.5 where the reduced image is just 1.1x the need)."""
    from skimage import data

    path = tmp_path / "large.jpg"
    Image.fromarray(data.astronaut()).resize((1600, 1200), Image.BICUBIC).save(path, quality=90)
    grid, size = (24, 24), (336, 336)
    for crop in (GridCrop(0, 0, 24, 24, False), GridCrop(3, 5, 15, 15, True)):
        needed = draft_size(crop, grid, size)
        drafted = open_rgb(path, draft_size=needed)
        assert drafted.size[0] >= needed[0] and drafted.size[1] >= needed[1]
        assert drafted.size[0] < 1600  # the draft did reduce it
        full, reduced = (crop_pixels(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), crop, grid, size)
                         for img in (open_rgb(path), drafted))
        assert (full.float() - reduced.float()).abs().mean() < 3.0


def test_image_copy_round_trips_and_trains_without_the_files(tmp_path, cache, real_image_dir):
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache, root)
    info = add_images(str(root), str(real_image_dir), resolution=48, workers=2)
    assert (info.resolution, info.count, info.complete) == (48, 6, True)
    reader = CacheReader(str(root))
    reader.check_image_copy(32)
    copies = reader.image_bytes(np.arange(len(reader)))
    for image_id, data in zip(reader.image_ids, copies):
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).astype(float)
        original = load_pixels(real_image_dir / image_id, (48, 48), "squash").astype(float)
        assert stored.shape == (3, 48, 48)
        assert np.abs(stored - original).mean() < 6.0  # JPEG q90 at 48 px (1.6 at 336 px)
    cfg = load_config(None, [f"data.cache={root}", f"out={tmp_path / 'run'}", "steps=2", *TINY_STUDENT])
    trainer = Trainer(cfg)
    assert trainer.source.paths is None
    assert trainer.run().steps == 2


def test_image_copy_is_refused_when_it_does_not_match_the_cache(tmp_path, cache, real_image_dir):
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache, root)
    other = tmp_path / "other"
    shutil.copytree(real_image_dir, other)
    next(other.iterdir()).unlink()
    with pytest.raises(ImageCopyError, match="is not the image set cache"):
        add_images(str(root), str(other), resolution=32)
    assert read_info(str(root)) is None
    with pytest.raises(ReaderError, match="holds no copy of its images; run `dune-cache add-images"):
        CacheReader(str(root)).check_image_copy(32)
    add_images(str(root), str(real_image_dir), resolution=16)
    with pytest.raises(ImageCopyError, match="already holds an image copy .* --overwrite"):
        add_images(str(root), str(real_image_dir), resolution=32)
    with pytest.raises(ReaderError, match="is 16 px, less than the student's 32 px"):
        CacheReader(str(root)).check_image_copy(32)
    with pytest.raises(DataError, match="data.image_source: .*16 px"):
        source(root, "", images_from_cache=True)
    group = zarr.open_group(str(root / "images"), mode="r+")  # a copy made for another image list
    group.attrs["dune_cache"] = {**group.attrs["dune_cache"], "manifest_sha256": "0" * 64}
    with pytest.raises(ReaderError, match="holds other images than teacher group"):
        CacheReader(str(root)).check_image_copy(16)
    group.attrs["dune_cache"] = {**group.attrs["dune_cache"], "complete": False}  # its writing was killed
    with pytest.raises(ReaderError, match="is incomplete \\(its writing stopped\\); .*--overwrite"):
        CacheReader(str(root)).check_image_copy(16)


def test_device_input_options_are_config_fields():
    base = ["data.cache=c", "data.images=i"]
    cfg = load_config(None, base + ["data.image_decode=device", "augment.photometric_on=device",
                                    "data.jpeg_draft=double", "data.image_source=cache"])
    assert (cfg.data.image_decode, cfg.augment.photometric_on, cfg.data.jpeg_draft) == ("device", "device", "double")
    with pytest.raises(ConfigError, match="data.image_decode: 'gpu' is not one of auto, loader, device"):
        load_config(None, base + ["data.image_decode=gpu"])
    with pytest.raises(ConfigError, match="data.image_decode=device: augment.mode=views"):
        load_config(None, base + ["data.image_decode=device", "augment.mode=views"])
    with pytest.raises(ConfigError, match="data.images: required with data.image_source=files"):
        load_config(None, ["data.cache=c", "data.image_source=files"])


def test_damage_flags_come_back_in_one_copy():
    flags = {("a", "cls"): torch.tensor([True, False]), ("a", "patch"): torch.tensor([False, False])}
    gathered = gather_flags(flags)
    assert list(gathered) == list(flags)
    np.testing.assert_array_equal(gathered["a", "cls"], [True, False])
    assert gather_flags({}) == {}


def test_trainer_with_photometric_on_the_device_trains_the_same_model(tmp_path, cache, real_image_dir):
    """The draws made in a worker, applied in the trainer: the model of the loader path, bit for bit (on CPU)."""
    runs = [Trainer(load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={tmp_path / p}",
                                       "steps=2", *TINY_STUDENT, f"augment.photometric_on={p}",
                                       f"data.num_workers={w}"]))
            for p, w in (("loader", 0), ("device", 1))]
    for run in runs:
        run.run()
    for (name, a), (_, b) in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().items()):
        assert torch.equal(a, b), name


def test_trainer_decodes_images_on_the_device(tmp_path, cache, real_image_dir):
    cfg = load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={tmp_path / 'run'}",
                             "steps=2", *TINY_STUDENT, "data.image_decode=device"])
    result = Trainer(cfg).run()
    assert result.steps == 2 and np.isfinite(result.final_loss)


def test_add_images_cli_is_light_and_reports_the_bytes(tmp_path, cache, real_image_dir):
    from test_cli_fast import run_app
    from typer.testing import CliRunner

    from dune_cache.cli import app

    code, heavy, _ = run_app("dune_cache.cli", "add-images", "--help")
    assert code == 0 and heavy == []
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache, root)
    result = CliRunner().invoke(app, ["add-images", str(root), "--images", str(real_image_dir), "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert "6 images at 32 px (JPEG quality 90)" in result.output and "kB per image" in result.output
    again = CliRunner().invoke(app, ["add-images", str(root), "--images", str(real_image_dir), "--resolution", "32"])
    assert again.exit_code != 0 and "--overwrite" in again.output
