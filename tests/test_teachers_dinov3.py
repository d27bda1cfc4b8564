"""DINOv3 teachers: both checkpoint layouts, strict loading, RoPE periods, token split, extraction.

Checkpoints are random weights written under the key names and shapes of facebookresearch/dinov3
``DinoVisionTransformer`` as its hub constructors build them (patch 16, 4 storage tokens, ``mask_k_bias``);
timm's own ``checkpoint_filter_fn`` serves as an independent converter to the timm layout. Exactness
against the upstream forward is ``tools/check_upstream_dinov3.py`` (docs/teachers.md, "DINOv3").
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.eva import checkpoint_filter_fn
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import CheckpointError, create_teacher, get_spec, list_teachers
from dune_cache.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from dune_cache.teachers.base import load_state_dict_strict
from dune_cache.teachers.dinov3 import create_dinov3_vit, dinov3_teacher_from_state, load_dinov3_weights

# release name -> (width, depth, heads, FFN "mlp" | "swiglu", FFN hidden width, qkv bias, local_cls_norm),
# as dinov3/hub/backbones.py builds them (SwiGLU hidden = int(D * ffn_ratio * 2 / 3) rounded up to 8 or 64)
RELEASE = {
    "dinov3_vits16": (384, 12, 6, "mlp", 1536, True, False),
    "dinov3_vits16plus": (384, 12, 6, "swiglu", 1536, True, False),
    "dinov3_vitb16": (768, 12, 12, "mlp", 3072, True, False),
    "dinov3_vitl16": (1024, 24, 16, "mlp", 4096, True, False),
    "dinov3_vith16plus": (1280, 32, 20, "swiglu", 5120, True, False),
    "dinov3_vit7b16": (4096, 40, 32, "swiglu", 8192, False, True),
}


def release_periods(width: int, heads: int) -> torch.Tensor:
    """RoPE periods ``base ** (2 i / (D_head / 2))``, base 100, ``i < D_head / 4`` (upstream's init)."""
    quarter = width // heads // 4
    return 100.0 ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter))


def release_state(name: str, depth: int | None = None, seed: int = 0, device: str | None = None,
                  ) -> dict[str, torch.Tensor]:
    """Random weights in the release ``.pth`` layout of ``name`` (``depth`` blocks if given)."""
    width, full_depth, heads, ffn, hidden, qkv_bias, local_cls_norm = RELEASE[name]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=gen) * 0.05

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + "weight": 1 + rand(width), prefix + "bias": rand(width)}

    state = {"cls_token": rand(1, 1, width), "storage_tokens": rand(1, 4, width), "mask_token": rand(1, width),
             "rope_embed.periods": release_periods(width, heads).to(device),
             "patch_embed.proj.weight": rand(width, 3, 16, 16), "patch_embed.proj.bias": rand(width),
             **norm("norm.")}
    if local_cls_norm:
        state.update(norm("local_cls_norm."))
    for i in range(full_depth if depth is None else depth):
        p = f"blocks.{i}."
        block = {**norm(p + "norm1."), p + "attn.qkv.weight": rand(3 * width, width),
                 p + "attn.proj.weight": rand(width, width), p + "attn.proj.bias": rand(width),
                 p + "ls1.gamma": 0.5 + rand(width), **norm(p + "norm2."), p + "ls2.gamma": 0.5 + rand(width)}
        if qkv_bias:
            block[p + "attn.qkv.bias"] = rand(3 * width)
            block[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width),
                                                         torch.ones(width)]).to(device)
        if ffn == "mlp":
            block.update({p + "mlp.fc1.weight": rand(hidden, width), p + "mlp.fc1.bias": rand(hidden),
                          p + "mlp.fc2.weight": rand(width, hidden), p + "mlp.fc2.bias": rand(width)})
        else:
            for w in ("w1", "w2"):
                block.update({p + f"mlp.{w}.weight": rand(hidden, width), p + f"mlp.{w}.bias": rand(hidden)})
            block.update({p + "mlp.w3.weight": rand(width, hidden), p + "mlp.w3.bias": rand(width)})
        state.update(block)
    return state


def timm_layout(release: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The same weights converted by timm's own DINOv3 checkpoint filter (it drops ``rope_embed.periods``)."""
    model = create_dinov3_vit(get_spec(name).arch, device="meta")
    return {k: v.contiguous() for k, v in checkpoint_filter_fn(dict(release), model).items()}


def pixels(h: int, w: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.fixture(scope="module")
def vits16_files(tmp_path_factory) -> tuple[Path, Path]:
    """(release .pth, timm .safetensors) of the same random ViT-S/16 weights."""
    release = release_state("dinov3_vits16")
    folder = tmp_path_factory.mktemp("dinov3")
    torch.save(release, folder / "dinov3_vits16_pretrain_lvd1689m-random.pth")
    save_file(timm_layout(release, "dinov3_vits16"), str(folder / "model.safetensors"))
    return folder / "dinov3_vits16_pretrain_lvd1689m-random.pth", folder / "model.safetensors"


@pytest.mark.parametrize("size", [(256, 256), (224, 320)])
def test_both_layouts_load_strictly_and_agree(vits16_files, size):
    release_path, timm_path = vits16_files
    h, w = size
    with torch.no_grad():
        release = create_teacher("dinov3_vits16", release_path)(pixels(h, w))
        timm_out = create_teacher("dinov3_vits16", timm_path)(pixels(h, w))
    assert (release.cls.shape, release.registers.shape) == ((2, 384), (2, 4, 384))
    assert release.patch.shape == (2, h // 16, w // 16, 384)  # storage tokens are not patches
    assert torch.isfinite(release.patch).all()
    for a, b in [(release.cls, timm_out.cls), (release.registers, timm_out.registers),
                 (release.patch, timm_out.patch)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the file's periods equal timm's float32 ones


def test_tokens_are_the_final_norm_of_cls_storage_and_patches(vits16_files):
    """cls / registers / patch = ``norm`` of the last block's ``[CLS, 4 storage, h*w patches]``."""
    teacher = create_teacher("dinov3_vits16", vits16_files[0])
    captured = {}
    handle = teacher.vit.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    with torch.no_grad():
        out = teacher(pixels(64, 96))
        normed = teacher.vit.norm(captured["x"])
    handle.remove()
    assert normed.shape[1] == 1 + 4 + 4 * 6
    torch.testing.assert_close(out.cls, normed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.registers, normed[:, 1:5], rtol=0, atol=0)
    torch.testing.assert_close(out.patch, normed[:, 5:].reshape(2, 4, 6, 384), rtol=0, atol=0)


def test_levels_equal_timm_intermediates_with_storage_tokens_dropped():
    """Level k = timm's own ``forward_intermediates`` of block k (no final norm) on an off-native grid (RoPE):
    CLS = the first of the ``[CLS, 4 storage]`` prefix, patch = the tokens after it."""
    teacher = dinov3_teacher_from_state(get_spec("dinov3_vits16"), release_state("dinov3_vits16", depth=3),
                                        "release weights", depth=3).eval()
    px = pixels(48, 80)
    with torch.no_grad():
        out = teacher(px, blocks=(0, 2))
        reference = teacher.vit.forward_intermediates(teacher.normalize(px), indices=[0, 2], norm=False,
                                                      return_prefix_tokens=True, intermediates_only=True)
    assert teacher.depth == 3 and "the class token" in teacher.level_description()
    for k, (patch, prefix) in zip((0, 2), reference):
        assert prefix.shape == (2, 5, 384) and out.levels[k][1].shape == (2, 3, 5, 384)
        torch.testing.assert_close(out.levels[k][1], patch.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.levels[k][0], prefix[:, 0], atol=1e-5, rtol=1e-5)
    # the last block's level is the residual stream before the final norm: normed, it is cls / patch
    torch.testing.assert_close(teacher.vit.norm(out.levels[2][1]), out.patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.vit.norm(out.levels[2][0]), out.cls, atol=1e-5, rtol=1e-5)


def test_release_rope_periods_are_used(tmp_path):
    """The checkpoint's ``rope_embed.periods`` (stored rounded to bfloat16 by the release) drive the RoPE."""
    state = release_state("dinov3_vits16", depth=2)
    spec = get_spec("dinov3_vits16")
    exact = dinov3_teacher_from_state(spec, state, "exact", depth=2).eval()
    rounded_periods = state["rope_embed.periods"].bfloat16().float()
    rounded = dinov3_teacher_from_state(spec, {**state, "rope_embed.periods": rounded_periods}, "bf16",
                                        depth=2).eval()
    assert torch.equal(rounded.vit.rope.periods, rounded_periods)
    assert not torch.equal(rounded_periods, state["rope_embed.periods"])
    with torch.no_grad():
        a, b = exact(pixels(64, 64)), rounded(pixels(64, 64))
    assert not torch.equal(a.patch, b.patch)


def test_masked_key_bias_is_dropped_and_q_v_biases_kept():
    state = release_state("dinov3_vits16", depth=1)
    weights = load_dinov3_weights(state, "test")
    bias = state["blocks.0.attn.qkv.bias"]
    assert torch.equal(weights.state["blocks.0.attn.q_bias"], bias[:384])
    assert torch.equal(weights.state["blocks.0.attn.v_bias"], bias[768:])
    assert not any(k.endswith(("bias_mask", "qkv.bias", "mask_token", "periods")) for k in weights.state)
    assert "reg_token" in weights.state and "blocks.0.gamma_1" in weights.state


def test_unmasked_key_bias_is_refused():
    state = release_state("dinov3_vits16", depth=1)
    state["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.bias has a non-zero key bias"):
        load_dinov3_weights(state, "test")


@pytest.mark.parametrize("edit, key, reported", [
    ("drop", "blocks.3.ls1.gamma", r"missing keys 1 \[blocks\.3\.gamma_1\]"),
    ("drop", "rope_embed.periods", r"missing keys 1 \[rope_embed\.periods\]"),
    ("add", "blocks.0.attn.q_norm.weight", r"unexpected keys 1 \[blocks\.0\.attn\.q_norm\.weight\]"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, edit, key, reported):
    state = release_state("dinov3_vits16")
    if edit == "drop":
        del state[key]
    else:
        state[key] = torch.ones(384)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=reported):
        create_teacher("dinov3_vits16", tmp_path / "bad.pth")


def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    torch.save({"pos_embed": torch.zeros(1, 5, 8), "blocks.0.norm1.weight": torch.ones(8)}, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match="not a DINOv3 ViT"):
        create_teacher("dinov3_vits16", tmp_path / "v2.pth")


def test_timm_file_without_qkv_bias_loads_into_timm_model_without_bias(tmp_path):
    release = release_state("dinov3_vits16", depth=2)
    plain = {k: v for k, v in timm_layout(release, "dinov3_vits16").items() if not k.endswith(("q_bias", "v_bias"))}
    teacher = dinov3_teacher_from_state(get_spec("dinov3_vits16"), plain, "plain", depth=2)
    assert teacher.vit.blocks[0].attn.q_bias is None
    with torch.no_grad():
        assert teacher.eval()(pixels(32, 48)).patch.shape == (2, 2, 3, 384)


@pytest.mark.parametrize("name", list(RELEASE))
def test_real_size_release_keys_load_on_meta(name):
    """Every real-size release checkpoint (7B included) maps key for key, shape for shape, onto its timm model."""
    spec = get_spec(name)
    weights = load_dinov3_weights(release_state(name, device="meta"), name)
    vit = create_dinov3_vit(spec.arch, device="meta")
    load_state_dict_strict(vit, weights.state, name)  # raises CheckpointError on any difference
    width, depth, heads = RELEASE[name][:3]
    assert (len(vit.blocks), vit.embed_dim, spec.embed_dim) == (depth, width, width)
    assert weights.rope_periods.shape == vit.rope.periods.shape == (width // heads // 4,)


def test_registered_specs_have_upstream_geometry():
    specs = {s.name: s for s in list_teachers()}
    for name, (width, *_) in RELEASE.items():
        spec = specs[name]
        geometry = (spec.patch_size, spec.embed_dim, spec.num_registers, spec.native_resolution)
        assert geometry == (16, width, 4, (256, 256))
        assert spec.cls_source == "token" and spec.final_norm
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert spec.arch.endswith(("dinov3", "dinov3_qkvb")) and "storage" in spec.description


def test_create_teacher_without_checkpoint_is_frozen_random_model():
    teacher = create_teacher("dinov3_vits16")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert len(teacher.block_modules()) == 12
    with torch.no_grad():
        out = teacher(pixels(48, 80, batch=1))
    assert (out.cls.shape, out.registers.shape, out.patch.shape) == ((1, 384), (1, 4, 384), (1, 3, 5, 384))


def test_teachers_command_lists_dinov3():
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:] if line.strip()}
    for name, (width, *_) in RELEASE.items():
        assert rows[name][2:5] == ["16", str(width), "4"], rows[name]


def test_extract_stores_release_checkpoint_features(tmp_path, vits16_files, real_image_dir):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(real_image_dir.iterdir())[:3]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, [
        "extract", "--teacher", "dinov3_vits16", "--checkpoint", str(vits16_files[0]), "--images", str(images),
        "--out", str(out), "--resolution", "64x96", "--dtype", "float32", "--batch-size", "2",
        "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), "dinov3_vits16")
    manifest = load_manifest(images)
    batch = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (64, 96), "squash"))
                         for i in range(len(manifest.ids))])
    with torch.no_grad():
        direct = create_teacher("dinov3_vits16", vits16_files[0])(batch)
    assert store.patch.shape == (3, 4, 6, 384)
    np.testing.assert_allclose(store.cls[:], direct.cls.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(store.patch[:], direct.patch.numpy(), rtol=0, atol=1e-5)
