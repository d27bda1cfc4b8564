"""Where a cache lives: a local path or any fsspec URL (``s3://bucket/x.zarr``, ``gs://...``, ``file:///...``).

Every open of a cache goes through :func:`open_group` / :func:`open_array` / :func:`open_store`, so
local folders, NFS mounts and object stores behave alike. Credentials and endpoints come the usual
way: the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...; read by s3fs/botocore/gcsfs themselves), fsspec
config files, plus an optional JSON dict in ``DUNE_CACHE_STORAGE_OPTIONS`` passed to fsspec for remote
URLs (e.g. ``{"endpoint_url": "http://minio:9000", "anon": false}``).

Opening for reading never writes. Opening for writing first writes and deletes a tiny probe object,
so a read-only store or missing write permission is a :class:`StoreError` naming the URL before any
work starts (object stores report refusals only when something is written).
"""
from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import CacheNotFoundError, StoreError
from ..utils.redaction import redact_text
from ..utils.redaction import redact_url as redact
from .urls import is_remote, join, local_path, scheme

STORAGE_OPTIONS_ENV = "DUNE_CACHE_STORAGE_OPTIONS"
# Object stores whose fsspec filesystems cache directory listings; a cache changes while it is filled,
# so listings are always fetched fresh (a DUNE_CACHE_STORAGE_OPTIONS value overrides this).
LISTING_CACHE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")
PROBE_KEY = ".dune_cache_write_probe"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: ``{}`` for local paths; for remote URLs fresh directory listings and the
    JSON dict in ``DUNE_CACHE_STORAGE_OPTIONS`` (which wins)."""
    if not is_remote(url):
        return {}
    options: dict[str, Any] = {"use_listings_cache": False} if scheme(url) in LISTING_CACHE_PROTOCOLS else {}
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if text:
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({exc.msg} at character {exc.pos}); expected "
                             f'a dict of fsspec options, e.g. {{"endpoint_url": "http://host:9000"}}') from None
        if not isinstance(extra, dict):
            raise StoreError(f"{STORAGE_OPTIONS_ENV} must be a JSON dict of fsspec options, got a "
                             f"{type(extra).__name__} (its value is not shown: it may hold credentials)")
        options.update(extra)
    return options


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` of ``url`` for listing and sizes (synchronous fsspec API)."""
    return fsspec.core.url_to_fs(local_path(url) or url, **storage_options(url))


def object_sizes(store: Store, prefix: str) -> dict[str, int]:
    """``{key: bytes}`` of every object under ``prefix`` (keys relative to ``store``'s root) from one recursive
    listing: a few paginated LIST requests on object storage, where zarr's ``nbytes_stored`` sends one
    request per object (hours for a bucket of millions of chunks); a directory walk on disk."""
    prefix = prefix.strip("/")
    if isinstance(store, zarr.storage.LocalStore):
        base = os.path.join(str(store.root), prefix)
        return {os.path.relpath(os.path.join(folder, name), str(store.root)).replace(os.sep, "/"):
                os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(base) for name in names}
    if isinstance(store, zarr.storage.FsspecStore):
        root = store.path.rstrip("/")
        found = sync(store.fs._find(f"{root}/{prefix}" if prefix else root, detail=True))
        return {path[len(root):].lstrip("/"): int(info["size"]) for path, info in found.items()
                if info.get("type", "file") != "directory"}
    raise TypeError(f"cannot list {type(store).__name__} (caches open as LocalStore or FsspecStore)")


def open_store(url: str, mode: str = "r") -> Store:
    """The Zarr store rooted at ``url``: a ``LocalStore`` for paths and ``file://`` URLs, else an
    ``FsspecStore``; read-only for ``mode="r"``. Nothing is read or written."""
    read_only = mode == "r"
    path = local_path(url)
    if path is not None:
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)


def check_writable(url: str) -> None:
    """Write and delete a probe object at ``url``; a :class:`StoreError` naming ``url`` when refused."""
    store = open_store(url, mode="a")
    key = PROBE_KEY  # one name for every process: a probe left by a killed process is written and deleted again
    try:
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(b"")))
        sync(store.delete(key))
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else "the write failed"
        raise StoreError(f"cannot write to {redact(url)}: {reason} ({type(exc).__name__}: {redact_text(str(exc))}). "
                         "The store is read-only or these credentials may not write there; reading (info, verify, "
                         "training) still works.") from exc


def _opened(url: str, where: str, opener, mode: str, what: str):
    """Run ``opener()`` on a store rooted at ``url`` (probed for writes unless ``mode="r"``), turning a missing
    node or refused access into a :class:`StoreError` naming ``where``."""
    if mode != "r":
        check_writable(url)
    try:
        return opener()
    except FileNotFoundError as exc:  # includes zarr's GroupNotFoundError / ArrayNotFoundError
        raise CacheNotFoundError(f"no {what} at {redact(where)}") from exc
    except PermissionError as exc:
        raise StoreError(f"permission denied reading {redact(where)} ({redact_text(str(exc))}); check the credentials "
                         f"(environment, fsspec config, {STORAGE_OPTIONS_ENV})") from exc


def open_group(url: str, path: str | None = None, mode: str = "r") -> zarr.Group:
    """The Zarr group at ``url`` (``/path`` inside it). ``mode``: ``r`` read-only (never writes), ``r+``
    existing and writable, ``a`` created if missing, ``w`` replaced. Raises :class:`CacheNotFoundError`
    (nothing there to open) or :class:`StoreError` (write refused, access denied)."""
    where = join(url, path) if path else url
    return _opened(url, where, lambda: zarr.open_group(open_store(url, mode), path=path or "", mode=mode), mode,
                   "group" if path else "cache")


def open_array(url: str, mode: str = "r") -> zarr.Array:
    """The Zarr array at ``url`` (same modes and errors as :func:`open_group`)."""
    return _opened(url, url, lambda: zarr.open_array(store=open_store(url, mode), mode=mode), mode, "array")
