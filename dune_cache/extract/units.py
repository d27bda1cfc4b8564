"""Work units of an extraction: which process owns which units, and which of their images are still to do.

A unit is one ``status`` chunk (or one shard); units are dealt round-robin over ``torchrun`` ranks and ``--shard i/n``
machines, so processes never write the same object.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import parse_shard
from ..format.constants import STATUS_FAILED, STATUS_PENDING
from ..format.unit_state import unit_bounds


def worker_slot(shard: str) -> tuple[int, int]:
    """This process's ``(slot, slots)`` over all machines (``--shard``) and ``torchrun`` ranks."""
    i, n = parse_shard(shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return i * world + rank, n * world


def my_units(num_units: int, slot: int, slots: int) -> list[int]:
    """Units dealt round-robin: unit ``u`` belongs to slot ``u % slots``."""
    return list(range(slot, num_units, slots))


def pending_indices(status: np.ndarray, units: list[int], per_unit: int, retry_failed: bool) -> np.ndarray:
    """Indices in ``units`` still to compute (and failed ones when ``retry_failed``), in order."""
    todo = status == STATUS_PENDING
    if retry_failed:
        todo |= status == STATUS_FAILED
    chunks = [np.flatnonzero(todo[lo:hi]) + lo for lo, hi in (unit_bounds(u, per_unit, len(status)) for u in units)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
