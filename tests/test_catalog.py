"""`dune-cache ls`: caches found under a folder, described per teacher group, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.config import StorageConfig

runner = CliRunner()


def extract(images: Path, out: Path, checkpoint: Path, **kw) -> None:
    run_extraction(ExtractConfig(**{**dict(teacher="tiny_test_teacher", images=images, out=str(out),
                                           checkpoint=checkpoint, batch_size=6, num_workers=0, progress=False), **kw}))


@pytest.fixture
def tree(tmp_path, real_image_dir, tiny_checkpoint) -> Path:
    """``root/a.zarr`` (one complete group), ``root/runs/2024/b.zarr`` (a complete group and a partial one, 4 of 6
    done, stored int8-channel), ``root/notes/`` (no cache), ``root/x/y/z/deep.zarr`` (4 levels down)."""
    root = tmp_path / "root"
    extract(real_image_dir, root / "a.zarr", tiny_checkpoint)
    b = root / "runs" / "2024" / "b.zarr"
    extract(real_image_dir, b, tiny_checkpoint, name="full", resolution="16x24", storage=StorageConfig(codec="zstd"))
    extract(real_image_dir, b, tiny_checkpoint, name="partial", shard="0/2",
            storage=StorageConfig(unit_size=2, encoding=EncodingConfig(name="int8-channel", calibration_images=2)))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a cache")
    extract(real_image_dir, root / "x" / "y" / "z" / "deep.zarr", tiny_checkpoint)
    return root


def listing(*args: str):
    result = runner.invoke(app, ["ls", *args])
    assert result.exit_code == 0, result.output
    return result


def test_ls_json_describes_every_group_of_every_cache(tree, real_image_dir, tiny_checkpoint, snapshot):
    before = snapshot(tree)
    entries = json.loads(listing(str(tree), "--json").output)
    assert [e["path"] for e in entries] == [str(tree / "a.zarr"), str(tree / "runs" / "2024" / "b.zarr")]
    manifest = load_manifest(real_image_dir)
    [a] = entries[0]["groups"]
    assert a["group"] == a["teacher"] == "tiny_test_teacher"
    assert a["checkpoint"]["file"] == "tiny.pth" and len(a["checkpoint"]["sha256"]) == 64
    assert a["images"] == {"count": 6, "manifest_sha256": manifest.sha256}
    assert a["geometry"] == {"resolution": [32, 48], "grid": [4, 6], "resize": "squash"}
    # the default codec: none for plain float16 features, zstd level 1 for encoded ones (docs/scale.md §4)
    assert a["storage"] == {"dtype": "float16", "codec": "none", "level": 0, "shard_images": 0, "encoding": None}
    assert a["blocks"] == []  # no intermediate blocks stored
    assert (a["done"], a["failed"], a["pending"]) == (6, 0, 0)
    on_disk = sum(p.stat().st_size for p in (tree / "a.zarr" / "tiny_test_teacher").rglob("*") if p.is_file())
    assert a["bytes"] == on_disk and a["error"] is None

    full, partial = entries[1]["groups"]
    assert (full["group"], full["geometry"]["grid"], full["storage"]["codec"]) == ("full", [2, 3], "zstd")
    assert partial["group"] == "partial"
    assert partial["storage"]["encoding"] == "int8-channel:margin=0.25,sigmas=6.0,calibration_images=2"
    assert (partial["done"], partial["failed"], partial["pending"]) == (4, 0, 2)
    assert snapshot(tree) == before  # nothing written, not even a timestamp


def test_ls_table_depth_and_errors(tree):
    lines = listing(str(tree)).output.splitlines()
    assert lines[0].split()[:3] == ["cache", "group", "teacher"]
    assert len(lines) == 1 + 3  # one line per teacher group
    partial = next(line for line in lines if " partial " in line)
    assert "4/0/2" in partial and "float16 zstd int8-channel" in partial and "32x48 -> 4x6 squash" in partial
    deep = json.loads(listing(str(tree), "--depth", "4", "--json").output)
    assert str(tree / "x" / "y" / "z" / "deep.zarr") in [e["path"] for e in deep]
    assert json.loads(listing(str(tree / "a.zarr"), "--json").output)[0]["path"] == str(tree / "a.zarr")
    assert "no caches under" in listing(str(tree / "notes")).output
    missing = runner.invoke(app, ["ls", str(tree / "nothing")])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_ls_shows_the_blocks_each_group_stores(tmp_path, real_image_dir, tiny_checkpoint):
    cache = tmp_path / "root" / "levels.zarr"
    extract(real_image_dir, cache, None, teacher="timm:vit_tiny_patch16_224", random_weights=True,
            resolution="32x48", blocks="sak")  # 12 blocks: SAK's choice is 2, 5, 8, 11
    extract(real_image_dir, cache, tiny_checkpoint)  # a group without levels next to it
    [entry] = json.loads(listing(str(tmp_path / "root"), "--json").output)
    assert {g["group"]: g["blocks"] for g in entry["groups"]} == {"timm-vit_tiny_patch16_224": [2, 5, 8, 11],
                                                                  "tiny_test_teacher": []}
    header, *rows = listing(str(tmp_path / "root")).output.splitlines()
    column = header.index("levels")
    assert {row.split()[1]: row[column:].split()[0] for row in rows} == {"timm-vit_tiny_patch16_224": "b2,b5,b8,b11",
                                                                         "tiny_test_teacher": "-"}


@pytest.fixture
def memory_root(tmp_path):
    """A fresh ``memory://`` location (an fsspec filesystem: the URL code path of an object store)."""
    import fsspec

    url = f"memory://{tmp_path.name}"
    yield url
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_ls_of_a_url_finds_the_caches_and_writes_nothing(memory_root, real_image_dir, tiny_checkpoint):
    import fsspec

    extract(real_image_dir, f"{memory_root}/a.zarr", tiny_checkpoint)
    extract(real_image_dir, f"{memory_root}/more/b.zarr", tiny_checkpoint, shard="0/2",
            storage=StorageConfig(unit_size=4))
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/{memory_root[len('memory://'):]}/notes/readme.txt", b"not a cache")
    before = {path: fs.cat_file(path) for path in fs.find(memory_root)}
    entries = json.loads(listing(memory_root, "--json").output)
    assert [e["path"] for e in entries] == [f"{memory_root}/a.zarr", f"{memory_root}/more/b.zarr"]
    counts = [(g["done"], g["failed"], g["pending"]) for e in entries for g in e["groups"]]
    assert counts == [(6, 0, 0), (4, 0, 2)]  # unit 0 of 2 (images 0-3) only
    group = f"{memory_root}/a.zarr/tiny_test_teacher"
    assert entries[0]["groups"][0]["bytes"] == sum(len(fs.cat_file(p)) for p in fs.find(group))
    assert {path: fs.cat_file(path) for path in fs.find(memory_root)} == before
