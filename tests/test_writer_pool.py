"""The extraction writer with a pool of threads (``--writer-threads``) writes exactly the store one thread writes."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dune_cache.config import EncodingConfig
from dune_cache.extract.run import run_extraction
from dune_cache.config import StorageConfig
from dune_cache.format.rows import disjoint_parts

from test_crash_consistency import store_objects
from test_extract import config, images  # noqa: F401 - the images fixture: 6 photos and 3 unusable files


@pytest.mark.parametrize("storage, views", [
    (StorageConfig(unit_size=4), 0),
    (StorageConfig(shard_images=2), 0),  # two threads never share a shard object
    (StorageConfig(unit_size=4, encoding=EncodingConfig("int8-token")), 0),
    (StorageConfig(unit_size=4), 2),  # view boxes and flips: one chunk per unit, shared by a batch's threads
], ids=["per-image", "sharded", "int8-token", "views"])
def test_a_pool_writer_writes_the_single_thread_store_byte_for_byte(tmp_path, images, tiny_checkpoint, storage, views):
    cfg = config(images, tmp_path / "one", tiny_checkpoint, batch_size=5, storage=storage, views=views)
    run_extraction(cfg)
    run_extraction(replace(cfg, out=str(tmp_path / "pool"), writer_threads=3))
    assert store_objects(tmp_path / "pool") == store_objects(tmp_path / "one")


def test_disjoint_parts_cut_only_between_objects_and_balance():
    assert disjoint_parts(np.arange(10, 18), 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    shards = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # no shard is split
    assert disjoint_parts(shards, 2) == [slice(0, 5), slice(5, 8)]
    assert disjoint_parts(np.zeros(6, dtype=int), 4) == [slice(0, 6)]  # one object: one part
    assert disjoint_parts(np.arange(5), 1) == [slice(0, 5)]
    assert disjoint_parts(np.zeros(0, dtype=int), 3) == []


def test_writer_threads_must_be_positive(images, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--writer-threads 0"):
        run_extraction(config(images, tmp_path / "c", tiny_checkpoint, writer_threads=0))
