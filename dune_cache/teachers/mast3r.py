"""CroCo-family ViT encoders with RoPE2D: MASt3R, DUSt3R, CroCo v2.

The three projects share one image encoder (naver/croco ``models/croco.py``): a 16x16 patch
projection without absolute position embedding, pre-norm transformer blocks whose attention
rotates queries and keys with RoPE2D (base 100), and a final LayerNorm. It has no CLS token:
the CLS target is the mean of the patch tokens.

Checkpoints hold ``ckpt['model']`` (encoder + decoder + heads) and either ``ckpt['args'].model``
(a constructor string, DUSt3R/MASt3R) or ``ckpt['croco_kwargs']`` (CroCo v2 releases). Only the
encoder keys ``patch_embed.*``, ``enc_blocks.*``, ``enc_norm.*`` are loaded, strictly.
Images are encoded as given (no transposition of portrait images), as in the upstream inference
loaders which swap ``ManyAR_PatchEmbed`` for ``PatchEmbedDust3R``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .base import Teacher, TeacherOutput, find_state_dict, load_state_dict_strict, read_checkpoint, tokens_to_output
from .rope import apply_rope_2d, patch_positions, rope_2d_tables
from .spec import TeacherSpec

ENCODER_PREFIXES = ("patch_embed.", "enc_blocks.", "enc_norm.")
_DECLARED_INT_OPTIONS = ("enc_embed_dim", "enc_depth", "enc_num_heads", "patch_size")


@dataclass(frozen=True)
class CrocoGeometry:
    """Shape of a CroCo encoder (patch size and width come from the :class:`TeacherSpec`)."""

    depth: int
    num_heads: int
    rope_base: float = 100.0
    mlp_ratio: int = 4


VIT_LARGE = CrocoGeometry(depth=24, num_heads=16)


class Attention(nn.Module):
    """Multi-head self-attention with fused ``qkv`` (laid out ``[q | k | v]``) and RoPE2D on q, k."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` with RoPE tables ``(N, D/heads)`` -> ``(B, N, D)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, no norm, no position embedding."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> tokens ``(B, h*w, D)`` in row-major order, grid ``(h, w)``."""
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class CrocoEncoder(nn.Module):
    """The CroCo/DUSt3R/MASt3R image encoder, with the upstream parameter names."""

    def __init__(self, patch_size: int, dim: int, geometry: CrocoGeometry):
        super().__init__()
        self.head_dim = dim // geometry.num_heads
        self.rope_base = geometry.rope_base
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.enc_blocks = nn.ModuleList(
            Block(dim, geometry.num_heads, geometry.mlp_ratio) for _ in range(geometry.depth)
        )
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images ``(B, 3, H, W)`` -> normed tokens ``(B, h*w, D)``, grid ``(h, w)``."""
        tokens, (h, w) = self.patch_embed(x)
        cos, sin = rope_2d_tables(patch_positions(h, w, x.device), self.head_dim, self.rope_base)
        for block in self.enc_blocks:
            tokens = block(tokens, cos, sin)
        return self.enc_norm(tokens), (h, w)


class CrocoTeacher(Teacher):
    """A CroCo-family encoder as a teacher; CLS = mean of the (normed) patch tokens."""

    def __init__(self, spec: TeacherSpec, geometry: CrocoGeometry):
        super().__init__(spec)
        self.geometry = geometry
        self.encoder = CrocoEncoder(spec.patch_size, spec.embed_dim, geometry)
        self.level_layout = (0, 0, "mean_patch")

    def block_modules(self) -> nn.Module:
        """``encoder.enc_blocks``: each block's output is the residual stream before ``enc_norm``."""
        return self.encoder.enc_blocks

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        tokens, grid = self.encoder(x)
        return tokens_to_output(tokens, num_prefix=0, num_registers=0, grid=grid, cls_source="mean_patch")

    def expected_options(self) -> dict[str, str]:
        """Constructor options a matching checkpoint may declare, as strings."""
        return {
            "enc_embed_dim": str(self.spec.embed_dim),
            "enc_depth": str(self.geometry.depth),
            "enc_num_heads": str(self.geometry.num_heads),
            "patch_size": str(self.spec.patch_size),
            "pos_embed": f"RoPE{self.geometry.rope_base:g}",
        }


def declared_encoder_options(ckpt: Mapping) -> dict[str, str]:
    """Encoder options a checkpoint declares, read without evaluating any code.

    CroCo v2 releases store ``croco_kwargs`` (a dict); DUSt3R/MASt3R training runs store
    ``args.model``, e.g. ``"AsymmetricMASt3R(pos_embed='RoPE100', enc_depth=24, ...)"``.
    Options the checkpoint does not mention are absent from the result.
    """
    kwargs = ckpt.get("croco_kwargs")
    if isinstance(kwargs, Mapping):
        return {k: str(kwargs[k]) for k in (*_DECLARED_INT_OPTIONS, "pos_embed") if k in kwargs}
    constructor = getattr(ckpt.get("args"), "model", None)
    if not isinstance(constructor, str):
        return {}
    declared = {k: m.group(1) for k in _DECLARED_INT_OPTIONS if (m := re.search(rf"\b{k}\s*=\s*(\d+)", constructor))}
    if m := re.search(r"\bpos_embed\s*=\s*['\"]([^'\"]+)['\"]", constructor):
        declared["pos_embed"] = m.group(1)
    return declared


def encoder_state_dict(ckpt: Mapping, source: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a CroCo-family checkpoint (decoder and heads dropped)."""
    state = find_state_dict(ckpt)
    if "enc_pos_embed" in state:
        raise CheckpointError(
            f"checkpoint {source} has 'enc_pos_embed': its encoder uses cosine absolute position "
            "embeddings (e.g. CroCo v1), not RoPE2D; only RoPE100 encoders are supported"
        )
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def load_croco_encoder(teacher: CrocoTeacher, checkpoint: Path) -> None:
    """Load the encoder of a CroCo/DUSt3R/MASt3R checkpoint into ``teacher``; raise CheckpointError on any mismatch."""
    ckpt = read_checkpoint(checkpoint)
    expected = teacher.expected_options()
    conflicts = {k: v for k, v in declared_encoder_options(ckpt).items() if v != expected[k]}
    if conflicts:
        raise CheckpointError(
            f"checkpoint {checkpoint} declares {conflicts}, teacher {teacher.spec.name} expects "
            f"{ {k: expected[k] for k in conflicts} }"
        )
    load_state_dict_strict(teacher.encoder, encoder_state_dict(ckpt, str(checkpoint)), str(checkpoint))


def croco_vit_large(spec: TeacherSpec, checkpoint: Path | None) -> Teacher:
    """ViT-L/16 CroCo-family encoder (1024-d, 24 blocks, 16 heads, RoPE100)."""
    teacher = CrocoTeacher(spec, VIT_LARGE)
    if checkpoint is not None:
        load_croco_encoder(teacher, checkpoint)
    return teacher
