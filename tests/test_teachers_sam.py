"""SAM image-encoder teachers: release checkpoint layout, strict loading, SAM's pad-to-1024 rule, extraction."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import CheckpointError, TeacherSpec, create_teacher, get_spec, register_teacher
from dune_cache.teachers.sam import SamTeacher, build_sam_encoder, load_sam_encoder, sam_teacher

# ---------------------------------------------------------------- upstream layout, written independently
# facebookresearch/segment-anything build_sam.py: (width, depth, heads, global-attention blocks); window 14,
# 1024 canvas (64x64 grid), neck 256, MLP ratio 4, file = torch.save(Sam.state_dict()).
UPSTREAM = {"b": (768, 12, 12, (2, 5, 8, 11)), "l": (1024, 24, 16, (5, 11, 17, 23)),
            "h": (1280, 32, 16, (7, 15, 23, 31))}
SAM_NAMES = [f"sam_vit{s}{v}" for s in "blh" for v in ("", "_encoder")]


def release_encoder_shapes(width: int, depth: int, heads: int, global_blocks, grid: int = 64, window: int = 14,
                           neck: int = 256) -> dict[str, tuple]:
    """``image_encoder.*`` names/shapes of a SAM release checkpoint (ImageEncoderViT, use_rel_pos=True)."""
    p = "image_encoder."
    shapes = {p + "pos_embed": (1, grid, grid, width), p + "patch_embed.proj.weight": (width, 3, 16, 16),
              p + "patch_embed.proj.bias": (width,)}
    for i in range(depth):
        b = f"{p}blocks.{i}."
        span = grid if i in global_blocks else window
        shapes.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "attn.rel_pos_h": (2 * span - 1, width // heads), b + "attn.rel_pos_w": (2 * span - 1, width // heads),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.lin1.weight": (4 * width, width), b + "mlp.lin1.bias": (4 * width,),
            b + "mlp.lin2.weight": (width, 4 * width), b + "mlp.lin2.bias": (width,),
        })
    shapes.update({p + "neck.0.weight": (neck, width, 1, 1), p + "neck.1.weight": (neck,), p + "neck.1.bias": (neck,),
                   p + "neck.2.weight": (neck, neck, 3, 3), p + "neck.3.weight": (neck,), p + "neck.3.bias": (neck,)})
    return shapes


PROMPT_SIDE_SHAPES = {  # a few prompt-encoder / mask-decoder tensors of a full Sam state dict
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "prompt_encoder.point_embeddings.0.weight": (1, 256), "prompt_encoder.no_mask_embed.weight": (1, 256),
    "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
    "mask_decoder.iou_token.weight": (1, 256), "mask_decoder.mask_tokens.weight": (4, 256),
    "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": (256, 256),
    "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
}


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) / max(1, int(np.prod(s[1:]))) ** 0.5 for k, s in shapes.items()}


def timm_name(release_key: str) -> str:
    key = release_key.removeprefix("image_encoder.")
    return key.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")


# A tiny SAM: 128 px canvas (8x8 grid, smaller than one 14x14 window: windows are padded), width 64,
# 2 blocks (block 1 global).
TINY = dict(img_size=128, embed_dim=64, num_heads=2, depth=2, global_attn_indexes=(1,))
TINY_SHAPES = release_encoder_shapes(64, 2, 2, (1,), grid=8)


def tiny_teacher(name: str, checkpoint=None) -> SamTeacher:
    return sam_teacher(get_spec(name), checkpoint, after_neck=not name.endswith("_encoder"), **TINY).eval()


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A whole-``Sam`` release file (plain state dict) with the tiny encoder and prompt-side keys."""
    encoder = random_state(TINY_SHAPES)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save({**encoder, **random_state(PROMPT_SIDE_SHAPES, seed=1)}, path)
    return path, encoder


def pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registration and real-size layout

@pytest.mark.parametrize("name", SAM_NAMES)
def test_registered_specs(name):
    spec = get_spec(name)
    size = name[len("sam_vit")]
    after_neck = not name.endswith("_encoder")
    assert spec.embed_dim == (256 if after_neck else UPSTREAM[size][0])
    assert (spec.patch_size, spec.num_registers, spec.cls_source, spec.native_resolution) == (16, 0, "mean_patch",
                                                                                               (1024, 1024))
    # SAM's pixel_mean/std [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375] are ImageNet's x 255
    np.testing.assert_allclose(np.array(spec.mean) * 255, [123.675, 116.28, 103.53], rtol=1e-9)
    np.testing.assert_allclose(np.array(spec.std) * 255, [58.395, 57.12, 57.375], rtol=1e-9)
    assert spec.final_norm == after_neck


@pytest.mark.parametrize("size", "blh")
def test_real_size_parameters_match_the_release_layout(size):
    width, depth, heads, global_blocks = UPSTREAM[size]
    with torch.device("meta"):
        encoder = build_sam_encoder(get_spec(f"sam_vit{size}").arch)
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    expected = {timm_name(k): s for k, s in release_encoder_shapes(width, depth, heads, global_blocks).items()}
    assert ours == expected
    assert isinstance(encoder.blocks, nn.ModuleList) and len(encoder.blocks) == depth
    assert all(m.eps == 1e-6 for m in encoder.modules() if isinstance(m, nn.LayerNorm))  # SAM's, not timm's 1e-5


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("name", ["sam_vitb", "sam_vitb_encoder"])
def test_release_checkpoint_loads_encoder_strictly_and_ignores_prompt_side(release_checkpoint, name):
    path, encoder = release_checkpoint
    teacher = tiny_teacher(name, path)
    loaded = teacher.encoder.state_dict()
    assert sorted(loaded) == sorted(timm_name(k) for k in encoder)
    for k, v in encoder.items():
        assert torch.equal(loaded[timm_name(k)], v), k
    with torch.no_grad():
        out = teacher(pixels(2, 64, 96))
    d = 256 if name == "sam_vitb" else 64
    assert out.patch.shape == (2, 4, 6, d) and out.cls.shape == (2, d) and out.registers.shape == (2, 0, d)
    torch.testing.assert_close(out.cls, out.patch.mean(dim=(1, 2)))


def test_timm_layout_checkpoint_loads(tmp_path, release_checkpoint):
    _, encoder = release_checkpoint
    torch.save({timm_name(k): v for k, v in encoder.items()}, tmp_path / "timm.pth")
    teacher = tiny_teacher("sam_vitb", tmp_path / "timm.pth")
    assert torch.equal(teacher.encoder.neck[2].weight, encoder["image_encoder.neck.2.weight"])


@pytest.mark.parametrize("change, reported", [
    (lambda s: s.pop("image_encoder.blocks.1.mlp.lin2.bias"), r"missing keys 1 \[blocks.1.mlp.fc2.bias\]"),
    (lambda s: s.__setitem__("image_encoder.norm.weight", torch.zeros(64)), r"unexpected keys 1 \[norm.weight\]"),
    (lambda s: s.__setitem__("text_encoder.proj", torch.zeros(4)), r"unexpected keys 1 \[text_encoder.proj\]"),
    (lambda s: s.__setitem__("image_encoder.blocks.1.attn.rel_pos_h", torch.zeros(27, 32)),
     r"blocks.1.attn.rel_pos_h: checkpoint \(27, 32\) vs model \(15, 32\)"),
])
def test_broken_checkpoint_is_refused_naming_keys_and_nothing_is_loaded(tmp_path, release_checkpoint, change, reported):
    _, encoder = release_checkpoint
    state = {**encoder, **random_state(PROMPT_SIDE_SHAPES)}
    change(state)
    torch.save(state, tmp_path / "broken.pth")
    teacher = tiny_teacher("sam_vitb")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(CheckpointError, match=reported):
        sam_teacher(get_spec("sam_vitb"), tmp_path / "broken.pth", after_neck=True, **TINY)
    with pytest.raises(CheckpointError):
        load_sam_encoder(teacher.encoder, tmp_path / "broken.pth")
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------- forward: SAM's pad-to-canvas rule

def timm_reference(teacher: SamTeacher) -> nn.Module:
    """timm's own VisionTransformerSAM with the teacher's weights (same options: SAM's LayerNorm eps)."""
    model = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY).eval()
    model.load_state_dict(teacher.encoder.state_dict(), strict=True)
    return model


def padded_canvas(px: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> SAM's ``preprocess``: normalised with its pixel mean/std, zero-padded at the
    bottom/right to the tiny model's 128x128 canvas."""
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return F.pad((px.float() - mean) / std, (0, 128 - px.shape[-1], 0, 128 - px.shape[-2]))


@pytest.mark.parametrize("size", [(128, 128), (64, 96), (128, 48)])
def test_tokens_are_the_padded_canvas_forward_cropped(release_checkpoint, size):
    """Native size: timm's forward; smaller: the image normalised, zero-padded bottom/right to the canvas
    (Sam.preprocess), timm's forward, top-left H/16 x W/16 tokens kept. Before the neck: the last block's output."""
    path, _ = release_checkpoint
    neck_teacher, encoder_teacher = tiny_teacher("sam_vitb", path), tiny_teacher("sam_vitb_encoder", path)
    model = timm_reference(neck_teacher)
    px = pixels(2, *size, seed=3)
    canvas = padded_canvas(px)
    h, w = size[0] // 16, size[1] // 16
    with torch.no_grad():
        neck = model.forward_features(canvas).permute(0, 2, 3, 1)[:, :h, :w]
        last_block = model.forward_intermediates(canvas, indices=[1], intermediates_only=True)[0]
        out_neck, out_encoder = neck_teacher(px), encoder_teacher(px)
    torch.testing.assert_close(out_neck.patch, neck, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_encoder.patch, last_block.permute(0, 2, 3, 1)[:, :h, :w], atol=1e-5, rtol=1e-5)
    # the padding is seen: the same content on a canvas padded with other values gives other tokens
    if size != (128, 128):
        with torch.no_grad():
            other = model.forward_features(F.pad(canvas[..., :size[0], :size[1]], (0, 128 - size[1], 0, 128 - size[0]),
                                                 value=1.0)).permute(0, 2, 3, 1)[:, :h, :w]
        assert not torch.allclose(other, out_neck.patch, atol=1e-3)


# ---------------------------------------------------------------- levels (--blocks)

@pytest.mark.parametrize("size", [(128, 128), (64, 96)])
def test_encoder_levels_are_timm_block_outputs_cropped_from_the_canvas(release_checkpoint, size):
    """Level k = timm's own output of block k (``forward_intermediates``, before the neck) on the padded canvas,
    cropped to the input's top-left H/16 x W/16 tokens; CLS = the mean of the crop."""
    path, _ = release_checkpoint
    teacher = tiny_teacher("sam_vitb_encoder", path)
    model = timm_reference(teacher)
    px = pixels(2, *size, seed=5)
    h, w = size[0] // 16, size[1] // 16
    with torch.no_grad():
        out = teacher(px, blocks=(0, 1))
        final = teacher(px)
        reference = model.forward_intermediates(padded_canvas(px), indices=[0, 1], norm=False, intermediates_only=True)
    assert teacher.depth == 2 and sorted(out.levels) == [0, 1]
    for k, block_map in enumerate(reference):
        cls, patch = out.levels[k]
        expected = block_map.permute(0, 2, 3, 1)[:, :h, :w]
        assert patch.shape == (2, h, w, 64) and cls.shape == (2, 64)
        torch.testing.assert_close(patch, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, expected.mean(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    # the last block's level is the encoder teacher's final output, and asking for levels leaves it alone
    torch.testing.assert_close(out.levels[1][1], final.patch, rtol=0, atol=0)
    torch.testing.assert_close(out.patch, final.patch, rtol=0, atol=0)
    description = teacher.level_description()
    assert "before the neck" in description and "cropped from the padded canvas" in description


def test_neck_teacher_refuses_levels_of_another_width(release_checkpoint):
    """After the neck the group is 256-d; the blocks are the encoder width (64 here): no levels."""
    teacher = tiny_teacher("sam_vitb", release_checkpoint[0])
    assert teacher.depth is None
    with pytest.raises(ValueError, match="sam_vitb does not support --blocks: its blocks are 64-d .* "
                                         "extract sam_vitb_encoder with --blocks instead"):
        teacher(pixels(1, 64, 64), blocks=(0,))


def test_input_beyond_the_canvas_is_refused_naming_the_native_size():
    teacher = create_teacher("sam_vitb")
    assert isinstance(teacher.encoder.blocks, nn.ModuleList) and len(teacher.encoder.blocks) == 12
    global_blocks = [i for i, b in enumerate(teacher.encoder.blocks) if b.attn.rel_pos_h.shape[0] == 127]
    assert global_blocks == [2, 5, 8, 11]
    with pytest.raises(ValueError, match="1040x1024 exceeds SAM's native 1024x1024"):
        teacher(pixels(1, 1040, 1024))
    with pytest.raises(ValueError, match="multiple"):
        teacher(pixels(1, 1000, 1024))


# ---------------------------------------------------------------- CLI: listing and one extraction

def test_teachers_command_lists_sam():
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in SAM_NAMES)


TINY_SPEC = TeacherSpec(name="sam_tiny_test_teacher", arch="samvit_base_patch16", patch_size=16, embed_dim=256,
                        cls_source="mean_patch", native_resolution=(128, 128), description="test-only tiny SAM")


@register_teacher(TINY_SPEC)
def _sam_tiny_test_teacher(spec, checkpoint):
    return sam_teacher(spec, checkpoint, after_neck=True, **TINY)


def test_extract_end_to_end_equals_a_direct_forward(tmp_path, real_image_dir, release_checkpoint):
    path, _ = release_checkpoint
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted(real_image_dir.iterdir())[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, ["extract", "--teacher", TINY_SPEC.name, "--checkpoint", str(path),
                                      "--images", str(images), "--out", str(out), "--resolution", "64x96",
                                      "--dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), TINY_SPEC.name)
    manifest = load_manifest(images)
    px = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (64, 96), "squash")) for i in range(3)])
    with torch.no_grad():
        direct = create_teacher(TINY_SPEC.name, path)(px)
    assert store.patch[:].shape == (3, 4, 6, 256)
    np.testing.assert_allclose(store.patch[:], direct.patch.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(store.cls[:], direct.cls.numpy(), atol=1e-5, rtol=1e-5)


TINY_ENCODER_SPEC = replace(TINY_SPEC, name="sam_tiny_encoder_test_teacher", embed_dim=64,
                            description="test-only tiny SAM, before the neck")


@register_teacher(TINY_ENCODER_SPEC)
def _sam_tiny_encoder_test_teacher(spec, checkpoint):
    return sam_teacher(spec, checkpoint, after_neck=False, **TINY)


def test_extract_blocks_stores_the_cropped_levels(tmp_path, real_image_dir, release_checkpoint):
    path, _ = release_checkpoint
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, ["extract", "--teacher", TINY_ENCODER_SPEC.name, "--checkpoint", str(path),
                                      "--images", str(real_image_dir), "--out", str(out), "--resolution", "64x96",
                                      "--dtype", "float32", "--blocks", "0,1", "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), TINY_ENCODER_SPEC.name)
    manifest = load_manifest(real_image_dir)
    rows = np.arange(len(manifest))
    px = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (64, 96), "squash")) for i in rows])
    with torch.no_grad():
        direct = create_teacher(TINY_ENCODER_SPEC.name, path)(px, blocks=(0, 1))
    assert store.blocks == (0, 1)
    for k, (cls, patch) in direct.levels.items():
        assert store.read_features(f"levels/b{k}/patch", rows).shape == (len(rows), 4, 6, 64)
        np.testing.assert_allclose(store.read_features(f"levels/b{k}/patch", rows), patch.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(store.read_features(f"levels/b{k}/cls", rows), cls.numpy(), atol=1e-5, rtol=1e-5)
