"""``pca``: coefficients ``c`` ``(..., r)`` on an orthonormal basis ``(r, D)`` around a mean ``(D,)`` calibrated
once per group: ``x = c·basis + mean``. CLS vectors are stored as ``none``: one CLS per image is at most
``1/(h·w)`` of the bytes, and a calibration set's few CLS vectors cannot estimate a ``D``-dimensional basis."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EncodingError
from .base import Part, Scheme, storage_tensor, token_rows
from .registry import register_scheme


def principal_basis(x: np.ndarray, rank: int, variance: float) -> tuple[dict[str, np.ndarray], dict]:
    """``mean`` ``(D,)`` and ``basis`` ``(r, D)`` float32 (top principal directions of the tokens of ``x``
    ``(n, ..., D)``, each row's largest entry positive): ``rank`` rows, or with ``rank == 0`` the fewest keeping
    ``variance`` of the variance; diagnostics ``rank``, ``variance_kept``."""
    d = x.shape[-1]
    if rank > d:
        raise EncodingError(f"pca rank {rank} exceeds the feature dimension {d}")
    total, outer, count = np.zeros(d), np.zeros((d, d)), 0
    for rows in token_rows(x):
        total, outer, count = total + rows.sum(0), outer + rows.T @ rows, count + len(rows)
    mean = total / count
    eigenvalues, vectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
    eigenvalues, vectors = np.clip(eigenvalues[::-1], 0, None), vectors[:, ::-1]
    kept = np.cumsum(eigenvalues) / max(eigenvalues.sum(), np.finfo(float).tiny)
    r = rank or min(int(np.searchsorted(kept, variance - 1e-12)) + 1, d)
    basis = vectors[:, :r].T
    basis *= np.sign(basis[np.arange(r), np.abs(basis).argmax(1)])[:, None]
    info = {"rank": r, "variance_kept": float(kept[r - 1])}
    return {"basis": basis.astype(np.float32), "mean": mean.astype(np.float32)}, info


def describe_rank(info: dict) -> list[str]:
    return [f"rank {info['rank']} ({100 * info['variance_kept']:.2f}% variance)"] if "rank" in info else []


@register_scheme
class PcaScheme(Scheme):
    """``c = (x − mean) · basisᵀ`` stored in part ``""`` ``(..., r)`` (storage dtype), ``x = c · basis + mean``
    (arrays ``basis`` ``(r, D)`` with orthonormal rows, ``mean`` ``(D,)``, float32)."""

    name = "pca"
    array_keys = ("basis", "mean")
    needs_calibration = True
    cls_scheme = "none"

    @classmethod
    def fit(cls, config, x):
        return principal_basis(x, config.rank, config.variance)

    describe = staticmethod(describe_rank)

    def parts(self) -> tuple[Part, ...]:
        return (Part("", len(self.arrays["basis"]), self.dtype, float("nan")),)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(..., r)``: ``(x − mean) · basisᵀ`` of features ``x`` ``(..., D)``, on their device."""
        k = self.constants(x.device)
        return (x.float() - k["mean"]) @ k["basis"].T

    def encode_tensor(self, x):
        return {"": storage_tensor(self.coefficients(x), self.dtype)}

    def decode(self, parts, device=None):
        c = parts[""].to(device, torch.float32)
        k = self.constants(c.device)
        return (c @ k["basis"]).add_(k["mean"])
