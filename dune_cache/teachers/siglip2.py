"""SigLIP2 fixed-resolution vision towers (B/16, L/16, so400m/14 and /16, giant-opt/16), on timm's ViT.

The model is timm's ``VisionTransformer`` of ``vit_*_siglip_<res>`` (no class token, ``global_pool="map"``:
an attention-pool head ``attn_pool``), loaded strictly from either layout:

* timm's own (``patch_embed.proj``, ``pos_embed`` ``(1, M*M, D)``, ``blocks.{i}.attn.qkv``, ``norm``,
  ``attn_pool.{latent,q,kv,proj,norm,mlp}``), i.e. ``timm/vit_*_siglip_*.v2_webli``;
* Hugging Face's ``SiglipVisionModel`` / ``SiglipModel`` (the ``google/siglip2-*`` fixed-resolution cards), a
  folder (``config.json`` checked against the teacher) or its ``model.safetensors``:
  ``vision_model.embeddings.{patch_embedding,position_embedding}``,
  ``vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}``,
  ``vision_model.post_layernorm``, ``vision_model.head.{probe,attention.in_proj_*,attention.out_proj,
  layernorm,mlp}``. In a full ``SiglipModel`` checkpoint the text tower (``text_model.*``) and the
  contrastive ``logit_scale``/``logit_bias`` are dropped deliberately; any other key is refused. A
  ``SiglipVisionModel`` saved by transformers 5 has the same keys without ``vision_model.``: read alike.
  SigLIP2 NaFlex towers (``Siglip2VisionModel``/``Siglip2Model``) are refused (not fixed-resolution).

Outputs: ``patch`` = tokens after the final LayerNorm (HF ``post_layernorm``, timm ``norm``); ``cls`` = the
attention-pool head over those tokens (HF ``pooler_output``); no registers. The MLPs use the tanh GELU of
the upstream towers, whatever timm's model definition defaults to (:func:`create_siglip2_vit`).

Off the native grid the ``(M, M)`` position embeddings are resized as Hugging Face's
``SiglipVisionEmbeddings.interpolate_pos_encoding`` does: bicubic to the exact grid, ``align_corners=False``,
no antialiasing (timm's own ``dynamic_img_size`` path antialiases, which differs when shrinking).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import CheckpointError
from .base import Teacher, TeacherOutput, load_state_dict_strict
from .dinov2 import PosEmbedResampling, resample_patch_pos_embed
from .families import SIGLIP2_HF_CARD_RESOLUTION
from .hf import (
    HF_FORMAT,
    Fused,
    HfGeometry,
    KeyRules,
    LoadedCheckpoint,
    check_hf_config,
    convert_keys,
    load_checkpoint,
    vit_fields,
)
from .spec import TeacherSpec

HF_VISION_PREFIX = "vision_model."
HF_UNPREFIXED_MARK = "embeddings.patch_embedding.weight"  # a SiglipVisionModel saved by transformers 5: no prefix
HF_RESAMPLING = PosEmbedResampling(offset=0.0, antialias=False)
SIGLIP_ACTIVATION = "gelu_tanh"  # timm name of GELU with the tanh approximation
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")

_V = r"^vision_model\."
_V_LAYER = _V + r"encoder\.layers\.(?P<layer>\d+)\."
HF_RULES = KeyRules(
    renames=(
        (_V + r"embeddings\.patch_embedding\.", "patch_embed.proj."),
        (_V_LAYER + r"layer_norm([12])\.", r"blocks.\1.norm\2."),
        (_V_LAYER + r"self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (_V_LAYER + r"mlp\.", r"blocks.\1.mlp."),
        (_V + r"post_layernorm\.", "norm."),
        (_V + r"head\.probe$", "attn_pool.latent"),
        (_V + r"head\.attention\.out_proj\.", "attn_pool.proj."),
        (_V + r"head\.layernorm\.", "attn_pool.norm."),
        (_V + r"head\.mlp\.", "attn_pool.mlp."),
    ),
    fused=(Fused(_V_LAYER + r"self_attn\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)$", ("q", "k", "v"),
                 r"blocks.\g<layer>.attn.qkv.\g<kind>"),),
    # a full SiglipModel's text tower and its contrastive temperature and bias
    dropped=(r"text_model\..*", "logit_scale", "logit_bias"),
)
HF_POS_EMBED = "vision_model.embeddings.position_embedding.weight"
HF_IN_PROJ = "vision_model.head.attention.in_proj_"
SIGLIP_DEFAULTS = {  # SiglipVisionConfig (transformers 5.25.0 configuration_siglip.py)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "patch_size": 16, "image_size": 224, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}


def create_siglip2_vit(arch: str, depth: int | None = None, device: torch.device | str | None = None
                       ) -> VisionTransformer:
    """timm SigLIP ViT ``arch`` (e.g. ``vit_base_patch16_siglip_224``) with its ``attn_pool`` head, no classifier.

    Always the tanh-approximated GELU of the upstream towers (HF ``hidden_act="gelu_pytorch_tanh"``):
    several timm definitions (B/16, L/16 at 256/384, so400m/14) default to the exact GELU instead.
    ``depth`` overrides the number of blocks (reduced-depth models in tests).
    """
    overrides = {} if depth is None else {"depth": depth}
    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, device=device,
                             act_layer=SIGLIP_ACTIVATION, **overrides)


def is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a Hugging Face Siglip checkpoint (keys under ``vision_model.``, or a transformers-5
    ``SiglipVisionModel``'s without that prefix)."""
    return HF_UNPREFIXED_MARK in state or any(k.startswith(HF_VISION_PREFIX) for k in state)


def siglip2_timm_state(state: Mapping[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """SigLIP2 weights in the timm or the Hugging Face layout -> the timm layout."""
    return hf_to_timm(state, source) if is_hf_layout(state) else dict(state)


def hf_to_timm(state: Mapping[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """A Hugging Face ``SiglipVisionModel``/``SiglipModel`` state dict -> timm names.

    q/k/v projections ``(D, D)`` are stacked into ``attn.qkv`` ``(3D, D)``; the head's ``in_proj``
    ``(3D, D)`` splits into ``attn_pool.q`` ``(D, D)`` and ``attn_pool.kv`` ``(2D, D)``; ``probe`` becomes
    ``attn_pool.latent`` and ``position_embedding.weight`` ``(M*M, D)`` becomes ``pos_embed`` ``(1, M*M, D)``.
    Keys without the ``vision_model.`` prefix (a transformers-5 ``SiglipVisionModel``) are read as under it.
    Text-tower keys and ``logit_scale``/``logit_bias`` are dropped; any key no rule knows keeps its
    original name, so a strict load reports it as unexpected. A layer with some but not all of its q/k/v
    projections is a :class:`CheckpointError` naming the absent ones; so is a NaFlex tower (:func:`check_not_naflex`).
    """
    if HF_UNPREFIXED_MARK in state:
        state = {HF_VISION_PREFIX + k: v for k, v in state.items()}
    check_not_naflex(state, None, source)
    rest = {k: v for k, v in state.items() if k != HF_POS_EMBED and not k.startswith(HF_IN_PROJ)}
    out = convert_keys(rest, HF_RULES, source)
    if HF_POS_EMBED in state:
        out["pos_embed"] = state[HF_POS_EMBED].unsqueeze(0)
    for key in (k for k in state if k.startswith(HF_IN_PROJ)):
        value, kind = state[key], key.removeprefix(HF_IN_PROJ)
        dim = value.shape[0] // 3
        out.update({f"attn_pool.q.{kind}": value[:dim], f"attn_pool.kv.{kind}": value[dim:]})
    return out


def check_not_naflex(state: Mapping[str, torch.Tensor], config: dict | None, source: str) -> None:
    """Refuse a SigLIP2 NaFlex tower (``Siglip2VisionModel``/``Siglip2Model``: config model_type siglip2*, or a
    2-d ``patch_embedding`` (a Linear over flattened patches)): the ``siglip2_*`` teachers are fixed-resolution."""
    patch_embed = state.get(HF_VISION_PREFIX + "embeddings.patch_embedding.weight")
    if (config or {}).get("model_type") in NAFLEX_MODEL_TYPES or (patch_embed is not None and patch_embed.dim() == 2):
        raise CheckpointError(
            f"checkpoint {source} is a SigLIP2 NaFlex tower (Siglip2VisionModel/Siglip2Model: a Linear patch "
            "embedding, position embeddings resized bilinearly per image), not covered: the siglip2_* teachers are "
            "the fixed-resolution towers (SiglipModel cards such as google/siglip2-base-patch16-224)")


def siglip2_hf_expected(spec: TeacherSpec, depth: int | None = None) -> HfGeometry:
    """What a transformers Siglip config.json (its ``vision_config``, or a ``SiglipVisionModel``'s top level) says
    for ``spec``'s tower: read off timm's model (meta device); image size = the Hub card's (384 for the 27x27
    so400m/14)."""
    vit = create_siglip2_vit(spec.arch, depth, device="meta")
    patch, grid = vit.patch_embed.patch_size[0], vit.patch_embed.grid_size[0]
    fields = {**vit_fields(vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, patch),
              "intermediate_size": vit.blocks[0].mlp.fc1.out_features,
              "image_size": SIGLIP2_HF_CARD_RESOLUTION.get(grid * patch, grid * patch),
              "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vit.norm.eps, "vision_use_head": True}
    return HfGeometry(model_types=("siglip", "siglip_vision_model"), fields=fields, defaults=SIGLIP_DEFAULTS,
                      section="vision_config")


def siglip2_checkpoint_state(spec: TeacherSpec, ckpt: LoadedCheckpoint, depth: int | None = None
                             ) -> tuple[dict[str, torch.Tensor], str]:
    """``ckpt``'s weights (for :func:`siglip2_teacher_from_state`) and their layout, ``"hf"`` or ``"timm"``; a
    transformers config.json is checked against ``spec`` (at ``depth`` blocks when given)."""
    if not is_hf_layout(ckpt.state):
        return ckpt.state, "timm"
    check_not_naflex({}, ckpt.config, ckpt.source)
    check_hf_config(ckpt.config, siglip2_hf_expected(spec, depth), spec.name, ckpt.source)
    return ckpt.state, HF_FORMAT


class Siglip2Teacher(Teacher):
    """A SigLIP2 vision tower: cls = attention-pool output ``(B, D)``, patch = post-norm tokens ``(B, h, w, D)``."""

    # intermediate blocks (--blocks): no prefix tokens, so a block's cls is the mean of its patch tokens
    level_layout = (0, 0, "mean_patch")

    def __init__(self, spec: TeacherSpec, vit: VisionTransformer):
        super().__init__(spec)
        self.vit = vit

    def block_modules(self) -> nn.Module:
        """``vit.blocks`` (``nn.Sequential``): each block's output is the residual stream before ``vit.norm``."""
        return self.vit.blocks

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images ``(B, 3, H, W)`` -> patch tokens with position embeddings ``(B, h*w, D)``, grid."""
        patches = self.vit.patch_embed(x)  # (B, h, w, D)
        b, h, w, d = patches.shape
        pos_embed = resample_patch_pos_embed(self.vit.pos_embed, (h, w), HF_RESAMPLING)
        return patches.reshape(b, h * w, d) + pos_embed, (h, w)

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        tokens, (h, w) = self.embed(x)
        tokens = self.vit.norm(self.vit.blocks(self.vit.norm_pre(tokens)))  # (B, h*w, D)
        b, _, d = tokens.shape
        return TeacherOutput(cls=self.vit.attn_pool(tokens), registers=tokens.new_zeros(b, 0, d),
                             patch=tokens.reshape(b, h, w, d))


def siglip2_teacher_from_state(spec: TeacherSpec, state: Mapping[str, torch.Tensor] | None, source: str,
                               depth: int | None = None) -> Siglip2Teacher:
    """Build ``spec``'s tower (``spec.arch`` is a timm name) and load ``state`` (either layout) strictly.

    ``state=None`` keeps random weights; ``depth`` overrides the number of blocks (tests).
    """
    if state is None:
        return Siglip2Teacher(spec, create_siglip2_vit(spec.arch, depth))
    # The strict load fills every tensor (the model has no buffers): skip the random initialisation.
    vit = create_siglip2_vit(spec.arch, depth, device="meta").to_empty(device="cpu")
    layout = "Hugging Face" if is_hf_layout(state) else "timm"
    converted = siglip2_timm_state(state, f"{source} ({layout} layout)")
    load_state_dict_strict(vit, converted, f"{source} ({layout} layout, compared in timm names)")
    return Siglip2Teacher(spec, vit)


def build_siglip2_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Siglip2Teacher:
    """Factory of the ``siglip2_*`` names: a ``.safetensors``/``.pth``/``.bin`` state dict in either layout, or a
    Hugging Face folder."""
    if checkpoint is None:
        return siglip2_teacher_from_state(spec, None, "random weights")
    ckpt = load_checkpoint(checkpoint)
    state, layout = siglip2_checkpoint_state(spec, ckpt)
    teacher = siglip2_teacher_from_state(spec, state, ckpt.source)
    teacher.checkpoint_format = layout
    return teacher
