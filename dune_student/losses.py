"""Distillation losses, teacher dropping, data sharing and target standardisation.

Loss (DUNE/UNIC, NOTES §1): per teacher and token type ``0.5·(1 − cos) + 0.5·SmoothL1(β=1)``
(SmoothL1 averaged over channels; SAK's ``0.9·(1 − cos of the whole map) + 0.1·SmoothL1`` with other
:class:`LossTerms`), in fp32, patch losses averaged over tokens, then CLS and patch
averaged. A teacher without a real CLS token (``cls_source == "mean_patch"``, e.g. MASt3R) is
distilled on patches only when its ``use_cls`` flag is false, as in DUNE; a class token or an attention-pool
output (``"attn_pool"``, SigLIP2) is distilled.

Teacher dropping ``lowest_loss`` (UNIC ``modeling/teacher_dropping.py``, DUNE
``TeacherDropping``): per image, the available teacher with the highest loss is always kept and
every other available teacher is dropped with probability ``p``. The kept (image, teacher) pairs
``K`` then all get the same weight ``1/|K|``, so the batch loss is the mean over kept pairs —
exactly what both repositories do (``coeffs / coeffs.sum()``; their comment "each image
contributes with equal weight" does not match their code: an image with two kept teachers weighs
twice an image with one). Unlike them, an image left without any teacher (no target, or excluded by
the data-sharing mode) is not an error here: it gets weight 0.

Data sharing (DUNE ``own_data`` / ``own+generic_data``): an image whose manifest tag equals a
teacher group's name is that teacher's *own* data. In DUNE the generic data is DINOv2's training
data and supervises every teacher in ``own+generic`` while 3D/human images supervise only their
own teacher. Here an image is generic when its tag is ``generic_tag`` or empty (untagged);
``generic_tag`` may also be a teacher group's name, which reproduces DUNE exactly (those images
are that teacher's own data under ``own_data`` and everybody's under ``own+generic``).

Standardisation: per-channel mean/std from the cache's statistics (``channel``), PHI-S on patch
tokens (``phis``, RADIO; CLS tokens keep the per-channel scheme since the cache holds PHI-S only for
patches), ``none``, or ``ema``: UNIC's running per-channel mean/std updated from the batches
(the fallback for a teacher whose cache has no statistics), pooled over every DDP rank.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dune_cache.stats import TeacherStats  # statistics arrays (D,) / (D, D); duck-typed

log = logging.getLogger(__name__)

Tokens = tuple[torch.Tensor, torch.Tensor]  # (cls (B, D), patch (B, h, w, D))
SHARING_MODES = ("all", "own_data", "own+generic")
STANDARDIZE_MODES = ("channel", "phis", "ema", "none")
STD_EPS = 1e-6


@dataclass(frozen=True)
class LossTerms:
    """Weights of the two terms of the distillation loss and where the cosine is taken.

    cosine_over: ``token`` (DUNE/UNIC: cosine of each token, averaged) or ``map`` (SAK, Theia: one cosine of the
    whole flattened map per sample). Defaults: DUNE's ``0.5·(1 − cos) + 0.5·SmoothL1``;
    :func:`dune_student.config.loss_terms` resolves them from a config (SAK: 0.9 / 0.1 over the map).
    """

    cos_weight: float = 0.5
    smooth_l1_weight: float = 0.5
    cosine_over: str = "token"


DUNE_TERMS = LossTerms()


def token_loss(pred: torch.Tensor, target: torch.Tensor, terms: LossTerms = DUNE_TERMS) -> torch.Tensor:
    """``w_cos·(1 − cos) + w_l1·SmoothL1(β=1)`` per sample (DUNE: 0.5 / 0.5, cosine per token).

    SmoothL1 is averaged over channels and tokens; the cosine is per token then averaged over tokens
    (``terms.cosine_over == "token"``) or of the whole flattened ``(..., D)`` map (``"map"``, SAK).
    pred, target: ``(B, ..., D)`` (e.g. ``(B, D)`` for CLS, ``(B, h, w, D)`` for patches), any float
    dtype; computed in fp32 even under autocast. Returns ``(B,)`` float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        batch = len(pred)
        if terms.cosine_over == "map":
            cosine = F.cosine_similarity(pred.reshape(batch, -1), target.reshape(batch, -1), dim=1)
        else:
            cosine = F.cosine_similarity(pred, target, dim=-1).reshape(batch, -1).mean(dim=1)
        smooth_l1 = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).reshape(batch, -1).mean(dim=1)
        return terms.cos_weight * (1.0 - cosine) + terms.smooth_l1_weight * smooth_l1


def teacher_losses(preds: Mapping[str, Tokens], targets: Mapping[str, Tokens], teachers: Sequence[str],
                   use_cls: Mapping[str, bool] | None = None, terms: LossTerms = DUNE_TERMS) -> torch.Tensor:
    """Loss of every sample for every teacher: mean of its CLS and patch losses (:func:`token_loss` with ``terms``).

    preds, targets: teacher -> (cls ``(B, D_t)``, patch ``(B, h_t, w_t, D_t)``) (targets standardised);
    use_cls: teacher -> whether its CLS is distilled (default true); false: patch loss only.
    Returns ``(B, T)`` float32, columns in ``teachers`` order.
    """
    columns = []
    for teacher in teachers:
        (pred_cls, pred_patch), (target_cls, target_patch) = preds[teacher], targets[teacher]
        patch = token_loss(pred_patch, target_patch, terms)
        distil_cls = True if use_cls is None else use_cls.get(teacher, True)
        columns.append(0.5 * (token_loss(pred_cls, target_cls, terms) + patch) if distil_cls else patch)
    return torch.stack(columns, dim=1)


def use_cls_from_provenance(provenance: Mapping[str, Mapping]) -> dict[str, bool]:
    """teacher -> distil its CLS? False for teachers whose cached CLS is the mean patch (DUNE: MASt3R); true for a
    class token and for an attention-pool head's output (SigLIP2: an image feature the teacher was trained on)."""
    return {teacher: attrs["teacher"]["cls_source"] != "mean_patch" for teacher, attrs in provenance.items()}


def highest_loss_teacher(losses: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the available teacher with the highest loss of each image (none if none available)."""
    masked = losses.detach().float().masked_fill(~available, -math.inf)
    one_hot = F.one_hot(masked.argmax(dim=1), losses.shape[1]).bool()
    return one_hot & available.any(dim=1, keepdim=True)


def drop_teachers(losses: torch.Tensor, available: torch.Tensor, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``lowest_loss`` teacher dropping: weights of each (image, teacher) loss.

    losses: ``(B, T)``; available: ``(B, T)`` bool (has a target and is allowed by data sharing);
    p: drop probability of each non-highest available teacher (0: keep all available).
    Returns ``(B, T)`` float32 weights without gradient: ``1/|kept|`` on kept pairs, 0 elsewhere
    (all zero when nothing is kept). The batch loss is ``(weights * losses).sum()``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop probability must be in [0, 1), got {p}")
    available = available.to(losses.device, torch.bool)
    draws = torch.rand(losses.shape, generator=generator,
                       device=generator.device if generator is not None else "cpu").to(losses.device)
    kept = available & ((draws >= p) | highest_loss_teacher(losses, available))
    weights = kept.float()
    return weights / weights.sum().clamp_min(1.0)


def sharing_mask(tags: Sequence[str], teachers: Sequence[str], mode: str,
                 generic_tag: str = "generic") -> torch.Tensor:
    """``(B, T)`` bool: which teachers each image may supervise (DUNE's data-sharing modes).

    ``all``: every teacher. ``own_data``: the teacher named by the image's tag. ``own+generic``: that
    teacher, and every teacher for generic images (tag ``generic_tag`` or empty). An image no
    teacher may use is an error naming its tag (DUNE asserts the same): check ``reader.tags`` once
    before training.
    """
    if mode not in SHARING_MODES:
        raise ValueError(f"unknown data-sharing mode {mode!r}; choose one of {', '.join(SHARING_MODES)}")
    own = torch.tensor([[tag == teacher for teacher in teachers] for tag in tags], dtype=torch.bool)
    own = own.reshape(len(tags), len(teachers))
    if mode == "all":
        return torch.ones_like(own)
    if mode == "own_data":
        mask = own
    else:
        generic = torch.tensor([tag in (generic_tag, "") for tag in tags], dtype=torch.bool)
        mask = own | generic[:, None]
    orphans = sorted({tag for tag, used in zip(tags, mask.any(dim=1).tolist()) if not used})
    if orphans:
        raise ValueError(f"data sharing {mode!r}: images tagged {orphans} supervise no teacher "
                         f"(teachers: {list(teachers)}, generic tag: {generic_tag!r})")
    return mask


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
        two available samples (otherwise only the patch statistics move). Other modes: no-op.
        """
        if self.mode != "ema":
            return
        cls, tokens = cls[available].double(), patch[available].reshape(-1, patch.shape[-1]).double()
        sums = torch.cat([cls.new_tensor([len(cls), len(tokens)]), cls.sum(0), cls.square().sum(0),
                          tokens.sum(0), tokens.square().sum(0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        n_cls, n_tokens = sums[:2].tolist()
        cls_sum, cls_squares, token_sum, token_squares = sums[2:].view(4, -1)
        if n_tokens >= 2:
            self._blend("patch", n_tokens, token_sum, token_squares, momentum)
        if n_cls >= 2:
            self._blend("cls", n_cls, cls_sum, cls_squares, momentum)

    def _blend(self, prefix: str, count: float, total: torch.Tensor, squares: torch.Tensor, momentum: float) -> None:
        """Move ``<prefix>_mean/std`` toward the mean and unbiased std of ``count`` rows with per-channel
        ``total`` and sum of ``squares`` ``(D,)``."""
        mean, std = getattr(self, f"{prefix}_mean"), getattr(self, f"{prefix}_std")
        batch_mean = total / count
        batch_var = (squares - count * batch_mean.square()).clamp_min(0) / (count - 1)
        mean.lerp_(batch_mean.to(mean.dtype), momentum)
        std.lerp_(batch_var.sqrt().to(std.dtype), momentum)


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
