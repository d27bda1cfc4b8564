"""Splitting a batch of image rows for writing: runs of consecutive indices, disjoint parts for parallel writers."""
from __future__ import annotations

from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
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


def take_rows(values, rows):
    """Rows ``rows`` (a slice, an index or a bool array) of float rows or of every part of encoded ones."""
    return {suffix: part[rows] for suffix, part in values.items()} if isinstance(values, dict) else values[rows]


def concat_rows(values: list, order: np.ndarray | None = None):
    """Float rows, or encoded parts suffix by suffix, of ``values`` end to end (then in ``order``, if given)."""
    pick = (lambda joined: joined) if order is None else (lambda joined: joined[order])
    if isinstance(values[0], dict):
        return {suffix: pick(np.concatenate([v[suffix] for v in values])) for suffix in values[0]}
    return pick(np.concatenate(values))


def row_count(values) -> int:
    """How many images (or views) float rows or encoded parts hold."""
    return len(next(iter(values.values()))) if isinstance(values, dict) else len(values)


@dataclass
class ViewRows:
    """The K cached views of B images: cls ``(B, K, D)``, patch ``(B, K, h, w, D)`` in the storage dtype (or their
    encoded parts by suffix), boxes ``(B, K, 4)`` float32 ``(y0, x0, y1, x1)`` relative to the original image, flip
    ``(B, K)`` uint8; levels: level feature name (``levels/b{k}/cls|patch``) -> the views' values ``(B, K, ...)`` at
    that block (or their parts)."""

    cls: np.ndarray
    patch: np.ndarray
    boxes: np.ndarray
    flip: np.ndarray
    levels: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, rows: slice | np.ndarray) -> "ViewRows":
        """The views of the images at batch positions ``rows``."""
        return ViewRows(cls=take_rows(self.cls, rows), patch=take_rows(self.patch, rows), boxes=self.boxes[rows],
                        flip=self.flip[rows], levels={name: take_rows(v, rows) for name, v in self.levels.items()})
