"""SAM image encoders (facebookresearch/segment-anything) ViT-B/L/H as teachers, on timm's ``VisionTransformerSAM``.

The encoder is a plain ViT/16 on a fixed 1024x1024 canvas: patch embedding, an absolute position
embedding ``(1, 64, 64, D)`` added to the ``(B, 64, 64, D)`` token map, pre-norm blocks whose attention
is windowed (14x14 windows, the 64x64 map zero-padded to 70x70 after ``norm1``, padding dropped
after attention) except at the global blocks (B: 2, 5, 8, 11; L: 5, 11, 17, 23; H: 7, 15, 23, 31),
every attention adding MViTv2 decomposed relative positions (tables ``rel_pos_h/w`` of
``2 * 14 - 1`` rows in windowed blocks, ``2 * 64 - 1`` in global ones), and no final norm. The
*neck* (1x1 conv D -> 256, LayerNorm2d, 3x3 conv 256 -> 256, LayerNorm2d) gives SAM's 256-d image
embedding. timm's modules compute the same operations once their LayerNorm eps is set to SAM's 1e-6
(timm's samvit defaults to 1e-5; checked against the upstream forward: ``tools/check_upstream_sam.py``,
docs/teachers.md); this module runs them itself so that a smaller input follows SAM's own rule rather
than timm's position-embedding resampling.

Input sizes: SAM resizes the long side of an image to 1024 and ``Sam.preprocess`` normalises it
(ImageNet mean/std x 255) and zero-pads it at the bottom and right to 1024x1024; the embedding's
valid region is the top-left ``(H/16, W/16)`` of the 64x64 map. A teacher input ``(H, W)`` (multiples
of 16, both at most 1024) is treated exactly that way: normalised, zero-padded to 1024x1024, encoded,
and the top-left ``H/16 x W/16`` tokens kept. Nothing is interpolated; every input costs a full
1024x1024 forward; inputs beyond 1024 are refused (SAM has no rule for them).

Checkpoints: the release files (``sam_vit_{b,l,h}_*.pth``, a plain state dict of the whole ``Sam``)
load strictly from their ``image_encoder.*`` keys (``mlp.lin1/lin2`` are timm's ``mlp.fc1/fc2``);
the ``prompt_encoder.*`` and ``mask_decoder.*`` keys are ignored deliberately, any other key is
refused as unexpected. timm's own layout (``samvit_*_patch16.sa1b``: no prefix, ``mlp.fc*``) loads too, and so
does a Hugging Face folder (or its ``model.safetensors``) of ``SamModel``/``SamVisionModel`` (``facebook/sam-vit-*``):
its ``vision_encoder.*`` converted to the release names (:func:`.hf.hf_sam_to_release`), its prompt encoder and
mask decoder ignored, its ``config.json`` checked against the encoder (width, depth, heads, global blocks, window,
canvas, neck width, norm epsilon).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .base import Teacher, TeacherOutput, load_state_dict_strict
from .hf import HF_FORMAT, HfGeometry, check_hf_config, hf_sam_to_release, is_hf_sam, load_checkpoint, sam_hf_geometry
from .spec import TeacherSpec

RELEASE_ENCODER_PREFIX = "image_encoder."
RELEASE_IGNORED_PREFIXES = ("prompt_encoder.", "mask_decoder.")  # SAM's prompt side: not part of the image encoder
RELEASE_TO_TIMM_NAMES = ((".mlp.lin1.", ".mlp.fc1."), (".mlp.lin2.", ".mlp.fc2."))
# SAM's blocks use LayerNorm(eps=1e-6) (build_sam.py); timm's samvit constructors default to nn.LayerNorm's 1e-5
SAM_BLOCK_NORM_EPS = 1e-6


class SamImageEncoder(nn.Module):
    """SAM's image encoder from the modules of a timm ``VisionTransformerSAM`` (timm's parameter names).

    ``blocks`` is an ``nn.ModuleList``: block ``k`` maps ``(B, 64, 64, D)`` to ``(B, 64, 64, D)``.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.blocks = nn.ModuleList(vit.blocks)
        self.neck = vit.neck

    def hf_geometry(self) -> HfGeometry:
        """What a transformers SAM config.json says for this encoder (read off its modules)."""
        blocks = self.blocks
        global_blocks = [i for i, b in enumerate(blocks) if not b.window_size]
        return sam_hf_geometry(blocks[0].norm1.normalized_shape[0], len(blocks), blocks[0].attn.num_heads,
                               self.patch_embed.proj.kernel_size[0], self.canvas_size[0],
                               max(b.window_size for b in blocks), global_blocks, self.neck[0].out_channels,
                               blocks[0].norm1.eps)

    @property
    def canvas_size(self) -> tuple[int, int]:
        """Input size ``(H, W)`` the position embedding is laid out for (1024x1024 for every SAM)."""
        patch = self.patch_embed.proj.kernel_size
        return self.pos_embed.shape[1] * patch[0], self.pos_embed.shape[2] * patch[1]

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised canvas ``(B, 3, 1024, 1024)`` -> last block output ``(B, 64, 64, D)`` (SAM has no final norm)."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def forward_neck(self, tokens: torch.Tensor) -> torch.Tensor:
        """Block output ``(B, 64, 64, D)`` -> SAM image embedding ``(B, 64, 64, 256)`` (channels last)."""
        return self.neck(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def pad_to_canvas(x: torch.Tensor, canvas: tuple[int, int], teacher: str) -> torch.Tensor:
    """Normalised ``(B, 3, H, W)`` -> ``(B, 3, *canvas)``, zeros at the bottom and right (``Sam.preprocess``).

    Raises ``ValueError`` naming the native size when ``H`` or ``W`` exceeds it.
    """
    h, w = x.shape[-2:]
    if h > canvas[0] or w > canvas[1]:
        raise ValueError(
            f"teacher {teacher}: input {h}x{w} exceeds SAM's native {canvas[0]}x{canvas[1]} canvas; SAM resizes "
            f"the long side to {max(canvas)} and pads, so use --resolution (or a student geometry) of at most "
            f"{canvas[0]}x{canvas[1]}")
    return F.pad(x, (0, canvas[1] - w, 0, canvas[0] - h))


class SamTeacher(Teacher):
    """A SAM image encoder as a teacher: tokens after the neck (256-d) or before it (the encoder width).

    CLS = mean of the kept patch tokens (SAM has no class token); no registers.

    Levels (``--blocks``): the output of ``encoder.blocks[k]`` ``(B, 64, 64, D)`` (channels last, before the
    neck) cropped to the input's own top-left grid like the final tokens, CLS = its mean. Only the
    ``sam_vit*_encoder`` teachers expose them: a cache group has one width, and the neck teachers' groups are
    256-d while their blocks are the encoder width.
    """

    level_layout = (0, 0, "mean_patch")  # blocks output a (B, 64, 64, D) map: no prefix tokens

    def __init__(self, spec: TeacherSpec, encoder: SamImageEncoder, after_neck: bool):
        super().__init__(spec)
        self.encoder = encoder
        self.after_neck = after_neck

    def block_modules(self) -> nn.Module | None:
        """``encoder.blocks`` (block ``k``: ``(B, 64, 64, D)`` -> ``(B, 64, 64, D)`` on the padded canvas), or
        ``None`` after the neck (levels of the encoder width do not fit a 256-d group)."""
        return None if self.after_neck else self.encoder.blocks

    @property
    def no_blocks_reason(self) -> str:
        width = self.encoder.blocks[0].norm1.normalized_shape[0]
        return (f"its blocks are {width}-d while its output after the neck is {self.spec.embed_dim}-d, and a group "
                f"has one width: extract {self.spec.name}_encoder with --blocks instead")

    def level_description(self) -> str:
        return (f"output of block k (0-based, of {self.depth}) of {self.spec.name}'s encoder, before the neck "
                "(SAM's encoder has no final norm), cropped from the padded canvas: the top-left H/16 x W/16 "
                "tokens of its (64, 64) map, as the final tokens; no registers; CLS = the mean of those "
                "cropped patch tokens")

    def level_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's output on the canvas ``(B, 64, 64, D)`` -> cls ``(B, D)`` (mean of the crop), patch
        ``(B, h, w, D)`` (the top-left ``grid`` of the map, the input's own tokens)."""
        h, w = grid
        return super().level_tokens(tokens[:, :h, :w].contiguous(), grid)

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        """Normalised ``(B, 3, H, W)`` -> patch ``(B, H/16, W/16, D)`` cropped from the padded canvas's map."""
        p = self.spec.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.encoder.forward_blocks(pad_to_canvas(x, self.encoder.canvas_size, self.spec.name))
        if self.after_neck:
            tokens = self.encoder.forward_neck(tokens)
        patch = tokens[:, :h, :w].contiguous()
        return TeacherOutput(cls=patch.mean(dim=(1, 2)), registers=patch.new_zeros(len(patch), 0, patch.shape[-1]),
                             patch=patch)


def release_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM image-encoder tensors in timm names: the release layout's ``image_encoder.*`` keys (prompt encoder and
    mask decoder dropped, any other key kept so that the strict load names it), or a timm-layout state as is."""
    if not any(k.startswith(RELEASE_ENCODER_PREFIX) for k in state):
        return dict(state)
    converted = {}
    for key, value in state.items():
        if key.startswith(RELEASE_IGNORED_PREFIXES):
            continue
        if key.startswith(RELEASE_ENCODER_PREFIX):
            key = key[len(RELEASE_ENCODER_PREFIX):]
            for old, new in RELEASE_TO_TIMM_NAMES:
                key = key.replace(old, new)
        converted[key] = value
    return converted


def load_sam_encoder(encoder: SamImageEncoder, checkpoint: Path, teacher: str = "this SAM encoder") -> str:
    """Load a SAM release checkpoint (or timm layout, or a Hugging Face folder) into ``encoder``, strictly;
    :class:`CheckpointError` naming missing/unexpected/mis-shaped keys (in timm names), or the config.json fields
    that differ from ``encoder`` (teacher name ``teacher``), otherwise. Returns the layout read: ``"release"``,
    ``"timm"`` or ``"hf"``."""
    ckpt = load_checkpoint(checkpoint)
    state, layout = ckpt.state, "timm"
    if is_hf_sam(state):
        check_hf_config(ckpt.config, encoder.hf_geometry(), teacher, ckpt.source)
        state, layout = hf_sam_to_release(state, ckpt.source), HF_FORMAT
    elif any(k.startswith(RELEASE_ENCODER_PREFIX) for k in state):
        layout = "release"
    source = (f"{checkpoint} (SAM layout: image_encoder.* compared without the prefix and with mlp.lin1/2 as "
              f"mlp.fc1/2; prompt_encoder.*/mask_decoder.* ignored)")
    load_state_dict_strict(encoder, release_to_timm(state), source)
    return layout


def build_sam_encoder(arch: str, *, skip_init: bool = False, **overrides) -> SamImageEncoder:
    """The encoder of timm model ``arch`` (``samvit_{base,large,huge}_patch16``); ``overrides`` (e.g. ``depth``,
    ``global_attn_indexes`` for reduced-depth tests) go to timm. ``skip_init``: allocate without initialising
    (every tensor is about to be loaded)."""
    options = {"pretrained": False, "num_classes": 0, "norm_layer": partial(nn.LayerNorm, eps=SAM_BLOCK_NORM_EPS),
               **overrides}
    if skip_init:
        return SamImageEncoder(timm.create_model(arch, device="meta", **options)).to_empty(device="cpu")
    return SamImageEncoder(timm.create_model(arch, **options))


def sam_teacher(spec: TeacherSpec, checkpoint: Path | None, after_neck: bool, **overrides) -> SamTeacher:
    """SAM teacher of ``spec`` (``spec.arch`` names the timm model), loaded from ``checkpoint`` if given."""
    encoder = build_sam_encoder(spec.arch, skip_init=checkpoint is not None, **overrides)
    layout = load_sam_encoder(encoder, checkpoint, spec.name) if checkpoint is not None else "release"
    teacher = SamTeacher(spec, encoder, after_neck)
    teacher.checkpoint_format = layout
    return teacher


def sam_neck_teacher(spec: TeacherSpec, checkpoint: Path | None) -> SamTeacher:
    """``sam_vit{b,l,h}``: SAM's 256-d image embedding (after the neck)."""
    return sam_teacher(spec, checkpoint, after_neck=True)


def sam_encoder_teacher(spec: TeacherSpec, checkpoint: Path | None) -> SamTeacher:
    """``sam_vit{b,l,h}_encoder``: the last block's output (before the neck), encoder width."""
    return sam_teacher(spec, checkpoint, after_neck=False)
