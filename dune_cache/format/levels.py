"""Intermediate blocks of a teacher ("levels", ``dune-cache extract --blocks``): names, choice, provenance.

A level is the token output of one transformer block of the teacher, stored next to the final
``cls``/``patch`` as ``levels/b{k}/cls`` ``(N, D)`` and ``levels/b{k}/patch`` ``(N, h, w, D)`` (block ``k``
0-based, relative to the teacher; docs/cache-format.md, "Levels"). ``--blocks sak`` takes SAK's
choice (innovator-zero/SAK ``models/backbones/model_set.py`` ``out_indices_cfg``): four blocks, the
last of each quarter of the depth, ``ceil(i * L / 4) - 1`` for ``i = 1..4`` -- ``[2, 5, 8, 11]`` for
12 blocks, ``[5, 11, 17, 23]`` for 24, ``[7, 15, 23, 31]`` for 32, ``[9, 19, 29, 39]`` for 40 and
``[6, 13, 20, 26]`` for SigLIP-so400m's 27.

Light on purpose (no torch, zarr): the CLI and :mod:`dune_cache.config` parse ``--blocks`` with it.
"""
from __future__ import annotations

LEVELS_GROUP = "levels"
KINDS = ("cls", "patch")


def level_prefix(block: int) -> str:
    """Path of block ``block``'s level subgroup inside a teacher group: ``levels/b{block}``."""
    return f"{LEVELS_GROUP}/b{block}"


def level_name(block: int, kind: str) -> str:
    """Feature array name of ``kind`` (``cls``/``patch``) at block ``block``: ``levels/b{block}/{kind}``."""
    return f"{level_prefix(block)}/{kind}"


def level_names(blocks: tuple[int, ...]) -> list[str]:
    """Every level feature array of ``blocks``, block by block: ``levels/b{k}/cls``, ``levels/b{k}/patch``."""
    return [level_name(k, kind) for k in blocks for kind in KINDS]


def block_of(name: str) -> int | None:
    """The block of a level feature array name (``levels/b5/patch``, ``views/levels/b5/patch`` -> 5), else None."""
    parts = name.split("/")
    if LEVELS_GROUP not in parts:
        return None
    return int(parts[parts.index(LEVELS_GROUP) + 1][1:])


def levels_section(blocks: tuple[int, ...], note: str) -> dict | None:
    """Provenance ``levels`` section (``None`` without blocks): the blocks and what their tokens are."""
    return {"blocks": list(blocks), "tokens": note} if blocks else None
