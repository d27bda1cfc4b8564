"""``lowrank``: each image's own truncated SVD. The ``(h·w, D)`` patch tokens of one image (or view), centred on
their mean ``m``, are factorised as ``U·S·V`` and the top ``image_rank`` = ``k`` factors kept: the token factors
``U·S`` ``(h, w, k)`` as int8 with one step per image and factor, the image's ``V`` ``(k, D)`` (each row times its
step) and ``m`` in the storage dtype. Per-token steps were measured no better on real DINOv2-S features (docs/
benchmarks.md) and would cost 4 bytes and one more chunk read per token grid.
No basis is shared between images, so nothing calibrated can go stale; calibration only records diagnostics.
CLS vectors are stored as ``none`` (one vector per image has no low-rank structure to use)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EncodingError
from .base import INT8_MAX, INT8_MISSING, Part, Scheme, int8_codes, missing_to_nan, to_storage
from .registry import register_scheme

NULL_RATIO = 1e-3  # a factor whose singular value is below this fraction of the image's largest is dropped


def top_directions(centred: np.ndarray, rank: int) -> np.ndarray:
    """Top ``rank`` right singular vectors ``(m, k, D)`` of each centred token matrix of ``centred`` ``(m, T, D)``,
    ``k = min(rank, T, D)``: eigenvectors of the smaller Gram matrix (``D×D`` or ``T×T``), ~20× less CPU than a
    full SVD of a ``(1024, 384)`` matrix."""
    m, t, d = centred.shape
    k = min(rank, t, d)
    if d <= t:
        _, vectors = np.linalg.eigh(centred.transpose(0, 2, 1) @ centred)  # ascending
        return vectors[..., ::-1][..., :k].transpose(0, 2, 1)
    values, vectors = np.linalg.eigh(centred @ centred.transpose(0, 2, 1))
    values, vectors = values[:, ::-1][:, :k], vectors[..., ::-1][..., :k]
    directions = vectors.transpose(0, 2, 1) @ centred  # (m, k, D), norms = singular values
    norms = np.linalg.norm(directions, axis=-1, keepdims=True)
    # directions of the Gram matrix's null space (e.g. T - 1 of T centred tokens) are rounding noise: zero them
    significant = norms > NULL_RATIO * norms.max(axis=1, keepdims=True)
    return np.where(significant, directions / np.where(significant, norms, 1.0), 0.0)


def image_factors(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens ``x`` ``(..., h, w, D)`` -> token factors ``U·S`` ``(..., h, w, k)`` (the centred tokens projected
    on the factors), factors ``V`` ``(..., k, D)`` (orthonormal rows) and token means ``(..., 1, D)`` of each image,
    float32; ``k = rank`` (zero-padded when an image has fewer than ``rank`` tokens or channels)."""
    *lead, h, w, d = x.shape
    tokens = x.reshape(-1, h * w, d).astype(np.float32)
    mean = tokens.mean(axis=1, keepdims=True)
    centred = tokens - mean
    factors = np.zeros((len(tokens), rank, d), np.float32)
    directions = top_directions(centred, rank)
    factors[:, :directions.shape[1]] = directions
    weights = centred @ factors.transpose(0, 2, 1)
    return weights.reshape(*lead, h, w, rank), factors.reshape(*lead, rank, d), mean.reshape(*lead, 1, d)


def factor_codes(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token factors ``(..., h, w, k)`` -> int8 codes (same shape) and each image's step per factor
    ``(..., k)`` = ``max |factor| / 127`` over its tokens (0 for a factor the image does not have)."""
    step = np.abs(weights).max(axis=(-3, -2)) / INT8_MAX
    spread = step[..., None, None, :]
    return int8_codes(np.divide(weights, spread, out=np.zeros_like(weights), where=spread > 0)), step


@register_scheme
class LowRankScheme(Scheme):
    """Parts: ``""`` ``(..., h, w, k)`` int8 codes ``q`` of the token factors ``U·S``, one step per image and
    factor; ``_basis`` ``(..., k + 1, D)`` per image, storage dtype: rows ``0 .. k−1`` the factors ``V`` each
    multiplied by its step, row ``k`` the token mean ``m``. Decode: ``x = q · _basis[:k] + _basis[k]``. A crop of the
    token grid cuts ``""`` and leaves ``_basis`` whole."""

    name = "lowrank"
    needs_calibration = True
    cls_scheme = "none"

    @property
    def rank(self) -> int:
        return self.config.image_rank

    @classmethod
    def fit(cls, config, x):
        """No arrays; diagnostics: the share of each calibration image's token variance its ``k`` factors keep
        (mean and minimum over images)."""
        if x.ndim < 4:
            raise EncodingError(f"lowrank factorises token grids (n, h, w, D); got features of shape {x.shape}")
        tokens = x.reshape(len(x), -1, x.shape[-1]).astype(np.float32)
        energy = np.linalg.svd(tokens - tokens.mean(1, keepdims=True), compute_uv=False) ** 2
        kept = energy[:, :config.image_rank].sum(1) / np.maximum(energy.sum(1), np.finfo(np.float32).tiny)
        return {}, {"rank": config.image_rank, "energy_kept_mean": float(kept.mean()),
                    "energy_kept_min": float(kept.min())}

    @staticmethod
    def describe(info):
        if "energy_kept_mean" not in info:
            return []
        return [f"rank {info['rank']} per image ({100 * info['energy_kept_mean']:.2f}% energy, "
                f"min {100 * info['energy_kept_min']:.2f}%)"]

    def parts(self) -> tuple[Part, ...]:
        return (Part("", self.rank, "int8", INT8_MISSING),
                Part("_basis", self.dim, self.dtype, float("nan"), rows=self.rank + 1))

    def encode(self, x):
        weights, factors, mean = image_factors(x, self.rank)
        codes, step = factor_codes(weights)
        basis = np.concatenate([factors * step[..., None], mean], axis=-2)
        return {"": codes, "_basis": to_storage(basis, self.dtype)}

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        basis = parts["_basis"].to(q.device, torch.float32)
        if basis.shape[-2:] != (self.rank + 1, self.dim) or basis.shape[:-2] != q.shape[:-3]:
            raise EncodingError(f"lowrank part _basis {tuple(basis.shape)} does not match the token factors "
                                f"{tuple(q.shape)}: expected (..., {self.rank + 1}, {self.dim}) per image, uncropped")
        *lead, h, w, k = q.shape
        codes = missing_to_nan(q.float(), q).reshape(*lead, h * w, k)
        return torch.matmul(codes, basis[..., :k, :]).add_(basis[..., k:, :]).reshape(*lead, h, w, self.dim)
