"""The extraction's writer: a thread (and optionally a pool) that encodes and stores each batch's features, then its
failure records, then marks its images done, so that compression and I/O overlap with the next forward and every
kill instant leaves a store the next run resumes.

In a sharded group a work unit is one shard, and zarr-python rewrites a whole shard on every partial write of it
(on object storage, a re-upload): the writer therefore gathers a unit's rows until every image of it this run
extracts has arrived, then writes the unit once (:meth:`TeacherStore.write_unit_block`), and only then its failure
records and status. A unit that already held done images (a resumed run of an older cache, ``--retry-failed``) is
written where its new rows are. A unit still incomplete when the run stops (Ctrl-C, SIGTERM, an error) is not
written: its images stay pending and the next run extracts them again, so that an interrupted run resumes into
exactly the store an uninterrupted one makes (a shard written in parts would hold its failed images' chunks
differently). That costs at most one unit of work per interruption.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import NonFiniteFeaturesError
from ..format.constants import STATUS_DONE, STATUS_FAILED
from ..format.rows import ViewRows, concat_rows, take_rows
from ..format.store import TeacherStore
from ..images.manifest import ImageManifest


@dataclass
class Rows:
    """Rows of some images to write: features of sorted ``indices`` (cls ``(B, D)``, patch ``(B, h, w, D)``, views
    and levels as :meth:`TeacherStore.write_rows` takes them: float rows, or their parts encoded already) and the
    images that failed, ``(index, reason, message)``."""

    indices: np.ndarray
    cls: object
    patch: object
    views: ViewRows | None
    failures: list[tuple[int, str, str]]
    levels: dict[str, object] = field(default_factory=dict)

    def take(self, keep: np.ndarray) -> "Rows":
        """The rows at bool ``keep`` ``(B,)``, and no failures."""
        if self.cls is None:  # a batch whose images all failed
            return Rows(self.indices[keep], None, None, None, [])
        return Rows(self.indices[keep], take_rows(self.cls, keep), take_rows(self.patch, keep),
                    None if self.views is None else self.views.take(keep),
                    [], {name: take_rows(values, keep) for name, values in self.levels.items()})

    @staticmethod
    def concatenate(parts: list["Rows"]) -> "Rows":
        """One :class:`Rows` of ``parts`` (each with features), in index order."""
        with_rows = [p for p in parts if len(p.indices)]
        failures = sorted(f for p in parts for f in p.failures)
        if not with_rows:
            return Rows(np.zeros(0, dtype=np.int64), None, None, None, failures)
        order = np.argsort(np.concatenate([p.indices for p in with_rows]), kind="stable")
        join = lambda values: concat_rows(values, order)  # noqa: E731
        views = None
        if with_rows[0].views is not None:
            first = with_rows[0].views
            views = ViewRows(**{name: join([getattr(p.views, name) for p in with_rows])
                                for name in ("cls", "patch", "boxes", "flip")},
                             levels={name: join([p.views.levels[name] for p in with_rows]) for name in first.levels})
        return Rows(join([p.indices for p in with_rows]), join([p.cls for p in with_rows]),
                    join([p.patch for p in with_rows]), views, failures,
                    {name: join([p.levels[name] for p in with_rows]) for name in with_rows[0].levels})


class FeatureWriter:
    """Writes batches in order; after each batch's (or, in a sharded group, each unit's) features land, marks its
    images done/failed. With ``threads`` > 1, features are encoded and written by that many threads at once (this one
    and a pool), each owning whole objects (images, or shards); failure records and status chunks follow once all
    have landed.

    ``todo``: the images this process will submit, in order (the pending ones of its units). In a sharded group it
    tells when a unit is complete, so that each shard is written once; without it every batch is written as it
    comes (each partial write of a shard rewrites the shard).
    """

    def __init__(self, store: TeacherStore, status: np.ndarray, records: list[dict], manifest: ImageManifest,
                 threads: int = 1, max_pending: int = 3, todo: np.ndarray | None = None,
                 stored: list[dict] | None = None):
        """``status`` ``(N,)``, failure ``records`` and the records ``stored`` (``None``: ``records``): those of the
        units this process owns and alone writes (:meth:`TeacherStore.read_unit_state`)."""
        self.store, self.status, self.manifest, self.threads = store, status, manifest, threads
        self.failures: dict[int, dict[int, dict]] = {}  # unit -> image -> record, as they are to be
        self.stored: dict[int, list[dict]] = {}  # unit -> its records as the store holds them
        for record in records:
            self.failures.setdefault(record["index"] // store.images_per_unit, {})[record["index"]] = record
        for record in records if stored is None else stored:
            self.stored.setdefault(record["index"] // store.images_per_unit, []).append(record)
        per = store.images_per_unit
        gathered = store.images_per_object > 1 and todo is not None
        self.expected: dict[int, int] = ({} if not gathered else
                                         dict(zip(*np.unique(np.asarray(todo) // per, return_counts=True))))
        self.pending: dict[int, list[Rows]] = {}  # unit -> rows gathered so far
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.pool = (ThreadPoolExecutor(threads - 1, thread_name_prefix="dune-cache-writer-pool")
                     if threads > 1 else None)
        self.thread = threading.Thread(target=self._run, name="dune-cache-writer", daemon=True)
        self.thread.start()

    def submit(self, indices: np.ndarray, cls: np.ndarray | None, patch: np.ndarray | None,
               views: ViewRows | None, failures: list[tuple[int, str, str]],
               levels: dict[str, np.ndarray] | None = None) -> None:
        """Queue a batch: features of ``indices`` (``levels``: level name -> ``(B, ...)``, see
        :meth:`TeacherStore.write_rows`) and the images that failed to decode."""
        self.submit_rows(Rows(indices, cls, patch, views, failures, levels or {}))

    def submit_rows(self, rows) -> None:
        """Queue :class:`Rows`, or an object whose ``rows()`` gives them in the writer thread (a batch still on its
        way from the device: :class:`dune_cache.extract.transfer.DeviceRows`)."""
        self.raise_if_failed()
        self.queue.put(rows)

    def close(self) -> None:
        """Write everything submitted but the incomplete units of a sharded group (see the module docstring), stop
        the thread, re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.pool is not None:
            self.pool.shutdown()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Re-raise what stopped the writer: bad features as they are, any other error as a failed write."""
        if isinstance(self.error, NonFiniteFeaturesError):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"writing to the cache failed: {self.error}") from self.error

    def _run(self) -> None:
        while (rows := self.queue.get()) is not None:
            self._guarded(self._take, rows)

    def _guarded(self, work, *args) -> None:
        """``work(*args)`` unless an earlier write failed; its error kept for the main thread."""
        if self.error is None:
            try:
                work(*args)
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                self.error = exc

    def _take(self, rows) -> None:
        """Write a batch, or in a sharded group gather it per unit and write the units it completes."""
        rows = rows if isinstance(rows, Rows) else rows.rows()
        if not self.expected:
            self._write(rows)
            self._commit(rows)
            return
        per = self.store.images_per_unit
        units = rows.indices // per
        failed_units = np.array([index // per for index, _, _ in rows.failures], dtype=np.int64)
        for unit in sorted(set(units.tolist()) | set(failed_units.tolist())):
            part = rows.take(units == unit)
            part.failures = [f for f in rows.failures if f[0] // per == unit]
            self.pending.setdefault(unit, []).append(part)
            arrived = sum(len(p.indices) + len(p.failures) for p in self.pending[unit])
            if arrived >= self.expected.get(unit, 0):
                self._flush(unit)

    def _flush(self, unit: int) -> None:
        """Write the rows gathered for ``unit``: at once when they cover every image of it, else where they are;
        then its failure records and status."""
        rows = Rows.concatenate(self.pending.pop(unit))
        lo, hi = unit * self.store.images_per_unit, min((unit + 1) * self.store.images_per_unit, self.store.count)
        whole = len(rows.indices) and len(rows.indices) + len(rows.failures) == hi - lo
        if whole:
            self.store.write_unit_block(lo, hi, rows.indices, rows.cls, rows.patch, rows.views, self.pool,
                                        rows.levels)
        else:
            self._write(rows)
        self._commit(rows)

    def _write(self, rows: Rows) -> None:
        if len(rows.indices):
            self.store.write_rows(rows.indices, rows.cls, rows.patch, rows.views, self.pool, self.threads,
                                  rows.levels)

    def _commit(self, rows: Rows) -> None:
        """Mark the rows' images done and its failed images failed: per unit touched, the failure records and the
        status chunk in the order :meth:`TeacherStore.commit_unit` keeps consistent (features first, so that a kill
        at any instant leaves no image done without its features, nor failed without its record)."""
        per = self.store.images_per_unit
        self.status[rows.indices] = STATUS_DONE
        for index, reason, message in rows.failures:
            self.status[index] = STATUS_FAILED
            self.failures.setdefault(index // per, {})[index] = {
                "index": index, "image_id": self.manifest.ids[index], "reason": reason, "message": message}
        touched = {int(i) // per for i in rows.indices} | {i // per for i, _, _ in rows.failures}
        for unit in sorted(touched):
            unit_failures = self.failures.get(unit, {})
            for index in [i for i in unit_failures if self.status[i] == STATUS_DONE]:
                del unit_failures[index]  # a retried image that now succeeded
            records = [unit_failures[i] for i in sorted(unit_failures)]
            self.store.commit_unit(unit, self.status, records, self.stored.get(unit, []))
            self.stored[unit] = records
