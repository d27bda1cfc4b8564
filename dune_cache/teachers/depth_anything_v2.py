"""Depth Anything V2 encoders (DepthAnything/Depth-Anything-V2): the DINOv2 ViT its DPT head reads.

``depth_anything_v2_vit{s,b,l,g}.pth`` is a plain state dict of ``DepthAnythingV2``: the encoder
(``DINOv2(model_name=...)``: facebookresearch DINOv2 layout, no registers, ``init_values=1.0`` so
``ls1``/``ls2.gamma``, 37x37 position embeddings resized bicubically with the ``+0.1`` offset, ViT-g with a
SwiGLU ``mlp.w12``/``mlp.w3``) under ``pretrained.``, and the DPT head under ``depth_head.``. The head is
ignored; any key under another prefix is an error, and the encoder part loads strictly through
:mod:`.dinov2` (missing/unexpected/mis-shaped keys listed). A Hugging Face folder (or its
``model.safetensors``) of ``DepthAnythingForDepthEstimation`` (``depth-anything/Depth-Anything-V2-*-hf``)
loads too: its ``backbone.*`` (transformers' DINOv2) converted to the release names under ``pretrained.``, its
DPT ``neck.*``/``head.*`` ignored, its ``config.json`` checked against the teacher (backbone geometry, and
``out_indices`` = the 4 blocks the head reads). transformers resizes the position embeddings without the ``+0.1``
offset, so off the native 518 the teacher's features (the release's rule) differ from transformers'.
Depth Anything V1 checkpoints have the same layout: their weights load as well, and give V1's features.

Upstream's forward reads ``pretrained.get_intermediate_layers(x, DEPTH_ANYTHING_V2_DPT_BLOCKS[size],
return_class_token=True)``: four blocks' tokens, each after the final norm. The last of the four is the last
block, so ``cls``/``patch`` here are the final-norm class and patch tokens of the encoder's last block; the
four are the teacher's :attr:`DepthAnythingV2Teacher.dpt_blocks`.

Levels (``--blocks``) follow the head's convention, not DINOv2's: block ``k``'s output with ``vit.norm``
applied (``get_intermediate_layers(..., norm=True)``), CLS = its class token. ``--blocks`` with the
``dpt_blocks`` of the size stores exactly what the DPT head reads: ``2,5,8,11`` (S, B), ``4,11,17,23`` (L),
``9,19,29,39`` (g). SAK's rule (``--blocks sak``, ``ceil(i * L / 4) - 1``) gives the same blocks for S, B
and g, but ``5,11,17,23`` for L.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError
from .base import strip_prefix
from .blocks import sak_blocks
from .dinov2 import Dinov2Teacher, dinov2_hf_expected, dinov2_teacher_from_state
from .families import DEPTH_ANYTHING_V2_DPT_BLOCKS
from .hf import (
    HF_FORMAT,
    LoadedCheckpoint,
    check_hf_config,
    depth_anything_hf_geometry,
    hf_depth_anything_to_release,
    is_hf_depth_anything,
    load_checkpoint,
)
from .spec import TeacherSpec

NAME_PREFIX = "depth_anything_v2_vit"  # + size letter s|b|l|g
ENCODER_PREFIX = "pretrained."
HEAD_PREFIX = "depth_head."


def dpt_blocks(spec: TeacherSpec) -> tuple[int, ...]:
    """The 4 blocks (0-based) whose final-normed tokens the DPT head of ``spec``'s size reads."""
    return DEPTH_ANYTHING_V2_DPT_BLOCKS[spec.name.removeprefix(NAME_PREFIX)]


class DepthAnythingV2Teacher(Dinov2Teacher):
    """A :class:`Dinov2Teacher` that also knows which 4 blocks (0-based) the DPT head reads, final-normed."""

    def __init__(self, spec: TeacherSpec, vit: VisionTransformer):
        super().__init__(spec, vit)
        self.dpt_blocks = dpt_blocks(spec)

    @property
    def named_blocks(self) -> dict[str, tuple[int, ...]]:
        """``--blocks dpt``: the 4 blocks the DPT head reads."""
        return {"dpt": self.dpt_blocks}

    def level_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's output ``(B, 1 + h*w, D)`` -> final-normed class token ``(B, D)`` and patch tokens
        ``(B, h, w, D)``: ``vit.norm`` applied, as the DPT head reads its blocks."""
        return super().level_tokens(self.vit.norm(tokens), grid)

    def level_description(self) -> str:
        blocks = ",".join(map(str, self.dpt_blocks))
        sak = ",".join(map(str, sak_blocks(self.depth)))
        same = "the same blocks" if sak == blocks else f"{sak}, not the same"
        return (f"output tokens of block k (0-based, of {self.depth}) of {self.spec.name}'s DINOv2 encoder after the "
                "final norm (vit.norm applied, as the DPT head reads its blocks: get_intermediate_layers(..., "
                f"norm=True)); CLS = the class token of that normed output. --blocks dpt ({blocks}) stores exactly "
                f"what the DPT head reads (--blocks sak gives {same})")


def encoder_state(state: dict, source: str) -> dict:
    """The ``pretrained.*`` weights of a Depth Anything V2 state dict, prefix removed; ``depth_head.*`` ignored.

    A key under neither prefix, or no encoder key at all, is a :class:`CheckpointError` naming them.
    """
    unexpected = sorted(k for k in state if not k.startswith((ENCODER_PREFIX, HEAD_PREFIX)))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not match a Depth Anything V2 model ('{ENCODER_PREFIX}*' encoder, "
            f"'{HEAD_PREFIX}*' head): unexpected keys {len(unexpected)} [{', '.join(unexpected[:12])}]")
    encoder = strip_prefix(state, ENCODER_PREFIX)
    if not encoder:
        raise CheckpointError(f"checkpoint {source} has no '{ENCODER_PREFIX}*' encoder keys "
                              f"(first keys: {sorted(state)[:8]})")
    return encoder


def release_state(spec: TeacherSpec, ckpt: LoadedCheckpoint) -> tuple[dict, str]:
    """``ckpt``'s weights in the release layout and the layout they came in (``"release"`` or ``"hf"``: a
    transformers folder's config.json is checked against ``spec``, its keys converted)."""
    if not is_hf_depth_anything(ckpt.state):
        return ckpt.state, "release"
    check_hf_config(ckpt.config, depth_anything_hf_geometry(dinov2_hf_expected(spec), dpt_blocks(spec)), spec.name,
                    ckpt.source)
    return hf_depth_anything_to_release(ckpt.state, ckpt.source, ENCODER_PREFIX, HEAD_PREFIX), HF_FORMAT


def build_depth_anything_v2_teacher(spec: TeacherSpec, checkpoint: Path | None) -> DepthAnythingV2Teacher:
    """Factory of the ``depth_anything_v2_vit*`` names: the encoder of a release checkpoint or Hugging Face folder."""
    if checkpoint is None:
        return DepthAnythingV2Teacher(spec, dinov2_teacher_from_state(spec, None, "random weights").vit)
    ckpt = load_checkpoint(checkpoint)
    state, layout = release_state(spec, ckpt)
    encoder = dinov2_teacher_from_state(spec, encoder_state(state, ckpt.source), ckpt.source)
    teacher = DepthAnythingV2Teacher(spec, encoder.vit)
    teacher.checkpoint_format = layout
    return teacher
