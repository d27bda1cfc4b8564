"""Caches on a real S3 server (rclone serve s3, fixture ``s3`` in conftest.py): extract, info/verify, read
with and without the local chunk cache, statistics and training from the bucket, read-only access."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import serve_s3
from dune_cache.cli import app as cache_app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.storage.location import filesystem
from dune_cache.read.reader import CacheReader
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_cache.errors import DamagedFeaturesError, StoreError
from dune_cache.config import StorageConfig
from dune_cache.format.store import TeacherStore
from dune_student.config import load_config
from dune_student.training.trainer import train
from test_extract import images  # noqa: F401 - fixture: six photos and three unusable files
from test_train import TINY_STUDENT

TEACHER = "tiny_test_teacher"


def extract(out: str, images, checkpoint) -> None:
    """Tiny-teacher cache of the six real photos on a 4x4 student grid, three images per work unit."""
    run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=out, checkpoint=checkpoint, student_patch=8,
                                 student_resolution="32", batch_size=2, num_workers=0, progress=False))


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, real_image_dir, tiny_checkpoint) -> str:
    out = str(tmp_path_factory.mktemp("local") / "cache.zarr")
    extract(out, real_image_dir, tiny_checkpoint)
    return out


def kept_files(chunks: Path) -> list[str]:
    """Files of a chunk cache folder, relative to their group's folder (the shared ``usage`` count left out)."""
    return sorted(p.relative_to(chunks).as_posix().split("/", 1)[1] for p in chunks.rglob("*")
                  if p.is_file() and p.parent != chunks)


def kept_chunks(chunks: Path) -> list[str]:
    """The chunk objects among :func:`kept_files` (``<array>/c/<image>/...``)."""
    return [f for f in kept_files(chunks) if "/c/" in f]


def read_everything(reader: CacheReader) -> tuple[np.ndarray, np.ndarray]:
    batch = reader.read(np.arange(len(reader)))
    return batch.cls[TEACHER].numpy(), batch.patch[TEACHER].numpy()


def test_extract_to_s3_reads_like_local_with_and_without_chunk_cache(s3, tmp_path, real_image_dir, tiny_checkpoint,
                                                                     local_cache, snapshot):
    url = s3.url("extract.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    served = s3.directory / "dune" / "extract.zarr"
    assert (served / TEACHER / "zarr.json").exists()  # really in the bucket

    runner = CliRunner()
    info = runner.invoke(cache_app, ["info", url])
    assert info.exit_code == 0 and "6 done" in info.output and "crc32c yes" in info.output, info.output
    verify = runner.invoke(cache_app, ["verify", url, "--no-progress"])
    assert verify.exit_code == 0 and "OK: 6 images checked" in verify.output, verify.output
    listing = runner.invoke(cache_app, ["ls", s3.url(""), "--json"])  # the catalog of the whole bucket
    assert listing.exit_code == 0, listing.output
    [entry] = [e for e in json.loads(listing.output) if e["path"].rstrip("/").endswith("extract.zarr")]
    [group] = entry["groups"]
    assert (group["teacher"], group["done"], group["failed"], group["pending"]) == (TEACHER, 6, 0, 0)
    assert group["error"] is None
    store = TeacherStore.open(url, TEACHER)  # sizes from one listing equal zarr's one request per object
    per_object = sum(a.nbytes_stored() for name in ("cls", "patch") for a in store.stored_arrays(name).values())
    assert store.nbytes_stored() == per_object == TeacherStore.open(local_cache, TEACHER).nbytes_stored()
    assert group["bytes"] == sum(f.stat().st_size for f in (served / TEACHER).rglob("*") if f.is_file())

    before = snapshot(served)
    expected = read_everything(CacheReader(local_cache))
    plain = CacheReader(url)
    assert plain.backend == "zarr" and plain.image_ids == CacheReader(local_cache).image_ids
    chunks = tmp_path / "chunks"
    cold = CacheReader(url, chunk_cache=chunks)
    for got in (read_everything(plain), read_everything(cold), read_everything(CacheReader(url, chunk_cache=chunks))):
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    assert snapshot(served) == before  # reading never writes, also remotely
    kept = kept_files(chunks)
    assert kept == ["cls/c/0/0", "cls/c/1/0", "cls/c/2/0", "cls/c/3/0", "cls/c/4/0", "cls/c/5/0", "cls/zarr.json",
                    *[f"patch/c/{i}/0/0/0" for i in range(6)], "patch/zarr.json", "source.json"]

    fs, path = filesystem(url)
    fs.rm(f"{path}/{TEACHER}/patch/c", recursive=True)  # the remote chunks are gone ...
    warm = read_everything(CacheReader(url, chunk_cache=chunks))  # ... a warm chunk cache still has them
    np.testing.assert_array_equal(warm[1], expected[1])
    with pytest.raises(DamagedFeaturesError, match="patch of 6 image.* marked done .* `dune-cache repair s3://"):
        read_everything(CacheReader(url))  # without it: the NaN fill value of chunks that are gone, refused


def test_a_corrupt_cached_chunk_is_fetched_again(s3, tmp_path, real_image_dir, tiny_checkpoint, local_cache):
    url = s3.url("refetch.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    chunks = tmp_path / "chunks"
    expected = read_everything(CacheReader(local_cache))
    read_everything(CacheReader(url, chunk_cache=chunks))
    [cached] = list(chunks.rglob("patch/c/2/0/0/0"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x10
    cached.write_bytes(bytes(data))  # e.g. a bad disk sector on the training machine
    got = read_everything(CacheReader(url, chunk_cache=chunks))
    np.testing.assert_array_equal(got[1], expected[1])
    assert cached.read_bytes() != bytes(data)  # replaced by the good copy


def test_a_full_chunk_cache_keeps_what_it_has_and_reads_the_rest_remotely(s3, tmp_path, real_image_dir,
                                                                         tiny_checkpoint, local_cache):
    url = s3.url("limited.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    expected = read_everything(CacheReader(local_cache))
    chunks = tmp_path / "chunks"

    for epoch in range(2):
        limited = CacheReader(url, chunk_cache=chunks, chunk_cache_limit=1)  # full after the first download
        for rows in (np.arange(0, 2), np.arange(2, 4), np.arange(4, 6)):
            batch = limited.read(rows)
            np.testing.assert_array_equal(batch.cls[TEACHER].numpy(), expected[0][rows])
            np.testing.assert_array_equal(batch.patch[TEACHER].numpy(), expected[1][rows])
        # one batch's objects passed the limit, nothing was kept after it
        assert {int(f.split('/')[2]) for f in kept_chunks(chunks)} == {0, 1}
    held = sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file() and p.name != "usage")
    assert int((chunks / "usage").read_text()) == held  # re-measured when the reader was built
    np.testing.assert_array_equal(read_everything(CacheReader(url, chunk_cache=chunks))[1], expected[1])
    assert {int(f.split('/')[2]) for f in kept_chunks(chunks)} == set(range(6))  # without a limit the rest is kept


def test_stats_and_training_from_s3_match_local(s3, tmp_path, real_image_dir, tiny_checkpoint, local_cache):
    url = s3.url("train.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    stats = CliRunner().invoke(cache_app, ["stats", url])
    assert stats.exit_code == 0, stats.output
    write_stats(local_cache, TEACHER, compute_stats(local_cache, TEACHER))
    remote_stats = CacheReader(url).stats(TEACHER)
    np.testing.assert_allclose(remote_stats.patch_mean, CacheReader(local_cache).stats(TEACHER).patch_mean)

    def run(cache: str, out: str, *extra: str):
        return train(load_config(None, [f"data.cache={cache}", f"data.images={real_image_dir}", f"out={out}",
                                        "steps=3", "checkpoint_every=3", *TINY_STUDENT, *extra]))

    local = run(local_cache, str(tmp_path / "local_run"))
    remote = run(url, str(tmp_path / "remote_run"), f"data.chunk_cache={tmp_path / 'chunks'}")
    assert remote.steps == 3 and remote.final_loss == pytest.approx(local.final_loss, rel=1e-6)
    assert len(kept_chunks(tmp_path / "chunks")) == 12  # training filled the chunk cache (CLS and patch of 6)
    limited = run(url, str(tmp_path / "limited_run"), f"data.chunk_cache={tmp_path / 'small'}",
                  "data.chunk_cache_limit_gb=1e-9")  # 1 byte: full after the first batch
    assert limited.final_loss == pytest.approx(local.final_loss, rel=1e-6)
    assert 0 < len(kept_chunks(tmp_path / "small")) < len(kept_chunks(tmp_path / "chunks"))
    with pytest.raises(ValueError, match="out: run directories are local paths"):
        load_config(None, [f"data.cache={url}", f"data.images={real_image_dir}", f"out={s3.url('runs/x')}"])


def test_read_only_server_reads_but_refuses_extraction_clearly(s3, monkeypatch, real_image_dir, tiny_checkpoint,
                                                               local_cache):
    url = s3.url("shared.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    with serve_s3(s3.directory, read_only=True) as endpoint:
        monkeypatch.setenv("DUNE_CACHE_STORAGE_OPTIONS", f'{{"endpoint_url": "{endpoint}"}}')
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # rclone answers refused writes with a (retryable) 500
        for a, b in zip(read_everything(CacheReader(url)), read_everything(CacheReader(local_cache))):
            np.testing.assert_array_equal(a, b)
        result = CliRunner().invoke(cache_app, ["verify", url, "--no-progress"])
        assert result.exit_code == 0, result.output
        for out in (url, s3.url("new.zarr")):  # resuming a cache, or creating one
            with pytest.raises(StoreError, match=f"cannot write to {out}.*read-only"):
                extract(out, real_image_dir, tiny_checkpoint)
        result = CliRunner().invoke(cache_app, ["extract", "--teacher", TEACHER, "--images", str(real_image_dir),
                                                "--out", url, "--checkpoint", str(tiny_checkpoint),
                                                "--student-patch", "8", "--student-resolution", "32"])
        assert result.exit_code == 2 and "cannot write to" in result.output, result.output
        result = CliRunner().invoke(cache_app, ["stats", url])
        assert result.exit_code == 2 and f"cannot write to {url}" in result.output, result.output
        missing = CliRunner().invoke(cache_app, ["info", s3.url("nothing.zarr")])
        assert missing.exit_code == 2 and "no cache at s3://dune/nothing.zarr" in missing.output, missing.output


def test_wrong_credentials_are_a_clear_error(s3, monkeypatch, local_cache, real_image_dir, tiny_checkpoint):
    url = s3.url("creds.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    monkeypatch.setenv("DUNE_CACHE_STORAGE_OPTIONS", '{"key": "AKIDEXAMPLE123", "secret": "WRONGSECRET0000"}')
    with pytest.raises(StoreError, match="permission denied reading s3://dune/creds.zarr"):
        CacheReader(url)
    monkeypatch.setenv("DUNE_CACHE_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(StoreError, match="DUNE_CACHE_STORAGE_OPTIONS must be a JSON dict"):
        CacheReader(url)


def test_remote_caches_are_read_with_zarr_python(s3, tmp_path, real_image_dir, tiny_checkpoint):
    url = s3.url("backends.zarr")
    extract(url, real_image_dir, tiny_checkpoint)
    assert CacheReader(url, dtype=torch.float16).backend == "zarr"  # auto: zarr-python over fsspec
    assert CacheReader(url, chunk_cache=tmp_path / "chunks").backend == "zarrs"  # zarrs decodes the local copies
    assert CacheReader(url, backend="memory").read(np.arange(2)).mask.all()
    with pytest.raises(StoreError, match="reads local caches only"):
        CacheReader(url, backend="tensorstore")


def test_chunk_cache_keeps_only_objects_whose_images_are_all_done(s3, tmp_path, images, tiny_checkpoint):
    """Shards of 4 images; images 6-8 are unreadable files, so shard 1 holds failed images and stays remote."""
    storage = StorageConfig(shard_images=4)
    for out in (s3.url("sharded.zarr"), str(tmp_path / "local.zarr")):
        run_extraction(ExtractConfig(teacher=TEACHER, images=images, out=out, checkpoint=tiny_checkpoint,
                                     batch_size=3, num_workers=0, progress=False, storage=storage))
    chunks = tmp_path / "chunks"
    remote = CacheReader(s3.url("sharded.zarr"), chunk_cache=chunks)
    assert len(remote) == 6
    for a, b in zip(read_everything(remote), read_everything(CacheReader(str(tmp_path / "local.zarr")))):
        np.testing.assert_array_equal(a, b)
    kept = kept_files(chunks)
    assert [k for k in kept if "/c/" in k] == ["cls/c/0/0", "patch/c/0/0/0/0"]
