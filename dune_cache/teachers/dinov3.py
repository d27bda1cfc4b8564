"""DINOv3 teachers (facebookresearch/dinov3), run on timm's ``Eva`` (``vit_*_patch16_dinov3[_qkvb]``).

Checkpoints load from either layout, strictly:

* the release ``.pth`` files (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` ...): ``cls_token``,
  ``storage_tokens`` ``(1, 4, D)``, ``mask_token`` (training only, dropped), ``rope_embed.periods``
  ``(D_head / 4,)``, ``blocks.{i}.*`` with ``ls1.gamma``/``ls2.gamma``, ``attn.qkv.bias`` and its
  ``attn.qkv.bias_mask`` (the key third masked to zero), a GELU ``mlp.fc1``/``mlp.fc2`` (S, B, L) or a
  SwiGLU ``mlp.w1``/``mlp.w2``/``mlp.w3`` (S+, H+, 7B), ``norm``; the 7B also holds ``local_cls_norm``
  (used upstream on local crops in training only, dropped);
* timm's layout: ``reg_token``, ``gamma_1``/``gamma_2``, ``attn.q_bias``/``attn.v_bias`` (``_qkvb``
  models; timm's plain ``vit_*_patch16_dinov3`` files have no qkv bias and load into that model),
  ``mlp.fc1_g``/``mlp.fc1_x``/``mlp.fc2``;
* a Hugging Face folder (or its ``model.safetensors``) of ``DINOv3ViTModel``
  (``facebook/dinov3-*-pretrain-lvd1689m``), converted to timm's names (:func:`.hf.hf_dinov3_to_timm`), its
  ``config.json`` checked against the teacher's geometry (``rope_theta`` included).

RoPE exactly as upstream evaluates it for any ``h x w`` grid: patch centres ``(i + 0.5) / h`` and
``(j + 0.5) / w`` mapped to ``[-1, 1]`` (``normalize_coords="separate"``), no shift/jitter/rescale (these
are training-only), angles ``2 pi * coord / period``. The periods come from the release checkpoint's
``rope_embed.periods`` (upstream loads that buffer, which the release stores rounded to bfloat16); a
timm-layout file or a Hugging Face folder has none and gets timm's, computed in float32 from base 100 like
upstream's init, and like transformers' ``DINOv3ViTRopePositionEmbedding`` (its ``inv_freq`` from
``rope_theta``): such a teacher is transformers' model, not quite the release's (docs/teachers.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

from ..errors import CheckpointError
from .base import Teacher, TeacherOutput, load_state_dict_strict, tokens_to_output
from .hf import (
    HF_FORMAT,
    HfGeometry,
    LoadedCheckpoint,
    check_hf_config,
    dinov3_hf_geometry,
    hf_dinov3_to_timm,
    is_hf_dinov3,
    load_checkpoint,
)
from .spec import TeacherSpec

PERIODS_KEY = "rope_embed.periods"
_TRAINING_ONLY = ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias")
_RELEASE_RENAMES = (
    ("storage_tokens", "reg_token"),
    (".ls1.gamma", ".gamma_1"),
    (".ls2.gamma", ".gamma_2"),
    (".mlp.w1.", ".mlp.fc1_g."),
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
)
_QKVB_SUFFIX = "_qkvb"
_RELEASE_NAMES_HINT = ("names above are timm's: release storage_tokens = reg_token, ls1/ls2.gamma = gamma_1/gamma_2, "
                       "attn.qkv.bias + bias_mask = attn.q_bias/v_bias, mlp.w1/w2/w3 = mlp.fc1_g/fc1_x/fc2")


@dataclass(frozen=True)
class Dinov3Weights:
    """A DINOv3 checkpoint in timm's layout, with what timm's model does not keep as parameters.

    ``rope_periods``: the release's ``rope_embed.periods`` ``(D_head / 4,)`` (``None`` for a timm-layout file).
    """

    state: dict[str, torch.Tensor]
    rope_periods: torch.Tensor | None

    @property
    def has_qkv_bias(self) -> bool:
        return any(k.endswith(".attn.q_bias") for k in self.state)


def load_dinov3_weights(raw_state: Mapping[str, torch.Tensor], source: str) -> Dinov3Weights:
    """DINOv3 weights in the release or the timm layout -> :class:`Dinov3Weights` (timm names)."""
    if "storage_tokens" in raw_state:
        return _convert_release(raw_state, source)
    if "reg_token" in raw_state:
        return Dinov3Weights(state=dict(raw_state), rope_periods=None)
    raise CheckpointError(
        f"checkpoint {source} is not a DINOv3 ViT: neither 'storage_tokens' (release layout) nor 'reg_token' "
        f"(timm layout) among its keys {sorted(raw_state)[:12]}"
    )


def _convert_release(raw_state: Mapping[str, torch.Tensor], source: str) -> Dinov3Weights:
    """Release names -> timm names; the masked qkv bias -> ``q_bias``/``v_bias``; periods kept aside."""
    state: dict[str, torch.Tensor] = {}
    for key, value in raw_state.items():
        if key in _TRAINING_ONLY or key == PERIODS_KEY or key.endswith(".qkv.bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias") and key + "_mask" in raw_state:
            state.update(_split_masked_qkv_bias(key, value, raw_state[key + "_mask"], source))
            continue
        for old, new in _RELEASE_RENAMES:
            key = key.replace(old, new)
        state[key] = value
    for key in raw_state:  # a bias mask without its bias stays visible to the strict load
        if key.endswith(".qkv.bias_mask") and key.removesuffix("_mask") not in raw_state:
            state[key] = raw_state[key]
    if PERIODS_KEY not in raw_state:  # a persistent buffer upstream: its strict load needs it too
        raise CheckpointError(f"checkpoint {source} (DINOv3 release layout) does not match: missing keys 1 "
                              f"[{PERIODS_KEY}]")
    return Dinov3Weights(state=state, rope_periods=raw_state[PERIODS_KEY])


def _split_masked_qkv_bias(key: str, bias: torch.Tensor, mask: torch.Tensor,
                           source: str) -> dict[str, torch.Tensor]:
    """``attn.qkv.bias`` ``(3D,)`` times its ``bias_mask`` -> ``attn.q_bias``, ``attn.v_bias`` ``(D,)``.

    Upstream's ``LinearKMaskedBias`` multiplies the bias by the mask (1 for q and v, 0 for k); timm's model
    has a fixed zero k bias, so a k part that the mask leaves non-zero cannot be represented: an error.
    """
    if bias.shape != mask.shape or bias.shape[0] % 3:
        raise CheckpointError(f"checkpoint {source}: {key} {tuple(bias.shape)} and its bias_mask "
                              f"{tuple(mask.shape)} are not one (3 * D,) qkv bias")
    q, k, v = (bias * mask.to(bias.dtype)).chunk(3)
    if not k.is_meta and not torch.equal(k, torch.zeros_like(k)):  # meta: shapes-only layout checks
        raise CheckpointError(f"checkpoint {source}: {key} has a non-zero key bias after its bias_mask; "
                              "DINOv3 masks the key bias to zero (mask_k_bias)")
    prefix = key.removesuffix("qkv.bias")
    return {prefix + "q_bias": q, prefix + "v_bias": v}


def create_dinov3_vit(arch: str, device: torch.device | str | None = None, depth: int | None = None) -> nn.Module:
    """Random-weight timm DINOv3 ``Eva`` ``arch`` without classifier, for any multiple of 16.

    ``depth``: fewer blocks than the release (reduced-depth copies in tests and exactness checks).
    """
    options = {} if depth is None else {"depth": depth}
    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, device=device, **options)


def _empty_dinov3_vit(arch: str, depth: int | None) -> nn.Module:
    """``arch`` allocated without random init (every parameter is about to be loaded); its computed,
    non-checkpointed buffers (RoPE periods, the zero key bias) filled as timm initialises them."""
    vit = create_dinov3_vit(arch, device="meta", depth=depth).to_empty(device="cpu")
    reinit_non_persistent_buffers(vit)
    return vit


def set_rope_periods(vit: nn.Module, periods: torch.Tensor, source: str) -> None:
    """Use the checkpoint's RoPE ``periods`` ``(D_head / 4,)`` in ``vit.rope`` (kept in float32, as upstream)."""
    own = vit.rope.periods
    if tuple(periods.shape) != tuple(own.shape):
        raise CheckpointError(f"checkpoint {source}: {PERIODS_KEY} has shape {tuple(periods.shape)}, the model "
                              f"needs {tuple(own.shape)} (head dim / 4)")
    with torch.no_grad():
        own.copy_(periods.to(own.dtype))


class Dinov3Teacher(Teacher):
    """A DINOv3 ViT returning final-norm CLS, storage (register) and patch tokens (``x_norm_*`` upstream)."""

    def __init__(self, spec: TeacherSpec, vit: nn.Module):
        super().__init__(spec)
        self.vit = vit
        self.level_layout = (1 + spec.num_registers, spec.num_registers, "token")

    def block_modules(self) -> nn.Module:
        """``vit.blocks``: each block's output is the residual stream ``[CLS, 4 storage, patches]`` before
        the final ``vit.norm`` (upstream ``get_intermediate_layers(..., norm=False)``)."""
        return self.vit.blocks

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        """Normalised images ``(B, 3, H, W)`` -> cls ``(B, D)``, registers ``(B, 4, D)``,
        patch ``(B, H/16, W/16, D)``."""
        p = self.spec.patch_size
        tokens = self.vit.forward_features(x)  # (B, 1 + 4 + h*w, D), after the final norm
        r = self.spec.num_registers
        return tokens_to_output(tokens, 1 + r, r, (x.shape[-2] // p, x.shape[-1] // p))


def dinov3_teacher_from_state(spec: TeacherSpec, state: Mapping[str, torch.Tensor] | None,
                              source: str, depth: int | None = None) -> Dinov3Teacher:
    """Build ``spec``'s model and load ``state`` (release or timm layout) strictly; ``None`` keeps random weights.

    ``depth``: a reduced-depth copy (tests, exactness checks); the registered teachers use the release depth.
    A timm-layout file without ``q_bias``/``v_bias`` loads into timm's model without qkv bias
    (``spec.arch`` minus ``_qkvb``); the release files of S/S+/B/L/H+ carry the bias, the 7B has none.
    """
    if state is None:
        return Dinov3Teacher(spec, create_dinov3_vit(spec.arch, depth=depth))
    weights = load_dinov3_weights(state, source)
    arch = spec.arch if weights.has_qkv_bias else spec.arch.removesuffix(_QKVB_SUFFIX)
    vit = _empty_dinov3_vit(arch, depth)
    try:
        load_state_dict_strict(vit, weights.state, source)
    except CheckpointError as exc:
        if weights.rope_periods is None:  # timm layout: the names are the file's own
            raise
        raise CheckpointError(f"{exc} ({_RELEASE_NAMES_HINT})") from exc
    if weights.rope_periods is not None:
        set_rope_periods(vit, weights.rope_periods, source)
    return Dinov3Teacher(spec, vit)


def dinov3_hf_expected(spec: TeacherSpec) -> HfGeometry:
    """What a transformers DINOv3 config.json says for ``spec``'s model (read off timm's ``Eva``, meta device)."""
    vit = create_dinov3_vit(spec.arch, device="meta")
    mlp = vit.blocks[0].mlp
    return dinov3_hf_geometry(vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads,
                              vit.patch_embed.patch_size[0], spec.num_registers, mlp.fc2.in_features,
                              hasattr(mlp, "fc1_g"), vit.norm.eps, float(vit.rope.temperature))


def dinov3_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"hf"`` (transformers), ``"release"`` (``storage_tokens``) or ``"timm"``: the layout of DINOv3 ``state``."""
    if is_hf_dinov3(state):
        return HF_FORMAT
    return "release" if "storage_tokens" in state else "timm"


def dinov3_checkpoint_state(spec: TeacherSpec, ckpt: LoadedCheckpoint) -> tuple[dict[str, torch.Tensor], str]:
    """``ckpt``'s weights in a layout :func:`load_dinov3_weights` reads (a transformers folder: config.json checked
    against ``spec``, keys converted to timm's) and the layout they came in."""
    layout = dinov3_layout(ckpt.state)
    if layout != HF_FORMAT:
        return ckpt.state, layout
    check_hf_config(ckpt.config, dinov3_hf_expected(spec), spec.name, ckpt.source)
    return hf_dinov3_to_timm(ckpt.state, ckpt.source), layout


def build_dinov3_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Dinov3Teacher:
    """Factory of the ``dinov3_*`` names: a ``.pth``/``.safetensors`` state dict (release or timm layout) or a
    Hugging Face folder."""
    if checkpoint is None:
        return dinov3_teacher_from_state(spec, None, "random weights")
    ckpt = load_checkpoint(checkpoint)
    state, layout = dinov3_checkpoint_state(spec, ckpt)
    teacher = dinov3_teacher_from_state(spec, state, ckpt.source)
    teacher.checkpoint_format = layout
    return teacher
