"""DINOv2 teachers (facebookresearch/dinov2), run on timm's ``VisionTransformer``.

Checkpoints load from either layout, strictly:

* the original ``.pth`` files (``dinov2_vitl14_reg4_pretrain.pth`` ...): ``cls_token``,
  ``pos_embed`` ``(1, 1 + 37*37, D)`` whose first entry belongs to the CLS token,
  ``register_tokens``, ``mask_token`` (training only, dropped), ``blocks.{i}.*`` or, when trained
  with ``block_chunks > 0``, ``blocks.{chunk}.{i}.*``; ViT-g's SwiGLU FFN is ``mlp.w12``/``mlp.w3``;
* timm's ``vit_*_patch14[_reg4]_dinov2`` layout: ``reg_token``, ``mlp.fc1``/``mlp.fc2``, and for
  the register models ``no_embed_class`` (the CLS position embedding folded into ``cls_token``,
  ``pos_embed`` of ``(1, 37*37, D)``);
* a Hugging Face folder (or its ``model.safetensors``) of ``Dinov2Model`` / ``Dinov2WithRegistersModel``
  (``facebook/dinov2-*``), converted to the release names (:func:`.hf.hf_dinov2_to_release`), its
  ``config.json`` checked against the teacher's geometry.

Position embeddings are resized to the input grid exactly as upstream: the models without
registers use bicubic with the legacy ``+0.1`` scale-factor offset and no antialiasing; the
register models use bicubic to the exact size with antialiasing (which is also what timm does).
This holds whatever the file format: transformers' ``Dinov2Model`` resizes to the exact size without the
offset, so off the native 518 its features differ from these (docs/teachers.md measures by how much);
``Dinov2WithRegistersModel`` resizes as the release does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .base import Teacher, TeacherOutput, load_state_dict_strict, tokens_to_output
from .families import DINOV2_PRETRAIN_SIZE
from .families import dinov2_timm_arch as timm_arch  # noqa: F401  (re-exported; the specs are in families.py)
from .hf import (
    HF_FORMAT,
    HfGeometry,
    LoadedCheckpoint,
    check_hf_config,
    dinov2_hf_geometry,
    hf_dinov2_to_release,
    is_hf_dinov2,
    load_checkpoint,
)
from .spec import TeacherSpec

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SWIGLU_RENAMES = {".mlp.w12.": ".mlp.fc1.", ".mlp.w3.": ".mlp.fc2."}


@dataclass(frozen=True)
class PosEmbedResampling:
    """How upstream resizes the square position-embedding grid to the input grid (bicubic)."""

    offset: float  # > 0: scale factor (h + offset) / M (legacy kludge); 0: exact output size
    antialias: bool


ORIGINAL_RESAMPLING = PosEmbedResampling(offset=0.1, antialias=False)  # hub ``dinov2_vit*14``
REGISTER_RESAMPLING = PosEmbedResampling(offset=0.0, antialias=True)  # hub ``dinov2_vit*14_reg``


def create_dinov2_vit(arch: str, device: torch.device | str | None = None, depth: int | None = None
                      ) -> VisionTransformer:
    """Random-weight timm DINOv2 ViT ``arch`` with 37x37 position embeddings and any input size; ``depth``: fewer
    blocks than the release (reduced-depth copies in tests and exactness checks)."""
    options = {} if depth is None else {"depth": depth}
    return timm.create_model(arch, pretrained=False, img_size=DINOV2_PRETRAIN_SIZE, dynamic_img_size=True,
                             num_classes=0, device=device, **options)


def load_dinov2_state_dict(raw_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 weights in the facebookresearch or the timm layout -> the timm layout.

    Only names that exist in the facebookresearch layout alone are rewritten, so a timm-layout
    state dict passes through unchanged.
    """
    state = {_timm_key(k): v for k, v in raw_state.items() if k != "mask_token"}
    if "register_tokens" in state:
        state.update(_registers_without_class_pos_embed(state))
    return state


def dinov2_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"hf"`` (transformers), ``"release"`` (facebookresearch: ``mask_token``, ``register_tokens``, chunked blocks
    or ``mlp.w12``) or ``"timm"``: the layout of DINOv2 weights ``state``."""
    if is_hf_dinov2(state):
        return HF_FORMAT
    release = "mask_token" in state or "register_tokens" in state
    return "release" if release or any(_CHUNKED_BLOCK.match(k) or ".mlp.w12." in k for k in state) else "timm"


def dinov2_hf_expected(spec: TeacherSpec, depth: int | None = None) -> HfGeometry:
    """What a transformers DINOv2 config.json says for ``spec``'s ViT (read off the timm model, on the meta device;
    ``depth``: a reduced-depth copy's)."""
    vit = create_dinov2_vit(spec.arch, device="meta", depth=depth)
    return dinov2_hf_geometry(vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads,
                              vit.patch_embed.patch_size[0], vit.patch_embed.grid_size[0], spec.num_registers,
                              isinstance(vit.blocks[0].mlp, GluMlp), vit.norm.eps)


def dinov2_release_state(spec: TeacherSpec, ckpt: LoadedCheckpoint, depth: int | None = None
                         ) -> tuple[dict[str, torch.Tensor], str]:
    """``ckpt``'s weights in a layout :func:`load_dinov2_state_dict` reads, and the layout they came in: a
    transformers folder's config.json is checked against ``spec`` (at ``depth`` blocks when given) and its keys
    converted to the release names."""
    layout = dinov2_layout(ckpt.state)
    if layout != HF_FORMAT:
        return ckpt.state, layout
    check_hf_config(ckpt.config, dinov2_hf_expected(spec, depth), spec.name, ckpt.source)
    return hf_dinov2_to_release(ckpt.state, ckpt.source), layout


def _timm_key(key: str) -> str:
    """One facebookresearch parameter name -> its timm name (unchunked blocks, SwiGLU as fc1/fc2)."""
    key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
    for old, new in _SWIGLU_RENAMES.items():
        key = key.replace(old, new)
    return key


def _registers_without_class_pos_embed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop facebookresearch register-model tokens; return them as timm's ``no_embed_class`` layout.

    ``pos_embed`` ``(1, 1 + M*M, D)`` -> ``(1, M*M, D)``, its first entry added to ``cls_token``
    ``(1, 1, D)``: upstream adds it to the CLS token and gives registers no position embedding.
    """
    pos_embed = state.pop("pos_embed")
    return {
        "reg_token": state.pop("register_tokens"),
        "cls_token": state.pop("cls_token") + pos_embed[:, :1],
        "pos_embed": pos_embed[:, 1:],
    }


def resample_patch_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                             how: PosEmbedResampling) -> torch.Tensor:
    """Square patch position embeddings ``(1, M*M, D)`` -> ``(1, h*w, D)`` for grid ``(h, w)``."""
    _, n, d = pos_embed.shape
    m = math.isqrt(n)
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    if how.offset:
        size_kwargs = {"scale_factor": ((h + how.offset) / m, (w + how.offset) / m)}
    else:
        size_kwargs = {"size": (h, w)}
    square = pos_embed.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    resized = F.interpolate(square, mode="bicubic", antialias=how.antialias, **size_kwargs)
    return resized.permute(0, 2, 3, 1).reshape(1, h * w, d).to(pos_embed.dtype)


class Dinov2Teacher(Teacher):
    """A DINOv2 ViT returning final-norm CLS, register and patch tokens (``x_norm_*`` upstream)."""

    def __init__(self, spec: TeacherSpec, vit: VisionTransformer):
        super().__init__(spec)
        self.vit = vit
        self.resampling = REGISTER_RESAMPLING if spec.num_registers else ORIGINAL_RESAMPLING
        self.level_layout = (1 + spec.num_registers, spec.num_registers, "token")

    def block_modules(self) -> nn.Module:
        """``vit.blocks``: each block's output is the residual stream before the final ``vit.norm``."""
        return self.vit.blocks

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images ``(B, 3, H, W)`` -> tokens ``(B, 1 + R + h*w, D)`` ``[CLS, registers, patches]``, grid."""
        vit = self.vit
        patches = vit.patch_embed(x)  # (B, h, w, D)
        b, h, w, d = patches.shape
        num_class_pos = 0 if vit.no_embed_class else 1
        patch_pos = resample_patch_pos_embed(vit.pos_embed[:, num_class_pos:], (h, w), self.resampling)
        cls = vit.cls_token + vit.pos_embed[:, :1] if num_class_pos else vit.cls_token
        prefix = [cls] if vit.reg_token is None else [cls, vit.reg_token]
        tokens = [t.expand(b, -1, -1) for t in prefix] + [patches.reshape(b, h * w, d) + patch_pos]
        return torch.cat(tokens, dim=1), (h, w)

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        tokens, grid = self.embed(x)
        tokens = self.vit.norm(self.vit.blocks(tokens))
        r = self.spec.num_registers
        return tokens_to_output(tokens, 1 + r, r, grid)


def dinov2_teacher_from_state(spec: TeacherSpec, state: Mapping[str, torch.Tensor] | None,
                              source: str, depth: int | None = None) -> Dinov2Teacher:
    """Build ``spec``'s ViT (``spec.arch`` is a timm name) and load ``state`` (either layout) strictly.

    ``state=None`` keeps random weights; ``depth``: a reduced-depth copy (tests, exactness checks).
    """
    if state is None:
        return Dinov2Teacher(spec, create_dinov2_vit(spec.arch, depth=depth))
    # Skip the random init (seconds for ViT-L/g): the strict load fills every tensor (the model has no buffers).
    vit = create_dinov2_vit(spec.arch, device="meta", depth=depth).to_empty(device="cpu")
    load_state_dict_strict(vit, load_dinov2_state_dict(state), source)
    return Dinov2Teacher(spec, vit)


def build_dinov2_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Dinov2Teacher:
    """Factory of the ``dinov2_*`` names: a ``.pth``/``.safetensors`` state dict (release or timm layout) or a
    Hugging Face folder."""
    if checkpoint is None:
        return dinov2_teacher_from_state(spec, None, "random weights")
    ckpt = load_checkpoint(checkpoint)
    state, layout = dinov2_release_state(spec, ckpt)
    teacher = dinov2_teacher_from_state(spec, state, ckpt.source)
    teacher.checkpoint_format = layout
    return teacher
