"""A kill at any instant: the extraction is stopped at every store write boundary in turn (each object written or
deleted is one), then the same command is run again, and the store must be exactly the one an uninterrupted run
makes: the same objects with the same bytes (provenance up to its creation time), and ``verify`` passes. Before the
re-run, every image the killed store marks failed has its failure record (``info`` and ``verify`` in between see no
unexplained failure).

Local stores write each object atomically (zarr's LocalStore: a temporary file renamed into place) and object
stores put whole objects, so the instants between two writes are all the instants a kill can leave behind."""
from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr.storage
from test_extract import config, images  # noqa: F401 - the images fixture: 6 photos and 3 unusable files

from dune_cache.commands.verify import verify_cache
from dune_cache.extract.run import run_extraction
from dune_cache.format.constants import STATUS_FAILED
from dune_cache.format.store import TeacherStore

TEACHER = "tiny_test_teacher"
WRITES = ("_set", "set_sync", "delete", "delete_dir", "delete_sync", "clear")


class Killed(BaseException):
    """The process died here: this write and every later one never happen (a BaseException, so no handler in the
    code under test mistakes it for an error it can deal with)."""


@contextlib.contextmanager
def killed_at_write(at: int | None):
    """Count the store's writes; with ``at``, write ``at`` and all that follow raise :class:`Killed` instead of
    writing. Yields the counter ``{"writes": n}``."""
    counter = {"writes": 0}
    originals = {name: getattr(zarr.storage.LocalStore, name) for name in WRITES}

    def guarded(name):
        original = originals[name]

        def check():
            counter["writes"] += 1
            if at is not None and counter["writes"] > at:
                raise Killed(f"killed before write {at + 1} ({name})")

        if name.endswith("_sync"):
            def write(self, *args, **kwargs):
                check()
                return original(self, *args, **kwargs)
        else:
            async def write(self, *args, **kwargs):
                check()
                return await original(self, *args, **kwargs)
        return write

    mp = pytest.MonkeyPatch()
    for name in WRITES:
        mp.setattr(zarr.storage.LocalStore, name, guarded(name))
    try:
        yield counter
    finally:
        mp.undo()


def store_objects(root: Path) -> dict[str, object]:
    """Every object of a cache: its bytes, and for group metadata the parsed JSON without the creation time."""
    objects: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = path.relative_to(root).as_posix()
        objects[key] = path.read_bytes()
        if path.name == "zarr.json":
            meta = json.loads(objects[key])
            meta.get("attributes", {}).get("dune_cache", {}).pop("created", None)
            objects[key] = meta
    return objects


def unexplained_failures(out: Path) -> list[int]:
    """Images marked failed that have no failure record in the store as a kill left it (what ``info`` and
    ``verify`` see before a resume): there must be none at any instant."""
    store = TeacherStore.open_if_complete(str(out), TEACHER, mode="r")
    if store is None:  # killed before the group was complete: nothing is marked yet
        return []
    recorded = {r["index"] for r in store.read_failures(stale=True)}
    return sorted(set(np.flatnonzero(store.read_status() == STATUS_FAILED).tolist()) - recorded)


@pytest.mark.parametrize("batch_size, writer_threads, shard_images, writes", [
    (1, 1, 0, 50),  # unit 1 records 2 failures in turn (each record update one object)
    (3, 2, 0, 40),  # a pool writes each batch's features (in any order), then its units' failures and status
    (2, 1, 4, 12),  # shards of 4 images: each unit gathered over batches, then written once
    (3, 2, 4, 12),  # ... by a pool, each array of a unit by one thread
])
def test_a_kill_at_every_write_boundary_resumes_into_the_reference_store(tmp_path, images, tiny_checkpoint,
                                                                         batch_size, writer_threads, shard_images,
                                                                         writes):
    cfg = config(images, tmp_path / "reference", tiny_checkpoint, batch_size=batch_size, writer_threads=writer_threads)
    if shard_images:
        cfg = replace(cfg, storage=replace(cfg.storage, shard_images=shard_images))
    with killed_at_write(None) as counter:
        run_extraction(cfg)
    reference = store_objects(tmp_path / "reference")
    boundaries = counter["writes"]
    assert boundaries > writes  # creation, then features, failure records and status of 3 units
    for at in range(boundaries):
        out = tmp_path / f"killed_at_{at}"
        with killed_at_write(at), pytest.raises((Killed, RuntimeError)) as died:
            run_extraction(replace(cfg, out=str(out)))
        assert isinstance(died.value, Killed) or isinstance(died.value.__cause__, Killed), died.value
        assert unexplained_failures(out) == [], f"killed before write {at + 1}: failed images without a record"
        result = run_extraction(replace(cfg, out=str(out)))  # the same command again
        assert result.total == 9
        got = store_objects(out)
        assert sorted(got) == sorted(reference), f"killed before write {at + 1}: other objects"
        different = [key for key in reference if got[key] != reference[key]]
        assert not different, f"killed before write {at + 1}: {different} differ from the uninterrupted run"
        [report] = verify_cache(str(out))
        assert report.ok, (at, report.problems)
