"""The read recipes of docs/cache-format.md work as written, with plain zarr and tensorstore."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dune_cache.extract import ExtractConfig, run_extraction
from dune_cache.store import StorageConfig, TeacherStore

SPEC = Path(__file__).parents[1] / "docs" / "cache-format.md"


def recipe(heading: str) -> str:
    text = SPEC.read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module", params=[0, 4], ids=["one-object-per-image", "sharded"])
def cache(request, tmp_path_factory, real_image_dir, tiny_checkpoint):
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    images = tmp_path_factory.mktemp("imgs")
    for p in real_image_dir.iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.jpg").write_bytes(b"nope")
    cfg = ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=tiny_checkpoint,
                        batch_size=3, num_workers=0, progress=False)
    run_extraction(replace(cfg, storage=StorageConfig(shard_images=request.param)))
    return out


def test_plain_zarr_recipe(cache):
    scope = {"CACHE": str(cache), "TEACHER": "tiny_test_teacher"}
    exec(recipe("Reading a cache with plain zarr"), scope)
    result = scope["result"]
    store = TeacherStore.open(str(cache), "tiny_test_teacher")
    done = np.flatnonzero(store.read_status() == 1)
    np.testing.assert_array_equal(result["patch"], store.patch[int(done[0])])
    np.testing.assert_array_equal(result["batch"], store.patch[:][done[:4]])
    assert result["id"] == store.manifest().ids[int(done[0])]
    assert [f["image_id"] for f in result["failures"]] == ["broken.jpg"]


def test_tensorstore_recipe(cache):
    pytest.importorskip("tensorstore", reason="tensorstore not installed")
    scope = {"CACHE": str(cache), "TEACHER": "tiny_test_teacher"}
    exec(recipe("Reading a cache with tensorstore"), scope)
    store = TeacherStore.open(str(cache), "tiny_test_teacher")
    done = np.flatnonzero(store.read_status() == 1)
    np.testing.assert_array_equal(scope["result"]["batch"], store.patch[:][done[:4]])
    np.testing.assert_array_equal(scope["result"]["cls"], store.cls[int(done[0])])
