"""Epoch sample order the way streaming loaders shuffle: block order, then a shuffle buffer.

Fast loaders (WebDataset, MosaicML Streaming, DALI) do not draw samples uniformly at random from
disk; they shuffle the order of contiguous *blocks* (shards) and pass the resulting stream through
an in-memory *shuffle buffer*. :func:`block_shuffled_order` reproduces that order as an index
permutation, so a reader can fetch whole blocks (one shard, or neighbouring chunks) at a time.
"""
from __future__ import annotations

import numpy as np


def block_stream(n: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` indices: the blocks ``[k·block_size, (k+1)·block_size)`` in random order, each in order."""
    starts = rng.permutation(-(-n // block_size)) * block_size
    stream = (starts[:, None] + np.arange(block_size)[None, :]).ravel()
    return stream[stream < n]


def buffer_shuffle(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Pass ``stream`` ``(n,)`` through a shuffle buffer of ``buffer_size`` slots.

    The buffer is filled with the first ``buffer_size`` items; then each incoming item replaces a
    uniformly chosen slot, whose previous item is emitted; at the end the buffer is emitted in
    random order (WebDataset's ``shuffle(buffer_size)``). Each item then waits a geometric number
    of steps (mean ``buffer_size``) in the buffer.

    Vectorised: the item emitted at step ``t`` is the one put into slot ``slots[t]`` at the last
    earlier step that chose the same slot (or the slot's initial item), so one stable sort of the
    slot choices replays the buffer without a Python loop.
    """
    fill = min(buffer_size, len(stream))
    initial, incoming = stream[:fill], stream[fill:]
    if len(incoming) == 0:
        return initial[rng.permutation(fill)]
    slots = rng.integers(0, fill, size=len(incoming))
    steps = np.argsort(slots, kind="stable")  # steps grouped by slot, in time order within a slot
    grouped = slots[steps]
    first_of_slot = np.r_[True, grouped[1:] != grouped[:-1]]
    last_of_slot = np.r_[first_of_slot[1:], True]
    emitted = np.empty_like(incoming)
    emitted[steps] = np.where(first_of_slot, initial[grouped], incoming[np.roll(steps, 1)])
    final = initial.copy()
    final[grouped[last_of_slot]] = incoming[steps[last_of_slot]]
    return np.concatenate([emitted, final[rng.permutation(fill)]])


def block_shuffled_order(n: int, block_size: int, buffer_size: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation ``(n,)`` of ``range(n)``: shuffled block order, then a shuffle buffer.

    Deterministic in ``(seed, epoch)``; different epochs give different orders. A loader reading
    the result in order touches one block after another (plus the buffer's spread), so it can read
    blocks contiguously; ``block_size=1`` with ``buffer_size >= n`` is a full random permutation.

    Randomness quality (``python tools/bench_reader.py --shuffle-quality --n 1281167``,
    docs/benchmarks.md): the block order removes global order (Spearman ρ between output position
    and storage index ≈ 0.004; consecutive samples as far apart as in a full permutation), but a
    batch stays *local*: with batches of 256 and 64-sample blocks, a 1024-slot buffer yields
    ~56 distinct blocks per batch (full permutation: 254) and, on storage sorted by class
    (1000 classes), 55 classes per batch instead of 226; an 8192-slot buffer 158, a 65536-slot
    buffer 215. When the reader fetches rows on demand (``CacheReader``), the buffer holds only
    indices, so make it large; ``block_size=1, buffer_size>=n`` is a full permutation.
    """
    if n < 0 or block_size < 1 or buffer_size < 1:
        raise ValueError(f"need n >= 0, block_size >= 1, buffer_size >= 1 (got {n}, {block_size}, {buffer_size})")
    rng = np.random.default_rng([seed, epoch])
    return buffer_shuffle(block_stream(n, block_size, rng), buffer_size, rng)
