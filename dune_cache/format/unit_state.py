"""Which images of a teacher group are done, failed or pending, and why the failed ones failed: the ``status`` array
(one chunk per work unit) and the failure records (``failures/records_<u>``), read and committed consistently at
every instant (docs/reliability.md). :class:`UnitState` is part of :class:`~dune_cache.format.store.TeacherStore`."""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import numpy as np
import zarr
import zarr.codecs

from .checks import MAX_RECORD_BYTES, check_whole_read
from .constants import ATTR_KEY, STATUS_FAILED, STATUS_PENDING

log = logging.getLogger(__name__)


def unit_bounds(unit: int, images_per_unit: int, count: int) -> tuple[int, int]:
    """Image index range ``[lo, hi)`` of a work unit."""
    lo = unit * images_per_unit
    return lo, min(lo + images_per_unit, count)


RECORDS_PREFIX, LEGACY_PREFIX = "records", "unit"  # failures/records_<u> groups; unit_<u> arrays of earlier versions


def failure_key(unit: int) -> str:
    """Name of the failure-record group of ``unit`` under ``<teacher>/failures/``."""
    return f"{RECORDS_PREFIX}_{unit:08d}"


def legacy_failure_key(unit: int) -> str:
    """Name of the failure-record array earlier versions wrote for ``unit`` (read, and removed on rewrite)."""
    return f"{LEGACY_PREFIX}_{unit:08d}"


class UnitState:
    """Status and failure records of a teacher group (``self.group``, ``self.status``, ``self.count``,
    ``self.images_per_unit`` come from :class:`~dune_cache.format.store.TeacherStore`)."""

    def read_status(self, units: Iterable[int] | None = None) -> np.ndarray:
        """Status ``(N,)`` of every image; with ``units``, only those units' chunks are read and the other
        entries are :data:`STATUS_PENDING` (an extraction slot reads only what it owns: other slots may be
        writing the rest)."""
        if units is None:
            return np.asarray(self.status[:], dtype=np.uint8)
        status = np.full(self.count, STATUS_PENDING, dtype=np.uint8)
        spans = [np.arange(*unit_bounds(unit, self.images_per_unit, self.count)) for unit in units]
        if spans:
            owned = np.concatenate(spans)
            status[owned] = self.status.oindex[owned]  # one call: zarr fetches the units' chunks concurrently
        return status

    def read_unit_state(self, units: list[int]) -> tuple[np.ndarray, list[dict], list[dict]]:
        """Status ``(N,)`` (see :meth:`read_status`), failure records of the images of ``units`` marked failed, and
        every record the store holds for them (what :meth:`commit_unit` replaces). Records land before the status
        that marks their images failed and go after the status that stops doing so (:meth:`commit_unit`), so every
        image marked failed has one. A group written by an earlier version (which replaced a unit's record array in
        two steps) may have lost some to a kill: such an image reads as pending and is extracted again (failing
        again, it gets its record back)."""
        status = self.read_status(units)
        stored = self.read_failures(units, stale=True)
        records = [r for r in stored if status[r["index"]] == STATUS_FAILED]
        orphans = np.flatnonzero(status == STATUS_FAILED)
        orphans = orphans[~np.isin(orphans, [r["index"] for r in records])]
        if len(orphans):
            log.warning("%d image(s) of %s were marked failed but their failure records were lost to an interrupted "
                        "write: extracting them again", len(orphans), self.group.path)
            status[orphans] = STATUS_PENDING
        return status, records, stored

    def read_failures(self, units: Iterable[int] | None = None, status: np.ndarray | None = None,
                      stale: bool = False) -> list[dict]:
        """Failure records of every unit (or of ``units`` only) of images marked failed in ``status`` (read when not
        given), sorted by image index: a record of an image not marked failed is one an update has not removed yet,
        and ignored (``stale=True``: every record stored, whatever the status). A unit's records are the attributes
        of its ``records_<unit>`` group; groups written by earlier versions hold them in a ``unit_<unit>`` array
        instead (read when there is no ``records_<unit>``)."""
        wanted = None if units is None else set(units)
        nodes = dict(self.group["failures"].members())  # one listing
        found: dict[int, Any] = {}
        for name, node in nodes.items():
            prefix, _, number = name.partition("_")
            unit = int(number) if number.isdigit() else None
            if unit is None or (wanted is not None and unit not in wanted):
                continue
            if prefix == RECORDS_PREFIX or (prefix == LEGACY_PREFIX and unit not in found):
                found[unit] = node
        records = sorted((r for unit, node in found.items() for r in self.unit_records(node, unit)),
                         key=lambda r: r["index"])
        if stale:
            return records
        status = self.read_status(wanted) if status is None else status
        return [r for r in records if status[r["index"]] == STATUS_FAILED]

    def unit_records(self, node: zarr.Group | zarr.Array, unit: int) -> list[dict]:
        """The records of ``unit`` held by ``node`` (a ``records_<unit>`` group, or an earlier version's
        ``unit_<unit>`` array, whose data reads as none while another process is still writing it), those of images
        outside the unit (a damaged or forged record) left out."""
        where = f"{self.group.path}/failures/{node.basename}"
        if isinstance(node, zarr.Group):
            records = (node.attrs.get(ATTR_KEY) or {}).get("records", [])
        else:
            text = bytes(check_whole_read(node, where, MAX_RECORD_BYTES, kinds="u", ndim=1)[:]).rstrip(b"\0")
            records = [json.loads(line) for line in text.decode("utf-8").splitlines() if line]
        lo, hi = unit_bounds(unit, self.images_per_unit, self.count)
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("index"), int)
                and not isinstance(r["index"], bool) and lo <= r["index"] < hi]

    @property
    def num_units(self) -> int:
        return -(-self.count // self.images_per_unit)

    def write_unit_status(self, unit: int, status: np.ndarray) -> None:
        """Rewrite the status chunk of ``unit`` from the full in-memory ``status`` ``(N,)``."""
        lo, hi = unit_bounds(unit, self.images_per_unit, self.count)
        self.status[lo:hi] = status[lo:hi]

    def commit_unit(self, unit: int, status: np.ndarray, records: list[dict], stored: list[dict]) -> None:
        """Write the status chunk of ``unit`` (from the full in-memory ``status``) and its failure ``records``, which
        replace ``stored`` (what the store holds now), so that at every instant each image marked failed has its
        record: records that come land (with those that stay) before the status, records that go are removed after
        it. Every object write is atomic (zarr's LocalStore renames a temporary file; an object store puts a whole
        object), so a kill between two writes leaves one of these consistent states (docs/reliability.md)."""
        union = {r["index"]: r for r in stored} | {r["index"]: r for r in records}
        before = [union[i] for i in sorted(union)]
        if before != stored:
            self.write_unit_failures(unit, before)
        self.write_unit_status(unit, status)
        if list(records) != before:
            self.write_unit_failures(unit, records)

    def write_unit_failures(self, unit: int, records: Iterable[dict]) -> None:
        """Replace the failure records of ``unit`` in one object write: the attributes of group
        ``failures/records_<unit>`` (created, or its ``zarr.json`` rewritten; removed when there are none). A record
        array an earlier version wrote for the unit is removed afterwards. Use :meth:`commit_unit` to change records
        and status together."""
        key, legacy = failure_key(unit), legacy_failure_key(unit)
        failures = self.group["failures"]
        records = list(records)
        attributes = {ATTR_KEY: {"kind": "failure_records", "unit": unit, "records": records}}
        if records:
            try:
                node = failures[key]
            except KeyError:
                failures.create_group(key, attributes=attributes)
            else:
                node.attrs.put(attributes)
        elif key in failures:
            del failures[key]
        if legacy in failures:
            del failures[legacy]

