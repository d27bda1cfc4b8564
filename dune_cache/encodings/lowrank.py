"""``lowrank``: each image's own truncated SVD. The ``(h·w, D)`` patch tokens of one image (or view), centred on
their mean ``m``, are factorised as ``U·S·V`` and the top ``image_rank`` = ``k`` factors kept: the token factors
``U·S`` ``(h, w, k)`` as int8 with one step per image and factor, the image's ``V`` ``(k, D)`` (each row times its
step) and ``m`` in the storage dtype, or with ``basis=int8`` those ``V`` rows as int8 with one step per row (the
factors' step folded in) and ``m`` in the storage dtype. Per-token steps were measured no better on real DINOv2-S
features (docs/benchmarks.md) and would cost 4 bytes and one more chunk read per token grid.
No basis is shared between images, so nothing calibrated can go stale; calibration only records diagnostics.
CLS vectors are stored as ``none`` (one vector per image has no low-rank structure to use)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EncodingError
from .base import (
    INT8_MAX,
    INT8_MISSING,
    Part,
    Scheme,
    divided,
    int8_codes,
    missing_to_nan,
    per_token_absmax_codes,
    storage_tensor,
)
from .registry import register_scheme

NULL_RATIO = 1e-3  # a factor whose singular value is below this fraction of the image's largest is dropped


# A Gram matrix this small (the image's fewer tokens or channels) is eigendecomposed exactly: LAPACK's eigh on the CPU
# beats the randomized finder up to ~512 (a DINOv2-S image at 448: 384 channels); a GPU's batched eigh of anything
# but small matrices is slow (one solver call per image), so there the matmul-only finder takes over sooner.
EXACT_UP_TO = {"cpu": 512, "cuda": 128}
OVERSAMPLE, POWER_ITERATIONS = 16, 3  # of the randomized range finder on larger images (Halko et al. 2011)


def top_directions(centred: torch.Tensor, rank: int) -> torch.Tensor:
    """Top ``rank`` right singular vectors ``(m, k, D)`` of each centred token matrix of ``centred`` ``(m, T, D)``
    float64, ``k = min(rank, T, D)``, rows orthonormal (directions an image does not have: zero).

    When ``min(T, D) <= EXACT_UP_TO`` (per device type): eigenvectors of the smaller Gram matrix (``D×D`` or
    ``T×T``). Larger images
    (a ViT-L at 448 px: 1024 tokens × 1024 channels) would need a 1024² eigendecomposition each, ~370 ms of CPU or a
    slow unbatched solver on a GPU; there a randomized range finder (Halko, Martinsson & Tropp, "Finding structure
    with randomness", SIAM Review 2011, Alg. 4.4: ``rank + 16`` fixed-seed probes, 3 power iterations) finds the top
    subspace with a few matmuls, and the exact small problem inside it gives the directions. ViT tokens' singular
    values decay fast, so the subspace is the truncated SVD's to within rounding (docs/benchmarks.md, "lowrank on
    the extraction device")."""
    m, t, d = centred.shape
    k = min(rank, t, d)
    if min(t, d) <= EXACT_UP_TO.get(centred.device.type, EXACT_UP_TO["cuda"]):
        return gram_directions(centred, k)
    probes = min(k + OVERSAMPLE, t, d)
    generator = torch.Generator(device=centred.device).manual_seed(0)
    omega = torch.randn(d, probes, generator=generator, device=centred.device, dtype=centred.dtype)
    basis = torch.linalg.qr(centred @ omega).Q  # (m, T, probes): the range of the tokens
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(centred @ torch.linalg.qr(centred.transpose(1, 2) @ basis).Q).Q
    small = basis.transpose(1, 2) @ centred  # (m, probes, D): the tokens in that range
    return gram_directions(small, k)


def gram_directions(centred: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``k`` right singular vectors ``(m, k, D)`` of each ``(m, T, D)`` matrix from the eigenvectors of its
    smaller Gram matrix (``D×D`` or ``T×T``; a batched ``eigh``)."""
    _, t, d = centred.shape
    if d <= t:
        _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)  # ascending
        return vectors.flip(-1)[..., :k].transpose(1, 2)
    _, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
    directions = vectors.flip(-1)[..., :k].transpose(1, 2) @ centred  # (m, k, D), norms = singular values
    norms = directions.norm(dim=-1, keepdim=True)
    # directions of the Gram matrix's null space (e.g. T - 1 of T centred tokens) are rounding noise: zero them
    significant = norms > NULL_RATIO * norms.amax(dim=1, keepdim=True)
    return torch.where(significant, directions / torch.where(significant, norms, torch.ones_like(norms)), 0.0)


def image_factors(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``x`` ``(..., h, w, D)`` -> token factors ``U·S`` ``(..., h, w, k)`` (the centred tokens projected
    on the factors), factors ``V`` ``(..., k, D)`` (orthonormal rows) and token means ``(..., 1, D)`` of each image,
    float32 on ``x``'s device; ``k = rank`` (zero-padded when an image has fewer than ``rank`` tokens or channels).
    Means and factors are computed in float64, so that they do not depend on the tokens' order (a flipped view's
    factors and mean, stored rounded, are its image's) beyond rounding."""
    *lead, h, w, d = x.shape
    tokens = x.reshape(-1, h * w, d).double()
    mean = tokens.mean(dim=1, keepdim=True)
    centred = tokens - mean
    factors = torch.zeros(len(tokens), rank, d, device=x.device, dtype=torch.float64)
    directions = top_directions(centred, rank)
    factors[:, :directions.shape[1]] = directions
    weights = (centred @ factors.transpose(1, 2)).float()
    return (weights.reshape(*lead, h, w, rank), factors.float().reshape(*lead, rank, d),
            mean.float().reshape(*lead, 1, d))


def factor_codes(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token factors ``(..., h, w, k)`` -> int8 codes (same shape) and each image's step per factor
    ``(..., k)`` = ``max |factor| / 127`` over its tokens (0 for a factor the image does not have)."""
    step = weights.abs().amax(dim=(-3, -2)) / INT8_MAX
    return int8_codes(divided(weights, step[..., None, None, :])), step


@register_scheme
class LowRankScheme(Scheme):
    """Parts: ``""`` ``(..., h, w, k)`` int8 codes ``q`` of the token factors ``U·S``, one step per image and
    factor, and per image, with ``basis=float`` (default): ``_basis`` ``(..., k + 1, D)`` storage dtype, rows
    ``0 .. k−1`` the factors ``V`` each multiplied by its step, row ``k`` the token mean ``m``; decode
    ``x = q · _basis[:k] + _basis[k]``. With ``basis=int8``: ``_basis`` ``(..., k, D)`` int8 codes of those same
    rows, one step per row in ``_basis_step`` ``(..., k, 1)`` float32, and ``_mean`` ``(..., 1, D)`` storage
    dtype; decode ``x = q · (_basis · _basis_step) + _mean``. Either way one matmul per image, and a crop of the
    token grid cuts ``""`` and leaves the per-image parts whole."""

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
        codes = Part("", self.rank, "int8", INT8_MISSING)
        if self.config.basis == "float":
            return codes, Part("_basis", self.dim, self.dtype, float("nan"), rows=self.rank + 1)
        return (codes, Part("_basis", self.dim, "int8", INT8_MISSING, rows=self.rank),
                Part("_basis_step", 1, "float32", float("nan"), rows=self.rank),
                Part("_mean", self.dim, self.dtype, float("nan"), rows=1))

    def encode_tensor(self, x):
        weights, factors, mean = image_factors(x, self.rank)
        codes, step = factor_codes(weights)
        rows = factors * step[..., None]  # each factor V_j times its step: q · rows = the token factors' part
        if self.config.basis == "float":
            return {"": codes, "_basis": storage_tensor(torch.cat([rows, mean], dim=-2), self.dtype)}
        row_codes, row_step = per_token_absmax_codes(rows)  # one step per row: max |row| / 127
        return {"": codes, "_basis": row_codes, "_basis_step": row_step, "_mean": storage_tensor(mean, self.dtype)}

    def rows_and_mean(self, parts: dict[str, torch.Tensor], factors: tuple[int, ...], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``(..., k, D)`` rows (NaN where a part's chunk was never written) and ``(..., 1, D)`` token
        mean of each image, on ``device``, after checking that every per-image part is ``(..., rows, last)`` with
        the leading axes of the token factors' shape ``factors`` ``(..., h, w, k)``."""
        for part in self.parts()[1:]:
            shape = tuple(parts[part.suffix].shape)
            if shape[-2:] != (part.rows, part.last) or shape[:-2] != factors[:-3]:
                raise EncodingError(f"lowrank part {part.suffix} {shape} does not match the token factors {factors}: "
                                    f"expected (..., {part.rows}, {part.last}) per image, uncropped")
        if self.config.basis == "float":
            basis = parts["_basis"].to(device, torch.float32)
            return basis[..., :self.rank, :], basis[..., self.rank:, :]
        codes = parts["_basis"].to(device)
        rows = missing_to_nan(codes.float(), codes).mul_(parts["_basis_step"].to(device, torch.float32))
        return rows, parts["_mean"].to(device, torch.float32)

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        *lead, h, w, k = q.shape
        rows, mean = self.rows_and_mean(parts, tuple(q.shape), q.device)
        codes = missing_to_nan(q.float(), q).reshape(*lead, h * w, k)
        return torch.matmul(codes, rows).add_(mean).reshape(*lead, h, w, self.dim)
