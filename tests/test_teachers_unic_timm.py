"""UNIC teachers (DINO, iBOT, DeiT-III, dBOT-ft ViT-B/16) and ``timm:<model_name>`` teachers.

Checkpoints are random tensors saved in each upstream project's own key layout and nesting
(naver/unic ``teachers/``, facebookresearch/dino, bytedance/ibot, facebookresearch/deit
``models_v2.py``, liuxingbin/dbot ``models_vit.py``). The UNIC outputs are compared with an
independent plain-torch forward of the original architectures.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F

from dune_cache.teachers import CheckpointError, create_teacher, list_prefixes
from dune_cache.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from dune_cache.teachers.timm_generic import TimmViTTeacher, create_timm_vit, spec_from_timm_model
from dune_cache.teachers.unic import deit3_to_timm, ssl_backbone_to_timm

VIT_B = {"depth": 12, "dim": 768}
VIT_MINI = {"depth": 2, "dim": 192}  # vit_tiny width, two blocks
HEAD_DIM = 64  # ViT-Ti/S/B attention heads
LN_EPS = 1e-6


@dataclass(frozen=True)
class OriginalLayout:
    """How an upstream project stores its ViT: token layout, extra parameters and file nesting."""

    pos_embed_has_cls: bool  # DINO/iBOT/MAE: (1, 1 + N, D); DeiT-III: (1, N, D), CLS added after
    layer_scale: bool  # DeiT-III blocks.i.gamma_1 / gamma_2
    pooled_cls: bool  # dBOT-ft: no final `norm`, `fc_norm` over the mean of the patch tokens
    num_classes: int  # classifier `head.*` stored in the file
    wrap: Callable[[dict], dict]  # state dict -> what torch.save writes


LAYOUTS = {
    "dino_vitb16": OriginalLayout(True, False, False, 0, lambda sd: sd),
    "ibot_vitb16": OriginalLayout(True, False, False, 0, lambda sd: {"state_dict": sd}),
    "deit3_vitb16": OriginalLayout(False, True, False, 1000, lambda sd: {"model": sd}),
    "dbot_vitb16": OriginalLayout(True, False, True, 1000, lambda sd: {
        "model": sd, "optimizer": {"state": {}}, "epoch": 99, "scaler": {"scale": 1.0},
        "args": argparse.Namespace(model="vit_base_patch16", global_pool=True),
    }),
}
# the same layouts on a two-block tiny ViT: timm kwargs mirroring each registered factory, converter
MINI_MODELS = {
    "dino_vitb16": ("vit_tiny_patch16_224", {}, ssl_backbone_to_timm),
    "deit3_vitb16": ("deit3_small_patch16_224", {"embed_dim": 192, "num_heads": 3}, deit3_to_timm),
    "dbot_vitb16": ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}, dict),
}


def original_vit_state(layout: OriginalLayout, depth: int, dim: int, seed: int = 0,
                       patch: int = 16, grid: int = 14) -> dict[str, torch.Tensor]:
    """Random ViT weights under the upstream (not timm) names of ``layout``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, center: float = 0.0, scale: float = 0.02) -> torch.Tensor:
        return center + scale * torch.randn(*shape, generator=g)

    state = {
        "cls_token": rand(1, 1, dim),
        "pos_embed": rand(1, grid * grid + layout.pos_embed_has_cls, dim),
        "patch_embed.proj.weight": rand(dim, 3, patch, patch),
        "patch_embed.proj.bias": rand(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            state |= {b + norm + ".weight": rand(dim, center=1.0, scale=0.1), b + norm + ".bias": rand(dim)}
        for name, (out, inp) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                                 "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}.items():
            state |= {b + name + ".weight": rand(out, inp), b + name + ".bias": rand(out)}
        if layout.layer_scale:
            state |= {b + "gamma_1": rand(dim, center=0.5, scale=0.1), b + "gamma_2": rand(dim, center=0.5, scale=0.1)}
    final = "fc_norm" if layout.pooled_cls else "norm"
    state |= {f"{final}.weight": rand(dim, center=1.0, scale=0.1), f"{final}.bias": rand(dim)}
    if layout.num_classes:
        state |= {"head.weight": rand(layout.num_classes, dim), "head.bias": rand(layout.num_classes)}
    return state


def reference_outputs(state: dict[str, torch.Tensor], x: torch.Tensor,
                      layout: OriginalLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch forward of the original ViT at its native grid: CLS ``(B, D)``, patch ``(B, N, D)``."""
    patches = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    patches = patches.flatten(2).transpose(1, 2)
    b, n, d = patches.shape
    heads = d // HEAD_DIM
    cls = state["cls_token"].expand(b, -1, -1)
    if layout.pos_embed_has_cls:
        tokens = torch.cat([cls, patches], dim=1) + state["pos_embed"]
    else:
        tokens = torch.cat([cls, patches + state["pos_embed"]], dim=1)

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (d,), state[f"{name}.weight"], state[f"{name}.bias"], eps=LN_EPS)

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        blk = f"blocks.{i}."
        qkv = linear(ln(tokens, blk + "norm1"), blk + "attn.qkv").reshape(b, n + 1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n + 1, d), blk + "attn.proj")
        tokens = tokens + (attn * state[blk + "gamma_1"] if layout.layer_scale else attn)
        mlp = linear(F.gelu(linear(ln(tokens, blk + "norm2"), blk + "mlp.fc1")), blk + "mlp.fc2")
        tokens = tokens + (mlp * state[blk + "gamma_2"] if layout.layer_scale else mlp)
        i += 1
    if layout.pooled_cls:
        return ln(tokens[:, 1:].mean(dim=1), "fc_norm"), tokens[:, 1:]
    normed = ln(tokens, "norm")
    return normed[:, 0], normed[:, 1:]


def random_pixels(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- UNIC teachers, real size

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unic_teacher_loads_original_checkpoint_and_matches_reference(name, tmp_path):
    layout = LAYOUTS[name]
    state = original_vit_state(layout, **VIT_B)
    path = tmp_path / f"{name}.pth"
    torch.save(layout.wrap(state), path)

    teacher = create_teacher(name, path)
    spec = teacher.spec
    assert (spec.name, spec.patch_size, spec.embed_dim, spec.num_registers) == (name, 16, 768, 0)
    assert (spec.mean, spec.std, spec.native_resolution) == (IMAGENET_MEAN, IMAGENET_STD, (224, 224))
    assert (spec.cls_source, spec.final_norm) == (("mean_patch", False) if layout.pooled_cls else ("token", True))
    derived = spec_from_timm_model(name, teacher.model)
    assert (derived.cls_source, derived.final_norm, derived.patch_size, derived.embed_dim) == \
        (spec.cls_source, spec.final_norm, spec.patch_size, spec.embed_dim)

    pixels = random_pixels(224, 224)
    with torch.no_grad():
        out = teacher(pixels)
        ref_cls, ref_patch = reference_outputs(state, teacher.normalize(pixels), layout)
    assert out.cls.shape == (1, 768) and out.patch.shape == (1, 14, 14, 768) and out.registers.shape == (1, 0, 768)
    torch.testing.assert_close(out.cls, ref_cls, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.patch.reshape(1, 196, 768), ref_patch, atol=2e-4, rtol=1e-4)

    with torch.no_grad():
        out = teacher(random_pixels(160, 240, seed=1))
    assert out.cls.shape == (1, 768) and out.patch.shape == (1, 10, 15, 768)
    assert torch.isfinite(out.patch).all()


# ---------------------------------------------------------------- same loading code, tiny ViT

def load_mini(name: str, path) -> TimmViTTeacher:
    """Load ``path`` through ``name``'s converter into a two-block tiny twin of its timm model."""
    timm_name, kwargs, convert = MINI_MODELS[name]
    model = create_timm_vit(timm_name, skip_init=True, depth=VIT_MINI["depth"], **kwargs)
    teacher = TimmViTTeacher(spec_from_timm_model(name, model), model)
    teacher.load_checkpoint(path, convert, name)
    return teacher


@pytest.mark.parametrize("name, removed, reported", [
    ("dino_vitb16", "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"),
    ("deit3_vitb16", "blocks.1.gamma_2", "blocks.1.ls2.gamma"),
    ("dbot_vitb16", "fc_norm.bias", "fc_norm.bias"),
])
def test_missing_key_raises_checkpoint_error_naming_it(name, removed, reported, tmp_path):
    layout = LAYOUTS[name]
    state = original_vit_state(layout, **VIT_MINI)
    del state[removed]
    path = tmp_path / "mini.pth"
    torch.save(layout.wrap(state), path)
    with pytest.raises(CheckpointError, match=rf"missing keys 1 \[{reported}\]; unexpected keys 0"):
        load_mini(name, path)


def test_missing_key_in_real_size_registered_teacher(tmp_path):
    layout = LAYOUTS["ibot_vitb16"]
    state = original_vit_state(layout, **VIT_B)
    del state["blocks.11.mlp.fc2.bias"]
    torch.save(layout.wrap(state), tmp_path / "ibot.pth")
    with pytest.raises(CheckpointError, match=r"missing keys 1 \[blocks\.11\.mlp\.fc2\.bias\]"):
        create_teacher("ibot_vitb16", tmp_path / "ibot.pth")


def test_ibot_and_dino_training_checkpoints_load_the_teacher_backbone(tmp_path):
    """``checkpoint.pth`` of main_dino/main_ibot: ``teacher`` = ``backbone.*`` + projection ``head.*``;
    ``student`` = ``module.backbone.*`` (+ iBOT's ``masked_embed``) + ``module.head.*``."""
    layout = LAYOUTS["dino_vitb16"]
    teacher_state = original_vit_state(layout, **VIT_MINI, seed=1)
    student_state = original_vit_state(layout, **VIT_MINI, seed=2) | {"masked_embed": torch.zeros(1, 192)}
    projection = {"head.mlp.0.weight": torch.randn(2048, 192), "head.last_layer.weight_g": torch.ones(8192, 1)}
    torch.save({
        "student": {f"module.backbone.{k}": v for k, v in student_state.items()}
                   | {f"module.{k}": v for k, v in projection.items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher_state.items()} | projection,
        "epoch": 100, "args": argparse.Namespace(arch="vit_base"),
    }, tmp_path / "checkpoint.pth")
    loaded = load_mini("dino_vitb16", tmp_path / "checkpoint.pth")
    torch.testing.assert_close(loaded.model.cls_token, teacher_state["cls_token"], rtol=0, atol=0)

    # extract_backbone_weights.py --checkpoint_key student: plain dict with the MIM token
    torch.save(student_state, tmp_path / "checkpoint_student.pth")
    loaded = load_mini("dino_vitb16", tmp_path / "checkpoint_student.pth")
    torch.testing.assert_close(loaded.model.blocks[1].mlp.fc2.weight, student_state["blocks.1.mlp.fc2.weight"],
                               rtol=0, atol=0)


# ---------------------------------------------------------------- timm:<model_name>

def timm_source(name: str, **kwargs) -> torch.nn.Module:
    """A random timm classifier whose weights the tests save in timm's layout."""
    return timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs).eval()


def test_timm_prefix_is_registered():
    assert list_prefixes()["timm"] == "any timm ViT-style model (dynamic_img_size) from a local checkpoint file"


def test_timm_vit_loads_timm_classifier_checkpoint_and_derives_spec(tmp_path):
    source = timm_source("vit_tiny_patch16_224", num_classes=1000)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "vit_tiny.pth")  # head.* is dropped

    teacher = create_teacher("timm:vit_tiny_patch16_224", tmp_path / "vit_tiny.pth")
    spec = teacher.spec
    assert (spec.name, spec.arch, spec.patch_size, spec.embed_dim, spec.num_registers) == \
        ("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224", 16, 192, 0)
    assert (spec.cls_source, spec.final_norm, spec.native_resolution) == ("token", True, (224, 224))
    assert (spec.mean, spec.std) == (tuple(source.pretrained_cfg["mean"]), tuple(source.pretrained_cfg["std"]))

    pixels = random_pixels(160, 240)
    with torch.no_grad():
        out = teacher(pixels)
        ref = source.forward_features(teacher.normalize(pixels))
    assert out.patch.shape == (1, 10, 15, 192) and out.registers.shape == (1, 0, 192)
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patch, ref[:, 1:].reshape(1, 10, 15, 192))


@pytest.mark.parametrize("kwargs, cls_source, final_norm", [
    ({"reg_tokens": 4}, "token", True),
    ({"reg_tokens": 2, "class_token": False, "global_pool": "avg"}, "mean_patch", False),
])
def test_timm_spec_and_split_follow_prefix_tokens_and_pooling(kwargs, cls_source, final_norm):
    model = create_timm_vit("vit_tiny_patch16_224", depth=2, **kwargs).eval()
    spec = spec_from_timm_model("timm:test", model)
    assert (spec.num_registers, spec.cls_source, spec.final_norm) == (kwargs["reg_tokens"], cls_source, final_norm)

    teacher = TimmViTTeacher(spec, model)
    pixels = random_pixels(64, 48)
    with torch.no_grad():
        out = teacher(pixels)
        tokens = model.forward_features(teacher.normalize(pixels))
    r, first_reg = spec.num_registers, int(model.has_class_token)
    torch.testing.assert_close(out.registers, tokens[:, first_reg:first_reg + r])
    torch.testing.assert_close(out.patch, tokens[:, first_reg + r:].reshape(1, 4, 3, 192))
    if cls_source == "token":
        torch.testing.assert_close(out.cls, tokens[:, 0])
    else:  # the model's own pooled feature: fc_norm over the mean of the patch tokens
        fc_norm = model.fc_norm
        expected = F.layer_norm(out.patch.mean(dim=(1, 2)), (192,), fc_norm.weight, fc_norm.bias, fc_norm.eps)
        torch.testing.assert_close(out.cls, expected)


def test_timm_wrong_model_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    other = timm_source("vit_tiny_patch16_224", depth=11, reg_tokens=2, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        create_teacher("timm:vit_tiny_patch16_224", tmp_path / "other.pth")
    message = str(err.value)
    assert "missing keys 12 [blocks.11." in message and "unexpected keys 1 [reg_token]" in message


@pytest.mark.parametrize("name, reason", [
    ("resnet18", "not a ViT-style model with dynamic_img_size"),
    ("swin_tiny_patch4_window7_224", "not a ViT-style model: no num_prefix_tokens"),
    ("not_a_timm_model", "unknown timm model"),
])
def test_timm_refuses_non_vit_models(name, reason):
    with pytest.raises(ValueError, match=reason):
        create_teacher(f"timm:{name}")


@pytest.mark.parametrize("name", ["dino_vitb16", "ibot_vitb16"])
def test_upstream_pos_variant_resamples_like_dino_and_equals_the_default_at_224(name, tmp_path):
    """``<name>_upstream_pos``: same checkpoint; off 224 the position embeddings follow DINO/iBOT's own
    ``interpolate_pos_encoding`` (bicubic, scale factor ``(grid + 0.1) / 14``, no antialias), written here from
    that rule; at 224 it equals the default (timm-resampled) teacher."""
    default = create_teacher(name)
    path = tmp_path / "backbone.pth"
    torch.save(default.model.state_dict(), path)
    default = create_teacher(name, path)
    exact = create_teacher(f"{name}_upstream_pos", path)
    g = torch.Generator().manual_seed(0)
    square = torch.randint(0, 256, (1, 3, 224, 224), generator=g, dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(exact(square).patch, default(square).patch)
        pixels = torch.randint(0, 256, (1, 3, 160, 288), generator=g, dtype=torch.uint8)
        out = exact(pixels)
        vit = default.model
        x = default.normalize(pixels)
        patches = vit.patch_embed(x).flatten(1, 2)  # (1, 10*18, D)
        dim = patches.shape[-1]
        grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
        resized = torch.nn.functional.interpolate(grid, scale_factor=((10 + 0.1) / 14, (18 + 0.1) / 14),
                                                  mode="bicubic")
        tokens = torch.cat([vit.cls_token + vit.pos_embed[:, :1],
                            patches + resized.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
        reference = vit.norm(vit.blocks(tokens))
    torch.testing.assert_close(out.cls, reference[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch, reference[:, 1:].reshape(1, 10, 18, dim), atol=1e-5, rtol=1e-5)
    assert (out.patch - default(pixels).patch).abs().max() > 1e-4  # timm's antialiased resampling differs off 224
