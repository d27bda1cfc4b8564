"""What :class:`dune_cache.read.reader.CacheReader` returns, and helpers of its reads.

Both batch types implement ``pin_memory()``: a DataLoader with ``pin_memory=True`` hands them back with every tensor
in page-locked host memory (PyTorch's data docs, "Memory pinning": any other type comes back unpinned), so that
the trainer's ``.to(device, non_blocking=True)`` copies overlap with compute instead of blocking.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils.runtime import pin_fields

FULL_IMAGE = -1  # the view index of the whole image (the group's cls/patch arrays)


@dataclass
class EncodedBatch:
    """Targets of ``B`` samples as stored, before decoding (:meth:`CacheReader.read` with ``decode=False``).

    cls:   teacher -> {part suffix: ``(B, C)``}, patch: teacher -> {part suffix: ``(B, h_t, w_t, C)``}: each
           stored part of the group's encoding (``""``: the array itself; ``C`` the part's last dimension) in
           its stored dtype (``CacheReader.dtype`` for encodings without a decode step), zeros where the mask
           is False. Parts of the patch tokens share the token grid, so a crop cuts them all alike.
    mask:  ``(B, T)`` bool, columns in ``CacheReader.teachers`` order
    indices, views: ``(B,)`` the samples and their views (:meth:`CacheReader.read`'s arguments), so that
           :meth:`CacheReader.decode` can name the image of a damaged target
    level_cls, level_patch: teacher -> block -> {part suffix: ...} like ``cls``/``patch``, of each block the
           group stores (``CacheReader(levels=True)``; empty otherwise)
    """

    cls: dict[str, dict[str, torch.Tensor]]
    patch: dict[str, dict[str, torch.Tensor]]
    mask: torch.Tensor
    indices: np.ndarray | None = None
    views: np.ndarray | None = None
    level_cls: dict[str, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    level_patch: dict[str, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def pin_memory(self) -> "EncodedBatch":
        """This batch with every tensor pinned (the DataLoader's pinning hook)."""
        return pin_fields(self)


@dataclass
class TargetBatch:
    """Targets of ``B`` samples for ``T`` teacher groups.

    cls:   teacher -> ``(B, D_t)`` float32 (``CacheReader.dtype``), zeros where the mask is False
    patch: teacher -> ``(B, h_t, w_t, D_t)`` float32 (``CacheReader.dtype``), zeros where the mask is False
    mask:  ``(B, T)`` bool, columns in ``CacheReader.teachers`` order
    damaged: ``(B, T)`` bool, targets dropped as damaged (``skip_damaged``; their mask is False)
    level_cls: teacher -> block -> ``(B, D_t)``, level_patch: teacher -> block -> ``(B, h_t, w_t, D_t)``: the
           intermediate blocks the group stores (docs/cache-format.md, "Levels"), read with
           ``CacheReader(levels=True)`` (empty otherwise); decoded, damage-checked and masked like cls/patch
    """

    cls: dict[str, torch.Tensor]
    patch: dict[str, torch.Tensor]
    mask: torch.Tensor
    damaged: torch.Tensor | None = None
    level_cls: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    level_patch: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def pin_memory(self) -> "TargetBatch":
        """This batch with every tensor pinned (the DataLoader's pinning hook)."""
        return pin_fields(self)


def split_reads(rows: np.ndarray, views: np.ndarray) -> list[tuple[str, np.ndarray, tuple]]:
    """One group's reads for samples with rows ``(B,)`` in it (-1: absent) and views ``(B,)``: at most
    ``("", selected, (rows,))`` from the whole-image arrays and ``("views/", selected, (rows, views))``
    from the views arrays; ``selected``: bool ``(B,)`` samples each read returns, in order."""
    present = rows >= 0
    whole, viewed = present & (views == FULL_IMAGE), present & (views != FULL_IMAGE)
    reads = [("", whole, (rows[whole],)), ("views/", viewed, (rows[viewed], views[viewed]))]
    return [read for read in reads if read[1].any()]


def unwritten_rows(values: torch.Tensor) -> torch.Tensor:
    """Bool ``(B,)``: rows of decoded targets ``(B, ..., D)`` whose first value is NaN/inf. A chunk that was lost
    or never written decodes to the NaN fill value throughout, and each image (each view) is its own chunk, so
    one value per row finds it at no measurable cost (tools/bench_reader.py); extraction never stores non-finite
    values and crc32c checksums turn altered chunk bytes into read errors."""
    return ~torch.isfinite(values.flatten(1)[:, 0])


def gather_flags(flags: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], np.ndarray]:
    """Bool ``(B,)`` flags, each where its values were decoded (e.g. the GPU), as numpy arrays: stacked and
    copied to the host at once, one device synchronisation per batch instead of one per teacher and kind."""
    if not flags:
        return {}
    stacked = torch.stack(list(flags.values())).cpu().numpy()  # all on the decoding device
    return dict(zip(flags, stacked))
