"""SigLIP2 fixed-resolution vision towers (B/16, L/16, so400m/14 and /16, giant-opt/16), on timm's ViT.

The model is timm's ``VisionTransformer`` of ``vit_*_siglip_<res>`` (no class token, ``global_pool="map"``:
an attention-pool head ``attn_pool``), loaded strictly from either layout:

* timm's own (``patch_embed.proj``, ``pos_embed`` ``(1, M*M, D)``, ``blocks.{i}.attn.qkv``, ``norm``,
  ``attn_pool.{latent,q,kv,proj,norm,mlp}``), i.e. ``timm/vit_*_siglip_*.v2_webli``;
* Hugging Face's ``SiglipVisionModel`` / ``SiglipModel`` (the ``google/siglip2-*`` fixed-resolution cards):
  ``vision_model.embeddings.{patch_embedding,position_embedding}``,
  ``vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}``,
  ``vision_model.post_layernorm``, ``vision_model.head.{probe,attention.in_proj_*,attention.out_proj,
  layernorm,mlp}``. In a full ``SiglipModel`` checkpoint the text tower (``text_model.*``) and the
  contrastive ``logit_scale``/``logit_bias`` are dropped deliberately; any other key is refused.

Outputs: ``patch`` = tokens after the final LayerNorm (HF ``post_layernorm``, timm ``norm``); ``cls`` = the
attention-pool head over those tokens (HF ``pooler_output``); no registers. The MLPs use the tanh GELU of
the upstream towers, whatever timm's model definition defaults to (:func:`create_siglip2_vit`).

Off the native grid the ``(M, M)`` position embeddings are resized as Hugging Face's
``SiglipVisionEmbeddings.interpolate_pos_encoding`` does: bicubic to the exact grid, ``align_corners=False``,
no antialiasing (timm's own ``dynamic_img_size`` path antialiases, which differs when shrinking).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import CheckpointError
from .base import Teacher, TeacherOutput, find_state_dict, load_state_dict_strict, read_checkpoint
from .dinov2 import PosEmbedResampling, resample_patch_pos_embed
from .spec import TeacherSpec

HF_VISION_PREFIX = "vision_model."
HF_IGNORED_PREFIXES = ("text_model.",)  # the text tower of a full SiglipModel checkpoint
HF_IGNORED_KEYS = ("logit_scale", "logit_bias")  # its contrastive temperature and bias
HF_RESAMPLING = PosEmbedResampling(offset=0.0, antialias=False)
SIGLIP_ACTIVATION = "gelu_tanh"  # timm name of GELU with the tanh approximation

_HF_RENAMES = (  # (regex on the key without "vision_model.", timm replacement)
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."),
    (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."),
)
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


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
    """Whether ``state`` is a Hugging Face Siglip checkpoint (keys under ``vision_model.``)."""
    return any(k.startswith(HF_VISION_PREFIX) for k in state)


def siglip2_timm_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP2 weights in the timm or the Hugging Face layout -> the timm layout."""
    return hf_to_timm(state) if is_hf_layout(state) else dict(state)


def hf_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``SiglipVisionModel``/``SiglipModel`` state dict -> timm names.

    q/k/v projections ``(D, D)`` are stacked into ``attn.qkv`` ``(3D, D)``; the head's ``in_proj``
    ``(3D, D)`` splits into ``attn_pool.q`` ``(D, D)`` and ``attn_pool.kv`` ``(2D, D)``; ``probe`` becomes
    ``attn_pool.latent`` and ``position_embedding.weight`` ``(M*M, D)`` becomes ``pos_embed`` ``(1, M*M, D)``.
    Text-tower keys and ``logit_scale``/``logit_bias`` are dropped; any key no rule knows keeps its
    original name, so a strict load reports it as unexpected. A layer with some but not all of its q/k/v
    projections is a :class:`CheckpointError` naming the absent ones.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(HF_IGNORED_PREFIXES) or key in HF_IGNORED_KEYS:
            continue
        if not key.startswith(HF_VISION_PREFIX):
            out[key] = value
            continue
        name = key[len(HF_VISION_PREFIX):]
        match = _HF_QKV.match(name)
        if match:
            layer, projection, kind = match.groups()
            qkv.setdefault((layer, kind), {})[projection] = value
            continue
        out.update(_convert_hf_tensor(key, name, value))
    for (layer, kind), parts in qkv.items():
        absent = [f"{HF_VISION_PREFIX}encoder.layers.{layer}.self_attn.{p}_proj.{kind}"
                  for p in "qkv" if p not in parts]
        if absent:
            raise CheckpointError(f"Hugging Face SigLIP checkpoint lacks {', '.join(absent)} (the other projections of "
                                  f"layer {layer} are there): q, k and v are fused into blocks.{layer}.attn.qkv")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _convert_hf_tensor(key: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One HF tensor (``key`` = ``vision_model.`` + ``name``) -> its timm name(s) and value(s)."""
    if name == "embeddings.position_embedding.weight":
        return {"pos_embed": value.unsqueeze(0)}
    if name == "head.probe":
        return {"attn_pool.latent": value}
    if name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
        dim = value.shape[0] // 3
        kind = name.rsplit("_", 1)[1]
        return {f"attn_pool.q.{kind}": value[:dim], f"attn_pool.kv.{kind}": value[dim:]}
    for pattern, replacement in _HF_RENAMES:
        if re.match(pattern, name):
            return {re.sub(pattern, replacement, name): value}
    return {key: value}


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
    try:
        converted = siglip2_timm_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {source} ({layout} layout): {exc}") from exc
    load_state_dict_strict(vit, converted, f"{source} ({layout} layout, compared in timm names)")
    return Siglip2Teacher(spec, vit)


def build_siglip2_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Siglip2Teacher:
    """Factory of the ``siglip2_*`` names: a ``.safetensors``/``.pth``/``.bin`` state dict in either layout."""
    state = find_state_dict(read_checkpoint(checkpoint)) if checkpoint is not None else None
    return siglip2_teacher_from_state(spec, state, str(checkpoint))
