"""Per-teacher projectors from student tokens to teacher tokens.

Three kinds, each mapping :class:`~dune_student.model.student.StudentOutput` to the teacher's CLS
``(B, D_t)`` and patch tokens ``(B, h, w, D_t)`` on the student grid:

* ``transformer`` (DUNE's ``TransformerProjector``, the default): one pre-norm transformer block
  (student width, student head count, MLP ratio 4, LayerScale 1e-4, LayerNorm eps 1e-6, qkv bias)
  over ``[CLS, patches]`` of the last student block, then ``Linear(D -> D_t)`` shared by CLS and
  patches. Registers are dropped before the block, as DUNE does (its encoder output concatenates
  CLS and patch tokens only); they are never targets.
* ``ladder`` (UNIC's ladder of projectors): per token type (CLS, patches), an MLP
  ``Linear(D -> hidden) GELU Linear(hidden -> D_t)`` on every block's output (before any final
  norm), outputs of all blocks summed. ``hidden`` is D except for the last block, 4*D (UNIC:
  768 and 3072 for ViT-B).
* ``mlp``: one such MLP per token type on the last block, hidden 4*D (the ladder's last rung alone).
* ``sak`` (SAK, :mod:`dune_student.model.sak`): per teacher, residual bottleneck adapters alongside every student
  block, the teacher's own LayerNorm and a ``Linear(D -> D_t)`` aligner at each distilled level; the final
  prediction is the last level, :meth:`TeacherHeads.forward_levels` gives every level.

All linear layers start trunc-normal (std 0.02) with zero bias, as UNIC's ladder and SAK.
:class:`TeacherHeads` holds one projector per teacher and resizes projected patch tokens
(bilinear, ``align_corners=False``) to the teacher's target grid when it differs from the
student's.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..config import HeadConfig
from .attention import BackendAttention, set_attention_backend
from .sak import SAKProjector, student_levels
from .student import Student, StudentOutput, split_tokens

PROJECTOR_LAYERSCALE = 1e-4


def two_layer_mlp(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """``Linear(dim -> hidden) GELU Linear(hidden -> out_dim)`` on the last axis."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Every ``nn.Linear`` in ``module``: weight trunc-normal(std), bias zero."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class TransformerProjector(nn.Module):
    """DUNE's projector: pre-norm transformer block over ``[CLS, patches]``, then ``Linear(D -> D_t)``."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.block = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=PROJECTOR_LAYERSCALE,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6), attn_layer=BackendAttention)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, out: StudentOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> CLS ``(B, D_t)``, patches ``(B, h, w, D_t)``."""
        batch, h, w, dim = out.patch.shape
        tokens = torch.cat([out.cls[:, None], out.patch.reshape(batch, h * w, dim)], dim=1)
        projected = self.linear(self.block(tokens))
        return projected[:, 0], projected[:, 1:].reshape(batch, h, w, -1)


class TokenMLPs(nn.Module):
    """One two-layer MLP for CLS ``(B, D)`` and one for patches ``(B, h, w, D)``."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.cls = two_layer_mlp(dim, hidden, out_dim)
        self.patch = two_layer_mlp(dim, hidden, out_dim)

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> CLS ``(B, D_t)``, patches ``(B, h, w, D_t)``."""
        return self.cls(cls), self.patch(patch)


class MLPProjector(nn.Module):
    """Per token type, ``Linear GELU Linear`` on the last block's tokens."""

    def __init__(self, dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.mlps = TokenMLPs(dim, hidden, out_dim)

    def forward(self, out: StudentOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> CLS ``(B, D_t)``, patches ``(B, h, w, D_t)``."""
        return self.mlps(out.cls, out.patch)


class LadderProjector(nn.Module):
    """UNIC's ladder: per block and token type an MLP on the block output; all blocks summed."""

    def __init__(self, dim: int, depth: int, num_registers: int, out_dim: int, hidden: int, last_hidden: int):
        super().__init__()
        self.num_registers = num_registers
        self.rungs = nn.ModuleList(
            TokenMLPs(dim, last_hidden if index == depth - 1 else hidden, out_dim) for index in range(depth))

    def forward(self, out: StudentOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Needs ``out.blocks`` (``Student(..., return_blocks=True)``) -> CLS ``(B, D_t)``, patches
        ``(B, h, w, D_t)``."""
        if len(out.blocks) != len(self.rungs):
            raise ValueError(f"the ladder needs all {len(self.rungs)} block outputs, got {len(out.blocks)}: "
                             "call the student with return_blocks=True")
        grid = out.patch.shape[1:3]
        cls_sum, patch_sum = 0, 0
        for rung, tokens in zip(self.rungs, out.blocks):
            cls, patch = rung(*split_tokens(tokens, self.num_registers, grid))
            cls_sum, patch_sum = cls_sum + cls, patch_sum + patch
        return cls_sum, patch_sum


def build_projector(cfg: HeadConfig, student: Student, out_dim: int) -> nn.Module:
    """Projector of kind ``cfg.kind`` from ``student`` tokens to ``out_dim`` (trunc-normal init)."""
    dim = student.embed_dim
    if cfg.kind == "transformer":
        projector = TransformerProjector(dim, student.num_heads, out_dim)
    elif cfg.kind == "sak":
        return SAKProjector(dim, student.num_registers, out_dim, student_levels(cfg.sak_levels, student.depth),
                            cfg.sak_reduction, cfg.sak_scale_init)  # SAK's own init
    elif cfg.kind == "ladder":
        projector = LadderProjector(dim, student.depth, student.num_registers, out_dim,
                                    hidden=cfg.mlp_hidden or dim, last_hidden=4 * dim)
    else:
        projector = MLPProjector(dim, out_dim, hidden=cfg.mlp_hidden or 4 * dim)
    init_linear_trunc_normal(projector)
    return projector


def resize_patch_grid(patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``(B, h, w, D)`` -> ``(B, grid[0], grid[1], D)``, bilinear, ``align_corners=False``."""
    if tuple(patch.shape[1:3]) == tuple(grid):
        return patch
    channels_first = patch.permute(0, 3, 1, 2)
    resized = F.interpolate(channels_first, size=tuple(grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class TeacherHeads(nn.Module):
    """One projector per teacher; projected patches resized to each teacher's target grid.

    teachers: name -> (teacher dim ``D_t``, target grid ``(h_t, w_t)``). Created on the student's
    device, with the student's attention backend.
    """

    def __init__(self, student: Student, teachers: dict[str, tuple[int, tuple[int, int]]],
                 cfg: HeadConfig | None = None):
        super().__init__()
        cfg = cfg or HeadConfig()
        self.kind = cfg.kind
        self.grids = {name: tuple(grid) for name, (_, grid) in teachers.items()}
        self.projectors = nn.ModuleDict(
            {name: build_projector(cfg, student, dim) for name, (dim, _) in teachers.items()})
        set_attention_backend(self, student.attention_backend)
        self.to(next(student.parameters()).device)

    @property
    def needs_blocks(self) -> bool:
        """Whether the student must be called with ``return_blocks=True``."""
        return self.kind in ("ladder", "sak")

    def forward_levels(self, out: StudentOutput) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """SAK heads: name -> per level (CLS ``(B, D_t)``, patches ``(B, h, w, D_t)`` on the student's grid)."""
        if self.kind != "sak":
            raise ValueError(f"only SAK heads predict per level; these are {self.kind!r} heads")
        return {name: projector.forward_levels(out) for name, projector in self.projectors.items()}

    def forward(self, out: StudentOutput, grids: dict[str, tuple[int, int]] | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (CLS ``(B, D_t)``, patches ``(B, h_t, w_t, D_t)``); ``grids`` overrides target grids."""
        grids = {**self.grids, **(grids or {})}
        result = {}
        for name, projector in self.projectors.items():
            cls, patch = projector(out)
            result[name] = (cls, resize_patch_grid(patch, grids[name]))
        return result
