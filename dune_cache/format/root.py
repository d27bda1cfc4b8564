"""A cache root's teacher groups: their names, and the selection a command or reader asks for.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import StoreError
from .constants import ATTR_KEY
from .store import open_root


def teacher_names(root: str) -> list[str]:
    """Names of the teacher groups in a cache root."""
    group = open_root(root, mode="r")
    return sorted(name for name, child in group.groups()
                  if child.attrs.get(ATTR_KEY, {}).get("kind") == "teacher_features")


def select_teachers(root: str, wanted: Sequence[str] | None = None,
                    error: type[StoreError] = StoreError) -> list[str]:
    """The teacher groups ``wanted`` (all of ``root``'s when ``None``); an ``error`` naming the missing ones and
    the available ones, or saying that ``root`` has none."""
    available = teacher_names(root)
    names = list(wanted) if wanted is not None else available
    missing = [name for name in names if name not in available]
    if missing:
        raise error(f"cache {root} has no teacher group {', '.join(map(repr, missing))}; "
                    f"available: {', '.join(available) or '(none)'}")
    if not names:
        raise error(f"{root}: no teacher groups (is this a dune_cache cache?)")
    return names
