"""Distillation losses, teacher dropping, data sharing and target standardisation.

Loss (DUNE, naver/dune; UNIC, naver/unic): per teacher and token type ``0.5·(1 − cos) + 0.5·SmoothL1(β=1)``
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

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Tokens = tuple[torch.Tensor, torch.Tensor]  # (cls (B, D), patch (B, h, w, D))
SHARING_MODES = ("all", "own_data", "own+generic")


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
    highest = masked.argmax(dim=1, keepdim=True) == torch.arange(losses.shape[1], device=losses.device)
    return highest & available.any(dim=1, keepdim=True)  # (one_hot would validate its input on the host)


def drop_teachers(losses: torch.Tensor, available: torch.Tensor, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``lowest_loss`` teacher dropping: weights of each (image, teacher) loss.

    losses: ``(B, T)``; available: ``(B, T)`` bool (has a target and is allowed by data sharing);
    p: drop probability of each non-highest available teacher (0: keep all available); generator: where the draws
    come from (on the losses' device, they need no transfer).
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
