"""``dune-cache info`` and ``dune-cache verify``: what a cache holds, and whether it is sound."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zarr

from .images import ImageManifest
from .store import (ATTR_KEY, STATUS_DONE, STATUS_FAILED, STATUS_PENDING, VIEW_ARRAYS, StoreError, TeacherStore,
                    open_root)


def teacher_names(root: str) -> list[str]:
    """Names of the teacher groups in a cache root."""
    group = open_root(root, mode="r")
    return sorted(name for name, child in group.groups()
                  if child.attrs.get(ATTR_KEY, {}).get("kind") == "teacher_features")


def teacher_info(store: TeacherStore) -> dict:
    """Counts, shapes, storage and provenance of one teacher group."""
    status = store.read_status()
    done = int((status == STATUS_DONE).sum())
    meta = store.provenance
    views = [store.views["cls"], store.views["patch"]] if store.views is not None else []
    values = sum(int(np.prod(array.shape[1:])) for array in [store.cls, store.patch, *views])
    per_image = values * store.cls.dtype.itemsize
    stored = store.nbytes_stored()
    raw = done * per_image
    return {
        "images": store.count,
        "done": done,
        "failed": int((status == STATUS_FAILED).sum()),
        "pending": int((status == STATUS_PENDING).sum()),
        "cls_shape": list(store.cls.shape),
        "patch_shape": list(store.patch.shape),
        "views": store.num_views,
        "views_patch_shape": list(store.views["patch"].shape) if store.views is not None else None,
        "dtype": str(store.cls.dtype),
        "codec": meta["storage"]["codec"],
        "level": meta["storage"]["level"],
        "shard_images": meta["storage"]["shard_images"],
        "bytes_stored": stored,
        "bytes_per_image": stored / done if done else 0.0,
        "raw_bytes": raw,
        "compression_ratio": raw / stored if stored else 0.0,
        "provenance": meta,
    }


def cache_info(root: str) -> dict[str, dict]:
    """``{teacher group: teacher_info}`` for every teacher group in the cache."""
    names = teacher_names(root)
    if not names:
        raise StoreError(f"{root}: no teacher groups (is this a dune_cache cache?)")
    return {name: teacher_info(TeacherStore.open(root, name)) for name in names}


@dataclass
class VerifyReport:
    """Problems found in one teacher group; ``ok`` when there are none."""

    name: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_provenance(store: TeacherStore, status: np.ndarray, manifest: ImageManifest) -> list[str]:
    """Array shapes, ``manifest`` and failure records agree with the recorded provenance (``status`` ``(N,)``)."""
    meta, problems = store.provenance, []
    dim = meta["teacher"]["embed_dim"]
    grid = tuple(meta["geometry"]["grid"])
    n = meta["images"]["count"]
    if tuple(store.cls.shape) != (n, dim):
        problems.append(f"cls shape {tuple(store.cls.shape)} != (images {n}, dim {dim}) in provenance")
    if tuple(store.patch.shape) != (n, *grid, dim):
        problems.append(f"patch shape {tuple(store.patch.shape)} != {(n, *grid, dim)} from provenance")
    if str(store.cls.dtype) != meta["storage"]["dtype"] or str(store.patch.dtype) != meta["storage"]["dtype"]:
        problems.append(f"array dtype differs from provenance dtype {meta['storage']['dtype']}")
    if store.views is not None:
        k = store.num_views
        expected = {"cls": (n, k, dim), "patch": (n, k, *grid, dim), "boxes": (n, k, 4), "flip": (n, k)}
        problems.extend(f"views/{name} shape {tuple(store.views[name].shape)} != {shape} from provenance"
                        for name, shape in expected.items() if tuple(store.views[name].shape) != shape)
    if len(manifest) != n:
        problems.append(f"manifest lists {len(manifest)} images, provenance says {n}")
    if manifest.sha256 != meta["images"]["manifest_sha256"]:
        problems.append("manifest sha256 differs from provenance (manifest altered?)")
    failed = set(np.flatnonzero(status == STATUS_FAILED).tolist())
    recorded = {r["index"] for r in store.read_failures()}
    if failed != recorded:
        problems.append(f"{len(failed ^ recorded)} images differ between failed status and failure records")
    pending = int((status == STATUS_PENDING).sum())
    if pending:
        problems.append(f"incomplete: {pending} of {n} images pending (re-run the same extract command to finish)")
    return problems


def checked_arrays(store: TeacherStore) -> dict[str, zarr.Array]:
    """Every per-image array whose rows ``verify`` decodes: features, and cached views with boxes and flips."""
    views = {f"views/{name}": store.views[name] for name in VIEW_ARRAYS} if store.views is not None else {}
    return {"cls": store.cls, "patch": store.patch, **views}


def invalid_rows(values: np.ndarray) -> tuple[np.ndarray, str]:
    """``(n, ...)`` rows -> bool ``(n,)`` of invalid ones and the problem: non-finite floats (a missing chunk
    reads as the NaN fill value), or flip flags other than 0/1 (unwritten ones read as 255)."""
    flat = values.reshape(len(values), -1)
    if np.issubdtype(flat.dtype, np.floating):
        return ~np.isfinite(flat).all(axis=1), "non-finite values (missing chunk or corrupt data)"
    return (flat > 1).any(axis=1), "flags other than 0/1 (missing chunk or corrupt data)"


def unreadable_or_nonfinite(store: TeacherStore, indices: np.ndarray) -> list[tuple[int, str]]:
    """``[(index, problem)]`` for images among sorted ``indices`` (one block) whose chunks do not decode
    or hold invalid values (:func:`invalid_rows`), in any of :func:`checked_arrays`."""
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    wanted = set(indices.tolist())
    problems: list[tuple[int, str]] = []
    for name, array in checked_arrays(store).items():
        try:
            rows = [(lo, array[lo:hi])]
        except Exception:  # noqa: BLE001 - read image by image to name the broken ones
            rows = []
            for i in indices.tolist():
                try:
                    rows.append((i, array[i:i + 1]))
                except Exception as exc:  # noqa: BLE001
                    problems.append((i, f"{name}: chunk does not decode: {type(exc).__name__}: {exc}"))
        for start, values in rows:
            invalid, problem = invalid_rows(values)
            problems.extend((start + int(k), f"{name}: {problem}")
                            for k in np.flatnonzero(invalid) if start + int(k) in wanted)
    return sorted(problems)


def verify_teacher(store: TeacherStore, block: int = 64, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Full check of one teacher group: provenance consistency, every done image decodes and is finite."""
    status, manifest = store.read_status(), store.manifest()
    report = VerifyReport(name=store.group.basename, problems=check_provenance(store, status, manifest))
    done = np.flatnonzero(status == STATUS_DONE)  # sorted
    ids = manifest.ids
    for start in range(0, store.count, block):
        indices = done[np.searchsorted(done, start):np.searchsorted(done, start + block)]
        if len(indices):
            for index, problem in unreadable_or_nonfinite(store, indices):
                report.problems.append(f"image {index} ({ids[index] if index < len(ids) else '?'}): {problem}")
            report.checked += len(indices)
        if progress:
            progress(min(block, store.count - start))
    return report


def verify_cache(root: str, progress_factory=None) -> list[VerifyReport]:
    """Verify every teacher group of a cache."""
    reports = []
    for name in teacher_names(root):
        store = TeacherStore.open(root, name)
        bar = progress_factory(name, store.count) if progress_factory else None
        reports.append(verify_teacher(store, progress=bar.update if bar else None))
        if bar:
            bar.close()
    if not reports:
        reports.append(VerifyReport(name="<root>", problems=[f"{root}: no teacher groups"]))
    return reports

