"""Alignment of a cache's teacher groups by image id: which row of each group holds each sample.

Each teacher group has its own image list (manifest); a sample is an image id, and ``rows[i, t]`` is its row in
group ``t`` (``-1``: the group has no done features for it). Used by :class:`dune_cache.read.reader.CacheReader`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ReaderError
from ..format.constants import STATUS_DONE, STATUS_PENDING
from ..format.root import select_teachers
from ..format.store import TeacherStore


def open_teacher_stores(root: str, teachers: Sequence[str] | None) -> dict[str, TeacherStore]:
    """Read-only stores of the requested teacher groups (all when ``None``)."""
    return {name: TeacherStore.open(root, name, mode="r") for name in select_teachers(root, teachers, ReaderError)}


def done_rows(store: TeacherStore, name: str, allow_partial: bool) -> np.ndarray:
    """Indices of done images of a group; refuses a group with pending images unless ``allow_partial``."""
    status = store.read_status()
    pending = int((status == STATUS_PENDING).sum())
    if pending and not allow_partial:
        raise ReaderError(f"teacher group {name!r} is incomplete: {pending} of {len(status)} images pending "
                          f"(finish the extraction, or pass allow_partial=True to use the done images only)")
    return np.flatnonzero(status == STATUS_DONE)


@dataclass
class Alignment:
    """Union of done image ids over groups; ``rows[i, t]`` = row of sample ``i`` in group ``t`` or -1."""

    image_ids: list[str]
    tags: list[str]
    rows: np.ndarray  # (N, T) int64


def align_groups(groups: list[tuple[list[str], list[str], np.ndarray]]) -> Alignment:
    """Align groups given as ``(manifest ids, manifest tags, done rows)``.

    Samples are ordered by first appearance: the first group's done images in manifest order, then
    images only later groups have. A sample's tag is the first non-empty tag among its groups.
    """
    sample_of: dict[str, int] = {}
    image_ids: list[str] = []
    tags: list[str] = []
    columns = []
    for ids, group_tags, done in groups:
        column = {}
        for row in done.tolist():
            image_id = ids[row]
            sample = sample_of.setdefault(image_id, len(image_ids))
            if sample == len(image_ids):
                image_ids.append(image_id)
                tags.append(group_tags[row])
            elif not tags[sample]:
                tags[sample] = group_tags[row]
            column[sample] = row
        columns.append(column)
    rows = np.full((len(image_ids), len(groups)), -1, dtype=np.int64)
    for t, column in enumerate(columns):
        rows[list(column.keys()), t] = list(column.values())
    return Alignment(image_ids=image_ids, tags=tags, rows=rows)
