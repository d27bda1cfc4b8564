"""The student: a DINOv2-style ViT built with timm, attention through xformers or SDPA.

Architecture (DUNE's student, naver/dune ``EncoderOptions``): ViT-S/B/L with patch 14 or 16,
optional register tokens, LayerScale, qkv bias, LayerNorm eps 1e-6, learned absolute position
embeddings for a square ``img_size`` grid that are resampled (bicubic, antialiased, timm's
``dynamic_img_size``) to any input grid. Position embeddings cover the patches only
(``no_embed_class``, as timm's ``*_reg4_dinov2`` models).

**Distilled tokens are the last block's output; there is no final norm.** DUNE builds its
encoder with a final LayerNorm but distils the pre-norm tokens (``apply_last_enc_norm=False``),
so that norm never receives a gradient; UNIC's ladder reads every block's output before the
final norm. Here the timm model is built with ``final_norm=False``: the encoder's
``forward_features`` *is* what the projectors were trained on, the exported encoder gives
exactly these tokens, and no untrained parameter is carried around.

Token layout of every block output: ``[CLS, R registers, N patches (row-major)]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..config import StudentConfig
from .attention import BackendAttention, resolve_attention_backend, set_attention_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Width, depth and heads of a ViT size."""

    embed_dim: int
    depth: int
    num_heads: int


ARCHS: dict[str, ArchSpec] = {  # the names are config.STUDENT_ARCHS (checked before torch is imported)
    "vit_tiny": ArchSpec(192, 12, 3),  # for tests
    "vit_small": ArchSpec(384, 12, 6),
    "vit_base": ArchSpec(768, 12, 12),
    "vit_large": ArchSpec(1024, 24, 16),
}


@dataclass
class StudentOutput:
    """Student tokens, before any final norm.

    cls: ``(B, D)``; patch: ``(B, h, w, D)``; blocks: each block's output ``(B, 1 + R + N, D)``
    when requested (the ladder and SAK projectors need them), else ``[]``; embedded: the tokens entering the
    first block ``(B, 1 + R + N, D)`` when blocks are requested (SAK's first adapter reads them), else ``None``.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    blocks: list[torch.Tensor] = field(default_factory=list)
    embedded: torch.Tensor | None = None


def timm_model_name(cfg: StudentConfig) -> str:
    """Registered timm model the student's kwargs override (all shape-defining kwargs are explicit)."""
    return f"{cfg.arch}_patch16_224"


def timm_architecture_kwargs(cfg: StudentConfig) -> dict:
    """``timm.create_model`` kwargs that fix the student's architecture and parameter shapes (JSON-able)."""
    spec = ARCHS[cfg.arch]
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, init_values=cfg.layerscale, reg_tokens=cfg.num_registers,
        no_embed_class=True, qkv_bias=True, final_norm=False, num_classes=0, dynamic_img_size=True,
    )


def split_tokens(tokens: torch.Tensor, num_registers: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block output ``(B, 1 + R + h*w, D)`` -> CLS ``(B, D)``, patches ``(B, h, w, D)`` (registers dropped)."""
    patch = tokens[:, 1 + num_registers:]
    return tokens[:, 0], patch.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])


class Student(nn.Module):
    """DINOv2-style ViT student; ``self.vit`` is a timm ``VisionTransformer`` (timm's key layout).

    ``device``: where the model is created (default: CUDA when available); ``auto`` attention
    resolves against it. Inputs are ImageNet-normalised pixels (see :meth:`normalize`).
    """

    def __init__(self, cfg: StudentConfig, device: torch.device | str | None = None):
        super().__init__()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        spec = ARCHS[cfg.arch]
        self.cfg = cfg
        self.embed_dim, self.depth, self.num_heads = spec.embed_dim, spec.depth, spec.num_heads
        self.patch_size, self.num_registers = cfg.patch_size, cfg.num_registers
        self.mean, self.std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
        self.timm_model_name = timm_model_name(cfg)
        self.timm_kwargs = timm_architecture_kwargs(cfg)
        choice = resolve_attention_backend(cfg.attention, device)
        self.vit = timm.create_model(self.timm_model_name, pretrained=False, drop_path_rate=cfg.drop_path,
                                     attn_layer=BackendAttention, device=device, **self.timm_kwargs)
        set_attention_backend(self.vit, choice.backend)
        self.attention_backend = choice.backend
        log.info("student attention backend: %s (%s)", choice.backend, choice.reason)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> ImageNet-normalised float32 ``(B, 3, H, W)``."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an input ``height x width`` (both multiples of the patch)."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixels_normalised: torch.Tensor, return_blocks: bool = False) -> StudentOutput:
        """Normalised pixels ``(B, 3, H, W)`` -> :class:`StudentOutput` (last block output, no final norm)."""
        grid = self.grid(*pixels_normalised.shape[-2:])
        if self.attention_backend == "xformers" and not pixels_normalised.is_cuda:
            raise RuntimeError("the student uses xformers attention, which needs CUDA inputs")
        return run_stem(self.vit, pixels_normalised, self.num_registers, grid, return_blocks)


def run_stem(vit: nn.Module, pixels_normalised: torch.Tensor, num_registers: int, grid: tuple[int, int],
             return_blocks: bool = False) -> StudentOutput:
    """A timm ``VisionTransformer`` (built with ``final_norm=False``) on ``(B, 3, H, W)`` -> :class:`StudentOutput`:
    the last block's tokens, and with ``return_blocks`` the embedded tokens and every block's output."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels_normalised))))
    embedded = x if return_blocks else None
    blocks = []
    for block in vit.blocks:
        x = block(x)
        if return_blocks:
            blocks.append(x)
    cls, patch = split_tokens(x, num_registers, grid)
    return StudentOutput(cls=cls, patch=patch, blocks=blocks, embedded=embedded)
