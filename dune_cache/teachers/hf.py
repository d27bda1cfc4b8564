"""Hugging Face transformers layouts of the teacher families: recognised from the keys, checked against
``config.json``, converted to the release (or timm) names the family loaders already read.

A Hugging Face checkpoint is a model folder (``config.json`` + ``model.safetensors`` or index + shards, see
:mod:`.checkpoint_files`) or its ``model.safetensors``; only safetensors are read. Each family's converter
maps transformers' parameter names onto the names of the layout its loader accepts, so that a release file,
a timm file and a Hugging Face folder of the same weights build one and the same model:

==================  =====================================================  ==========================
family              transformers classes (model_type)                      converted to
==================  =====================================================  ==========================
DINOv2              ``Dinov2Model`` (dinov2),                              facebookresearch release
                    ``Dinov2WithRegistersModel`` (dinov2_with_registers)
DINOv3              ``DINOv3ViTModel`` (dinov3_vit)                        timm ``Eva``
SigLIP / SigLIP2    ``SiglipModel`` (siglip), ``SiglipVisionModel``        timm ``VisionTransformer``
                    (siglip_vision_model), keys under ``vision_model.``    (in :mod:`.siglip2`)
                    or not
SAM                 ``SamModel`` (sam), ``SamVisionModel``                 segment-anything release
                    (sam_vision_model): ``vision_encoder.*``
Depth Anything V2   ``DepthAnythingForDepthEstimation`` (depth_anything):  Depth-Anything-V2 release
                    ``backbone.*`` (a ``Dinov2Backbone``)
==================  =====================================================  ==========================

Names are those transformers 5.25.0 writes with ``save_pretrained`` (``models/*/modeling_*.py`` of the PyPI
release, huggingface/transformers tag ``v5.25.0``), which are the Hub files' names: its DINOv2 modules hold
``q_proj``/``k_proj``/``v_proj``/``o_proj`` in memory but are saved (and loaded) under the Hub names
``attention.attention.{query,key,value}``/``attention.output.dense`` (``conversion_mapping.py``); both are read.

A transformers ``config.json`` (one with ``model_type``) beside the weights is checked against the model the
teacher name builds (:func:`check_hf_config`): hidden size, depth, heads, patch and image size, registers,
MLP kind, norm epsilon, activation, ...; a field the file omits takes transformers' default for that class.
A ``config.json`` without ``model_type`` (e.g. a timm Hub folder's) is not a transformers config: not checked.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import CheckpointError
from .base import find_state_dict, read_checkpoint
from .checkpoint_files import read_hf_config

HF_FORMAT = "hf"  # provenance checkpoint.format of a Hugging Face layout

# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's tensors and, for a Hugging Face folder (or its weights file), its transformers config.

    ``state``: tensor name -> tensor; ``config``: the parsed ``config.json`` when it is a transformers config
    (has ``model_type``), else ``None``; ``source``: the path given, for messages.
    """

    state: dict[str, torch.Tensor]
    config: dict | None
    source: str


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read checkpoint ``path`` (a file, or a Hugging Face folder: safetensors only) and its transformers config."""
    config = read_hf_config(Path(path))
    if config is not None and "model_type" not in config:
        config = None
    return LoadedCheckpoint(state=find_state_dict(read_checkpoint(path)), config=config, source=str(path))


# -------------------------------------------------------------------------------------------------
# Renaming
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fused:
    """Tensors stored apart upstream and concatenated (dim 0) in the target layout, e.g. q, k, v -> qkv.

    ``pattern`` matches a source key with named groups, ``part`` among them (one of ``parts``, which give the
    concatenation order); ``target`` is the target name, a ``re`` template over the other groups.
    """

    pattern: str
    parts: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class KeyRules:
    """How one layout's names become another's: ``dropped`` keys (regexes) are left out deliberately, ``fused``
    groups concatenated, every other key renamed by the first of ``renames`` (regex, template) that matches;
    a key no rule knows keeps its name, so that a strict load reports it as unexpected."""

    renames: tuple[tuple[str, str], ...]
    fused: tuple[Fused, ...] = ()
    dropped: tuple[str, ...] = ()


def convert_keys(state: Mapping[str, torch.Tensor], rules: KeyRules, source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed by ``rules``; a :class:`CheckpointError` naming the absent keys of a partial fused group."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[Fused, re.Match, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in rules.dropped):
            continue
        fused = next(((f, m) for f in rules.fused if (m := re.fullmatch(f.pattern, key))), None)
        if fused is not None:
            rule, match = fused
            groups.setdefault(match.expand(rule.target), (rule, match, {}))[2][match.group("part")] = value
            continue
        out[_renamed(key, rules.renames)] = value
    for target, (rule, match, parts) in groups.items():
        absent = [_with_part(match, p) for p in rule.parts if p not in parts]
        if absent:
            raise CheckpointError(f"checkpoint {source} lacks {', '.join(absent)} (the other parts are there): "
                                  f"{'/'.join(rule.parts)} are fused into {target}")
        out[target] = torch.cat([parts[p] for p in rule.parts])
    return out


def _with_part(match: re.Match, part: str) -> str:
    """The key ``match`` matched, with its ``part`` group replaced by ``part`` (the name of a sibling tensor)."""
    key = match.string
    return key[:match.start("part")] + part + key[match.end("part"):]


def _renamed(key: str, renames: Sequence[tuple[str, str]]) -> str:
    """``key`` rewritten by the first matching ``(regex, template)`` of ``renames``, else unchanged."""
    for pattern, template in renames:
        if re.match(pattern, key):
            return re.sub(pattern, template, key, count=1)
    return key


# -------------------------------------------------------------------------------------------------
# config.json against the teacher's geometry
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfGeometry:
    """What a transformers ``config.json`` must say for one teacher: its ``model_type`` (one of ``model_types``),
    and ``fields`` (name -> value) read from its sub-config ``section`` (``vision_config``, ``backbone_config``)
    when it has one, else from its top level (a ``SiglipVisionModel``'s or ``SamVisionModel``'s config), a field
    the file omits taking ``defaults[name]`` (transformers' default for that class)."""

    model_types: tuple[str, ...]
    fields: dict[str, object]
    defaults: dict[str, object]
    section: str | None = None


def check_hf_config(config: dict | None, geometry: HfGeometry, teacher: str, source: str) -> None:
    """Refuse (:class:`CheckpointError` naming every field that differs) a transformers ``config`` that does not
    describe the model ``teacher`` builds; ``None`` (no transformers config) passes."""
    if config is None:
        return
    model_type = config.get("model_type")
    if model_type not in geometry.model_types:
        raise CheckpointError(f"{source}: config.json model_type {model_type!r} is not a {teacher} checkpoint "
                              f"(expected {' or '.join(map(repr, geometry.model_types))}); pick the teacher of that "
                              "model family")
    nested = isinstance(config.get(geometry.section), dict)
    section = config[geometry.section] if nested else config
    where = f"{geometry.section}." if nested else ""
    wrong = [f"{where}{name} {section.get(name, geometry.defaults.get(name))!r} (teacher: {want!r})"
             for name, want in geometry.fields.items()
             if not _same(section.get(name, geometry.defaults.get(name)), want)]
    if wrong:
        raise CheckpointError(f"{source}: config.json does not describe {teacher}: {'; '.join(wrong)}; give the "
                              "checkpoint of this teacher, or the teacher name whose geometry the folder has")


def _same(value: object, want: object) -> bool:
    """Config value ``value`` equals ``want`` (a square ``[n, n]`` equals ``n``; lists equal tuples; floats within
    1e-9 relative)."""
    if isinstance(value, (list, tuple)) and not isinstance(want, (list, tuple)):
        return len(value) == 2 and value[0] == value[1] and _same(value[0], want)
    if isinstance(value, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(value) == len(want) and all(_same(a, b) for a, b in zip(value, want))
    if isinstance(want, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, want, rel_tol=1e-9)
    return value == want


def vit_fields(embed_dim: int, depth: int, heads: int, patch: int) -> dict[str, object]:
    """The config fields every ViT family shares: width, depth, heads, patch size."""
    return {"hidden_size": embed_dim, "num_hidden_layers": depth, "num_attention_heads": heads, "patch_size": patch}


# -------------------------------------------------------------------------------------------------
# DINOv2 (Dinov2Model, Dinov2WithRegistersModel) -> facebookresearch release names
# -------------------------------------------------------------------------------------------------
_LAYER = r"^encoder\.layer\.(?P<layer>\d+)\."
DINOV2_RULES = KeyRules(
    renames=(
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (_LAYER + r"norm([12])\.", r"blocks.\1.norm\2."),
        (_LAYER + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
        (_LAYER + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (_LAYER + r"mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
        (_LAYER + r"mlp\.weights_in\.", r"blocks.\1.mlp.w12."),  # SwiGLU (ViT-g): [gate; up] = release w12
        (_LAYER + r"mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
        (r"^layernorm\.", "norm."),
    ),
    fused=(
        Fused(_LAYER + r"attention\.attention\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$",
              ("query", "key", "value"), r"blocks.\g<layer>.attn.qkv.\g<kind>"),
        Fused(_LAYER + r"attention\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)$",
              ("q", "k", "v"), r"blocks.\g<layer>.attn.qkv.\g<kind>"),
        Fused(_LAYER + r"mlp\.(?P<part>gate|up)_proj\.(?P<kind>weight|bias)$",
              ("gate", "up"), r"blocks.\g<layer>.mlp.w12.\g<kind>"),
    ),
)
DINOV2_DEFAULTS = {  # configuration_dinov2.py / configuration_dinov2_with_registers.py (transformers 5.25.0)
    "dinov2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14,
               "image_size": 224, "mlp_ratio": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
               "use_swiglu_ffn": False, "num_register_tokens": 0},
    "dinov2_with_registers": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "patch_size": 16, "image_size": 224, "mlp_ratio": 4, "hidden_act": "gelu",
                              "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False,
                              "num_register_tokens": 4},
}


def is_hf_dinov2(state: Mapping[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether ``state`` holds a transformers DINOv2 (``{prefix}embeddings.cls_token``, ``{prefix}encoder.layer.*``)."""
    return f"{prefix}embeddings.cls_token" in state and any(k.startswith(f"{prefix}encoder.layer.") for k in state)


def hf_dinov2_to_release(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict -> facebookresearch DINOv2 names.

    query/key/value ``(D, D)`` each -> ``blocks.{i}.attn.qkv`` ``(3D, D)``; ``layer_scale{1,2}.lambda1`` ->
    ``ls{1,2}.gamma``; ``position_embeddings`` ``(1, 1 + M*M, D)`` -> ``pos_embed`` (same tensor, the CLS entry
    first as in the release); ``register_tokens`` ``(1, R, D)`` kept; SwiGLU ``weights_in`` ``(2H, D)`` = ``w12``.
    """
    return convert_keys(state, DINOV2_RULES, source)


def dinov2_hf_geometry(embed_dim: int, depth: int, heads: int, patch: int, grid: int, registers: int,
                       swiglu: bool, norm_eps: float, section: str | None = None,
                       model_types: tuple[str, ...] | None = None) -> HfGeometry:
    """What a DINOv2 config.json says for a ViT of this geometry (``grid``: the position-embedding side, 37)."""
    model_type = "dinov2_with_registers" if registers else "dinov2"
    fields = {**vit_fields(embed_dim, depth, heads, patch), "image_size": grid * patch, "layer_norm_eps": norm_eps,
              "use_swiglu_ffn": swiglu, "mlp_ratio": 4, "qkv_bias": True}
    if not swiglu:  # transformers' SwiGLU (ViT-g) is SiLU whatever hidden_act says
        fields["hidden_act"] = "gelu"
    if registers:
        fields["num_register_tokens"] = registers
    return HfGeometry(model_types=model_types or (model_type,), fields=fields, defaults=DINOV2_DEFAULTS[model_type],
                      section=section)


# -------------------------------------------------------------------------------------------------
# Depth Anything V2 (DepthAnythingForDepthEstimation) -> the release's pretrained.* / depth_head.*
# -------------------------------------------------------------------------------------------------
DEPTH_ANYTHING_BACKBONE = "backbone."
DEPTH_ANYTHING_HEAD = ("neck.", "head.")  # transformers' DPT neck and head: the release depth_head.*, not read


def is_hf_depth_anything(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds a transformers Depth Anything (a DINOv2 under ``backbone.``)."""
    return is_hf_dinov2(state, DEPTH_ANYTHING_BACKBONE)


def hf_depth_anything_to_release(state: Mapping[str, torch.Tensor], source: str, encoder_prefix: str,
                                 head_prefix: str) -> dict[str, torch.Tensor]:
    """``backbone.*`` (DINOv2, converted as :func:`hf_dinov2_to_release`) -> ``{encoder_prefix}*``; the DPT
    ``neck.*``/``head.*`` -> under ``{head_prefix}`` (ignored by the loader, as the release head is); any other
    key kept as is (the loader names it)."""
    backbone = {k[len(DEPTH_ANYTHING_BACKBONE):]: v for k, v in state.items() if k.startswith(DEPTH_ANYTHING_BACKBONE)}
    out = {encoder_prefix + k: v for k, v in hf_dinov2_to_release(backbone, source).items()}
    for key, value in state.items():
        if not key.startswith(DEPTH_ANYTHING_BACKBONE):
            out[head_prefix + key if key.startswith(DEPTH_ANYTHING_HEAD) else key] = value
    return out


def depth_anything_hf_geometry(backbone: HfGeometry, dpt_blocks: Sequence[int]) -> HfGeometry:
    """A Depth Anything config.json: its ``backbone_config`` is ``backbone``'s DINOv2 geometry, whose
    ``out_indices`` (transformers stages: 0 = the embeddings, so block ``k`` is stage ``k + 1``) are the 4 blocks
    the DPT head reads."""
    fields = {"model_type": "dinov2", **backbone.fields, "out_indices": [k + 1 for k in dpt_blocks]}
    defaults = {**backbone.defaults, "model_type": None}
    return HfGeometry(model_types=("depth_anything",), fields=fields, defaults=defaults, section="backbone_config")


# -------------------------------------------------------------------------------------------------
# DINOv3 (DINOv3ViTModel) -> timm Eva names
# -------------------------------------------------------------------------------------------------
_V3_LAYER = r"^(?:model\.)?layer\.(?P<layer>\d+)\."  # saved as layer.*; model.layer.* in memory
DINOV3_DROPPED = (r"embeddings\.mask_token",)  # training only (masked patches)
DINOV3_RULES = KeyRules(
    renames=(
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (_V3_LAYER + r"norm([12])\.", r"blocks.\1.norm\2."),
        (_V3_LAYER + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (_V3_LAYER + r"attention\.([qv])_proj\.bias$", r"blocks.\1.attn.\2_bias"),
        (_V3_LAYER + r"layer_scale([12])\.lambda1$", r"blocks.\1.gamma_\2"),
        (_V3_LAYER + r"mlp\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),  # SwiGLU: silu(gate) * up
        (_V3_LAYER + r"mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
        (r"^norm\.", "norm."),
    ),
    fused=(Fused(_V3_LAYER + r"attention\.(?P<part>[qkv])_proj\.weight$", ("q", "k", "v"),
                 r"blocks.\g<layer>.attn.qkv.weight"),),
    dropped=DINOV3_DROPPED,
)
_V3_UP = _V3_LAYER + r"mlp\.up_proj\."
_V3_K_BIAS = re.compile(_V3_LAYER + r"attention\.k_proj\.bias$")
DINOV3_DEFAULTS = {  # configuration_dinov3_vit.py (transformers 5.25.0)
    "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
    "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "rope_theta": 100.0, "key_bias": False,
    "use_gated_mlp": False, "num_register_tokens": 0, "layerscale_value": 1.0,
}


def is_hf_dinov3(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds a transformers DINOv3 ViT (``embeddings.register_tokens``, ``[model.]layer.*``)."""
    return "embeddings.register_tokens" in state and any(re.match(_V3_LAYER, k) for k in state)


def hf_dinov3_to_timm(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers ``DINOv3ViTModel`` state dict -> timm ``Eva`` names (as timm's DINOv3 files have them).

    q/k/v weights ``(D, D)`` -> ``attn.qkv.weight`` ``(3D, D)``; the q and v biases -> ``attn.q_bias``/``v_bias``
    (the key has none: timm's model holds a fixed zero key bias, as upstream masks it); ``layer_scale{1,2}`` ->
    ``gamma_{1,2}``; ``register_tokens`` -> ``reg_token``; MLP ``up_proj``/``down_proj`` -> ``fc1``/``fc2``, or
    with ``gate_proj`` (SwiGLU) ``gate``/``up``/``down`` -> ``fc1_g``/``fc1_x``/``fc2``. RoPE has no tensor in
    the file: transformers computes its frequencies from ``rope_theta`` as timm does (:func:`dinov3_hf_geometry`).
    """
    k_bias = sorted(k for k in state if _V3_K_BIAS.match(k))
    if k_bias:
        raise CheckpointError(f"checkpoint {source}: {k_bias[0]} is present, but DINOv3 has no key bias (its key "
                              "bias is masked to zero; config key_bias=false), which the teacher's model holds fixed")
    gated = any(re.match(_V3_LAYER + r"mlp\.gate_proj\.", k) for k in state)
    up = (_V3_UP, r"blocks.\1.mlp.fc1_x." if gated else r"blocks.\1.mlp.fc1.")
    rules = KeyRules(renames=DINOV3_RULES.renames + (up,), fused=DINOV3_RULES.fused, dropped=DINOV3_RULES.dropped)
    return convert_keys(state, rules, source)


def dinov3_hf_geometry(embed_dim: int, depth: int, heads: int, patch: int, registers: int, mlp_hidden: int,
                       gated: bool, norm_eps: float, rope_theta: float) -> HfGeometry:
    """What a DINOv3 config.json says for timm's ``Eva`` of this geometry (``rope_theta``: timm's RoPE
    temperature; the RoPE periods come from it, not from the file)."""
    fields = {**vit_fields(embed_dim, depth, heads, patch), "num_register_tokens": registers,
              "intermediate_size": mlp_hidden, "use_gated_mlp": gated, "hidden_act": "silu" if gated else "gelu",
              "layer_norm_eps": norm_eps, "rope_theta": rope_theta, "key_bias": False}
    return HfGeometry(model_types=("dinov3_vit",), fields=fields, defaults=DINOV3_DEFAULTS)


# -------------------------------------------------------------------------------------------------
# SAM (SamModel, SamVisionModel) -> segment-anything release names
# -------------------------------------------------------------------------------------------------
SAM_VISION = "vision_encoder."
_SAM_LAYER = r"^vision_encoder\.layers\.(\d+)\."
SAM_RULES = KeyRules(
    renames=(
        (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
        (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
        (_SAM_LAYER + r"layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
        (_SAM_LAYER + r"(attn|mlp)\.", r"image_encoder.blocks.\1.\2."),  # attn.{qkv,proj,rel_pos_h/w}, mlp.lin1/2
        (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
        (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
        (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
        (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    ),
    # SAM's prompt side (the release's prompt_encoder.*/mask_decoder.*, also ignored there); shared_image_embedding
    # is the prompt encoder's random Fourier matrix (release prompt_encoder.pe_layer.*)
    dropped=(r"prompt_encoder\..*", r"mask_decoder\..*", r"shared_image_embedding\..*"),
)
SAM_DEFAULTS = {  # SamVisionConfig (transformers 5.25.0 configuration_sam.py)
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16, "image_size": 1024,
    "output_channels": 256, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11], "hidden_act": "gelu",
    "layer_norm_eps": 1e-6, "use_abs_pos": True, "use_rel_pos": True,
}


def is_hf_sam(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds a transformers SAM vision encoder (``vision_encoder.*``)."""
    return f"{SAM_VISION}patch_embed.projection.weight" in state


def hf_sam_to_release(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers ``SamModel``/``SamVisionModel`` state dict -> segment-anything's ``image_encoder.*`` names.

    ``layers.{i}.layer_norm{1,2}`` -> ``blocks.{i}.norm{1,2}``; ``attn.*`` (fused ``qkv``, ``proj``, the relative
    position tables ``rel_pos_h/w`` ``(2S - 1, D_head)``) and ``mlp.lin{1,2}`` keep their names; the neck's
    ``conv1``/``layer_norm1``/``conv2``/``layer_norm2`` -> ``neck.0``..``neck.3``; ``patch_embed.projection`` ->
    ``patch_embed.proj``. The prompt encoder, mask decoder and ``shared_image_embedding`` are dropped.
    """
    return convert_keys(state, SAM_RULES, source)


def sam_hf_geometry(embed_dim: int, depth: int, heads: int, patch: int, canvas: int, window: int,
                    global_blocks: Sequence[int], neck_dim: int, norm_eps: float) -> HfGeometry:
    """What a SAM config.json's ``vision_config`` (``SamVisionModel``'s: its top level) says for this image encoder;
    the MLP width is checked by the strict load (``mlp_dim`` defaults to ``mlp_ratio * hidden_size``)."""
    fields = {**vit_fields(embed_dim, depth, heads, patch), "image_size": canvas, "window_size": window,
              "global_attn_indexes": list(global_blocks), "output_channels": neck_dim, "layer_norm_eps": norm_eps,
              "hidden_act": "gelu", "use_abs_pos": True, "use_rel_pos": True}
    return HfGeometry(model_types=("sam", "sam_vision_model"), fields=fields, defaults=SAM_DEFAULTS,
                      section="vision_config")
