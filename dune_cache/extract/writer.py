"""The extraction's writer: a thread (and optionally a pool) that encodes and stores each batch's features, then its
failure records, then marks its images done, so that compression and I/O overlap with the next forward and every
kill instant leaves a store the next run resumes.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..format.store import STATUS_DONE, STATUS_FAILED, TeacherStore, ViewRows
from ..images.manifest import ImageManifest


class FeatureWriter:
    """Writes batches in order; after each batch's features land, marks its images done/failed. With ``threads``
    > 1, each batch's features are encoded and written by that many threads at once (this one and a pool), each
    owning whole objects (images, or shards); its failure records and status chunks follow once all have landed."""

    def __init__(self, store: TeacherStore, status: np.ndarray, records: list[dict], manifest: ImageManifest,
                 threads: int = 1, max_pending: int = 3, stored: list[dict] | None = None):
        """``status`` ``(N,)``, failure ``records`` and the records ``stored`` (``None``: ``records``): those of the
        units this process owns and alone writes (:meth:`TeacherStore.read_unit_state`)."""
        self.store, self.status, self.manifest, self.threads = store, status, manifest, threads
        self.failures: dict[int, dict[int, dict]] = {}  # unit -> image -> record, as they are to be
        self.stored: dict[int, list[dict]] = {}  # unit -> its records as the store holds them
        for record in records:
            self.failures.setdefault(record["index"] // store.images_per_unit, {})[record["index"]] = record
        for record in records if stored is None else stored:
            self.stored.setdefault(record["index"] // store.images_per_unit, []).append(record)
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
        self.raise_if_failed()
        self.queue.put((indices, cls, patch, views, failures, levels))

    def close(self) -> None:
        """Flush everything submitted, stop the thread, re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.pool is not None:
            self.pool.shutdown()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing to the cache failed: {self.error}") from self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                    self.error = exc

    def _write(self, indices, cls, patch, views, failures, levels) -> None:
        per = self.store.images_per_unit
        if len(indices):
            self.store.write_rows(indices, cls, patch, views, self.pool, self.threads, levels)
            self.status[indices] = STATUS_DONE
        for index, reason, message in failures:
            self.status[index] = STATUS_FAILED
            self.failures.setdefault(index // per, {})[index] = {
                "index": index, "image_id": self.manifest.ids[index], "reason": reason, "message": message}
        touched = {int(i) // per for i in indices} | {i // per for i, _, _ in failures}
        for unit in sorted(touched):
            unit_failures = self.failures.get(unit, {})
            for index in [i for i in unit_failures if self.status[i] == STATUS_DONE]:
                del unit_failures[index]  # a retried image that now succeeded
            records = [unit_failures[i] for i in sorted(unit_failures)]
            self.store.commit_unit(unit, self.status, records, self.stored.get(unit, []))
            self.stored[unit] = records
