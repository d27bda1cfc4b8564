"""RADIO / C-RADIO teachers (NVlabs/RADIO): the ViT backbones with CPE, from a release ``.pth.tar``.

A release file is self-describing: ``args`` (an ``argparse.Namespace``: ``model``, ``model_kwargs``,
``cpe_max_size``, ``teachers``, ``cls_token_per_teacher``, ``register_multiple``/``cpe_num_registers``,
``model_norm``, ``spectral_reparam``) and ``state_dict`` (or ``state_dict_ema``, preferred as upstream's
``hubconf.radio_model`` does) with

* ``base_model.*``: ``patch_generator.embedder.weight`` (a bias-free ``Linear`` over flattened ``(c, y, x)``
  patches), ``patch_generator.pos_embed`` ``(1, M*M, D)`` (the CPE grid, ``M = cpe_max_size / patch``),
  ``patch_generator.cls_token.token`` ``(T + R, D)`` (one summary token per distinct teacher, then registers),
  ``blocks.{i}.*`` (timm ViT blocks; LayerScale stored as ``ls{1,2}.grandma``), ``norm.*`` with
  ``model_norm``; ``reg_token`` of the ``*_v2_224`` models is never read by the CPE forward and is ignored;
* ``input_conditioner.norm_mean``/``norm_std``: the model normalises [0, 1] pixels itself;
* ``_feature_normalizer.mean``/``tx`` (e.g. ``radio_v2.5-h-norm``): applied to the patch features;
* ignored deliberately: ``_heads.*`` / ``_feature_projections.*`` (the per-teacher adaptors, not the backbone)
  and ``_intermediate_feature_normalizer.*`` (levels are the raw block outputs). Any other key is refused.

Outputs: ``patch`` = the backbone's patch tokens (feature normalizer applied when present; RADIO's ``features``).
RADIO's *summary* is the ``k`` per-teacher summary tokens concatenated (``k·D``); a cache group has one width,
so ``cls`` = the summary token of the checkpoint's first summary teacher (``summary_idxs[0]``), named in the
loaded spec's description (provenance).

Positions, as the repository's ``ViTPatchGenerator`` evaluates them: the ``M x M`` grid is used as is for an
``M x M`` input; otherwise resized bilinear (``align_corners=False``, no antialiasing) to a square of the larger
grid side and cropped to the top-left ``h x w`` (CPE mode, ``M`` larger than the model's 224-px grid), or
cropped then resized (no CPE).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import CheckpointError, UnknownTeacherError
from .base import Teacher, TeacherOutput, load_state_dict_strict, read_checkpoint, strip_prefix
from .families import RADIO_RELEASES
from .registry import get_spec
from .spec import TeacherSpec

BACKBONE_PREFIX = "base_model."
CONDITIONER_PREFIX = "input_conditioner."
NORMALIZER_PREFIX = "_feature_normalizer."
IGNORED_PREFIXES = ("_heads.", "_feature_projections.", "_intermediate_feature_normalizer.")
# timm's register tokens of the *_v2_224 models: the CPE forward never reads them
IGNORED_BACKBONE_KEYS = ("reg_token",)
BASE_IMAGE_SIZE = 224  # the timm models' img_size: CPE mode is on when the CPE grid is larger than its grid
CONFIG_FIELDS = ("model", "cpe_max_size", "teachers")
UNSUPPORTED_MODEL_KWARGS = ("scaled_ln",)  # RADIO-only model options with no exact counterpart here

# ``args.model`` of the RADIO ViT backbones -> timm ``VisionTransformer`` arguments (RADIO's extra_timm_models
# registrations and timm's own, for those built on timm's VisionTransformer).
RADIO_ARCHS: dict[str, dict] = {
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch16_224": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_huge_patch16_224_mlpnorm": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch16_224": dict(patch_size=16, embed_dim=1536, depth=40, num_heads=24),
    "vit_so400m_patch16_224": dict(patch_size=16, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152),
    "vit_so400m_v2_patch16_224": dict(patch_size=16, embed_dim=1152, depth=27, num_heads=16,
                                      mlp_ratio=((4304 + 31) // 32 * 32) / 1152),
    "vit_base_patch16_v2_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                    reg_tokens=4, no_embed_class=True, img_size=518 * 16 // 14),
    "vit_large_patch16_v2_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                                     reg_tokens=4, no_embed_class=True, img_size=518 * 16 // 14),
}
MLP_NORM_ARCHS = ("vit_huge_patch16_224_mlpnorm",)  # a LayerNorm (eps 1e-5) inside each block's MLP


@dataclass(frozen=True)
class RadioConfig:
    """What a RADIO checkpoint's ``args`` say about its backbone."""

    model: str
    model_kwargs: dict
    max_grid: int  # side of the CPE position grid
    num_summary: int  # summary (CLS) tokens, one per distinct teacher (1 without cls_token_per_teacher)
    num_registers: int
    summary_slot: int  # the token cls holds: summary_idxs[0]
    summary_head: str  # its teacher's name in args.teachers
    summary_heads: tuple[str, ...]  # every summary teacher (RADIO's summary concatenates their tokens)
    model_norm: bool

    @property
    def vit_kwargs(self) -> dict:
        return {**RADIO_ARCHS[self.model], **self.model_kwargs}

    @property
    def patch_size(self) -> int:
        return self.vit_kwargs["patch_size"]

    @property
    def embed_dim(self) -> int:
        return self.vit_kwargs["embed_dim"]

    @property
    def num_prefix(self) -> int:
        return self.num_summary + self.num_registers

    @property
    def cpe_mode(self) -> bool:
        return self.max_grid * self.patch_size != BASE_IMAGE_SIZE


def radio_config(args: argparse.Namespace, source: str, head: str | None = None) -> RadioConfig:
    """The backbone facts of a checkpoint's ``args``, cls from summary teacher ``head`` (default: the first); a
    :class:`CheckpointError` naming what is not supported."""
    absent = [f for f in CONFIG_FIELDS if getattr(args, f, None) is None]
    if absent:
        raise CheckpointError(f"RADIO checkpoint {source}: args lacks {', '.join(absent)} (a ViT with CPE needs them)")
    if args.model not in RADIO_ARCHS:
        raise CheckpointError(f"RADIO checkpoint {source}: backbone args.model={args.model!r} is not supported; "
                              f"supported ViT backbones: {', '.join(RADIO_ARCHS)}")
    kwargs = {k: v for k, v in dict(getattr(args, "model_kwargs", None) or {}).items() if k != "weight_init"}
    unsupported = [k for k in UNSUPPORTED_MODEL_KWARGS if kwargs.pop(k, False)]
    if unsupported:
        raise CheckpointError(f"RADIO checkpoint {source}: args.model_kwargs {unsupported} not supported")
    patch = {**RADIO_ARCHS[args.model], **kwargs}["patch_size"]
    per_teacher = getattr(args, "cls_token_per_teacher", True)
    names = [t["name"] for t in args.teachers]
    distinct = list(dict.fromkeys(names))
    num_summary = len(distinct) if per_teacher else 1
    first_slots = [names.index(name) for name in distinct]
    slots = sorted(i for i in first_slots if args.teachers[i].get("use_summary", True)) if per_teacher else [0]
    if not slots:
        raise CheckpointError(f"RADIO checkpoint {source}: no teacher of args.teachers has use_summary")
    heads = tuple(names[s] for s in slots) if per_teacher else tuple(distinct)
    if head is not None and head not in heads:
        raise CheckpointError(f"RADIO checkpoint {source}: no summary teacher {head!r}; its summary teachers: "
                              f"{', '.join(heads)}" + ("" if per_teacher else " (one summary token shared by all)"))
    chosen = heads.index(head) if head is not None and per_teacher else 0
    registers = getattr(args, "cpe_num_registers", None)
    multiple = getattr(args, "register_multiple", None)
    if not registers:
        registers = multiple - num_summary % multiple if multiple else 0
    return RadioConfig(model=args.model, model_kwargs=kwargs, max_grid=round(args.cpe_max_size / patch),
                       num_summary=num_summary, num_registers=registers, summary_slot=slots[chosen],
                       summary_head=heads[chosen], summary_heads=heads,
                       model_norm=bool(getattr(args, "model_norm", False)))


def cpe_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int], cpe_mode: bool) -> torch.Tensor:
    """CPE positions ``(1, M*M, D)`` -> the ``(1, h*w, D)`` of an ``h x w`` grid (module docstring)."""
    m = round(pos_embed.shape[1] ** 0.5)
    if grid == (m, m):
        return pos_embed
    table = pos_embed.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if cpe_mode:
        side = max(grid)
        table = F.interpolate(table.float(), size=(side, side), mode="bilinear", align_corners=False)
    table = table[..., :grid[0], :grid[1]]
    if tuple(table.shape[-2:]) != grid:
        table = F.interpolate(table.float(), size=grid, mode="bilinear", align_corners=False)
    return table.to(pos_embed.dtype).flatten(2).transpose(1, 2)


class SummaryTokens(nn.Module):
    """``token`` ``(T + R, D)``: the summary tokens then the registers, prepended to every image's tokens."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(count, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, T + R + N, D)``."""
        return torch.cat([self.token.unsqueeze(0).expand(tokens.shape[0], -1, -1), tokens], dim=1)


class CPEPatchGenerator(nn.Module):
    """Pixels ``(B, 3, H, W)`` -> ``(B, T + R + h*w, D)``: linear patch embedding, CPE positions, prefix tokens."""

    def __init__(self, cfg: RadioConfig):
        super().__init__()
        p, d = cfg.patch_size, cfg.embed_dim
        self.patch_size, self.cpe_mode = p, cfg.cpe_mode
        self.embedder = nn.Linear(3 * p * p, d, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_grid ** 2, d))
        self.cls_token = SummaryTokens(cfg.num_prefix, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        p = self.patch_size
        h, w = height // p, width // p
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        tokens = self.embedder(patches) + cpe_position_embedding(self.pos_embed, (h, w), self.cpe_mode)
        return self.cls_token(tokens)


class RadioBackbone(nn.Module):
    """RADIO's ViT with CPE, in the release's ``base_model.`` names: patch generator, timm blocks, final norm
    (``model_norm``; identity otherwise, as upstream replaces it)."""

    def __init__(self, cfg: RadioConfig, device: torch.device | str | None = None):
        super().__init__()
        vit_kwargs = {k: v for k, v in cfg.vit_kwargs.items() if k not in ("reg_tokens", "img_size", "no_embed_class")}
        vit = VisionTransformer(**vit_kwargs, num_classes=0, global_pool="", class_token=False, pos_embed="none",
                                device=device)
        if cfg.model in MLP_NORM_ARCHS:
            for block in vit.blocks:
                block.mlp.norm = nn.LayerNorm(block.mlp.fc1.out_features, device=device)
        self.patch_generator = CPEPatchGenerator(cfg).to(device)
        self.blocks = vit.blocks
        self.norm = vit.norm if cfg.model_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> tokens ``(B, T + R + h*w, D)``."""
        return self.norm(self.blocks(self.patch_generator(x)))


class FeatureNormalizer(nn.Module):
    """``(x - mean) @ tx.T`` on the last axis: RADIO's learned whitening of the patch features."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("tx", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.tx.T


class RadioTeacher(Teacher):
    """cls = one summary token ``(B, D)``, registers ``(B, R, D)``, patch = features ``(B, h, w, D)``."""

    def __init__(self, spec: TeacherSpec, cfg: RadioConfig, backbone: RadioBackbone,
                 normalizer: FeatureNormalizer | None):
        super().__init__(spec)
        self.cfg, self.backbone, self.normalizer = cfg, backbone, normalizer
        self.level_layout = (cfg.num_prefix, cfg.num_registers, "token")

    def block_modules(self) -> nn.Module:
        return self.backbone.blocks

    def split(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, T + R + h*w, D)`` -> the cls summary token ``(B, D)``, patch tokens ``(B, h, w, D)``."""
        b, _, d = tokens.shape
        return tokens[:, self.cfg.summary_slot], tokens[:, self.cfg.num_prefix:].reshape(b, *grid, d)

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        p = self.spec.patch_size
        tokens = self.backbone(x)
        cls, patch = self.split(tokens, (x.shape[-2] // p, x.shape[-1] // p))
        if self.normalizer is not None:
            patch = self.normalizer(patch)
        return TeacherOutput(cls=cls, registers=tokens[:, self.cfg.num_summary:self.cfg.num_prefix], patch=patch)

    def level_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(tokens, grid)

    def level_description(self) -> str:
        return (f"output tokens of block k (0-based, of {self.depth}) of {self.spec.name}: CLS = that block's token "
                f"in the summary slot of cls ({self.cfg.summary_head}), patch = its patch tokens, registers dropped; "
                "no final norm and no feature normalizer applied")


def radio_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The model tensors of a release file: ``state_dict_ema`` when present (as upstream), else ``state_dict``."""
    for key in ("state_dict_ema", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    raise CheckpointError("no state_dict or state_dict_ema in the RADIO checkpoint "
                          f"(top-level keys: {sorted(checkpoint)})")


def split_radio_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """A release state dict -> ``{"backbone", "conditioner", "normalizer"}`` parts (prefixes stripped, LayerScale
    ``grandma`` renamed to timm's ``gamma``); ignored prefixes dropped, any other key refused."""
    known = (BACKBONE_PREFIX, CONDITIONER_PREFIX, NORMALIZER_PREFIX, *IGNORED_PREFIXES)
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise CheckpointError(f"RADIO checkpoint {source}: unexpected keys {unknown[:12]} (known prefixes: "
                              f"{', '.join(known)})")
    if any(".parametrizations." in k for k in state):
        raise CheckpointError(f"RADIO checkpoint {source} holds spectral-reparametrised weights (*.parametrizations.*) "
                              "and no state_dict_ema: not supported; use a release file")
    backbone = {k.replace(".grandma", ".gamma"): v for k, v in strip_prefix(state, BACKBONE_PREFIX).items()
                if k not in IGNORED_BACKBONE_KEYS}
    return {"backbone": backbone, "conditioner": strip_prefix(state, CONDITIONER_PREFIX),
            "normalizer": strip_prefix(state, NORMALIZER_PREFIX)}


def loaded_spec(spec: TeacherSpec, cfg: RadioConfig, conditioner: Mapping[str, torch.Tensor],
                normalized: bool) -> TeacherSpec:
    """``spec`` with what this checkpoint says: backbone, registers, input normalisation, final norm, summary head."""
    mean = tuple(float(v) for v in conditioner["norm_mean"].flatten())
    std = tuple(float(v) for v in conditioner["norm_std"].flatten())
    facts = (f" This checkpoint: {cfg.model}, CPE grid {cfg.max_grid}x{cfg.max_grid}, {cfg.num_summary} summary "
             f"tokens then {cfg.num_registers} registers; summary teachers {list(cfg.summary_heads)}; cls = the "
             f"summary token of {cfg.summary_head!r} (slot {cfg.summary_slot}); feature normalizer "
             f"{'applied to patch' if normalized else 'absent'}.")
    return dataclasses.replace(spec, arch=cfg.model, num_registers=cfg.num_registers, mean=mean, std=std,
                               final_norm=cfg.model_norm, description=spec.description + facts)


def check_width(spec: TeacherSpec, cfg: RadioConfig, source: str) -> None:
    if (cfg.embed_dim, cfg.patch_size) != (spec.embed_dim, spec.patch_size):
        raise CheckpointError(f"RADIO checkpoint {source} is {cfg.model} (width {cfg.embed_dim}, patch "
                              f"{cfg.patch_size}); teacher {spec.name} is width {spec.embed_dim}, patch "
                              f"{spec.patch_size}: pick the teacher of that release")


def radio_teacher_from_checkpoint(spec: TeacherSpec, checkpoint: Mapping, source: str,
                                  head: str | None = None) -> RadioTeacher:
    """Build the backbone ``checkpoint["args"]`` describes and load its tensors strictly; cls from summary
    teacher ``head`` (default: the first)."""
    if not isinstance(checkpoint.get("args"), argparse.Namespace):
        raise CheckpointError(f"{source} is not a RADIO release file: no args Namespace (top-level keys: "
                              f"{sorted(checkpoint)})")
    cfg = radio_config(checkpoint["args"], source, head)
    check_width(spec, cfg, source)
    parts = split_radio_state(radio_state(checkpoint), source)
    backbone = RadioBackbone(cfg, device="meta").to_empty(device="cpu")
    load_state_dict_strict(backbone, parts["backbone"], f"{source} (base_model.*)")
    conditioner = parts["conditioner"]
    if sorted(conditioner) != ["norm_mean", "norm_std"]:
        raise CheckpointError(f"RADIO checkpoint {source}: input_conditioner.* holds {sorted(conditioner)}, "
                              "expected norm_mean and norm_std")
    normalizer = None
    if parts["normalizer"]:
        normalizer = FeatureNormalizer(cfg.embed_dim)
        load_state_dict_strict(normalizer, parts["normalizer"], f"{source} (_feature_normalizer.*)")
    return RadioTeacher(loaded_spec(spec, cfg, conditioner, normalizer is not None), cfg, backbone, normalizer)


def random_radio_teacher(spec: TeacherSpec) -> RadioTeacher:
    """``spec``'s backbone with random weights (speed only): its release's ``random_model``, one summary token,
    ``spec.num_registers`` registers, the CPE grid of ``cpe_max_size`` 2048."""
    model = RADIO_RELEASES[spec.name].random_model
    cfg = RadioConfig(model=model, model_kwargs={}, max_grid=2048 // spec.patch_size, num_summary=1,
                      num_registers=spec.num_registers, summary_slot=0, summary_head="(random)",
                      summary_heads=("(random)",), model_norm=False)
    return RadioTeacher(spec, cfg, RadioBackbone(cfg), None)


def build_radio_teacher(spec: TeacherSpec, checkpoint: Path | None) -> RadioTeacher:
    """Factory of the RADIO names: a release ``.pth.tar`` (args + state dict)."""
    if checkpoint is None:
        return random_radio_teacher(spec)
    return radio_teacher_from_checkpoint(spec, read_checkpoint(checkpoint), str(checkpoint))


def radio_head_teacher(suffix: str, checkpoint: Path | None) -> RadioTeacher:
    """``radio:<release>@<head>``: teacher ``<release>`` (e.g. ``c_radio_v3_b``) with cls = the summary token of
    the checkpoint's summary teacher ``<head>`` (a name in its ``args.teachers``, e.g. ``dino_v2-g``)."""
    release, _, head = suffix.partition("@")
    if release not in RADIO_RELEASES or not head:
        raise UnknownTeacherError(f"radio:{suffix}: expected radio:<release>@<summary teacher>, release one of "
                                  f"{', '.join(RADIO_RELEASES)} (e.g. radio:c_radio_v3_b@dino_v2-g)")
    if checkpoint is None:
        raise CheckpointError(f"radio:{suffix} needs --checkpoint: the summary teachers are named in its args")
    spec = dataclasses.replace(get_spec(release), name=f"radio:{suffix}")
    return radio_teacher_from_checkpoint(spec, read_checkpoint(checkpoint), str(checkpoint), head)
