"""SAK's teacher-specific adapter paths (innovator-zero/SAK, commit c468ae95bd8436f7994923ad4eaa2e3915b59e1b,
``models/backbones/sak.py``), written from its description, not copied.

The student ViT is SAK's *teacher-agnostic stem*. Each teacher ``t`` gets a path of residual bottleneck
adapters that runs alongside the stem's blocks, reading the stem's states ``x_0`` (tokens entering the first
block) and ``x_i`` (output of block ``i``)::

    r_0 = A_0(x_0)                  A(z) = z + scale · up(GELU(down(z)))   D -> D/reduction -> D
    r_i = A_i(r_{i-1} + x_i)        i = 1 .. depth

At each distilled level (a stem block ``b``), the path's tokens ``r_{b+1}`` go through the teacher's own
``LayerNorm(D)`` (eps 1e-5) and a per-level aligner ``Linear(D -> D_t)``; the aligned CLS token and patch
tokens are the level's prediction. SAK distils patch tokens only; the CLS token here goes through the same
norm and aligner, as DUNE's projector shares its linear between CLS and patches. The stem never reads the
paths, so running each path after the stem's forward equals SAK's interleaved forward.

* **Levels**: SAK's rule takes the last block of each quarter of the depth, ``[2, 5, 8, 11]`` for 12 blocks and
  ``[5, 11, 17, 23]`` for 24 (SAK's ``out_indices_cfg``; :func:`dune_cache.format.levels.sak_blocks`, the rule
  ``dune-cache extract --blocks sak`` applies to teachers). The student's levels are paired
  in order with the blocks each teacher's cache stores (:func:`pair_levels`). The **final** prediction (what
  :class:`~dune_student.model.heads.TeacherHeads` returns, scored against the cache's ``cls``/``patch``) is the
  last level, as in SAK, which has no separate final target.
* **Init** (SAK ``_init_weights``): every linear trunc-normal(std 0.02), zero bias; norms weight 1, bias 0.
  The adapters' learnable scale starts at ``heads.sak_scale_init``: 0 (default here) makes every adapter the
  identity, so a path is then exactly the adapter-free SAK path ``r_i = x_0 + x_1 + ... + x_i`` (note: a
  running sum of the stem's states, not the stem's own state); SAK itself starts the scale at 1 (the
  adapters then start near the identity, their up-projection being small).

Loading an export (:mod:`dune_student.model.export`) needs timm, torch and this module only.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dune_cache import sak_blocks  # SAK's level rule, shared with `dune-cache extract --blocks sak`

SAK_COMMIT = "c468ae95bd8436f7994923ad4eaa2e3915b59e1b"


def student_levels(configured: Sequence[int], depth: int) -> list[int]:
    """The student's levels: ``heads.sak_levels`` (checked: increasing, within the depth) or SAK's rule."""
    levels = list(configured) or list(sak_blocks(depth))
    if sorted(set(levels)) != levels or levels[0] < 0 or levels[-1] >= depth:
        raise ValueError(f"heads.sak_levels {levels}: need increasing block indices in [0, {depth - 1}]")
    return levels


def pair_levels(levels: Sequence[int], teacher_blocks: Mapping[str, Sequence[int]]) -> dict[str, list[tuple[int, int]]]:
    """teacher -> ``[(student block, teacher block), ...]`` paired in order. A teacher whose cache stores no blocks
    is paired on its final output alone (empty list); one storing another number of levels is an error naming
    the teacher and both lists."""
    pairs = {}
    for teacher, blocks in teacher_blocks.items():
        blocks = list(blocks)
        if blocks and len(blocks) != len(levels):
            raise ValueError(f"teacher {teacher}: its cache stores blocks {blocks} ({len(blocks)} levels) but the SAK "
                             f"student distils {len(levels)} levels at its blocks {list(levels)}: extract with "
                             f"`dune-cache extract --blocks` giving {len(levels)} blocks, or set heads.sak_levels to "
                             f"{len(blocks)} student blocks")
        pairs[teacher] = list(zip(levels, blocks))
    return pairs


def init_sak_weights(module: nn.Module) -> None:
    """SAK's init: linears trunc-normal(std 0.02) with zero bias, LayerNorms weight 1 and bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class Adapter(nn.Module):
    """Residual bottleneck ``z + scale · up(GELU(down(z)))``, ``D -> D/reduction -> D``, on ``(B, L, D)``."""

    def __init__(self, dim: int, reduction: int, scale_init: float):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction)
        self.up = nn.Linear(dim // reduction, dim)
        self.scale = nn.Parameter(torch.full((1,), float(scale_init)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.scale * self.up(F.gelu(self.down(tokens)))


class AdapterPath(nn.Module):
    """One teacher's adapter path over the stem's states and its per-level LayerNorms.

    ``adapters[0]`` reads the embedded tokens, ``adapters[i + 1]`` the output of stem block ``i``, up to the last
    level's block (later blocks feed no level).
    """

    def __init__(self, dim: int, levels: Sequence[int], reduction: int, scale_init: float):
        super().__init__()
        self.levels = list(levels)
        self.adapters = nn.ModuleList(Adapter(dim, reduction, scale_init) for _ in range(self.levels[-1] + 2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.levels)

    def forward(self, embedded: torch.Tensor, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """embedded ``(B, L, D)`` and the stem's block outputs ``[(B, L, D)] * depth`` -> the normalised path
        tokens ``(B, L, D)`` at each level."""
        if len(blocks) <= self.levels[-1]:
            raise ValueError(f"the SAK path needs the stem's block outputs up to block {self.levels[-1]}, got "
                             f"{len(blocks)}: call the student with return_blocks=True")
        residual = self.adapters[0](embedded)
        outputs = []
        for index, state in enumerate(blocks[:self.levels[-1] + 1]):
            residual = self.adapters[index + 1](residual + state)
            if index in self.levels:
                outputs.append(self.norms[self.levels.index(index)](residual))
        return outputs


def split_level_tokens(tokens: torch.Tensor, num_registers: int, grid: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1 + R + h*w, C)`` -> CLS ``(B, C)``, patches ``(B, h, w, C)`` (registers dropped)."""
    patch = tokens[:, 1 + num_registers:]
    return tokens[:, 0], patch.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])


class SAKProjector(nn.Module):
    """One teacher's SAK head: an :class:`AdapterPath` and a ``Linear(D -> D_t)`` aligner per level.

    Called on a :class:`~dune_student.model.student.StudentOutput` with ``blocks`` and ``embedded``
    (``return_blocks=True``).
    """

    def __init__(self, dim: int, num_registers: int, out_dim: int, levels: Sequence[int], reduction: int = 4,
                 scale_init: float = 0.0):
        super().__init__()
        self.num_registers, self.reduction = num_registers, reduction
        self.path = AdapterPath(dim, levels, reduction, scale_init)
        self.aligners = nn.ModuleList(nn.Linear(dim, out_dim) for _ in levels)
        init_sak_weights(self)
        for adapter in self.path.adapters:  # the scale is a parameter, not a linear: keep its configured init
            adapter.scale.data.fill_(float(scale_init))

    @property
    def levels(self) -> list[int]:
        return self.path.levels

    def path_tokens(self, out) -> list[torch.Tensor]:
        """The normalised path tokens ``(B, 1 + R + N, D)`` at each level (what a router mixes)."""
        if out.embedded is None:
            raise ValueError("the SAK head needs the stem's block outputs: call the student with return_blocks=True")
        return self.path(out.embedded, out.blocks)

    def forward_levels(self, out) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: CLS ``(B, D_t)``, patches ``(B, h, w, D_t)`` on the student's grid."""
        grid = tuple(out.patch.shape[1:3])
        return [split_level_tokens(aligner(tokens), self.num_registers, grid)
                for aligner, tokens in zip(self.aligners, self.path_tokens(out))]

    def forward(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """The last level: CLS ``(B, D_t)``, patches ``(B, h, w, D_t)``."""
        return self.forward_levels(out)[-1]


def resize_grid(patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w, C)`` -> ``(B, grid[0], grid[1], C)``, bilinear, ``align_corners=False`` (as SAK's loss)."""
    if tuple(patch.shape[1:3]) == tuple(grid):
        return patch
    resized = F.interpolate(patch.permute(0, 3, 1, 2), size=tuple(grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def at_larger_grid(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAK's loss grid: the smaller of prediction and target patch maps ``(B, h, w, C)`` resized to the larger."""
    pred_cells, target_cells = pred.shape[1] * pred.shape[2], target.shape[1] * target.shape[2]
    if pred_cells >= target_cells:
        return pred, resize_grid(target, tuple(pred.shape[1:3]))
    return resize_grid(pred, tuple(target.shape[1:3])), target
