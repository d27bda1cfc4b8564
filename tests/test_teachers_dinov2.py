"""DINOv2 and Multi-HMR teachers: both checkpoint layouts, strict loading, token geometry.

Checkpoints are random weights written under the key names and shapes of
facebookresearch/dinov2 ``DinoVisionTransformer`` (img_size 518, patch 14); timm's own
``checkpoint_filter_fn`` serves as an independent converter to the timm layout.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from dune_cache.teachers import CheckpointError, create_teacher, get_spec, list_teachers
from dune_cache.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from dune_cache.teachers.base import load_state_dict_strict
from dune_cache.teachers.dinov2 import (ORIGINAL_RESAMPLING, REGISTER_RESAMPLING, create_dinov2_vit,
                                        load_dinov2_state_dict, resample_patch_pos_embed)
from dune_cache.teachers.families import dinov2_timm_arch as timm_arch
from dune_cache.teachers.multihmr import build_multihmr_teacher

# size -> (width, depth, SwiGLU hidden width or None: GELU MLP of 4*D), as upstream vit_small..vit_giant2 build them
FB_SHAPES = {"s": (384, 12, None), "b": (768, 12, None), "l": (1024, 24, None), "g": (1536, 40, 4096)}
POS_TOKENS = 1 + 37 * 37


def fb_dinov2_state(size: str, registers: int = 0, block_chunks: int = 0, device: str | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random DINOv2 weights in the facebookresearch ``.pth`` layout (``blocks.{chunk}.{i}`` if chunked)."""
    dim, depth, swiglu_hidden = FB_SHAPES[size]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=gen) * 0.05

    state = {
        "cls_token": rand(1, 1, dim), "pos_embed": rand(1, POS_TOKENS, dim), "mask_token": rand(1, dim),
        "patch_embed.proj.weight": rand(dim, 3, 14, 14), "patch_embed.proj.bias": rand(dim),
        "norm.weight": rand(dim), "norm.bias": rand(dim),
    }
    if registers:
        state["register_tokens"] = rand(1, registers, dim)
    if swiglu_hidden:
        mlp = {"mlp.w12.weight": (2 * swiglu_hidden, dim), "mlp.w12.bias": (2 * swiglu_hidden,),
               "mlp.w3.weight": (dim, swiglu_hidden), "mlp.w3.bias": (dim,)}
    else:
        mlp = {"mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
               "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
    block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
             "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
             "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,), **mlp, "ls2.gamma": (dim,)}
    for i in range(depth):
        prefix = f"blocks.{i // (depth // block_chunks)}.{i}." if block_chunks else f"blocks.{i}."
        state.update({prefix + name: rand(*shape) for name, shape in block.items()})
    return {k: v + 1 if re.search(r"norm\d?\.weight$", k) else v for k, v in state.items()}


def timm_layout(fb_state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The same weights converted by timm's own DINOv2 checkpoint filter."""
    model = create_dinov2_vit(get_spec(name).arch, device="meta")
    return {k: v.contiguous() for k, v in checkpoint_filter_fn(dict(fb_state), model).items()}


def pixels(h: int, w: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.fixture(scope="module", params=["dinov2_vits14", "dinov2_vits14_reg4"])
def both_layouts(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(name, fb-layout .pth, timm-layout .safetensors) holding the same random weights."""
    name = request.param
    spec = get_spec(name)
    fb = fb_dinov2_state("s", registers=spec.num_registers)
    folder = tmp_path_factory.mktemp(name)
    torch.save(fb, folder / f"{name}_pretrain.pth")
    save_file(timm_layout(fb, name), str(folder / "model.safetensors"))
    return name, folder / f"{name}_pretrain.pth", folder / "model.safetensors"


@pytest.mark.parametrize("size", [(224, 224), (168, 252)])
def test_both_layouts_load_strictly_and_agree(both_layouts, size):
    name, fb_path, timm_path = both_layouts
    registers = get_spec(name).num_registers
    h, w = size
    with torch.no_grad():
        fb_out = create_teacher(name, fb_path)(pixels(h, w, batch=2))
        timm_out = create_teacher(name, timm_path)(pixels(h, w, batch=2))
    assert fb_out.cls.shape == (2, 384)
    assert fb_out.registers.shape == (2, registers, 384)
    assert fb_out.patch.shape == (2, h // 14, w // 14, 384)
    assert torch.isfinite(fb_out.patch).all()
    for a, b in [(fb_out.cls, timm_out.cls), (fb_out.registers, timm_out.registers), (fb_out.patch, timm_out.patch)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_embedding_matches_timm_where_resampling_agrees(both_layouts):
    """timm's ``_pos_embed`` is a reference for the token order ``[CLS, registers, patches]``; its
    position-embedding resizing equals upstream's for register models (bicubic, antialias) and for
    the others on the native 37x37 grid only. Blocks and final norm are timm's own."""
    name, _, timm_path = both_layouts
    teacher = create_teacher(name, timm_path)
    h, w = (168, 252) if teacher.spec.num_registers else (518, 518)
    x = teacher.normalize(pixels(h, w))
    with torch.no_grad():
        ours, grid = teacher.embed(x)
        reference = teacher.vit._pos_embed(teacher.vit.patch_embed(x))
    assert grid == (h // 14, w // 14)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_position_embedding_resampling_follows_upstream():
    pos = torch.randn(1, 37 * 37, 8)
    square = pos.reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    legacy = F.interpolate(square, scale_factor=(12.1 / 37, 18.1 / 37), mode="bicubic", antialias=False)
    exact = F.interpolate(square, size=(12, 18), mode="bicubic", antialias=True)
    as_tokens = lambda t: t.permute(0, 2, 3, 1).reshape(1, 12 * 18, 8)  # noqa: E731
    torch.testing.assert_close(resample_patch_pos_embed(pos, (12, 18), ORIGINAL_RESAMPLING), as_tokens(legacy))
    torch.testing.assert_close(resample_patch_pos_embed(pos, (12, 18), REGISTER_RESAMPLING), as_tokens(exact))
    assert resample_patch_pos_embed(pos, (37, 37), ORIGINAL_RESAMPLING) is pos  # native grid: untouched


def test_chunked_blocks_convert_like_flat_blocks():
    flat = load_dinov2_state_dict(fb_dinov2_state("s", registers=4))
    chunked = load_dinov2_state_dict(fb_dinov2_state("s", registers=4, block_chunks=4))
    assert flat.keys() == chunked.keys()
    assert all(torch.equal(flat[k], chunked[k]) for k in flat)
    assert "mask_token" not in flat and "register_tokens" not in flat and flat["pos_embed"].shape == (1, 1369, 384)


@pytest.mark.parametrize("edit, key", [
    ("drop", "blocks.3.ls1.gamma"),
    ("add", "blocks.0.attn.q_norm.weight"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, edit, key):
    state = fb_dinov2_state("s")
    if edit == "drop":
        del state[key]
    else:
        state[key] = torch.ones(384)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=("missing" if edit == "drop" else "unexpected") + r" keys 1 \[" + key):
        create_teacher("dinov2_vits14", tmp_path / "bad.pth")


@pytest.mark.parametrize("name, block_chunks", [
    *[(f"dinov2_vit{s}14{r}", 0) for s in FB_SHAPES for r in ("", "_reg4")],
    ("dinov2_vitg14_reg4", 4),
    ("dinov2_vitl14_reg4", 1),
    ("multihmr", 0),
])
def test_real_size_original_keys_load_on_meta(name, block_chunks):
    """Every real-size original checkpoint maps key for key, shape for shape, onto its timm model."""
    spec = get_spec(name)
    size = {384: "s", 768: "b", 1024: "l", 1536: "g"}[spec.embed_dim]
    fb = fb_dinov2_state(size, spec.num_registers, block_chunks, device="meta")
    vit = create_dinov2_vit(spec.arch, device="meta")
    load_state_dict_strict(vit, load_dinov2_state_dict(fb), name)  # raises CheckpointError on any difference
    assert vit.pos_embed.shape[1] == POS_TOKENS - (1 if spec.num_registers else 0)


def test_multihmr_loads_backbone_encoder_and_ignores_head(tmp_path):
    encoder = fb_dinov2_state("s", seed=3)
    head = {"mlp_classif.0.weight": torch.randn(384, 384), "x_attention_head.layers.0.norm.weight": torch.ones(384),
            "backbone.encoder_proj.weight": torch.randn(2, 2)}
    ckpt = {"model_state_dict": {**{f"backbone.encoder.{k}": v for k, v in encoder.items()}, **head},
            "args": argparse.Namespace(backbone="dinov2_vits14", img_size=[672]), "epoch": 7}
    torch.save(ckpt, tmp_path / "multiHMR_672_S.pt")
    torch.save(encoder, tmp_path / "encoder.pth")
    small = dataclasses.replace(get_spec("multihmr"), arch=timm_arch("s", 0), embed_dim=384)  # ViT-S, same loader
    teacher = build_multihmr_teacher(small, tmp_path / "multiHMR_672_S.pt").eval()
    image = pixels(224, 224)
    with torch.no_grad():
        out = teacher(image)
        plain = create_teacher("dinov2_vits14", tmp_path / "encoder.pth")(image)
    assert out.patch.shape == (1, 16, 16, 384) and out.cls.shape == (1, 384) and out.registers.shape == (1, 0, 384)
    torch.testing.assert_close(out.patch, plain.patch, rtol=0, atol=0)


def test_multihmr_without_backbone_raises(tmp_path):
    torch.save({"model_state_dict": {"mlp_classif.0.weight": torch.zeros(2, 2)}}, tmp_path / "head_only.pt")
    with pytest.raises(CheckpointError, match="backbone.encoder"):
        create_teacher("multihmr", tmp_path / "head_only.pt")


EXPECTED = {  # name -> (width, registers, native resolution)
    **{f"dinov2_vit{s}14{r}": (FB_SHAPES[s][0], 4 if r else 0, (518, 518)) for s in FB_SHAPES for r in ("", "_reg4")},
    "multihmr": (1024, 0, (672, 672)),
}


def test_registered_specs_have_upstream_geometry():
    specs = {s.name: s for s in list_teachers()}
    for name, (width, registers, native) in EXPECTED.items():
        spec = specs[name]
        assert ((spec.patch_size, spec.embed_dim, spec.num_registers, spec.native_resolution)
                == (14, width, registers, native))
        assert spec.cls_source == "token" and spec.final_norm
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert spec.arch.endswith("dinov2") and spec.description


def test_create_teacher_without_checkpoint_is_frozen_random_model():
    teacher = create_teacher("dinov2_vits14_reg4")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        out = teacher(pixels(168, 252))
    assert (out.cls.shape, out.registers.shape, out.patch.shape) == ((1, 384), (1, 4, 384), (1, 12, 18, 384))
