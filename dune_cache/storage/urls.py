"""Cache locations as strings: a local path or an fsspec URL (``s3://bucket/x.zarr``, ``file:///...``).

Pure string functions (standard library only), so that configurations can check a location without
importing fsspec or zarr; :mod:`dune_cache.storage.location` opens what they name. :func:`redact` (defined with the
console's redaction, :mod:`dune_cache.utils.redaction`) is what a location looks like wherever it is recorded, logged
or put in a message: no user-info, no query values.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from ..utils.redaction import redact_url as redact  # noqa: F401  (re-exported: the one redaction of a location)


def scheme(url: str) -> str:
    """The URL scheme, ``""`` for a plain path (a one-letter scheme is a Windows drive, i.e. a path)."""
    found = urlsplit(str(url)).scheme if "://" in str(url) else ""
    return "" if len(found) == 1 else found.lower()


def is_remote(url: str) -> bool:
    """Whether ``url`` names a non-local filesystem (any scheme other than ``file``)."""
    return scheme(url) not in ("", "file", "local")


def local_path(url: str) -> str | None:
    """The filesystem path of a local path or ``file://`` URL; ``None`` for a remote URL."""
    if is_remote(url):
        return None
    if scheme(url):
        parts = urlsplit(str(url))
        return unquote(parts.netloc + parts.path)
    return os.fspath(url)


def join(url: str, *parts: str) -> str:
    """``url`` extended by path ``parts`` (``/``-separated; empty parts are skipped)."""
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not tail:
        return str(url)
    if scheme(url):
        return f"{str(url).rstrip('/')}/{tail}"
    return os.path.join(os.fspath(url), *tail.split("/"))
