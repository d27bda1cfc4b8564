"""Which intermediate blocks of a teacher to keep (``dune-cache extract --blocks``): parsing the option, SAK's rule and
a teacher's own named choices.

``--blocks sak`` takes SAK's choice (innovator-zero/SAK ``models/backbones/model_set.py`` ``out_indices_cfg``): four
blocks, the last of each quarter of the depth, ``ceil(i * L / 4) - 1`` for ``i = 1..4`` -- ``[2, 5, 8, 11]`` for 12
blocks, ``[5, 11, 17, 23]`` for 24, ``[7, 15, 23, 31]`` for 32, ``[9, 19, 29, 39]`` for 40 and ``[6, 13, 20, 26]`` for
SigLIP-so400m's 27. How the chosen blocks are named and stored in a group: :mod:`dune_cache.format.levels`.

Light on purpose (no torch, zarr): the CLI and :mod:`dune_cache.config` parse ``--blocks`` with it.
"""
from __future__ import annotations

import math
from typing import Mapping, Union

SAK = "sak"


BlockChoice = Union[str, tuple[int, ...]]  # a name ("sak", or one the teacher defines), or 0-based block indices


def sak_blocks(depth: int) -> tuple[int, ...]:
    """SAK's four blocks for a teacher of ``depth`` blocks: ``ceil(i * depth / 4) - 1``, ``i = 1..4``."""
    if depth < 4:
        raise ValueError(f"--blocks sak takes 4 blocks; the teacher has only {depth}")
    return tuple(math.ceil(i * depth / 4) - 1 for i in range(1, 5))


def parse_blocks(text: str | None) -> BlockChoice:
    """``--blocks`` text -> a choice name (``"sak"``, or one a teacher defines such as Depth Anything V2's ``"dpt"``;
    resolved by :func:`resolve_blocks`) or sorted unique block indices (``""``/``None``: no levels, ``()``)."""
    if text is None or not text.strip():
        return ()
    if text.strip().isidentifier():
        return text.strip().lower()
    try:
        blocks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--blocks {text!r}: expected 'sak', a teacher's own choice name (e.g. 'dpt') or "
                         "comma-separated block indices, e.g. 5,11,17,23") from exc
    check_block_indices(tuple(blocks), None, f"--blocks {text!r}")
    return tuple(sorted(set(blocks)))


def check_block_indices(blocks: tuple[int, ...], depth: int | None, what: str) -> None:
    """Refuse negative indices and, with ``depth``, indices past the teacher's last block."""
    if any(k < 0 for k in blocks):
        raise ValueError(f"{what}: block indices are 0-based and >= 0")
    if depth is not None and any(k >= depth for k in blocks):
        raise ValueError(f"{what}: the teacher has {depth} blocks (indices 0..{depth - 1})")


NO_BLOCKS = "it exposes no transformer blocks (extract it without --blocks)"


def resolve_blocks(choice: BlockChoice, depth: int | None, teacher: str, why_not: str = NO_BLOCKS,
                   named: Mapping[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """``choice`` as sorted block indices of a teacher with ``depth`` blocks (``None``: it has no blocks to
    expose, and asking for any is an error naming the teacher and ``why_not``); ``named``: the teacher's own
    choices by name (e.g. ``{"dpt": (4, 11, 17, 23)}``), besides ``sak``."""
    if not choice:
        return ()
    if depth is None:
        raise ValueError(f"teacher {teacher} does not support --blocks: {why_not}")
    named = named or {}
    if choice == SAK:
        blocks = sak_blocks(depth)
    elif isinstance(choice, str):
        if choice not in named:
            known = ", ".join(sorted({SAK, *named}))
            raise ValueError(f"--blocks {choice!r} is not a block choice of teacher {teacher} (its choices: "
                             f"{known}; or give 0-based block indices, e.g. 5,11,17,23)")
        blocks = tuple(sorted(named[choice]))
    else:
        blocks = tuple(sorted(set(choice)))
    check_block_indices(blocks, depth, f"--blocks for teacher {teacher}")
    return blocks
