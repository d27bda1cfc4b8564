"""Training SAK heads (``heads.kind=sak``): level targets, their standardisation and SAK's per-level loss.

The student's levels (:func:`dune_student.model.sak.student_levels`) are paired in order with the blocks each teacher's
cache stores (``dune-cache extract --blocks``, ``CacheReader.blocks``). A teacher's loss is SAK's sum over its
levels of ``w_cos·(1 − cos) + w_l1·SmoothL1`` (:class:`~dune_student.loss.distill.LossTerms`; SAK: 0.9 / 0.1, cosine of
the whole map), each on the patch map at the larger of the two grids (the smaller resized, bilinear) and, for a
teacher with a real CLS token, also on the CLS (the mean of both, as for the other heads). A teacher whose cache
stores no levels (e.g. a CNN) is distilled on its final ``cls``/``patch`` from the student's last level. Teacher
dropping, data sharing and the final targets' standardisation apply unchanged. Level targets are standardised
with running EMA statistics per (teacher, block) — ``dune-cache stats`` covers the final features only — or not
at all with ``loss.standardize=none``; these statistics are buffers saved in the checkpoint.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import TrainConfig, loss_terms
from ..model.sak import at_larger_grid, pair_levels, student_levels
from .distill import LossTerms, Tokens, teacher_losses
from .standardize import Standardizer


def level_key(teacher: str, block: int) -> str:
    """Name of a (teacher, teacher block) level among the level standardiser's entries."""
    return f"{teacher}@b{block}"


class SAKObjective(nn.Module):
    """Per-sample, per-teacher SAK loss ``(B, T)`` from the heads' level predictions and a batch's targets.

    pairs: teacher -> ``[(student block, teacher block), ...]`` (empty: final targets only); dims: teacher -> D_t.
    """

    def __init__(self, pairs: Mapping[str, Sequence[tuple[int, int]]], dims: Mapping[str, int],
                 use_cls: Mapping[str, bool], terms: LossTerms, standardize: str):
        super().__init__()
        self.pairs = {t: list(p) for t, p in pairs.items()}
        self.use_cls, self.terms = dict(use_cls), terms
        level_dims = {level_key(t, block): dims[t] for t, p in self.pairs.items() for _, block in p}
        self.level_standardizer = Standardizer(level_dims, {}, "none" if standardize == "none" else "ema")

    @classmethod
    def from_config(cls, cfg: TrainConfig, blocks: Mapping[str, Sequence[int]], depth: int, dims: Mapping[str, int],
                    use_cls: Mapping[str, bool]) -> "SAKObjective":
        """Pair the student's levels with the cache's stored ``blocks`` (an error names a mismatching teacher)."""
        pairs = pair_levels(student_levels(cfg.heads.sak_levels, depth), blocks)
        return cls(pairs, dims, use_cls, LossTerms(*loss_terms(cfg)), cfg.loss.standardize)

    def level_targets(self, level_cls: Mapping[str, Mapping[int, torch.Tensor]],
                      level_patch: Mapping[str, Mapping[int, torch.Tensor]], mask: torch.Tensor,
                      teachers: Sequence[str], momentum: float) -> dict[str, list[Tokens]]:
        """teacher -> per paired level its standardised (cls ``(B, D_t)``, patch ``(B, h, w, D_t)``) on
        ``mask``'s device; the EMA statistics observe the available samples (``mask`` ``(B, T)``) first."""
        device, result = mask.device, {}
        for column, teacher in enumerate(teachers):
            result[teacher] = []
            for _, block in self.pairs[teacher]:
                missing = block not in level_patch.get(teacher, {})
                if missing:
                    raise ValueError(f"teacher {teacher}: the batch has no targets of block {block}: the reader must "
                                     "read levels (CacheReader(levels=True))")
                cls = level_cls[teacher][block].to(device, non_blocking=True)
                patch = level_patch[teacher][block].to(device, non_blocking=True)
                key = level_key(teacher, block)
                self.level_standardizer.observe(key, cls, patch, mask[:, column], momentum)
                result[teacher].append(self.level_standardizer.standardize(key, cls, patch))
        return result

    def losses(self, preds: Mapping[str, list[Tokens]], finals: Mapping[str, Tokens],
               levels: Mapping[str, list[Tokens]], teachers: Sequence[str]) -> torch.Tensor:
        """preds: teacher -> per student level (cls, patch on the student grid); finals: teacher -> standardised
        final targets; levels: :meth:`level_targets`. Returns ``(B, T)`` float32, columns in ``teachers`` order."""
        columns = []
        for teacher in teachers:
            if self.pairs[teacher]:
                pairs = list(zip(preds[teacher], levels[teacher]))
            else:  # no stored levels: the last level against the final targets
                pairs = [(preds[teacher][-1], finals[teacher])]
            columns.append(sum(self.pair_loss(teacher, pred, target) for pred, target in pairs))
        return torch.stack(columns, dim=1)

    def pair_loss(self, teacher: str, pred: Tokens, target: Tokens) -> torch.Tensor:
        """``(B,)``: one level's loss, patch maps compared at the larger grid."""
        pred_patch, target_patch = at_larger_grid(pred[1], target[1])
        return teacher_losses({teacher: (pred[0], pred_patch)}, {teacher: (target[0], target_patch)}, [teacher],
                              self.use_cls, self.terms)[:, 0]
