"""Booby-trapped files for the security tests (docs/security.md): a pickle whose unpickling runs code."""
from __future__ import annotations

from pathlib import Path

import torch


class Trap:
    """Unpickling this object calls ``open(marker, "w")``, creating ``marker``: the code a malicious pickle runs.
    A test passes only if ``marker`` does not exist afterwards (:func:`assert_not_fired`)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def save_trapped(path: Path, marker: Path, contents: dict | None = None, legacy: bool = False) -> Path:
    """``torch.save`` of ``contents`` (default: one tensor) with a :class:`Trap` under ``"trap"``; ``legacy``: the
    pre-zip serialization, whose globals cannot be listed statically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(contents if contents is not None else {"weight": torch.ones(2)}), "trap": Trap(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def assert_not_fired(marker: Path) -> None:
    assert not Path(marker).exists(), f"the trap ran: {marker} was created by unpickling"
