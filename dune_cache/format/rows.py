"""Splitting a batch of image rows for writing: runs of consecutive indices, disjoint parts for parallel writers."""
from __future__ import annotations

from concurrent.futures import Executor, wait
from typing import Callable

import numpy as np


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted indices -> ``[(start_index, stop_index, offset_in_input)]`` runs of consecutive values."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def disjoint_parts(keys: np.ndarray, parts: int) -> list[slice]:
    """At most ``parts`` contiguous slices of about equal length covering the sorted object ``keys`` ``(B,)`` of a
    batch's images, cut only where the key changes: no object is in two slices."""
    if len(keys) == 0:
        return []
    candidates = np.flatnonzero(np.diff(keys)) + 1
    targets = [j * len(keys) / parts for j in range(1, parts)]
    cuts = sorted({int(candidates[k]) for k in np.searchsorted(candidates, targets) if k < len(candidates)})
    bounds = [0, *cuts, len(keys)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def run_all(tasks: list[Callable[[], None]], executor: Executor | None) -> None:
    """Run ``tasks``, the first in this thread and the others on ``executor`` (all here without one); return once
    every task has finished, raising the first error."""
    if executor is None or len(tasks) < 2:
        for task in tasks:
            task()
        return
    futures = [executor.submit(task) for task in tasks[1:]]
    try:
        tasks[0]()
    finally:
        wait(futures)
    for future in futures:
        future.result()
