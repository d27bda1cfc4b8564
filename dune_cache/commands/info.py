"""``dune-cache info``: what a cache holds, per teacher group (images done/failed/pending, shapes, bytes stored and
the ratio to plain float16, encoding, levels, provenance).
"""
from __future__ import annotations

import numpy as np

from ..format.constants import STATUS_DONE, STATUS_FAILED, STATUS_PENDING
from ..format.levels import level_prefix
from ..format.root import select_teachers
from ..format.store import TeacherStore


def teacher_info(store: TeacherStore) -> dict:
    """Counts, shapes, storage, encoding and provenance of one teacher group. ``raw_bytes``: the done images'
    features (CLS and patch tokens, and cached views) as plain float16; ``compression_ratio`` = raw_bytes /
    bytes_stored (everything the features take, calibration arrays included) whatever the encoding."""
    status = store.read_status()
    done = int((status == STATUS_DONE).sum())
    meta = store.provenance
    tokens_per_image = (1 + int(np.prod(store.patch.shape[1:3]))) * (1 + store.num_views) * (1 + len(store.blocks))
    by_array = store.nbytes_by_array()
    stored = sum(by_array.values())
    raw = done * tokens_per_image * store.dim * 2
    return {
        "images": store.count,
        "done": done,
        "failed": int((status == STATUS_FAILED).sum()),
        "pending": int((status == STATUS_PENDING).sum()),
        "cls_shape": list(store.cls.shape),
        "patch_shape": list(store.patch.shape),
        "views": store.num_views,
        "views_patch_shape": list(store.views["patch"].shape) if store.views is not None else None,
        "dtype": meta["storage"]["dtype"],
        "encoding": store.encoding.to_json(),
        "codec": meta["storage"]["codec"],
        "level": meta["storage"]["level"],
        "shard_images": meta["storage"]["shard_images"],
        "bytes_stored": stored,
        "bytes_per_image": stored / done if done else 0.0,
        "raw_bytes": raw,
        "raw_dtype": "float16",
        "compression_ratio": raw / stored if stored else 0.0,
        "levels": level_bytes(store, by_array),
        "provenance": meta,
    }


def level_bytes(store: TeacherStore, by_array: dict[str, int]) -> dict[str, dict]:
    """Per stored block ``b{k}``: the bytes of its level arrays (cls, patch, their views and its calibration
    arrays) and their ``share`` of the whole group's stored bytes."""
    total = sum(by_array.values())
    levels = {}
    for k in store.blocks:
        size = sum(b for name, b in by_array.items() if f"{level_prefix(k)}/" in name)
        levels[f"b{k}"] = {"block": k, "bytes": size, "share": size / total if total else 0.0}
    return levels


def cache_info(root: str) -> dict[str, dict]:
    """``{teacher group: teacher_info}`` for every teacher group in the cache."""
    return {name: teacher_info(TeacherStore.open(root, name)) for name in select_teachers(root)}
