"""Pictures: `dune-cache show` (teacher PCA maps) and `dune-student show` (student next to teacher)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dune_cache.cli import app as cache_app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.viz.pictures import LABEL_HEIGHT, pca_rgb
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_student.cli import app as student_app
from dune_student.config import load_config
from dune_student.training.trainer import train

from test_train import TINY_STUDENT

TEACHER = "tiny_test_teacher"
SUBSET = "tiny_subset"  # second group of the same teacher over three of the six images, native 32x48 input
SUBSET_IDS = ("astronaut.png", "chelsea.jpg", "coffee.png")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, real_image_dir, tiny_checkpoint) -> Path:
    """Tiny-teacher cache of six real photos on a 4x4 grid (with statistics), plus a second group that has
    only three of the images."""
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=real_image_dir, out=str(out), checkpoint=tiny_checkpoint,
                                 student_patch=8, student_resolution="32", batch_size=6, num_workers=0,
                                 progress=False))
    write_stats(str(out), TEACHER, compute_stats(str(out), TEACHER))
    subset = tmp_path_factory.mktemp("subset")
    for image_id in SUBSET_IDS:
        shutil.copy(real_image_dir / image_id, subset / image_id)
    run_extraction(ExtractConfig(teacher=TEACHER, name=SUBSET, images=subset, out=str(out),
                                 checkpoint=tiny_checkpoint, batch_size=3, num_workers=0, progress=False))
    return out


def panels(path: Path, count: int, cell: int, width: int | None = None) -> list[np.ndarray]:
    """The ``count`` pictures of a row PNG of ``cell x width`` panels (default square; labels cut off),
    after checking the PNG's size."""
    width = width or cell
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (LABEL_HEIGHT + cell, count * width, 3)
    return [image[LABEL_HEIGHT:, k * width:(k + 1) * width] for k in range(count)]


def test_pca_rgb_colours_tokens_jointly():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5, 32)), rng.normal(size=(3, 3, 32)) + 2.0
    maps = pca_rgb([a, b])
    assert [m.shape for m in maps] == [(4, 5, 3), (3, 3, 3)] and all(m.dtype == np.uint8 for m in maps)
    assert all(m.std() > 0 for m in maps) and not np.array_equal(maps[0][:3, :3], maps[1])
    constant = pca_rgb([np.ones((2, 2, 8))])[0]  # no variance: finite, all zero, no crash
    assert constant.shape == (2, 2, 3) and not constant.any()


def test_cache_show_writes_rows_and_grid(tmp_path, cache):
    cell, ids = 64, ["astronaut.png", "rocket.jpg", "chelsea.jpg"]
    result = CliRunner().invoke(cache_app, ["show", str(cache), "--out", str(tmp_path), "--cell", str(cell),
                                            *(arg for i in ids for arg in ("--images", i))])
    assert result.exit_code == 0 and "not drawn" not in result.output, result.output
    rows = sorted(tmp_path.glob("0*.png"))
    assert [p.name for p in rows] == ["00_astronaut.png", "01_rocket.png", "02_chelsea.png"]
    # groups in cache order: tiny_subset (its 32x48 input sets the cells' aspect), tiny_test_teacher
    width = cell * 48 // 32
    pictures = [panels(p, 3, cell, width) for p in rows]  # input, tiny_subset map, tiny_test_teacher map
    assert all(picture.std() > 0 for row in pictures for picture in row)
    assert not np.array_equal(pictures[0][1], pictures[2][1])  # distinct images, distinct maps
    assert not np.array_equal(pictures[0][2], pictures[2][2])
    for row in pictures:  # photos (each found in the image folder of a group holding it), not flat maps
        assert len(np.unique(row[0].reshape(-1, 3), axis=0)) > 100
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * width, 3 * (LABEL_HEIGHT + cell))
    # rocket.jpg has no tiny_subset features: a grey placeholder there, not a map
    placeholder = pictures[1][1]
    assert np.median(placeholder) == 128


def test_cache_show_first_and_teacher_selection(tmp_path, cache):
    result = CliRunner().invoke(cache_app, ["show", str(cache), "--out", str(tmp_path), "--first", "2",
                                            "--teacher", TEACHER, "--cell", "32"])
    assert result.exit_code == 0, result.output
    rows = sorted(tmp_path.glob("0*.png"))
    assert len(rows) == 2 and all(p.std() > 0 for r in rows for p in panels(r, 2, 32))


def test_cache_show_draws_features_when_images_moved(tmp_path, cache):
    result = CliRunner().invoke(cache_app, ["show", str(cache), "--out", str(tmp_path / "out"), "--images",
                                            "coffee.png", "--image-root", str(tmp_path), "--cell", "32"])
    assert result.exit_code == 0, result.output
    assert "coffee.png: input image not drawn" in result.output and "file not found" in result.output
    image, *maps = panels(tmp_path / "out" / "00_coffee.png", 3, 32, 48)
    assert np.median(image) == 128 and all(m.std() > 0 for m in maps)


def test_cache_show_unknown_id_lists_available_ones(tmp_path, cache):
    result = CliRunner().invoke(cache_app, ["show", str(cache), "--out", str(tmp_path), "--images", "nope.png"])
    assert result.exit_code == 2
    assert "nope.png" in result.output and "astronaut.png" in result.output
    assert not list(tmp_path.iterdir())


def test_cache_show_finds_images_by_unique_file_name_and_writes_short_names(tmp_path, real_image_dir,
                                                                           tiny_checkpoint):
    nested = {"left/astronaut.png": "astronaut.png", "right/astronaut.png": "astronaut.png",
              "a/deeply/nested/folder/of/a/dataset/chelsea_" + "x" * 60 + ".jpg": "chelsea.jpg"}
    for image_id, source in nested.items():
        (tmp_path / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_image_dir / source, tmp_path / "images" / image_id)
    out = tmp_path / "cache.zarr"
    run_extraction(ExtractConfig(teacher=TEACHER, images=tmp_path / "images", out=str(out),
                                 checkpoint=tiny_checkpoint, batch_size=3, num_workers=0, progress=False))
    chelsea = "chelsea_" + "x" * 60
    result = CliRunner().invoke(cache_app, ["show", str(out), "--out", str(tmp_path / "by_name"), "--cell", "16",
                                            "--images", f"{chelsea}.jpg", "--images", chelsea,
                                            "--images", "right/astronaut.png"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "by_name").glob("0*.png"))
    assert names == [f"00_{chelsea[:40]}.png", f"01_{chelsea[:40]}.png", "02_astronaut.png"]
    ambiguous = CliRunner().invoke(cache_app, ["show", str(out), "--out", str(tmp_path / "ambiguous"),
                                               "--images", "astronaut.png"])
    assert ambiguous.exit_code == 2
    assert "matches 2 images" in ambiguous.output and "left/astronaut.png" in ambiguous.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache, real_image_dir) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={out}", "steps=2",
                             "checkpoint_every=2", f"data.teachers={TEACHER}", *TINY_STUDENT]))
    return out


def test_student_show_puts_student_next_to_teacher(tmp_path, run_dir, cache):
    cell = 48
    result = CliRunner().invoke(student_app, ["show", str(run_dir), "--cache", str(cache), "--first", "3",
                                              "--out", str(tmp_path), "--cell", str(cell)])
    assert result.exit_code == 0, result.output
    rows = sorted(tmp_path.glob("0*.png"))
    assert len(rows) == 3
    pictures = [panels(p, 3, cell) for p in rows]  # student input, teacher, student
    assert all(picture.std() > 0 for row in pictures for picture in row)
    assert not np.array_equal(pictures[0][1], pictures[1][1])
    assert not np.array_equal(pictures[0][1], pictures[0][2])
    assert Image.open(tmp_path / "grid.png").size == (3 * cell, 3 * (LABEL_HEIGHT + cell))


def test_student_show_needs_the_images(tmp_path, run_dir, cache):
    result = CliRunner().invoke(student_app, ["show", str(run_dir / "checkpoint.pt"), "--out", str(tmp_path),
                                              "--image-root", str(tmp_path), "--first", "1"])
    assert result.exit_code == 2 and "--image-root" in result.output and "file not found" in result.output
    missing = CliRunner().invoke(student_app, ["show", str(tmp_path / "norun"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "no run directory" in missing.output
