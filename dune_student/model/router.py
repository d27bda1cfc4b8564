"""SAK's Mixture-of-Representations (MoR) routers (innovator-zero/SAK ``MoR``/``GlobalRouter``), written from
its description.

Per task and per level, a router weighs the ``E = 1 + T`` representations of that level — the stem's patch
tokens and the T teacher paths' normalised patch tokens, all ``(B, h, w, D)`` — with softmax weights computed
from the stem's tokens::

    logits = Linear(D/2 -> E or 2E)(GELU(LayerNorm(Linear(D -> D/2)(stem))))       (B, h, w, ·)
    pooling "global" (SAK): logits averaged over the tokens, one weight set per image; "token": per token
    noisy gating (SAK, training only): logits + N(0, 1) · (softplus(noise logits) + 0.01), noise drawn per token
    weights = softmax(logits) over E; routed = Σ_e weights_e · representation_e          (B, h, w, D)

Weights sum to 1 at every token. Linears start trunc-normal(std 0.02), zero bias (SAK's init).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sak import init_sak_weights

NOISE_FLOOR = 1e-2  # SAK: softplus(raw) + 1e-2


class MoRRouter(nn.Module):
    """Softmax weights over ``experts`` representations of one level, from the stem's patch tokens."""

    def __init__(self, dim: int, experts: int, pooling: str = "global", noisy_gating: bool = True):
        super().__init__()
        if pooling not in ("global", "token"):
            raise ValueError(f"router pooling must be global or token, got {pooling!r}")
        self.experts, self.pooling, self.noisy_gating = experts, pooling, noisy_gating
        hidden = dim // 2
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                  nn.Linear(hidden, experts * (2 if noisy_gating else 1)))
        init_sak_weights(self)

    def weights(self, stem: torch.Tensor) -> torch.Tensor:
        """stem patch tokens ``(B, h, w, D)`` -> weights ``(B, h, w, E)``, summing to 1 over E at every token."""
        logits = self.gate(stem)
        if self.pooling == "global":
            logits = logits.mean(dim=(1, 2), keepdim=True).expand(*stem.shape[:3], -1)
        if self.noisy_gating:
            logits, noise_logits = logits.chunk(2, dim=-1)
            if self.training:
                logits = logits + torch.randn_like(logits) * (F.softplus(noise_logits) + NOISE_FLOOR)
        return logits.softmax(dim=-1)

    def forward(self, stem: torch.Tensor, paths: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """stem ``(B, h, w, D)`` and T paths ``[(B, h, w, D)]`` -> routed ``(B, h, w, D)``, weights
        ``(B, h, w, 1 + T)``."""
        if len(paths) + 1 != self.experts:
            raise ValueError(f"the router mixes {self.experts} representations, got the stem and {len(paths)} paths")
        weights = self.weights(stem)
        stacked = torch.stack([stem, *paths], dim=-1)  # (B, h, w, D, E)
        return (stacked * weights[..., None, :]).sum(dim=-1), weights


class TaskRouters(nn.Module):
    """One :class:`MoRRouter` per task and level: ``routers[task][level]``."""

    def __init__(self, tasks: Sequence[str], levels: int, dim: int, teachers: int, pooling: str = "global",
                 noisy_gating: bool = True):
        super().__init__()
        self.routers = nn.ModuleDict({task: nn.ModuleList(MoRRouter(dim, teachers + 1, pooling, noisy_gating)
                                                          for _ in range(levels)) for task in tasks})

    @property
    def tasks(self) -> list[str]:
        return list(self.routers)

    def forward(self, stem_levels: Sequence[torch.Tensor], path_levels: Sequence[Sequence[torch.Tensor]]
                ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """stem_levels: per level ``(B, h, w, D)``; path_levels: per level the T paths ``[(B, h, w, D)]`` ->
        task -> per level (routed ``(B, h, w, D)``, weights ``(B, h, w, 1 + T)``)."""
        return {task: [router(stem, paths) for router, stem, paths in zip(levels, stem_levels, path_levels)]
                for task, levels in self.routers.items()}
