"""sha256 of files, computed once per process for each (path, size, mtime): what provenance records of a checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): a process hashes a checkpoint once (``repair``
    checks it before resuming the extraction that records it)."""
    stat = os.stat(path)
    return hashed_file(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def hashed_file(path: str, size: int, mtime_ns: int, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
