"""`dune-cache repair`: damaged chunks found by verify are re-extracted, bit for bit, and nothing else is."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.utils.hashing import file_sha256, hashed_file
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.config import StorageConfig
from dune_cache.format.store import TeacherStore

GROUP = "tiny_test_teacher"
runner = CliRunner()


@pytest.fixture
def images(tmp_path, real_image_dir) -> Path:
    """Six real photos and, first in manifest order, a file that is not an image (a recorded failure)."""
    d = tmp_path / "images"
    shutil.copytree(real_image_dir, d)
    (d / "aa_text.jpg").write_bytes(b"this is not an image")
    return d


def extract(images: Path, out: Path | str, checkpoint: Path, **storage) -> None:
    """One image per batch, so that every image's features are computed alike in every run."""
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=checkpoint,
                                 batch_size=1, num_workers=0, progress=False,
                                 storage=StorageConfig(unit_size=4, **storage)))


def assert_same_group(a: Path | str, b: Path | str) -> None:
    """Status, failure records and every stored value (each part of each feature array, NaN fill included)
    are identical."""
    sa, sb = TeacherStore.open(str(a), GROUP), TeacherStore.open(str(b), GROUP)
    np.testing.assert_array_equal(sa.read_status(), sb.read_status())
    assert sa.read_failures() == sb.read_failures()
    for name in ("cls", "patch"):
        parts_a, parts_b = sa.stored_arrays(name), sb.stored_arrays(name)
        assert parts_a.keys() == parts_b.keys()
        for suffix in parts_a:
            x, y = parts_a[suffix][:], parts_b[suffix][:]
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name + suffix


def repair(out: Path | str, *extra: str):
    return runner.invoke(app, ["repair", str(out), "--batch-size", "1", "--num-workers", "0", "--no-progress",
                               *extra])


def verify(out: Path | str):
    return runner.invoke(app, ["verify", str(out), "--no-progress"])


def truncate(path: Path) -> None:
    """Cut a stored object to 8 bytes, shorter than blosc's header: decoding fails whatever the codec (blosc
    decodes a half-truncated chunk into garbage without an error; only a crc32c checksum catches that)."""
    path.write_bytes(path.read_bytes()[:8])


@pytest.mark.parametrize("encoding", ["none", "int8-token"])
def test_truncated_chunk_is_found_and_only_its_image_re_extracted(tmp_path, images, tiny_checkpoint, snapshot,
                                                                  encoding):
    """Also under an encoding with a calibration (int8 codes): the repair keeps the group's calibration."""
    clean, out = tmp_path / "clean.zarr", tmp_path / "cache.zarr"
    storage = {"encoding": EncodingConfig(name=encoding, calibration_images=3)}
    extract(images, clean, tiny_checkpoint, **storage)
    extract(images, out, tiny_checkpoint, **storage)
    ids = load_manifest(images).ids
    truncate(out / GROUP / "patch" / "c" / "3" / "0" / "0" / "0")

    checked = verify(out)
    assert checked.exit_code == 1 and f"image 3 ({ids[3]}): patch: chunk does not decode" in checked.output

    before = snapshot(out)
    dry = repair(out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"image 3 ({ids[3]})" in dry.output and "would re-extract 1 images" in dry.output
    assert snapshot(out) == before

    fixed = repair(out)
    assert fixed.exit_code == 0, fixed.output
    assert "repaired: 1 of 1 images re-extracted" in fixed.output
    assert verify(out).exit_code == 0
    assert_same_group(clean, out)
    after = snapshot(out)
    changed = {path for path in after if before.get(path) != after[path]}
    assert f"{GROUP}/patch/c/3/0/0/0" in changed
    allowed = re.compile(rf"{GROUP}/((cls|patch)[^/]*/c/3/|status/|failures/)")  # image 3's chunks of every part
    assert all(allowed.match(path) for path in changed), changed


def test_undecodable_shard_is_re_extracted_whole(tmp_path, images, tiny_checkpoint):
    """A truncated shard holds images 0-3: the done ones 1-3 are damaged, and failed image 0 shares the shard,
    so all four are re-extracted (image 0 fails again, with its record)."""
    clean, out = tmp_path / "clean.zarr", tmp_path / "cache.zarr"
    extract(images, clean, tiny_checkpoint, shard_images=4)
    extract(images, out, tiny_checkpoint, shard_images=4)
    truncate(out / GROUP / "patch" / "c" / "0" / "0" / "0" / "0")
    assert verify(out).exit_code == 1

    fixed = repair(out)
    assert fixed.exit_code == 0, fixed.output
    assert "3 damaged images, 1 more sharing their undecodable objects" in fixed.output
    assert "repaired: 3 of 4 images re-extracted; failed again (unusable image files): aa_text.jpg" in fixed.output
    assert verify(out).exit_code == 0
    assert_same_group(clean, out)


def test_a_changed_file_is_hashed_again(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"one")
    first = file_sha256(path)
    assert file_sha256(path) == first
    path.write_bytes(b"other")
    assert file_sha256(path) != first


def test_lost_failure_record_is_restored(tmp_path, images, tiny_checkpoint):
    clean, out = tmp_path / "clean.zarr", tmp_path / "cache.zarr"
    extract(images, clean, tiny_checkpoint)
    extract(images, out, tiny_checkpoint)
    shutil.rmtree(out / GROUP / "failures" / "records_00000000")
    checked = verify(out)
    assert checked.exit_code == 1 and "1 images differ between failed status and failure records" in checked.output

    hashed_file.cache_clear()
    fixed = repair(out)
    assert fixed.exit_code == 0, fixed.output
    assert (hashed_file.cache_info().misses, hashed_file.cache_info().hits) == (1, 1)  # checkpoint read once
    assert "image 0 (aa_text.jpg): failed status and failure record disagree" in fixed.output
    assert verify(out).exit_code == 0
    assert_same_group(clean, out)


def test_another_checkpoint_or_image_list_is_refused_before_anything_is_written(tmp_path, images, tiny_checkpoint,
                                                                                 snapshot):
    out = tmp_path / "cache.zarr"
    extract(images, out, tiny_checkpoint)
    truncate(out / GROUP / "cls" / "c" / "2" / "0")
    other = tmp_path / "other.pth"
    state = torch.load(tiny_checkpoint)
    state["scale"] = state["scale"] + 1
    torch.save(state, other)
    fewer = tmp_path / "fewer"
    shutil.copytree(images, fewer)
    (fewer / "aa_text.jpg").unlink()
    before = snapshot(out)

    refused = repair(out, "--checkpoint", str(other))
    assert refused.exit_code == 2
    assert "checkpoint.sha256: store has" in refused.output and "nothing was changed" in refused.output
    refused = repair(out, "--images", str(fewer))
    assert refused.exit_code == 2 and "images.manifest_sha256: store has" in refused.output
    assert snapshot(out) == before
    assert repair(out, "--checkpoint", str(tiny_checkpoint), "--images", str(images)).exit_code == 0
    assert verify(out).exit_code == 0


@pytest.fixture(params=["local", "memory"])
def cache_url(request, tmp_path) -> str:
    """Where the damaged cache lives: a local folder, or a ``memory://`` URL (the fsspec code path of object
    stores)."""
    if request.param == "local":
        yield str(tmp_path / "cache.zarr")
        return
    import fsspec

    yield f"memory://{tmp_path.name}/cache.zarr"
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_flipped_byte_fails_its_checksum_and_is_repaired(tmp_path, images, tiny_checkpoint, cache_url):
    """With crc32c (the default) one flipped byte in a chunk fails to decode: found, named and re-extracted, also
    in a cache on an fsspec URL."""
    from dune_cache.storage.location import filesystem
    from dune_cache.storage.urls import join

    clean = tmp_path / "clean.zarr"
    extract(images, clean, tiny_checkpoint)
    extract(images, cache_url, tiny_checkpoint)
    fs, chunk = filesystem(join(cache_url, GROUP, "patch", "c", "5", "0", "0", "0"))
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(chunk, bytes(data))
    ids = load_manifest(images).ids

    checked = verify(cache_url)
    assert checked.exit_code == 1 and f"image 5 ({ids[5]}): patch: chunk does not decode" in checked.output
    assert "checksum" in checked.output
    fixed = repair(cache_url)
    assert fixed.exit_code == 0 and "repaired: 1 of 1 images re-extracted" in fixed.output, fixed.output
    assert verify(cache_url).exit_code == 0
    assert_same_group(clean, cache_url)
