"""Extraction on a dask.distributed cluster (``--scheduler``): a LocalCluster of worker processes on this machine,
the tiny teacher registered in them (tests/cluster_worker.py). A worker SIGKILLed mid-unit, a worker that joins, a
client killed and run again, a group started with --shard: each run ends in the store a single process makes, byte
for byte (provenance's creation time aside); a unit that kills every worker reading it is given up and named."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import dask
import distributed
import numpy as np
import pytest

from dune_cache.commands.verify import verify_cache
from dune_cache.config import StorageConfig
from dune_cache.errors import ClusterError
from dune_cache.extract.cluster import KEY_PREFIX, LOCAL_CLUSTER_CONFIG, environment_kept
from dune_cache.extract.run import run_extraction
from dune_cache.format.constants import STATUS_PENDING
from dune_cache.format.store import TeacherStore

from test_crash_consistency import store_objects
from test_extract import config, images  # noqa: F401 - the images fixture: 6 photos and 3 unusable files

TESTS = Path(__file__).parent
REPO = TESTS.parent
TEACHER = "tiny_test_teacher"
WAIT_S = 240  # the longest a test waits for workers on a loaded machine (each imports torch)
# workers import the tests' teacher; a unit given up after 2 worker deaths; a killed worker's unit lock freed
# after 5 s instead of 30 (the scheduler checks every 0.5 s)
CLUSTER_CONFIG = {**LOCAL_CLUSTER_CONFIG,
                  "distributed.worker.preload": [(f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; "
                                                  "import cluster_worker")],
                  "distributed.scheduler.allowed-failures": 1,
                  "distributed.scheduler.locks.lease-timeout": "5s",
                  "distributed.scheduler.locks.lease-validation-interval": "0.5s"}


def unit_config(images: Path, out: Path, checkpoint: Path, **kw):
    """Units of 2 images (5 units over the 9 images), one image per batch, decoding in the worker process."""
    return config(images, out, checkpoint, batch_size=1, storage=StorageConfig(unit_size=2), **kw)


@pytest.fixture
def markers(tmp_path, monkeypatch) -> Path:
    """The folder the workers mark their forwards in (tests/cluster_worker.py), empty."""
    folder = tmp_path / "markers"
    folder.mkdir()
    monkeypatch.setenv("DUNE_TEST_MARKERS", str(folder))
    return folder


@pytest.fixture
def start_cluster(markers):
    """``start_cluster(n, **config)``: a LocalCluster of ``n`` single-threaded worker processes (with dask ``config``
    besides :data:`CLUSTER_CONFIG`), and a client of it for the test itself, closed at the end of the test."""
    opened = []

    def start(n: int, **config):
        stack = contextlib.ExitStack()
        stack.enter_context(environment_kept())  # the nanny's OMP_NUM_THREADS=1 must not reach later tests
        stack.enter_context(dask.config.set({**CLUSTER_CONFIG, **config}))
        cluster = distributed.LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None)
        client = distributed.Client(cluster)
        opened.append((stack, cluster, client))
        client.wait_for_workers(n, timeout=WAIT_S)
        return cluster, client

    yield start
    for stack, cluster, client in reversed(opened):
        client.close()
        cluster.close()
        stack.close()


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return found


def marked_pids(markers: Path) -> list[int]:
    """Worker processes that started a forward, in the order of their first marker."""
    names = sorted((p.name for p in markers.iterdir() if p.name != "hold"), key=lambda n: int(n.split("-")[1]))
    return list(dict.fromkeys(int(name.split("-")[0]) for name in names))


def unit_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def assert_same_store(out: Path, reference: Path) -> None:
    """Every object of ``out`` equals the reference's, byte for byte (provenance's creation time aside), and
    ``verify`` passes."""
    expected, got = store_objects(reference), store_objects(out)
    assert sorted(got) == sorted(expected)
    assert [key for key in expected if got[key] != expected[key]] == []
    assert all(report.ok for report in verify_cache(str(out)))


@pytest.mark.parametrize("shard_images", [0, 2])
def test_a_worker_killed_mid_unit_has_its_unit_run_elsewhere_into_the_reference_store(
        tmp_path, images, tiny_checkpoint, markers, start_cluster, shard_images):
    storage = StorageConfig(unit_size=2, shard_images=shard_images)
    cfg = replace(unit_config(images, tmp_path / "reference", tiny_checkpoint), storage=storage)
    run_extraction(cfg)
    cluster, client = start_cluster(2)
    (markers / "hold").touch()  # every forward waits: the kill lands mid-unit
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_extraction, replace(cfg, out=str(tmp_path / "cluster"),
                                                      scheduler=cluster.scheduler_address))
        victim = wait_for(lambda: marked_pids(markers), "a forward in a worker")[0]
        address = {pid: addr for addr, pid in client.run(os.getpid).items()}[victim]  # a worker, nothing else
        in_flight = [unit_of(key) for key in client.processing()[address] if key.startswith(KEY_PREFIX)]
        os.kill(victim, signal.SIGKILL)
        (markers / "hold").unlink()
        result = running.result(timeout=WAIT_S)
    assert in_flight, "the killed worker ran no unit"
    assert sorted(u.unit for u in result.units) == [0, 1, 2, 3, 4]
    assert all(u.pid != victim for u in result.units if u.unit in in_flight)  # its unit finished elsewhere
    assert (result.processed, result.failed) == (6, 3)
    assert_same_store(tmp_path / "cluster", tmp_path / "reference")


def test_a_worker_that_joins_mid_run_takes_units(tmp_path, images, tiny_checkpoint, markers, start_cluster):
    cfg = unit_config(images, tmp_path / "reference", tiny_checkpoint)
    run_extraction(cfg)
    cluster, client = start_cluster(1)
    first = next(iter(client.scheduler_info()["workers"]))
    (markers / "hold").touch()  # the first worker holds its first unit until the second worker is up
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_extraction, replace(cfg, out=str(tmp_path / "cluster"),
                                                      scheduler=cluster.scheduler_address))
        wait_for(lambda: marked_pids(markers), "the first worker's forward")
        cluster.scale(2)
        client.wait_for_workers(2, timeout=WAIT_S)
        (markers / "hold").unlink()
        result = running.result(timeout=WAIT_S)
    by_worker = {u.worker for u in result.units}
    assert len(result.units) == 5 and by_worker - {first}, f"every unit ran on the first worker: {result.units}"
    assert_same_store(tmp_path / "cluster", tmp_path / "reference")


def test_a_unit_that_kills_its_workers_is_reported_with_its_images_after_its_retries(tmp_path, images,
                                                                                     tiny_checkpoint, start_cluster):
    shutil.copy(images / "astronaut.png", images / "poison.png")  # index 5 of 10: unit 2 (motorcycle.jpg, poison)
    cluster, _ = start_cluster(2)
    cfg = unit_config(images, tmp_path / "cluster", tiny_checkpoint, scheduler=cluster.scheduler_address)
    with pytest.raises(ClusterError) as raised:
        run_extraction(cfg)
    message = str(raised.value)
    assert "1 of 5 unit(s) were given up because 2 workers died while running each" in message, message
    # its images still pending: the poison, and motorcycle.jpg unless its batch was written before the worker died
    assert re.search(r"unit 2 \((motorcycle\.jpg, )?poison\.png\)\. The 4 other units are done and kept",
                     message), message
    status = TeacherStore.open(str(tmp_path / "cluster"), TEACHER).read_status()
    assert status[5] == STATUS_PENDING and (np.delete(status, [4, 5]) != STATUS_PENDING).all()


def test_a_task_error_stops_the_run_naming_the_unit_and_the_fix(tmp_path, images, tiny_checkpoint, start_cluster):
    """Worker processes started as daemons (dask's default) cannot start DataLoader workers: every unit's task
    refuses, is retried, and the run stops with the first one's error."""
    cluster, _ = start_cluster(1, **{"distributed.worker.daemon": True})
    cfg = unit_config(images, tmp_path / "cluster", tiny_checkpoint, num_workers=1, scheduler=cluster.scheduler_address)
    with pytest.raises(ClusterError, match=r"unit \d failed on the cluster after 2 retries: ClusterError: this dask "
                                           r"worker is a daemonic process.*DASK_DISTRIBUTED__WORKER__DAEMON=False"):
        run_extraction(cfg)


CLIENT = f"""
import sys
sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]
import conftest  # registers tiny_test_teacher
from dune_cache.cli import app
app(sys.argv[1:], prog_name="dune-cache")
"""


def client_command(images: Path, out: Path, checkpoint: Path, scheduler: str) -> list[str]:
    return [sys.executable, "-c", CLIENT, "extract", "--teacher", TEACHER, "--checkpoint", str(checkpoint),
            "--images", str(images), "--out", str(out), "--batch-size", "1", "--num-workers", "0",
            "--unit-size", "2", "--no-progress", "--scheduler", scheduler]


def test_a_killed_client_run_again_completes_the_reference_store(tmp_path, images, tiny_checkpoint, markers,
                                                                  start_cluster):
    """The client is SIGKILLed while units run; the units already running finish on their workers (dask cannot stop
    a running task); the client run again waits for them (the units' locks) and does the rest."""
    run_extraction(unit_config(images, tmp_path / "reference", tiny_checkpoint))
    cluster, _ = start_cluster(2)
    out = tmp_path / "cluster"
    command = client_command(images, out, tiny_checkpoint, cluster.scheduler_address)
    (markers / "hold").touch()
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(marked_pids(markers)) == 2 or first.poll() is not None, "both workers' forwards")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
    finally:
        first.kill()
        first.wait()
    pending = TeacherStore.open(str(out), TEACHER).read_status() == STATUS_PENDING
    assert pending.sum() >= 5, "the killed client left no work"  # at most 2 of 5 units were running
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    (markers / "hold").unlink()
    output, _ = again.communicate(timeout=WAIT_S)
    assert again.returncode == 0, output
    assert "[tiny_test_teacher] OK: " in output, output
    assert_same_store(out, tmp_path / "reference")


def test_a_group_started_with_shard_is_finished_by_a_local_cluster(tmp_path, images, tiny_checkpoint, markers):
    """``--scheduler local:2`` starts its own LocalCluster (the tests' teacher preloaded through dask's config); run
    again with ``--overwrite``, the client replaces the group and the workers fill the new one, decoding images in
    DataLoader workers (which dask's non-daemonic workers may start). This process's environment is left as it was
    (the nanny writes OMP_NUM_THREADS=1 into it when it starts a worker)."""
    cfg = unit_config(images, tmp_path / "reference", tiny_checkpoint)
    run_extraction(cfg)
    run_extraction(replace(cfg, out=str(tmp_path / "mixed"), shard="0/2"))  # units 0, 2, 4
    environment = dict(os.environ)
    with dask.config.set(CLUSTER_CONFIG):
        result = run_extraction(replace(cfg, out=str(tmp_path / "mixed"), scheduler="local:2"))
        assert dict(os.environ) == environment
        assert sorted(u.unit for u in result.units) == [1, 3]
        assert_same_store(tmp_path / "mixed", tmp_path / "reference")
        time.sleep(1.1)  # provenance's creation time has seconds: the replaced group is a new one
        created = TeacherStore.open(str(tmp_path / "mixed"), TEACHER).provenance["created"]
        result = run_extraction(replace(cfg, out=str(tmp_path / "mixed"), scheduler="local:2", overwrite=True,
                                        num_workers=1))  # decoded by a DataLoader worker of each dask worker
    assert sorted(u.unit for u in result.units) == [0, 1, 2, 3, 4]  # --overwrite: the client replaced the group
    assert TeacherStore.open(str(tmp_path / "mixed"), TEACHER).provenance["created"] != created
    assert_same_store(tmp_path / "mixed", tmp_path / "reference")


def test_scheduler_and_shard_together_are_refused(tmp_path, images, tiny_checkpoint):
    with pytest.raises(ValueError, match="drop --shard 1/2"):
        run_extraction(unit_config(images, tmp_path / "x", tiny_checkpoint, scheduler="local:2", shard="1/2"))
    assert not (tmp_path / "x").exists()
