"""Extraction end to end on a tiny teacher and real photos: values, resume, bad input, mismatches, sharding."""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dune_cache.config import ExtractConfig
from dune_cache.errors import NonFiniteFeaturesError
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.commands.info import cache_info
from dune_cache.commands.verify import verify_cache
from dune_cache.format.constants import STATUS_DONE, STATUS_FAILED
from dune_cache.format.store import TeacherStore
from dune_cache.config import StorageConfig
from dune_cache.errors import StoreError, StoreMismatchError
from dune_cache.teachers import create_teacher

TESTS = Path(__file__).parent


@pytest.fixture
def images(tmp_path, real_image_dir) -> Path:
    """Six real photos plus three unusable files."""
    d = tmp_path / "images"
    shutil.copytree(real_image_dir, d)
    (d / "zz_text.jpg").write_bytes(b"this is not an image")
    (d / "zz_empty.png").write_bytes(b"")
    jpg = next(d.glob("*.jpg")).read_bytes()
    (d / "zz_truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    return d


def config(images: Path, out: Path, checkpoint: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(teacher="tiny_test_teacher", images=images, out=str(out), checkpoint=checkpoint,
                         batch_size=2, num_workers=0, progress=False, storage=StorageConfig(unit_size=4))
    return replace(base, **kw)


def read_all(out: Path, name: str = "tiny_test_teacher"):
    store = TeacherStore.open(str(out), name)
    return store.read_status(), store.cls[:], store.patch[:]


def test_features_equal_a_direct_teacher_forward(tmp_path, images, tiny_checkpoint):
    cfg = config(images, tmp_path / "cache", tiny_checkpoint)
    result = run_extraction(cfg)
    assert (result.processed, result.failed, result.total) == (6, 3, 9)
    status, cls, patch = read_all(tmp_path / "cache")
    manifest = load_manifest(images)
    teacher = create_teacher("tiny_test_teacher", tiny_checkpoint)
    good = [i for i, name in enumerate(manifest.ids) if not name.startswith("zz_")]
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (32, 48), "squash")) for i in good])
    with torch.inference_mode():
        out = teacher(pixels)
    np.testing.assert_allclose(cls[good], out.cls.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(patch[good], out.patch.numpy(), rtol=2e-3, atol=2e-3)
    assert patch.shape == (9, 4, 6, 16) and patch.dtype == np.float16
    assert (status[good] == STATUS_DONE).all()


def test_bad_files_are_recorded_with_reasons_and_skipped(tmp_path, images, tiny_checkpoint):
    run_extraction(config(images, tmp_path / "cache", tiny_checkpoint))
    store = TeacherStore.open(str(tmp_path / "cache"), "tiny_test_teacher")
    failures = {r["image_id"]: r["reason"] for r in store.read_failures()}
    assert failures == {"zz_text.jpg": "not_an_image", "zz_empty.png": "not_an_image", "zz_truncated.jpg": "truncated"}
    status = store.read_status()
    assert (status == STATUS_FAILED).sum() == 3 and (status == STATUS_DONE).sum() == 6
    assert all(r.ok for r in verify_cache(str(tmp_path / "cache")))
    # a fixed file is picked up with --retry-failed, and its failure record disappears
    shutil.copy(next(images.glob("*.png")), images / "zz_empty.png")
    result = run_extraction(config(images, tmp_path / "cache", tiny_checkpoint, retry_failed=True))
    assert (result.processed, result.failed) == (1, 2)
    assert {r["image_id"] for r in store.read_failures()} == {"zz_text.jpg", "zz_truncated.jpg"}


class Interrupt(Exception):
    pass


def test_interrupted_extraction_resumes_to_the_same_result(tmp_path, images, tiny_checkpoint, monkeypatch):
    reference = config(images, tmp_path / "ref", tiny_checkpoint)
    run_extraction(reference)
    ref_status, ref_cls, ref_patch = read_all(tmp_path / "ref")

    cfg = config(images, tmp_path / "cache", tiny_checkpoint)
    real_write_rows = TeacherStore.write_rows
    calls = {"n": 0}

    def crash_on_third_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt("disk went away")
        return real_write_rows(self, *args)

    monkeypatch.setattr(TeacherStore, "write_rows", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="disk went away"):
        run_extraction(cfg)
    status, _, _ = read_all(tmp_path / "cache")
    assert 0 < (status == STATUS_DONE).sum() < 6  # kept what finished before the crash
    monkeypatch.setattr(TeacherStore, "write_rows", real_write_rows)

    computed = []
    real_forward = type(create_teacher("tiny_test_teacher")).forward
    monkeypatch.setattr(type(create_teacher("tiny_test_teacher")), "forward",
                        lambda self, px: computed.append(len(px)) or real_forward(self, px))
    result = run_extraction(cfg)
    assert result.processed == 6 - (status == STATUS_DONE).sum()  # finished images were not recomputed
    assert sum(computed) == result.processed
    status, cls, patch = read_all(tmp_path / "cache")
    np.testing.assert_array_equal(status, ref_status)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_array_equal(patch, ref_patch)


def test_keyboard_interrupt_keeps_finished_batches(tmp_path, images, tiny_checkpoint, monkeypatch):
    teacher_cls = type(create_teacher("tiny_test_teacher"))
    real_forward = teacher_cls.forward
    calls = {"n": 0}

    def ctrl_c_on_second_batch(self, px):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_forward(self, px)

    monkeypatch.setattr(teacher_cls, "forward", ctrl_c_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(config(images, tmp_path / "cache", tiny_checkpoint))
    status, cls, _ = read_all(tmp_path / "cache")
    done = np.flatnonzero(status == STATUS_DONE)
    assert len(done) == 2 and np.isfinite(cls[done]).all()


def test_mismatched_store_is_refused_with_what_differs(tmp_path, images, tiny_checkpoint):
    out = tmp_path / "cache"
    run_extraction(config(images, out, tiny_checkpoint))
    other_ckpt = tmp_path / "other.pth"
    state = torch.load(tiny_checkpoint)
    state["scale"] = state["scale"] * 2
    torch.save(state, other_ckpt)
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("".join(f"{images}/{p}\n" for p in load_manifest(images).ids[:3]))
    cases = {
        "checkpoint.weights_sha256": config(images, out, other_ckpt),  # other weights (docs/cache-format.md)
        "images.manifest_sha256": config(fewer, out, tiny_checkpoint),
        "geometry.resolution": config(images, out, tiny_checkpoint, resolution="40x48"),
        "storage.dtype": config(images, out, tiny_checkpoint, storage=StorageConfig(unit_size=4, dtype="float32")),
    }
    for field, cfg in cases.items():
        with pytest.raises(StoreMismatchError, match=field.replace(".", r"\.")) as info:
            run_extraction(cfg)
        assert "--overwrite" in str(info.value)
    before = read_all(out)
    np.testing.assert_array_equal(before[0], read_all(out)[0])  # refusals touched nothing
    result = run_extraction(replace(cases["geometry.resolution"], overwrite=True))
    assert result.processed == 6 and read_all(out)[2].shape == (9, 5, 6, 16)


def test_overwrite_reextracts_a_matching_group_from_scratch(tmp_path, images, tiny_checkpoint):
    """``--overwrite`` deletes the group even when it matches (its help and the README say so); without it the
    same command resumes and recomputes nothing."""
    out = tmp_path / "cache"
    run_extraction(config(images, out, tiny_checkpoint))
    assert run_extraction(config(images, out, tiny_checkpoint)).processed == 0  # matching: resumed, all done
    zarr.open_group(str(out / "tiny_test_teacher"), mode="r+").attrs["left_by_the_old_group"] = True
    result = run_extraction(config(images, out, tiny_checkpoint, overwrite=True))
    assert (result.processed, result.failed) == (6, 3)
    assert "left_by_the_old_group" not in zarr.open_group(str(out / "tiny_test_teacher"), mode="r").attrs


def test_non_finite_features_are_an_error_naming_images_and_keep_earlier_batches(tmp_path, images,
                                                                                  tiny_checkpoint, monkeypatch):
    teacher_cls = type(create_teacher("tiny_test_teacher"))
    real_forward = teacher_cls.forward
    calls = {"n": 0}

    def nan_on_third_batch(self, px):
        calls["n"] += 1
        out = real_forward(self, px)
        if calls["n"] == 3:
            out.patch[0, 0, 0, 0] = float("nan")
            out.cls[-1, 0] = 1e6  # beyond float16
        return out

    monkeypatch.setattr(teacher_cls, "forward", nan_on_third_batch)
    with pytest.raises(NonFiniteFeaturesError) as info:
        run_extraction(config(images, tmp_path / "cache", tiny_checkpoint))
    manifest = load_manifest(images)
    status, cls, patch = read_all(tmp_path / "cache")
    done = np.flatnonzero(status == STATUS_DONE)
    assert len(done) == 4  # two full batches before the bad one
    pending = [manifest.ids[i] for i in range(len(manifest)) if status[i] == 0 and not manifest.ids[i].startswith("zz")]
    assert all(name in str(info.value) for name in pending)
    assert np.isfinite(patch[done]).all()


def test_shards_fill_one_store_like_a_single_run(tmp_path, images, tiny_checkpoint):
    run_extraction(config(images, tmp_path / "single", tiny_checkpoint))
    for i in range(3):
        run_extraction(config(images, tmp_path / "sharded", tiny_checkpoint, shard=f"{i}/3"))
    for a, b in zip(read_all(tmp_path / "single"), read_all(tmp_path / "sharded")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_processes_write_one_store(tmp_path, images, tiny_checkpoint, where, request):
    """Three OS processes (like three machines with --shard i/3) extract into one store at the same time, on a
    local disk or an S3 bucket; only slot 0 creates the group, the others wait for its provenance."""
    out = request.getfixturevalue("s3").url("concurrent.zarr") if where == "s3" else str(tmp_path / "c")
    script = (
        "import sys; sys.path.insert(0, {tests!r}); import conftest; from dune_cache.cli import app; app()"
    ).format(tests=str(TESTS))
    common = ["extract", "--teacher", "tiny_test_teacher", "--images", str(images), "--out", out,
              "--checkpoint", str(tiny_checkpoint), "--batch-size", "1", "--num-workers", "0", "--unit-size", "2",
              "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-c", script, *common, "--shard", f"{i}/3"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [f"--- shard {i}/3 exited {p.returncode}:\n{text}" for i, (p, text) in enumerate(zip(procs, outputs))
              if p.returncode != 0]
    print(*failed, sep="\n")  # shown in full under "Captured stdout" (assertion messages get truncated)
    assert not failed, f"{len(failed)} of 3 extraction processes failed"
    run_extraction(config(images, tmp_path / "single", tiny_checkpoint, storage=StorageConfig(unit_size=2)))
    for a, b in zip(read_all(tmp_path / "single"), read_all(out)):
        np.testing.assert_array_equal(a, b)
    single, shared = (TeacherStore.open(str(root), "tiny_test_teacher") for root in (tmp_path / "single", out))
    assert single.read_failures() == shared.read_failures()


def test_a_slot_never_reads_another_slots_objects_while_they_are_written(tmp_path, images, tiny_checkpoint):
    """The race CI once hit with 3 processes: a slot starting late read another slot's failure record between
    that record's metadata and its data landing (zeros, not JSON). A slot now reads only the status and failure
    objects of its own units; a unit's records are now one object written at once, and a record array of an earlier
    version caught mid-write reads as no records."""
    out = tmp_path / "c"
    run_extraction(config(images, out, tiny_checkpoint, shard="0/2"))  # units 0 and 2 of 3 (4 images each)
    store = TeacherStore.open(str(out), "tiny_test_teacher", mode="a")
    assert [r["image_id"] for r in store.read_failures([2])] == ["zz_truncated.jpg"]
    del store.group["failures"]["records_00000002"]  # as an earlier version stored it: an array, rewritten in steps
    store.group["failures"].create_array("unit_00000002", shape=(64,), dtype="uint8", chunks=(64,),
                                         compressors=(), overwrite=True)  # being rewritten: metadata landed
    assert store.read_failures([2]) == [] and store.read_failures() == []
    result = run_extraction(config(images, out, tiny_checkpoint, shard="1/2"))  # unit 1 while unit 2 is in flight
    assert (result.processed, result.failed) == (2, 2)
    assert [r["image_id"] for r in store.read_failures([1])] == ["zz_empty.png", "zz_text.jpg"]
    run_extraction(config(images, tmp_path / "single", tiny_checkpoint))
    for a, b in zip(read_all(tmp_path / "single"), read_all(out)):
        np.testing.assert_array_equal(a, b)


def test_other_slots_never_create_a_group_and_wait_for_slot_0(tmp_path, images, tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="dune_cache.format.store")
    with pytest.raises(StoreError, match="gave up after 1 s waiting for slot 0 .* to create it: .*/c/tiny"):
        TeacherStore.wait_for_creator(str(tmp_path / "c"), "tiny", {}, overwrite=False, wait_s=0.6)
    assert "waiting up to 1 s for slot 0" in caplog.text and not (tmp_path / "c").exists()  # wrote nothing
    run_extraction(config(images, tmp_path / "c", tiny_checkpoint))
    store = TeacherStore.open(str(tmp_path / "c"), "tiny_test_teacher")
    created = dt.datetime.fromisoformat(store.provenance["created"])
    later = {"created": (created + dt.timedelta(minutes=5)).isoformat()}
    with pytest.raises(StoreError, match="replace the group created .* without --overwrite to join"):
        TeacherStore.wait_for_creator(str(tmp_path / "c"), "tiny_test_teacher", later, overwrite=True, wait_s=0.6)
    soon = {"created": (created + dt.timedelta(seconds=3)).isoformat()}  # slot 0 of this very run made it
    assert TeacherStore.wait_for_creator(str(tmp_path / "c"), "tiny_test_teacher", soon, overwrite=True, wait_s=0)


def test_sharded_storage_round_trips_and_reports(tmp_path, images, tiny_checkpoint):
    cfg = config(images, tmp_path / "cache", tiny_checkpoint, storage=StorageConfig(shard_images=4, codec="zstd"))
    run_extraction(cfg)
    arr = zarr.open_array(str(tmp_path / "cache"), path="tiny_test_teacher/patch", mode="r")
    assert arr.shards == (4, 4, 6, 16) and arr.chunks == (1, 4, 6, 16)
    info = cache_info(str(tmp_path / "cache"))["tiny_test_teacher"]
    assert (info["done"], info["failed"], info["pending"]) == (6, 3, 0)
    assert info["bytes_stored"] > 0 and info["compression_ratio"] > 0


def test_verify_names_images_with_corrupt_or_missing_chunks(tmp_path, images, tiny_checkpoint):
    out = tmp_path / "cache"
    run_extraction(config(images, out, tiny_checkpoint))
    manifest = load_manifest(images)
    status = read_all(out)[0]
    done = np.flatnonzero(status == STATUS_DONE)
    corrupt, missing = int(done[0]), int(done[1])
    patch_dir = out / "tiny_test_teacher" / "patch" / "c"
    (patch_dir / str(corrupt) / "0" / "0" / "0").write_bytes(b"garbage bytes")
    (patch_dir / str(missing) / "0" / "0" / "0").unlink()
    [report] = verify_cache(str(out))
    text = "\n".join(report.problems)
    assert not report.ok
    assert manifest.ids[corrupt] in text and "does not decode" in text
    assert manifest.ids[missing] in text and "non-finite" in text


def test_work_units_are_dealt_over_machines_and_torchrun_ranks(monkeypatch):
    from dune_cache.extract.units import my_units, worker_slot

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert worker_slot("2/3") == (9, 12)  # machine 2 of 3, rank 1 of 4
    slots = [my_units(30, s, 12) for s in range(12)]
    assert sorted(u for units in slots for u in units) == list(range(30))  # disjoint and complete
    with pytest.raises(ValueError, match="i/n"):
        worker_slot("2-3")
