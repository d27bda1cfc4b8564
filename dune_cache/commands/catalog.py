"""``dune-cache ls ROOT``: the caches under a folder or fsspec URL, and what each teacher group holds.

A cache is found by its root group's ``zarr.json`` (attributes ``dune_cache.kind == "cache_root"``),
searching folders down to ``depth`` levels below ``ROOT`` (``ROOT`` itself is level 0); the search
does not enter a cache once found, nor any other zarr array. Each teacher group is then described
from its provenance (including the intermediate blocks it stores, ``extract --blocks``), its ``status``
array and the bytes its objects occupy. Nothing is written.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..encodings import EncodingConfig
from ..errors import StoreError
from ..format.constants import ATTR_KEY, STATUS_DONE, STATUS_FAILED, STATUS_PENDING
from ..format.root import teacher_names
from ..format.store import TeacherStore
from ..storage import location
from ..storage.location import filesystem
from ..storage.urls import join
from ..utils.redaction import redact_text
from ..utils.redaction import redact_url as redact

SHORT_SHA = 12


@dataclass
class GroupEntry:
    """One teacher group: identity, geometry and storage from its provenance; image counts from ``status``;
    ``bytes``: all objects of the group on storage. ``error``: why the group could not be read (then the
    other fields may be empty)."""

    group: str
    teacher: str = ""
    checkpoint: dict | None = None  # {"file", "sha256"}
    images: dict | None = None  # {"count", "manifest_sha256"}
    geometry: dict | None = None  # {"resolution": [H, W], "grid": [h, w], "resize"}
    storage: dict | None = None  # {"dtype", "codec", "level", "shard_images", "encoding" (NAME[:params] or None)}
    blocks: list[int] = field(default_factory=list)  # intermediate blocks stored as levels/b{k} (none: [])
    done: int = 0
    failed: int = 0
    pending: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass
class CacheEntry:
    """One cache root (``path``: its location, the search root joined with the relative folders)."""

    path: str
    groups: list[GroupEntry]


# ---------------------------------------------------------------------------------------
# Finding caches
# ---------------------------------------------------------------------------------------
def zarr_node(fs, path: str) -> dict | None:
    """The parsed ``zarr.json`` of folder ``path``, or ``None`` when it has none (or it is not JSON)."""
    try:
        return json.loads(fs.cat_file(f"{path}/zarr.json"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_cache_root(node: dict | None) -> bool:
    return bool(node) and node.get("attributes", {}).get(ATTR_KEY, {}).get("kind") == "cache_root"


def find_caches(root: str, depth: int = 3) -> list[str]:
    """Locations (``root`` joined with the relative folders, sorted) of the caches at most ``depth`` levels below
    ``root``. Raises :class:`StoreError` when ``root`` does not exist."""
    fs, base = filesystem(root)
    if not fs.exists(base):
        raise StoreError(f"{root}: no such folder or location")
    found: list[str] = []

    def walk(path: str, level: int) -> None:
        node = zarr_node(fs, path)
        if is_cache_root(node):
            found.append(path)
            return
        if level >= depth or (node or {}).get("node_type") == "array":
            return
        for child in fs.ls(path, detail=True):
            if child["type"] == "directory":
                walk(child["name"].rstrip("/"), level + 1)

    walk(base.rstrip("/"), 0)
    relative = sorted(path[len(base.rstrip("/")):].strip("/") for path in found)
    return [join(root, rel) if rel else root for rel in relative]


# ---------------------------------------------------------------------------------------
# Describing them
# ---------------------------------------------------------------------------------------
def describe_group(cache: str, name: str) -> GroupEntry:
    """A :class:`GroupEntry` of teacher group ``name`` of ``cache`` (read-only)."""
    try:
        store = TeacherStore.open(cache, name, mode="r")
    except StoreError as exc:
        return GroupEntry(group=name, error=redact_text(str(exc)))
    meta = store.provenance
    counts = np.bincount(store.read_status(), minlength=3)
    geometry, storage = meta["geometry"], meta["storage"]
    return GroupEntry(
        group=name, teacher=meta["teacher"]["name"],
        checkpoint={"file": meta["checkpoint"]["file"], "sha256": meta["checkpoint"]["sha256"]},
        images={"count": meta["images"]["count"], "manifest_sha256": meta["images"]["manifest_sha256"]},
        geometry={"resolution": geometry["resolution"], "grid": geometry["grid"], "resize": geometry["resize"]},
        storage={"dtype": storage["dtype"], "codec": storage["codec"], "level": storage["level"],
                 "shard_images": storage["shard_images"], "encoding": str(EncodingConfig.from_json(storage["encoding"]))
                 if storage.get("encoding") else None},
        blocks=list(store.blocks),
        done=int(counts[STATUS_DONE]), failed=int(counts[STATUS_FAILED]), pending=int(counts[STATUS_PENDING]),
        bytes=sum(location.object_sizes(store.group.store, store.group.path).values()))


def catalog(root: str, depth: int = 3) -> list[CacheEntry]:
    """Every cache under ``root`` (see :func:`find_caches`) with its teacher groups."""
    return [CacheEntry(path=redact(cache), groups=[describe_group(cache, name) for name in teacher_names(cache)])
            for cache in find_caches(root, depth)]


def catalog_json(entries: list[CacheEntry]) -> list[dict]:
    return [asdict(entry) for entry in entries]


# ---------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------
COLUMNS = ("cache", "group", "teacher", "checkpoint", "images", "geometry", "storage", "levels", "done/failed/pending",
           "size")


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n < 1024:
        return f"{n} B"
    power = min(int(np.log2(n) // 10), 4)
    return f"{n / 1024 ** power:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[power - 1]}"


def group_row(cache: str, g: GroupEntry) -> tuple[str, ...]:
    """Table cells of one group (shortened sha256s; ``resolution -> grid``; levels ``b2,b5,b8,b11`` or ``-``)."""
    if g.error is not None:
        return (cache, g.group, f"unreadable: {g.error}", "", "", "", "", "", "", "")
    res, grid = g.geometry["resolution"], g.geometry["grid"]
    storage = f"{g.storage['dtype']} {g.storage['codec']}" + (f" {g.storage['encoding']}"
                                                               if g.storage["encoding"] else "")
    return (cache, g.group, g.teacher,
            f"{g.checkpoint['file'] or '-'} {g.checkpoint['sha256'][:SHORT_SHA]}",
            f"{g.images['count']} {g.images['manifest_sha256'][:SHORT_SHA]}",
            f"{res[0]}x{res[1]} -> {grid[0]}x{grid[1]} {g.geometry['resize']}", storage,
            ",".join(f"b{k}" for k in g.blocks) or "-", f"{g.done}/{g.failed}/{g.pending}", human_bytes(g.bytes))


def table_lines(entries: list[CacheEntry]) -> list[str]:
    """Aligned text table, one line per teacher group (a cache without groups gets one line of its own)."""
    rows = [row for e in entries
            for row in ([group_row(e.path, g) for g in e.groups] or [(e.path, "(no teacher groups)")])]
    widths = [max(len(row[k]) for row in [COLUMNS, *rows] if k < len(row)) for k in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [COLUMNS, *rows]]
