"""``dune-cache info`` and ``dune-cache verify``: what a cache holds, and whether it is sound."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zarr
import zarr.storage

from ..errors import StoreError
from ..format.constants import STATUS_DONE, STATUS_FAILED, STATUS_PENDING
from ..format.root import teacher_names
from ..format.store import TeacherStore
from ..images.manifest import ImageManifest


@dataclass
class VerifyReport:
    """Problems found in one teacher group; ``ok`` when there are none.

    ``problems`` are the printed lines. The same, structured: ``inconsistent``, group-level problems
    (shapes, dtype, manifest against provenance; not repairable); ``pending``, images not computed yet;
    ``damaged``, each image whose stored data is wrong (a done image whose chunks do not decode or hold
    invalid values, or whose failed status and failure record disagree) -> its problems: the images
    ``dune-cache repair`` re-extracts.
    """

    name: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: dict[int, list[str]] = field(default_factory=dict)
    inconsistent: list[str] = field(default_factory=list)
    pending: int = 0

    def add_damage(self, index: int, problem: str) -> None:
        self.damaged.setdefault(index, []).append(problem)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_provenance(store: TeacherStore, manifest: ImageManifest) -> list[str]:
    """``manifest`` agrees with the recorded provenance (the arrays' shapes, chunks and dtypes were checked when the
    store was opened, :func:`dune_cache.format.checks.check_layout`, and its image count when it was read,
    :meth:`TeacherStore.manifest`)."""
    if manifest.sha256 != store.provenance["images"]["manifest_sha256"]:
        return ["manifest sha256 differs from provenance (manifest altered?)"]
    return []


def failure_record_mismatches(store: TeacherStore, status: np.ndarray) -> list[int]:
    """Sorted images whose failed ``status`` ``(N,)`` and failure records disagree (one without the other)."""
    failed = set(np.flatnonzero(status == STATUS_FAILED).tolist())
    recorded = {r["index"] for r in store.read_failures()}
    return sorted(failed ^ recorded)


def feature_names(store: TeacherStore) -> list[str]:
    """The group's feature arrays: ``cls``, ``patch``, each stored block's ``levels/b{k}/cls|patch`` and, with
    cached views, the same under ``views/`` (:meth:`TeacherStore.feature_names`)."""
    return store.feature_names()


def checked_arrays(store: TeacherStore) -> dict[str, zarr.Array]:
    """Every stored per-image array: each part of the feature arrays (see the group's encoding) and, with
    cached views, the boxes and flips."""
    parts = {name + suffix: array for name in feature_names(store)
             for suffix, array in store.stored_arrays(name).items()}
    views = {f"views/{name}": store.views[name] for name in ("boxes", "flip")} if store.views is not None else {}
    return {**parts, **views}


def checked_reads(store: TeacherStore) -> dict[str, Callable[[slice], np.ndarray]]:
    """What ``verify`` reads per block of rows: each feature array decoded through the group's encoding (a
    chunk never written decodes to NaN), and the views' boxes and flips as stored."""
    reads: dict[str, Callable[[slice], np.ndarray]] = {name: feature_read(store, name) for name in feature_names(store)}
    if store.views is not None:
        reads.update({f"views/{name}": store.views[name].__getitem__ for name in ("boxes", "flip")})
    return reads


def feature_read(store: TeacherStore, name: str) -> Callable[[slice], np.ndarray]:
    """``rows -> float32 (n, ..., D)``: feature array ``name`` decoded as stored (no damage check). The stored parts
    of a local group are read by tensorstore when it is installed: it checks the crc32c of every chunk, inner
    chunks of shards included, at 1/28 of zarr-python's CPU on 1024-image shards (docs/scale.md); zarrs skips
    the crc32c of inner chunks, and remote groups are read by zarr-python."""
    local = isinstance(store.group.store, zarr.storage.LocalStore)
    if not local or importlib.util.find_spec("tensorstore") is None:
        return lambda rows: store.read_features(name, rows, check=False)
    import tensorstore

    group = f"{store.group.store.root}/{store.group.path}"
    parts = {part.suffix: tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                                          "path": f"{group}/{name}{part.suffix}"}},
                                           read=True).result()
             for part in store.encoding_of(name).parts(name)}
    return lambda rows: store.encoding_of(name).decode_numpy(name, {suffix: array[rows].read().result()
                                                                    for suffix, array in parts.items()})


def invalid_rows(values: np.ndarray) -> tuple[np.ndarray, str]:
    """``(n, ...)`` rows -> bool ``(n,)`` of invalid ones and the problem: non-finite floats (a missing chunk
    reads as the NaN fill value), or flip flags other than 0/1 (unwritten ones read as 255)."""
    flat = values.reshape(len(values), -1)
    if np.issubdtype(flat.dtype, np.floating):
        return ~np.isfinite(flat).all(axis=1), "non-finite values (missing chunk or corrupt data)"
    return (flat > 1).any(axis=1), "flags other than 0/1 (missing chunk or corrupt data)"


def checksum_note(exc: Exception) -> str:
    """`` (crc32c checksum mismatch)`` when ``exc`` is a failed crc32c (zarr-python and tensorstore word it
    differently), else nothing."""
    text = str(exc).lower()
    return " (crc32c checksum mismatch)" if any(w in text for w in ("checksum", "crc32c", "digest mismatch")) else ""


def unreadable_or_nonfinite(reads: dict[str, Callable[[slice], np.ndarray]],
                            indices: np.ndarray) -> list[tuple[int, str]]:
    """``[(index, problem)]`` for images among sorted ``indices`` (one block) whose chunks do not decode
    or hold invalid values (:func:`invalid_rows`), in any of the ``reads`` (:func:`checked_reads`)."""
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    wanted = set(indices.tolist())
    problems: list[tuple[int, str]] = []
    for name, read in reads.items():
        try:
            rows = [(lo, read(slice(lo, hi)))]
        except Exception:  # noqa: BLE001 - read image by image to name the broken ones
            rows = []
            for i in indices.tolist():
                try:
                    rows.append((i, read(slice(i, i + 1))))
                except Exception as exc:  # noqa: BLE001
                    problems.append((i, f"{name}: chunk does not decode{checksum_note(exc)}: "
                                        f"{type(exc).__name__}: {exc}"))
        for start, values in rows:
            invalid, problem = invalid_rows(values)
            problems.extend((start + int(k), f"{name}: {problem}")
                            for k in np.flatnonzero(invalid) if start + int(k) in wanted)
    return sorted(problems)


VERIFY_BLOCK = 64  # images per read of verify in a group with one object per image


def verify_block(store: TeacherStore) -> int:
    """Images per verify read: one whole shard (each shard object decoded once), else :data:`VERIFY_BLOCK`."""
    return store.images_per_object if store.images_per_object > 1 else VERIFY_BLOCK


def verify_teacher(store: TeacherStore, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Full check of one teacher group: provenance consistency, every done image decodes and is finite."""
    block = verify_block(store)
    status, manifest = store.read_status(), store.manifest()
    inconsistent = check_provenance(store, manifest)
    report = VerifyReport(name=store.group.basename, problems=list(inconsistent), inconsistent=inconsistent,
                          pending=int((status == STATUS_PENDING).sum()))
    if report.pending:
        report.problems.append(f"incomplete: {report.pending} of {store.count} images pending "
                               "(re-run the same extract command to finish)")
    mismatched = failure_record_mismatches(store, status)
    if mismatched:
        report.problems.append(f"{len(mismatched)} images differ between failed status and failure records")
    for index in mismatched:
        report.add_damage(index, "failed status and failure record disagree")
    done = np.flatnonzero(status == STATUS_DONE)  # sorted
    ids, reads = manifest.ids, checked_reads(store)
    for start in range(0, store.count, block):
        indices = done[np.searchsorted(done, start):np.searchsorted(done, start + block)]
        if len(indices):
            for index, problem in unreadable_or_nonfinite(reads, indices):
                report.problems.append(f"image {index} ({ids[index] if index < len(ids) else '?'}): {problem}")
                report.add_damage(index, problem)
            report.checked += len(indices)
        if progress:
            progress(min(block, store.count - start))
    return report


def verify_cache(root: str, progress_factory=None) -> list[VerifyReport]:
    """Verify every teacher group of a cache; a group whose metadata the store refuses (it does not describe this
    format within its limits) is reported as inconsistent."""
    reports = []
    for name in teacher_names(root):
        bar = None
        try:
            store = TeacherStore.open(root, name)
            bar = progress_factory(name, store.count) if progress_factory else None
            reports.append(verify_teacher(store, progress=bar.update if bar else None))
        except StoreError as exc:  # metadata the store refuses, or a manifest that does not fit the provenance
            reports.append(VerifyReport(name=name, problems=[str(exc)], inconsistent=[str(exc)]))
        finally:
            if bar:
                bar.close()
    if not reports:
        reports.append(VerifyReport(name="<root>", problems=[f"{root}: no teacher groups"]))
    return reports
