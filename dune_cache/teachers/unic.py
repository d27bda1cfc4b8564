"""UNIC's four ViT-B/16 teachers (naver/unic ``teachers/config.py``), run on timm models.

Each upstream checkpoint layout is mapped onto a timm model by one small key converter and
loaded strictly (:meth:`TimmViTTeacher.load_checkpoint`; classifier ``head.*`` keys are dropped).
All four were trained and are fed by UNIC at 224x224 with ImageNet mean/std; outputs are what
UNIC distils (its teachers' ``x_norm_clstoken`` / ``x_norm_patchtokens``):

* ``dino_vitb16``: facebookresearch/dino ``dino_vitbase16_pretrain.pth``, a plain state dict
  already in timm's names -> ``vit_base_patch16_224``; ``pos_embed`` ``(1, 1 + 196, D)`` holds the
  CLS slot. Tokens after the final ``norm``.
* ``ibot_vitb16``: bytedance/ibot ``vitb_16_rand_mask/checkpoint_teacher.pth``, the same ViT under
  ``state_dict`` (UNIC loads it with its DINO ViT). Tokens after the final ``norm``.
* ``deit3_vitb16``: facebookresearch/deit ``deit_3_base_224_1k.pth`` (or ``_21k``) under ``model``;
  LayerScale ``blocks.i.gamma_{1,2}`` -> ``ls{1,2}.gamma``; ``pos_embed`` ``(1, 196, D)`` has no
  CLS slot (added to patches only) -> ``deit3_base_patch16_224`` (``no_embed_class``). Tokens after
  the final ``norm``.
* ``dbot_vitb16``: liuxingbin/dbot ``84.5_dbot_base_finetune.pth`` (dBOT-ft, ImageNet-1k) under
  ``model``, MAE fine-tune layout in timm's names: no final ``norm``, ``fc_norm`` after global
  average pooling -> ``vit_base_patch16_224`` with ``global_pool="avg"``. As in UNIC, CLS =
  ``fc_norm(mean of patch tokens)`` and patch tokens = last block output (no norm exists).

Full self-distillation training checkpoints of DINO/iBOT (``checkpoint.pth``) also load: their
``teacher`` entry holds ``backbone.*`` (maybe ``module.backbone.*``) beside a projection ``head.*``.

At other input sizes timm resamples the absolute position embeddings bicubically with antialiasing,
whether shrinking or enlarging (PyTorch's antialiased kernel differs from plain bicubic in both
directions); DINO/iBOT's own ``interpolate_pos_encoding`` uses a ``+0.1`` scale-factor offset without
antialiasing, so off-224 features of ``dino_vitb16``/``ibot_vitb16`` differ slightly from the upstream
code. ``dino_vitb16_upstream_pos``/``ibot_vitb16_upstream_pos`` are the same teachers resampling exactly as
upstream does (:data:`.dinov2.ORIGINAL_RESAMPLING`, the rule DINOv2 inherited from DINO); they equal the
default names at 224. DeiT-III and dBOT-ft upstream only run at 224.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from .base import strip_prefix
from .dinov2 import Dinov2Teacher
from .registry import TeacherFactory
from .spec import TeacherSpec
from .timm_generic import StateConverter, TimmViTTeacher, create_timm_vit

_LAYER_SCALE = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")
_IBOT_MIM_TOKEN = "masked_embed"  # iBOT student only: replaces masked patches during training


def ssl_backbone_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO / iBOT ViT state dict -> timm ``vit_base_patch16_224`` names.

    Released backbones already use timm's names. Training checkpoints wrap the ViT as
    ``[module.]backbone.*`` next to a DINO/iBOT projection ``head.*``: only the backbone is kept,
    without the iBOT student's ``masked_embed`` (a training-only token).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = strip_prefix(state, "backbone.")
    return {k: v for k, v in state.items() if k != _IBOT_MIM_TOKEN}


def deit3_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeiT-III (facebookresearch/deit ``models_v2.py``) -> timm ``deit3_*``: LayerScale ``gamma_{1,2}`` ->
    ``ls{1,2}.gamma``."""
    return {_LAYER_SCALE.sub(r"\1.ls\2.gamma", k): v for k, v in state.items()}


def _factory(timm_name: str, convert: StateConverter, layout: str, **timm_kwargs) -> TeacherFactory:
    """Factory building ``timm_name`` and loading a checkpoint of ``layout`` through ``convert``."""

    def build(spec: TeacherSpec, checkpoint: Path | None) -> TimmViTTeacher:
        model = create_timm_vit(timm_name, skip_init=checkpoint is not None, **timm_kwargs)
        teacher = TimmViTTeacher(spec, model)
        if checkpoint is not None:
            teacher.load_checkpoint(checkpoint, convert, layout)
        return teacher

    return build


def _with_upstream_pos_resampling(build: TeacherFactory) -> TeacherFactory:
    """``build``'s teacher run by :class:`Dinov2Teacher`, whose position-embedding resampling for a spec without
    registers is DINO's own (bicubic, ``+0.1`` scale-factor offset, no antialiasing); same weights, same blocks."""

    def build_upstream_pos(spec: TeacherSpec, checkpoint: Path | None) -> Dinov2Teacher:
        return Dinov2Teacher(spec, build(spec, checkpoint).model)

    return build_upstream_pos


# the factories of the specs in families.py
build_dino_vitb16 = _factory("vit_base_patch16_224", ssl_backbone_to_timm, "DINO")
build_ibot_vitb16 = _factory("vit_base_patch16_224", ssl_backbone_to_timm, "iBOT")
build_deit3_vitb16 = _factory("deit3_base_patch16_224", deit3_to_timm, "DeiT-III")
build_dbot_vitb16 = _factory("vit_base_patch16_224", dict, "dBOT-ft", global_pool="avg", fc_norm=True)
build_dino_vitb16_upstream_pos = _with_upstream_pos_resampling(build_dino_vitb16)
build_ibot_vitb16_upstream_pos = _with_upstream_pos_resampling(build_ibot_vitb16)
