"""Target standardisation (DUNE: per-channel mean/std per teacher; RADIO's PHI-S; or running EMA statistics as
UNIC keeps them) and the EMA momentum schedule.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dune_cache import TeacherStats  # statistics arrays (D,) / (D, D); duck-typed

from .distill import Tokens

log = logging.getLogger(__name__)


STANDARDIZE_MODES = ("channel", "phis", "ema", "none")


STD_EPS = 1e-6


def ema_momentum(step: int, total_steps: int, start: float = 1.0, end: float = 1e-3) -> float:
    """UNIC's cosine schedule of the statistics' EMA momentum, from ``start`` at step 0 to ``end``."""
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def _as_buffer(values: np.ndarray | None, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    if values is None:
        return torch.full(shape, fill, dtype=torch.float32)
    tensor = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if tensor.shape != shape:
        raise ValueError(f"statistics of shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.clone()


class TeacherStandardizer(nn.Module):
    """Standardisation of one teacher's targets; its statistics are buffers (saved in checkpoints).

    Buffers ``cls_mean``, ``cls_std``, ``patch_mean``, ``patch_std`` ``(D,)``; with ``phis`` also
    ``phis_mean`` ``(D,)`` and ``phis_matrix`` ``(D, D)``; none with ``none``.
    """

    def __init__(self, mode: str, dim: int, stats: TeacherStats | None):
        super().__init__()
        self.mode = mode
        if mode == "none":
            return
        for name in ("cls_mean", "cls_std", "patch_mean", "patch_std"):
            values = getattr(stats, name) if stats is not None else None
            self.register_buffer(name, _as_buffer(values, (dim,), 1.0 if name.endswith("std") else 0.0))
        if mode == "phis":
            self.register_buffer("phis_mean", _as_buffer(stats.phis_mean, (dim,), 0.0))
            self.register_buffer("phis_matrix", _as_buffer(stats.phis_matrix, (dim, dim), 0.0))

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> Tokens:
        """cls ``(B, D)``, patch ``(B, h, w, D)`` -> standardised float32 ``(cls, patch)``."""
        cls, patch = cls.float(), patch.float()
        if self.mode == "none":
            return cls, patch
        cls = (cls - self.cls_mean) / self.cls_std.clamp_min(STD_EPS)
        if self.mode == "phis":
            return cls, (patch - self.phis_mean) @ self.phis_matrix.T
        return cls, (patch - self.patch_mean) / self.patch_std.clamp_min(STD_EPS)

    def inverse(self, cls: torch.Tensor, patch: torch.Tensor) -> Tokens:
        """Undo :meth:`forward`: standardised ``(cls (B, D), patch (B, h, w, D))`` -> teacher space."""
        cls, patch = cls.float(), patch.float()
        if self.mode == "none":
            return cls, patch
        cls = cls * self.cls_std.clamp_min(STD_EPS) + self.cls_mean
        if self.mode == "phis":
            flat = patch.reshape(-1, patch.shape[-1])
            solved = torch.linalg.solve(self.phis_matrix, flat.T).T
            return cls, solved.reshape(patch.shape) + self.phis_mean
        return cls, patch * self.patch_std.clamp_min(STD_EPS) + self.patch_mean

    @torch.no_grad()
    def observe(self, cls: torch.Tensor, patch: torch.Tensor, available: torch.Tensor, momentum: float) -> None:
        """EMA mode: ``stat ← (1 − momentum)·stat + momentum·batch_stat`` over the available samples of the
        global batch: under DDP the batch statistics pool every process's samples (one all-reduce of float64
        sums), so all ranks keep the same statistics and standardise alike.

        cls ``(B, D)``, patch ``(B, h, w, D)``, available ``(B,)`` bool. CLS statistics need at least
        two available samples (otherwise only the patch statistics move). Other modes: no-op. Device operations only
        (the unavailable samples weigh 0, and the "at least two" rule is a ``torch.where``), so no host sync.
        """
        if self.mode != "ema":
            return
        available = available.to(cls.device, non_blocking=True)
        weight = available.double()  # (B,)
        cls = torch.where(available[:, None], cls.double(), 0.0)
        tokens = torch.where(available[:, None, None, None], patch.double(), 0.0).reshape(-1, patch.shape[-1])
        per_image = patch.shape[1] * patch.shape[2]
        sums = torch.cat([weight.sum().reshape(1), weight.sum().reshape(1) * per_image, cls.sum(0),
                          cls.square().sum(0), tokens.sum(0), tokens.square().sum(0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        n_cls, n_tokens = sums[0], sums[1]
        cls_sum, cls_squares, token_sum, token_squares = sums[2:].view(4, -1)
        self._blend("patch", n_tokens, token_sum, token_squares, momentum)
        self._blend("cls", n_cls, cls_sum, cls_squares, momentum)

    def _blend(self, prefix: str, count: torch.Tensor, total: torch.Tensor, squares: torch.Tensor,
               momentum: float) -> None:
        """Move ``<prefix>_mean/std`` toward the mean and unbiased std of ``count`` ``()`` rows with per-channel
        ``total`` and sum of ``squares`` ``(D,)``; left as they are when ``count < 2``."""
        mean, std = getattr(self, f"{prefix}_mean"), getattr(self, f"{prefix}_std")
        enough = count >= 2
        safe = torch.where(enough, count, torch.full_like(count, 2.0))
        batch_mean = total / safe
        batch_var = (squares - safe * batch_mean.square()).clamp_min(0) / (safe - 1)
        mean.copy_(torch.where(enough, mean.lerp(batch_mean.to(mean.dtype), momentum), mean))
        std.copy_(torch.where(enough, std.lerp(batch_var.sqrt().to(std.dtype), momentum), std))


class Standardizer(nn.Module):
    """Target standardisation for every teacher; statistics live in buffers (they land in checkpoints).

    dims: teacher -> D; stats: teacher -> its cache statistics (None when not computed);
    mode: ``channel`` | ``phis`` | ``ema`` | ``none``. A teacher without statistics under ``channel``
    or ``phis`` falls back to ``ema`` (logged). ``modes`` holds each teacher's mode in use.
    """

    def __init__(self, dims: Mapping[str, int], stats: Mapping[str, TeacherStats | None], mode: str = "channel"):
        super().__init__()
        if mode not in STANDARDIZE_MODES:
            raise ValueError(f"unknown standardisation {mode!r}; choose one of {', '.join(STANDARDIZE_MODES)}")
        bad = [t for t in dims if "." in t]
        if bad:
            raise ValueError(f"teacher names {bad} contain '.', which module buffers cannot be named with")
        self.modes: dict[str, str] = {}
        for teacher in dims:
            self.modes[teacher] = mode
            if mode in ("channel", "phis") and stats.get(teacher) is None:
                log.warning("teacher %s: no statistics in the cache (run `dune-cache stats`); "
                            "standardising its targets with running EMA statistics instead of %s", teacher, mode)
                self.modes[teacher] = "ema"
        self.teachers = nn.ModuleDict({
            t: TeacherStandardizer(self.modes[t], dims[t], stats.get(t) if self.modes[t] != "ema" else None)
            for t in dims})

    def standardize(self, teacher: str, cls: torch.Tensor, patch: torch.Tensor) -> Tokens:
        """cls ``(B, D)``, patch ``(B, h, w, D)`` -> standardised float32 ``(cls, patch)``."""
        return self.teachers[teacher](cls, patch)

    def destandardize(self, teacher: str, cls: torch.Tensor, patch: torch.Tensor) -> Tokens:
        """Inverse of :meth:`standardize` (e.g. to read student predictions in teacher space)."""
        return self.teachers[teacher].inverse(cls, patch)

    def observe(self, teacher: str, cls: torch.Tensor, patch: torch.Tensor, available: torch.Tensor,
                momentum: float) -> None:
        """Update a teacher's EMA statistics from a batch (before standardising it); no-op unless ``ema``."""
        self.teachers[teacher].observe(cls, patch, available, momentum)
