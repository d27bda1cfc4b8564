"""How a reader's requests reach the bytes: per-process backend handles, the chunk cache's local copies, and one
retry (after dropping the kept copies) before a chunk that does not decode is named.

A request is ``(teacher, array, dtype, index)``: array ``<teacher>/<array>`` (e.g. ``patch``, ``patch_scale``,
``views/boxes``) read at ``index`` ``(rows,)`` or ``(rows, views)`` (int64 arrays), values in ``dtype`` (``None``:
the stored dtype). :class:`~dune_cache.read.reader.CacheReader` holds one :class:`ArrayReads`.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ReaderError
from ..storage import location
from ..storage.chunk_cache import ArrayMirror, SpaceLedger, group_directory
from .backends import BACKEND_FACTORIES

log = logging.getLogger(__name__)

Request = tuple[str, str, "torch.dtype | None", tuple]


class ArrayReads:
    """Reads of a cache root's arrays through one backend, and through a local chunk cache for a remote root.

    ``chunk_cache``: the local folder keeping copies of a remote cache's feature chunks (``None``: none); it keeps
    only the rows ``done_masks[teacher]`` marks done (bool ``(N,)``), in a folder named from the group's
    ``provenance``, and at most ``limit`` bytes in all (0: no limit).
    """

    def __init__(self, root: str, backend: str, chunk_cache: str | None, limit: int,
                 done_masks: dict[str, np.ndarray], provenance: dict[str, dict]):
        self.root, self.backend, self.chunk_cache = root, backend, chunk_cache
        self.ledger = SpaceLedger.measured(Path(chunk_cache), limit) if chunk_cache else None
        self.done_masks, self.provenance = done_masks, provenance
        self._handles: tuple[int, Any, dict[str, Any]] | None = None  # (pid, backend, arrays opened so far)

    def for_backend(self, backend: str) -> "ArrayReads":
        """The same reads through ``backend``, with handles of their own (none opened yet)."""
        other = copy.copy(self)
        other.backend, other._handles = backend, None
        return other

    def __getstate__(self) -> dict:
        """Pickles without open handles (spawn/forkserver workers reopen them on first read)."""
        return {**self.__dict__, "_handles": None}

    def _open_here(self) -> tuple[Any, dict[str, Any]]:
        """Backend of this process and the arrays it has opened so far (see :meth:`array`).

        tensorstore aborts and zarrs hangs in a forked child when the parent has opened arrays, so
        nothing is opened before the first read: a reader built in the main process can be
        handed to forked DataLoader workers as long as the main process has not read through it.
        """
        if self._handles is None or self._handles[0] != os.getpid():
            self._handles = (os.getpid(), BACKEND_FACTORIES[self.backend](), {})
        return self._handles[1], self._handles[2]

    def array(self, teacher: str, array: str, dtype: torch.dtype | None = None) -> Any:
        """Handle of ``<teacher>/<array>``, opened on first use; values come out in ``dtype`` (``None``: stored)."""
        io, arrays = self._open_here()
        path = f"{teacher}/{array}"
        if path not in arrays:
            arrays[path] = io.open(location.join(self.root, teacher, array), dtype)
        return arrays[path]

    def mirror(self, teacher: str, array: str, dtype: torch.dtype | None) -> tuple[ArrayMirror, Any] | None:
        """The chunk-cache mirror of ``<teacher>/<array>`` and a handle on it (read with the local decoder), or
        ``None`` without a chunk cache or for arrays it does not keep (see :mod:`dune_cache.storage.chunk_cache`)."""
        if self.chunk_cache is None or self.backend == "memory":
            return None
        io, arrays = self._open_here()
        key = f"{teacher}/{array}@mirror"
        if key not in arrays:
            folder = group_directory(self.chunk_cache, location.join(self.root, teacher), self.provenance[teacher])
            mirror = ArrayMirror.create(location.join(self.root, teacher, array), folder / array,
                                        self.done_masks[teacher], self.ledger)
            arrays[key] = (mirror, io.open(str(mirror.folder), dtype)) if mirror is not None else None
        return arrays[key]

    def read(self, requests: list[Request], image_of: Callable[[str, int], str]) -> list[np.ndarray]:
        """The values of each request. When a chunk does not decode (crc32c mismatch, corrupt or truncated object)
        the chunk-cache copies of the requested rows are dropped and read again once; then a :class:`ReaderError`
        names the teacher, array and image (``image_of(teacher, row)``: the image id of a group's row)."""
        try:
            return self._routed(requests)
        except Exception as exc:  # noqa: BLE001 - located (and maybe fetched again) below
            error = exc
        if self._forget_kept(requests):
            try:
                return self._routed(requests)
            except Exception as exc:  # noqa: BLE001
                error = exc
        located = self._locate_bad_chunk(requests, image_of)
        if located is None:
            raise error
        raise located from error

    def _routed(self, requests: list[Request]) -> list[np.ndarray]:
        """The backend's read of the requests. With a chunk cache, rows it keeps are fetched into it first and read
        from it; the other rows come from the remote store."""
        io, _ = self._open_here()
        reads, routes = [], []  # routes: per request, the bool (B,) rows of each of its reads
        for teacher, array, dtype, index in requests:
            mirrored = self.mirror(teacher, array, dtype)
            kept = mirrored[0].kept(index[0]) if mirrored else np.zeros(len(index[0]), dtype=bool)
            route = []
            if kept.any():
                kept[kept] = mirrored[0].fetch(index[0][kept])  # rows left out: no room in the chunk cache
            if kept.any():
                reads.append((mirrored[1], tuple(part[kept] for part in index)))
                route.append(kept)
            if not kept.all():
                reads.append((self.array(teacher, array, dtype), tuple(part[~kept] for part in index)))
                route.append(~kept)
            routes.append(route)
        values = iter(io.read(reads))
        out = []
        for route in routes:
            parts = [next(values) for _ in route]
            if len(parts) == 1:
                out.append(parts[0])
                continue
            merged = np.empty((len(route[0]), *parts[0].shape[1:]), dtype=parts[0].dtype)
            for rows, value in zip(route, parts):
                merged[rows] = value
            out.append(merged)
        return out

    def _forget_kept(self, requests: list[Request]) -> bool:
        """Drop the chunk-cache copies of every requested row; whether there were any."""
        forgotten = 0
        for teacher, array, dtype, index in requests:
            mirrored = self.mirror(teacher, array, dtype)
            if mirrored:
                forgotten += mirrored[0].forget(index[0][mirrored[0].kept(index[0])])
        if forgotten:
            log.warning("dropped %d chunk(s) from the local chunk cache that did not decode; reading them again",
                        forgotten)
        return forgotten > 0

    def _locate_bad_chunk(self, requests: list[Request], image_of: Callable[[str, int], str]) -> ReaderError | None:
        """Read the requests sample by sample; the error naming the first that fails (``None``: none does)."""
        for teacher, array, dtype, index in requests:
            for j in range(len(index[0])):
                try:
                    self._routed([(teacher, array, dtype, tuple(part[j:j + 1] for part in index))])
                except Exception as exc:  # noqa: BLE001
                    row = int(index[0][j])
                    return ReaderError(
                        f"teacher {teacher}: {array} of image {row} ({image_of(teacher, row)}) cannot be read or "
                        f"does not decode ({type(exc).__name__}: {exc}); a corrupt or truncated chunk is listed by "
                        f"`dune-cache verify {self.root}` and rewritten by `dune-cache repair {self.root}`")
        return None
