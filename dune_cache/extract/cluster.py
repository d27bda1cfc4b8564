"""``dune-cache extract --scheduler``: the work units of an extraction run as tasks on a ``dask.distributed`` cluster,
whose machines may come and go (docs/cluster.md).

The client (this process) opens the teacher group exactly as slot 0 of a ``--shard`` run does (creating it, a lossy
encoding calibrated first), submits one task per unit that has images to do, shows a progress bar while they finish
and checks that every unit is done. A task (:func:`extract_unit`) extracts one unit on a worker through the same
loader, forward, encoding and writer as any other run (:func:`.pipeline.extract_units`), so a unit's features,
failure records and status are written in the writer's order and a sharded unit is written once. Each worker keeps
its opened extraction (the teacher on its device) between tasks (:func:`worker_extraction`).

What happens when things fail is the engine's own doing:

- a worker lost mid-unit (killed, preempted, out of memory): the scheduler runs its tasks again elsewhere; the unit's
  new run resumes from the store, so the store ends as a single process would have made it. A task on a worker that
  died ``distributed.scheduler.allowed-failures`` + 1 times is given up (``KilledWorker``): such units are reported
  with their images at the end, once every other unit finished;
- a task that raises is run again :data:`TASK_RETRIES` times (``Client.submit(retries=...)``), then stops the run;
  images that cannot be decoded are not errors: they are recorded as failed, as in any run;
- a worker that joins takes queued units; the client can be killed and run again: it resumes from the store;
- a unit is extracted while holding a ``distributed.Lock`` named after the group and unit, so a unit is never written
  by two tasks at once (a task still running for a killed client, or one run twice by the scheduler).

Only this module imports dask.distributed, and only when a run asks for a cluster.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import ExtractConfig, parse_scheduler
from ..errors import ClusterError
from ..format.constants import STATUS_PENDING
from ..format.store import TeacherStore
from ..format.unit_state import unit_bounds
from ..storage.urls import is_remote, join
from .pipeline import Extraction, ExtractResult, extract_units, open_extraction
from .units import pending_indices

log = logging.getLogger(__name__)

TASK_RETRIES = 2  # runs again of a unit whose task raised (e.g. a storage hiccup); worker deaths: allowed-failures
KEY_PREFIX = "dune-cache-extract"  # every unit task's key starts so (one dask task group per run)
# what a local cluster (--scheduler local[:N]) is started with: worker processes that may start DataLoader workers
# (dask starts them daemonic by default), and one unit per worker at a time, so that a worker's death counts
# against (allowed-failures) the unit it was running only, not one queued behind it
LOCAL_CLUSTER_CONFIG = {"distributed.worker.daemon": False, "distributed.scheduler.worker-saturation": 1.0}


@dataclass
class UnitResult:
    """What one unit's task did: images extracted and failed, seconds, and where it ran."""

    unit: int
    processed: int
    failed: int
    seconds: float
    worker: str
    pid: int


@dataclass
class ClusterResult(ExtractResult):
    """:class:`ExtractResult` of a cluster run, with each unit's :class:`UnitResult` (completion order)."""

    units: list[UnitResult] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------
def extract_on_cluster(cfg: ExtractConfig) -> ClusterResult:
    """Run the pending units of ``cfg``'s teacher group as tasks on the dask cluster ``cfg.scheduler`` (started here
    for ``local[:N]``) and return once each is done. A :class:`ClusterError` names the units that kept killing
    workers (after the others finished) or the first unit whose task failed after its retries."""
    cfg.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClusterError(f"--scheduler {cfg.scheduler} runs under torchrun (WORLD_SIZE="
                           f"{os.environ['WORLD_SIZE']}): start one client process, without torchrun")
    cfg = task_config(cfg)
    store, device_type = create_group(cfg)
    todo = pending_units(store, cfg.retry_failed)
    created = store.provenance["created"]
    start = time.perf_counter()
    gpus = local_gpus(cfg.scheduler, device_type)
    results, crashed = [], {}
    if todo:  # else nothing to run: no cluster is started or contacted
        with connect(cfg.scheduler, gpus) as client:
            resources = unit_resources(client, cfg.device, gpus)
            futures = submit_units(client, replace(cfg, scheduler=None, overwrite=False), store, todo, created,
                                   resources,
                                   gpu_by_worker_name=gpus > 0 and cfg.device in ("auto", "cuda"))
            results, crashed = gather_units(futures, todo, f"{store.group.basename} [{len(todo)} units]",
                                            cfg.progress)
    seconds = time.perf_counter() - start
    if crashed:
        raise ClusterError(crashed_message(crashed, store, store.manifest().ids, len(results), len(todo)))
    left = pending_units(store, retry_failed=False)
    if left:
        raise ClusterError(f"every task finished but {sum(left.values())} image(s) of units {sorted(left)[:20]} are "
                           f"still pending in {join(cfg.out, store.group.basename)}: run the same command again")
    return ClusterResult(group=store.group.basename, total=store.count, processed=sum(r.processed for r in results),
                         failed=sum(r.failed for r in results), seconds=seconds, units=results)


def task_config(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with local paths absolute (a worker may start in another folder) and no progress bar in the tasks;
    they also run without ``--overwrite`` (the client replaces the group before any task runs)."""
    out = cfg.out if is_remote(cfg.out) else str(Path(cfg.out).resolve())
    checkpoint = None if cfg.checkpoint is None else Path(cfg.checkpoint).resolve()
    return replace(cfg, out=out, images=Path(cfg.images).resolve(), checkpoint=checkpoint, progress=False)


def create_group(cfg: ExtractConfig) -> tuple[TeacherStore, str]:
    """Open (or create, calibrating a lossy encoding, or with ``--overwrite`` replace) ``cfg``'s teacher group as
    slot 0 does; returns it and the type of the device the client resolved (``cpu``, ``cuda``). A client without a
    GPU (a login node) calibrates on its CPU even when the units run on CUDA. The client's teacher is freed: the
    workers load their own."""
    import torch

    device = cfg.device if torch.cuda.is_available() or not cfg.device.startswith("cuda") else "cpu"
    extraction = open_extraction(replace(cfg, scheduler=None, device=device), creator=True)
    return extraction.store, extraction.device.type


def pending_units(store: TeacherStore, retry_failed: bool) -> dict[int, int]:
    """Unit -> images to do (pending ones, and failed ones when ``retry_failed``) of every unit that has some."""
    status = store.read_status()
    per = store.images_per_unit
    counts = np.bincount(pending_indices(status, list(range(store.num_units)), per, retry_failed) // per,
                         minlength=store.num_units)
    return {int(u): int(n) for u, n in enumerate(counts) if n}


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """Restore ``os.environ`` on exit. distributed's nanny writes its pre-spawn variables (``OMP_NUM_THREADS=1``,
    ``MKL_NUM_THREADS=1``, ...) into this process's own environment each time it starts a worker, which would leave
    every process this one starts afterwards single-threaded."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def connect(scheduler: str, gpus: int) -> Iterator:
    """A ``distributed.Client`` of ``scheduler``: ``local[:N]`` starts a ``LocalCluster`` of N single-threaded worker
    processes here for the block (N default: ``gpus``, at least 1; with ``gpus``, each declares ``GPU=1``); an
    address or scheduler file connects to a running cluster."""
    from distributed import Client, LocalCluster

    kind, value = parse_scheduler(scheduler)
    if kind == "address":
        with Client(value) as client:
            yield client
        return
    if kind == "file":
        with Client(scheduler_file=value) as client:
            yield client
        return
    import dask

    with environment_kept(), dask.config.set(LOCAL_CLUSTER_CONFIG), \
            LocalCluster(n_workers=value or max(gpus, 1), processes=True, threads_per_worker=1,
                         dashboard_address=None, resources={"GPU": 1} if gpus else None) as cluster, \
            Client(cluster) as client:
        yield client


def local_gpus(scheduler: str, device_type: str) -> int:
    """GPUs the workers of a local cluster share (worker ``i`` takes ``cuda:(i mod count)``): every visible one when
    ``scheduler`` is ``local[:N]`` and the extraction runs on CUDA, else none."""
    if parse_scheduler(scheduler)[0] != "local" or device_type != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def unit_resources(client, device: str, gpus: int) -> dict | None:
    """``{"GPU": 1}`` when units run on CUDA: on a local cluster with ``gpus``, or on a running cluster with
    ``--device cuda[:k]``, or ``auto`` while a worker declares a ``GPU`` resource (``dask worker --resources GPU=1``),
    so that a GPU runs one unit at a time; else no restriction."""
    if gpus:
        return {"GPU": 1}
    declared = any("GPU" in w.get("resources", {}) for w in client.scheduler_info()["workers"].values())
    gpu = device.startswith("cuda") or (device == "auto" and declared)
    if gpu and not declared:
        log.warning("units run on CUDA and ask for a GPU resource, but no worker of %s declares one yet: they wait "
                    "for workers started with --resources GPU=1 (docs/cluster.md)", client.scheduler.address)
    return {"GPU": 1} if gpu else None


def submit_units(client, cfg: ExtractConfig, store: TeacherStore, todo: dict[int, int], created: str,
                 resources: dict | None, gpu_by_worker_name: bool = False) -> dict:
    """One task per unit of ``todo`` (in unit order, so the scheduler starts the first ones first), each
    :func:`extract_unit` of ``cfg`` with ``resources``: future -> unit."""
    run = uuid.uuid4().hex[:12]
    return {client.submit(extract_unit, cfg, unit, created, gpu_by_worker_name,
                          key=f"{KEY_PREFIX}-{store.group.basename}-{run}-{unit:08d}", pure=False,
                          retries=TASK_RETRIES, resources=resources): unit
            for unit in sorted(todo)}


def gather_units(futures: dict, todo: dict[int, int], desc: str, progress: bool
                 ) -> tuple[list[UnitResult], dict[int, BaseException]]:
    """Wait for the unit tasks, advancing a progress bar by each finished unit's images. Returns the results and the
    units given up after killing workers (``KilledWorker``); any other task error cancels the rest and is raised as a
    :class:`ClusterError` naming the unit."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    results, crashed = [], {}
    waiting = dict(futures)
    bar = tqdm(total=sum(todo.values()), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for future in as_completed(list(waiting)):
            unit = waiting.pop(future)
            outcome = future.result() if future.status == "finished" else future.exception()
            future.release()  # a finished unit's result is not kept on its worker: a worker lost later re-runs nothing
            if isinstance(outcome, UnitResult):
                results.append(outcome)
                bar.update(outcome.processed + outcome.failed)
            elif isinstance(outcome, KilledWorker):
                crashed[unit] = outcome
            else:
                for other in waiting:
                    other.cancel()
                raise ClusterError(f"unit {unit} failed on the cluster after {TASK_RETRIES} retries: "
                                   f"{type(outcome).__name__}: {outcome}") from outcome
    finally:
        bar.close()
    return results, crashed


def crashed_message(crashed: dict[int, BaseException], store: TeacherStore, ids: list[str], done: int,
                    units: int) -> str:
    """One paragraph naming each unit that kept killing workers, with its images (the first 10), and the fix."""
    status = store.read_status(list(crashed))
    lines = []
    for unit in sorted(crashed):
        lo, hi = unit_bounds(unit, store.images_per_unit, store.count)
        pending = [ids[i] for i in range(lo, hi) if status[i] == STATUS_PENDING]
        more = f" and {len(pending) - 10} more" if len(pending) > 10 else ""
        lines.append(f"unit {unit} ({', '.join(pending[:10])}{more})")
    killed = getattr(next(iter(crashed.values())), "allowed_failures", None)
    deaths = f"{killed + 1} workers died" if killed is not None else "workers died"
    return (f"{len(crashed)} of {units} unit(s) were given up because {deaths} while running each "
            f"(distributed.scheduler.allowed-failures): {'; '.join(lines)}. The {done} other units are done and kept. "
            "One of these images kills the process that reads it (a decoder crash, or memory: see the workers' logs); "
            "extract them in one process without --scheduler to see the error, or remove them from the image list.")


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------
_OPENED: dict[tuple, Extraction] = {}  # this worker's extraction (teacher loaded), kept between its tasks
_OPENING = threading.Lock()


def extract_unit(cfg: ExtractConfig, unit: int, created: str, gpu_by_worker_name: bool = False) -> UnitResult:
    """The task: extract work unit ``unit`` of ``cfg``'s group (made at ``created``) on this worker, holding the
    unit's lock. ``gpu_by_worker_name``: a local cluster's worker ``i`` of a machine with ``G`` GPUs uses
    ``cuda:(i mod G)``."""
    from distributed import Lock, get_worker

    worker = get_worker()
    if gpu_by_worker_name:
        import torch

        cfg = replace(cfg, device=f"cuda:{int(worker.name) % torch.cuda.device_count()}")
    extraction = worker_extraction(cfg, created)
    lock = Lock(f"{KEY_PREFIX}:{join(cfg.out, extraction.name)}:{unit}")
    try:
        with lock:
            result = extract_units(extraction, [unit], f"unit {unit}")
    finally:
        callback = getattr(lock, "refresh_callback", None)  # its lease refresher, else kept alive by the loop
        if callback is not None:
            callback.stop()
    return UnitResult(unit=unit, processed=result.processed, failed=result.failed, seconds=result.seconds,
                      worker=worker.address, pid=os.getpid())


def worker_extraction(cfg: ExtractConfig, created: str) -> Extraction:
    """This worker's :class:`Extraction` of ``cfg`` (opened once, kept for later tasks: the teacher is loaded once
    per worker; the checkpoint's sha256 is compared with the group's when it is opened). A group replaced since the
    client submitted (another ``created``) is refused; an extraction of another config is dropped first."""
    key = (repr(cfg), created)
    with _OPENING:
        if key not in _OPENED:
            _OPENED.clear()
            extraction = open_extraction(cfg, creator=False)
            if extraction.store.provenance.get("created") != created:
                raise ClusterError(f"{join(cfg.out, extraction.name)} was replaced (created "
                                   f"{extraction.store.provenance.get('created')}, the client's run has {created}): "
                                   "run the extract command again")
            check_can_decode(extraction.workers)
            extraction.loader_context = loader_context()
            _OPENED[key] = extraction
        return _OPENED[key]


def loader_context() -> str | None:
    """How a worker starts its DataLoader workers: by ``fork`` where the platform has it, as a ``dune-cache extract``
    process on Linux does. dask starts worker processes with ``spawn``, which becomes their default, and a spawned
    decoding process would import torch again and receive the whole manifest pickled, for every unit."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def check_can_decode(workers: int) -> None:
    """Refuse a worker process that cannot start ``workers`` DataLoader workers: dask starts worker processes as
    daemons unless told otherwise, and a daemonic process may not have children."""
    if workers and multiprocessing.current_process().daemon:
        raise ClusterError(f"this dask worker is a daemonic process, which cannot start the {workers} image-decoding "
                           "DataLoader workers: start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False in "
                           "their environment (docs/cluster.md), or pass --num-workers 0")
