"""Per-teacher target statistics: per-channel mean/std and PHI-S, computed out of core with dask.

PHI-S (RADIO, "PHI-S: Distribution Balancing for Label-Free Multi-Teacher Distillation"):
with ``μ`` the mean of the patch tokens and ``Σ = U diag(e) Uᵀ`` their covariance,
``W = H Uᵀ / sqrt(mean(e))`` where ``H`` is a normalised Hadamard matrix (``H Hᵀ = I``, every
entry ``±1/sqrt(D)``); standardised targets are ``y = (x − μ) Wᵀ``. The rotation ``Uᵀ``
decorrelates, ``H`` spreads every principal component evenly over all channels, and the single
scale makes **every channel's variance exactly 1**. It is not whitening: the covariance of ``y``
is ``H diag(e / mean(e)) Hᵀ`` — unit diagonal, same spectrum shape as ``Σ`` — and the transform is
a scaled rotation (``W Wᵀ = I / mean(e)``), so relative distances between targets are preserved.

Stored in ``<root>/<teacher>/stats/`` (docs/cache-format.md, "Statistics"); written only by
``dune-cache stats``. They are estimated on a sample of at most ``sample`` done images spread evenly over the group
(default :data:`dune_cache.config.STATS_SAMPLE`: per-channel moments and a ``D×D`` covariance from ten thousand images'
tokens are converged), so the cost stops growing with the cache beyond that; ``sample=0`` reads every done image.
"""
from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np

from ..config import STATS_SAMPLE
from ..encodings import calibration_indices
from ..errors import StoreError
from ..format.constants import STATUS_DONE, STATUS_PENDING
from ..format.stats import TeacherStats
from ..format.store import TeacherStore

log = logging.getLogger(__name__)

DEFAULT_BLOCK_IMAGES = 16


# ---------------------------------------------------------------------------------------
# Hadamard matrices
# ---------------------------------------------------------------------------------------
def is_prime(q: int) -> bool:
    return q >= 2 and all(q % k for k in range(2, int(q ** 0.5) + 1))


def jacobsthal(q: int) -> np.ndarray:
    """``(q, q)`` matrix ``Q[i, j] = χ(j − i)``, ``χ`` the quadratic character modulo the prime ``q``."""
    squares = np.zeros(q, dtype=np.int64)
    squares[(np.arange(1, q) ** 2) % q] = 1
    chi = np.where(squares == 1, 1, -1)
    chi[0] = 0
    return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]


def paley_one(q: int) -> np.ndarray:
    """Paley construction I: Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def paley_two(q: int) -> np.ndarray:
    """Paley construction II: Hadamard matrix of order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
    identity = np.eye(q + 1, dtype=np.int64)
    return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(identity, np.array([[1, 1], [1, -1]]))


def paley_core(order: int) -> np.ndarray | None:
    """A Paley Hadamard matrix of exactly ``order``, if one of the two constructions applies."""
    if is_prime(order - 1) and (order - 1) % 4 == 3:
        return paley_one(order - 1)
    if order % 2 == 0 and is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return paley_two(order // 2 - 1)
    return None


def hadamard(d: int) -> np.ndarray:
    """``(d, d)`` ±1 Hadamard matrix (``H Hᵀ = d·I``): Sylvester ``2^k`` ⊗ a Paley core of order
    ``d / 2^k`` (e.g. 384 = 12·32, 768 = 12·64, 1280 = 20·64, 1536 = 12·128)."""
    power = 1
    while d % (power * 2) == 0:
        power *= 2
    for sylvester in (power >> k for k in range(power.bit_length())):
        core = np.ones((1, 1), dtype=np.int64) if d == sylvester else paley_core(d // sylvester)
        if core is not None:
            h = core
            while h.shape[0] < d:
                h = np.block([[h, h], [h, -h]])
            return h
    raise ValueError(f"no Hadamard construction for dimension {d} (Sylvester ⊗ Paley I/II)")


def phis_transform(covariance: np.ndarray) -> np.ndarray:
    """PHI-S matrix ``W = H Uᵀ / sqrt(mean(e))`` ``(D, D)`` of a covariance ``(D, D)``."""
    eigenvalues, vectors = np.linalg.eigh(covariance)
    mean_eigenvalue = float(np.clip(eigenvalues, 0, None).mean())
    if mean_eigenvalue <= 0:
        raise StoreError("PHI-S: the patch features have zero variance")
    d = len(covariance)
    return hadamard(d) / np.sqrt(d) @ vectors.T / np.sqrt(mean_eigenvalue)


# ---------------------------------------------------------------------------------------
# Out-of-core moments
# ---------------------------------------------------------------------------------------
def sampled_rows(store: TeacherStore, name: str, images: np.ndarray, block_images: int) -> da.Array:
    """Feature array ``name`` (``cls``/``patch``) of the images ``images`` (sorted indices of done images) decoded
    through the group's encoding, as float64 dask rows ``(n, ..., D)`` in blocks of ``block_images``."""
    tail = (*store.group[name].shape[1:-1], store.dim)
    rows = da.from_array(images, chunks=block_images)
    return rows.map_blocks(lambda block: store.read_features(name, block).astype(np.float64), dtype=np.float64,
                           new_axis=list(range(1, 1 + len(tail))), chunks=(rows.chunks[0], *((s,) for s in tail)))


def compute_stats(root: str, teacher: str, block_images: int = DEFAULT_BLOCK_IMAGES,
                  sample: int = STATS_SAMPLE) -> TeacherStats:
    """Statistics of ``teacher`` over at most ``sample`` of its done images spread evenly over them (0: all),
    reading ``block_images`` images at a time (dask, one pass; sums and sums of outer products in float64)."""
    store = TeacherStore.open(root, teacher, mode="r")
    status = store.read_status()
    done = status == STATUS_DONE
    count = int(done.sum())
    if count == 0:
        raise StoreError(f"teacher group {teacher!r} has no done images")
    if (status == STATUS_PENDING).any():
        log.warning("%s: %d images pending; statistics cover the %d done ones",
                    teacher, int((status == STATUS_PENDING).sum()), count)
    dim = store.dim
    images = np.flatnonzero(done)
    if sample and len(images) > sample:
        images = images[calibration_indices(len(images), sample)]
        log.info("%s: statistics on %d of its %d done images, spread evenly (--sample)", teacher, len(images), count)
    done_count, count = count, len(images)
    cls = sampled_rows(store, "cls", images, block_images)
    tokens = sampled_rows(store, "patch", images, block_images).reshape(-1, dim)
    n_tokens = count * int(np.prod(store.patch.shape[1:3]))
    cls_sum, cls_sq, tok_sum, tok_sq, tok_outer = dask.compute(
        cls.sum(0), (cls ** 2).sum(0), tokens.sum(0), (tokens ** 2).sum(0), tokens.T @ tokens)
    cls_mean, patch_mean = cls_sum / count, tok_sum / n_tokens
    covariance = tok_outer / n_tokens - np.outer(patch_mean, patch_mean)
    return TeacherStats(
        cls_mean=cls_mean, cls_std=np.sqrt(np.clip(cls_sq / count - cls_mean ** 2, 0, None)),
        patch_mean=patch_mean, patch_std=np.sqrt(np.clip(tok_sq / n_tokens - patch_mean ** 2, 0, None)),
        phis_mean=patch_mean, phis_matrix=phis_transform(covariance), count=count, done=done_count)
