"""`dune-cache recompress`: a tiny-teacher cache re-encoded into a new root, the source untouched."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.read.reader import CacheReader
from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.info import cache_info
from dune_cache.commands.verify import verify_cache
from dune_cache.commands.recompress import RecompressConfig, recompress
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import read_stats, write_stats
from dune_cache.config import StorageConfig
from dune_cache.errors import StoreError
from dune_cache.format.store import TeacherStore
from dune_student.config import AugmentConfig, DataConfig
from dune_student.data.batches import BatchSource, InputPlan

TEACHER = "tiny_test_teacher"


@pytest.fixture(scope="module")
def images(tmp_path_factory, real_image_dir) -> Path:
    """Six real photos and one unusable file (a failure record to copy)."""
    d = tmp_path_factory.mktemp("rc") / "images"
    shutil.copytree(real_image_dir, d)
    (d / "zz_text.jpg").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def source(tmp_path_factory, images, tiny_checkpoint) -> Path:
    """float16 cache with one cached view per image, work units of 2 images, and statistics."""
    out = tmp_path_factory.mktemp("rc") / "source.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=tiny_checkpoint,
                                 batch_size=3, num_workers=0, progress=False, views=1,
                                 storage=StorageConfig(unit_size=2)))
    write_stats(str(out), TEACHER, compute_stats(str(out), TEACHER))
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def run(source: Path, out: Path, encoding: str, **kw) -> None:
    recompress(RecompressConfig(cache=str(source), out=str(out), encoding=EncodingConfig.parse(encoding),
                                progress=False, block_images=2, **kw))


def test_none_to_none_is_bit_identical_and_copies_everything(source, tmp_path):
    run(source, tmp_path / "copy.zarr", "none", unit_size=4)
    a, b = TeacherStore.open(str(source), TEACHER), TeacherStore.open(str(tmp_path / "copy.zarr"), TEACHER)
    for array in ("cls", "patch", "status", "manifest", "views/cls", "views/patch", "views/boxes", "views/flip"):
        np.testing.assert_array_equal(a.group[array][...], b.group[array][...])  # NaN rows included
    assert b.read_failures() == a.read_failures() and [r["image_id"] for r in b.read_failures()] == ["zz_text.jpg"]
    assert b.images_per_unit == 4 and b.provenance["storage"]["unit_size"] == 4
    same = {k: v for k, v in a.provenance.items() if k != "storage"}
    assert {k: v for k, v in b.provenance.items() if k not in ("storage", "recompressed")} == same
    assert b.provenance["recompressed"]["from"] == str(source)
    assert b.provenance["recompressed"]["storage"] == a.provenance["storage"]
    np.testing.assert_allclose(read_stats(str(tmp_path / "copy.zarr"), TEACHER).phis_matrix,
                               read_stats(str(source), TEACHER).phis_matrix, rtol=1e-9, atol=1e-12)
    assert all(r.ok for r in verify_cache(str(tmp_path / "copy.zarr")))


@pytest.mark.parametrize("encoding,bound", [("int8-channel", 0.02), ("int8-token", 0.02), ("bitround", 0.005),
                                            ("pca:rank=12", 0.5)])
def test_recompressed_values_decode_within_bounds_and_the_source_is_untouched(source, tmp_path, encoding, bound):
    before = snapshot(source)
    out = tmp_path / "new.zarr"
    run(source, out, encoding)
    assert snapshot(source) == before
    a, b = TeacherStore.open(str(source), TEACHER), TeacherStore.open(str(out), TEACHER)
    np.testing.assert_array_equal(a.read_status(), b.read_status())
    assert b.manifest().ids == a.manifest().ids and b.read_failures() == a.read_failures()
    done = np.flatnonzero(a.read_status() == 1)
    for name in ("patch", "cls", "views/patch"):
        x, y = a.read_features(name, done), b.read_features(name, done)
        assert np.linalg.norm(y - x) / np.linalg.norm(x) < bound, name
    assert b.encoding.name == encoding.partition(":")[0]
    assert all(r.ok for r in verify_cache(str(out)))
    recomputed, original = read_stats(str(out), TEACHER), read_stats(str(source), TEACHER)
    decoded = b.read_features("patch", done).reshape(-1, b.dim)  # statistics of what a student trains on
    np.testing.assert_allclose(recomputed.patch_mean, decoded.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(recomputed.patch_std, decoded.std(0), rtol=1e-4, atol=1e-6)
    assert not np.array_equal(recomputed.patch_std, original.patch_std) and recomputed.count == original.count


def test_info_shows_the_encoding_and_the_ratio_to_float16(source, tmp_path):
    out = tmp_path / "int8.zarr"
    runner = CliRunner()
    result = runner.invoke(app, ["recompress", str(source), "--out", str(out), "--encoding", "int8-channel",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{TEACHER}] 6/7 images" in result.output and "smaller" in result.output
    info = cache_info(str(out))[TEACHER]
    raw = 6 * (1 + 24) * 2 * 16 * 2  # done images x (CLS + 4x6 tokens) x (image + 1 view) x D x float16
    assert info["raw_bytes"] == raw and info["compression_ratio"] == pytest.approx(raw / info["bytes_stored"])
    assert info["bytes_per_image"] == pytest.approx(info["bytes_stored"] / 6)
    assert info["encoding"]["name"] == "int8-channel" and info["encoding"]["kinds"]["patch"]["scheme"] == "int8-channel"
    shown = runner.invoke(app, ["info", str(out)])
    assert "encoding   int8-channel:margin=0.25" in shown.output and "vs raw float16" in shown.output
    again = runner.invoke(app, ["recompress", str(source), "--out", str(out), "--encoding", "pca"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["recompress", str(source), "--out", str(out), "--encoding", "pca:rank=4",
                               "--overwrite", "--no-progress"]).exit_code == 0
    assert TeacherStore.open(str(out), TEACHER).encoding.name == "pca"


def test_the_source_itself_is_refused_as_output(source):
    with pytest.raises(StoreError, match="never modifies its source"):
        run(source, source, "int8-token")
    with pytest.raises(StoreError, match="no teacher group 'other'"):
        run(source, source.parent / "x.zarr", "int8-token", teachers=["other"])


@pytest.mark.parametrize("encoding", ["int8-token", "lowrank:image_rank=3"])
def test_the_training_batches_decode_alike_in_the_worker_and_on_the_device(source, tmp_path, images, encoding):
    out = tmp_path / "token.zarr"
    run(source, out, encoding)
    args = (CacheReader(str(out), backend="zarr"),
            DataConfig(images=str(images), batch_size=3, shuffle_block=2, shuffle_buffer=4), AugmentConfig(), 0,
            np.arange(6), 32)
    in_worker = BatchSource(*args)[1]
    deferred = BatchSource(*args, InputPlan(decode_targets_on_device=True))[1]
    assert in_worker.encoded is None and deferred.encoded is not None and not deferred.patch
    assert deferred.encoded.patch[TEACHER][""].dtype == torch.int8
    decoded = BatchSource(*args).reader().decode(deferred.encoded, "cpu")  # what the trainer does
    assert decoded.patch[TEACHER].shape == in_worker.patch[TEACHER].shape  # grid-crop cut the parts alike
    torch.testing.assert_close(decoded.patch[TEACHER], in_worker.patch[TEACHER])
    torch.testing.assert_close(decoded.cls[TEACHER], in_worker.cls[TEACHER])


def test_the_trainer_decodes_deferred_targets_like_the_worker(tmp_path, real_image_dir, tiny_checkpoint):
    from dune_student.config import load_config
    from dune_student.training.trainer import Trainer

    grid_cache, out = tmp_path / "grid.zarr", tmp_path / "grid_int8.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=real_image_dir, out=str(grid_cache),
                                 checkpoint=tiny_checkpoint,
                                 student_patch=8, student_resolution="32", batch_size=6, num_workers=0, progress=False))
    write_stats(str(grid_cache), TEACHER, compute_stats(str(grid_cache), TEACHER))
    run(grid_cache, out, "int8-channel")
    overrides = [f"data.cache={out}", f"data.images={real_image_dir}", f"out={tmp_path / 'run'}", "steps=2",
                 "student.arch=vit_tiny", "student.patch_size=8", "student.img_size=32", "data.resolution=32",
                 "data.batch_size=4", "data.num_workers=0", "progress=false"]
    losses = []
    for on_device in (False, True):
        trainer = Trainer(load_config(None, overrides))  # same seed: same initial model
        trainer.source.plan = InputPlan(decode_targets_on_device=on_device)
        batch = trainer.source[0]
        assert (batch.encoded is not None) == on_device
        trainer.train_step(batch)
        losses.append(trainer.read_metrics().loss)
    assert np.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=1e-3)
