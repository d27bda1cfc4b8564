"""The read recipes of docs/cache-format.md work as written, with plain zarr and tensorstore."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.config import StorageConfig
from dune_cache.format.store import TeacherStore

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


@pytest.fixture(scope="module",
                params=["none", "bitround", "int8-channel", "int8-token:outlier_ratio=1.5", "pca:rank=5"])
def encoded_cache(request, tmp_path_factory, real_image_dir, tiny_checkpoint):
    """One cache per encoding (with one cached view per image; the low outlier ratio makes int8-token keep
    some channels in float16)."""
    out = tmp_path_factory.mktemp("encoded") / "cache.zarr"
    cfg = ExtractConfig(teacher="tiny_test_teacher", images=real_image_dir, out=str(out), checkpoint=tiny_checkpoint,
                        batch_size=3, num_workers=0, progress=False, views=1,
                        storage=StorageConfig(encoding=EncodingConfig.parse(request.param)))
    run_extraction(cfg)
    return out


def test_plain_zarr_decoding_recipe(encoded_cache):
    scope = {"CACHE": str(encoded_cache), "TEACHER": "tiny_test_teacher"}
    exec(recipe("Decoding an encoded cache with plain zarr"), scope)
    store = TeacherStore.open(str(encoded_cache), "tiny_test_teacher")
    done = np.flatnonzero(store.read_status() == 1)
    for name in ("patch", "cls"):
        np.testing.assert_allclose(scope["result"][name], store.read_features(name, done[:4]), rtol=1e-6, atol=1e-6)
    if store.encoding.name == "int8-token":  # the recipe's outlier-channel branch runs
        assert store.encoding.schemes["patch"].info["outlier_channels"]
    views = scope["decode"]("views/patch", done)
    assert views.shape == (len(done), 1, 4, 6, 16) and np.isfinite(views).all()
    np.testing.assert_allclose(views, store.read_features("views/patch", done), rtol=1e-6, atol=1e-6)
