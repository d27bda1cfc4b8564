"""Per-chunk crc32c checksums: every reader backend and ``verify`` detect a flipped byte and name the image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.commands.verify import verify_cache
from dune_cache.read.reader import CacheReader
from dune_cache.errors import ReaderError
from dune_cache.read.backends import backend_installed
from dune_cache.format.constants import ATTR_KEY
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_cache.errors import StoreMismatchError

TEACHER = "tiny_test_teacher"


def extract(out: Path, images: Path, checkpoint: Path, **storage) -> None:
    run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=checkpoint, batch_size=3,
                                 num_workers=0, progress=False, storage=StorageConfig(unit_size=2, **storage)))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("shard_images", [0, 2])
def test_a_flipped_byte_is_an_error_naming_the_image(tmp_path, real_image_dir, tiny_checkpoint, shard_images):
    out = tmp_path / "cache"
    extract(out, real_image_dir, tiny_checkpoint, shard_images=shard_images)
    patch = zarr.open_array(str(out / TEACHER / "patch"), mode="r")
    codecs = patch.metadata.codecs[0].codecs if shard_images else patch.metadata.codecs
    assert isinstance(codecs[-1], zarr.codecs.Crc32cCodec)
    victim = 3  # an image alone in its chunk, or the second of its shard
    image = TeacherStore.open(str(out), TEACHER).manifest().ids[victim]
    flip_a_byte(out / TEACHER / "patch" / "c" / str(victim // (shard_images or 1)) / "0" / "0" / "0")

    [report] = verify_cache(str(out))
    assert [p for p in report.problems if image in p and "does not decode" in p], report.problems
    # zarrs (0.2) skips the crc32c of inner chunks it decodes partially, i.e. in shards (docs/sharing.md)
    backends = ["tensorstore", "zarr", "auto"] + (["zarrs"] if not shard_images else [])
    if shard_images:  # so backend auto must not take zarrs for float16 out, its first choice otherwise
        assert CacheReader(str(out), backend="auto", dtype=torch.float16).backend != "zarrs"
    for backend in filter(lambda name: name == "auto" or backend_installed(name), backends):
        reader = CacheReader(str(out), backend=backend)
        sample = reader.image_ids.index(image)
        with pytest.raises(ReaderError, match=f"teacher {TEACHER}: patch of image {victim} \\({image}\\)"):
            reader.read(np.array([0, sample]))
        reader.read(np.array([s for s in range(len(reader)) if s != sample]))  # the others read fine


def test_caches_without_checksums_read_and_resume_as_such(tmp_path, real_image_dir, tiny_checkpoint):
    out = tmp_path / "cache"
    extract(out, real_image_dir, tiny_checkpoint, checksum=False)
    group = zarr.open_group(str(out / TEACHER), mode="r+")
    meta = group.attrs[ATTR_KEY]
    del meta["storage"]["checksum"]  # as written before checksums existed
    group.attrs[ATTR_KEY] = meta
    assert TeacherStore.open(str(out), TEACHER).provenance["storage"]["checksum"] is False
    assert not any(isinstance(c, zarr.codecs.Crc32cCodec) for c in group["patch"].metadata.codecs)
    extract(out, real_image_dir, tiny_checkpoint, checksum=False)  # resumes
    with pytest.raises(StoreMismatchError, match="storage.checksum: store has False, this run has True"):
        extract(out, real_image_dir, tiny_checkpoint)
