"""Hugging Face model folders as teacher checkpoints, exact to transformers' own forward.

For every teacher family transformers implements (DINOv2 with and without registers, DINOv3, SigLIP/SigLIP2, SAM,
Depth Anything V2) a transformers model of the teacher's real geometry (SAM ViT-B and DINOv2 ViT-g/14: real width,
2 blocks, loaded through the same loader at that depth) gets seeded random values in every tensor
(:func:`randomize_`), is written with ``save_pretrained`` (a folder: ``config.json`` + ``model.safetensors``, or
shards and their index), loaded by this package and run on the same uint8 pixels at the teacher's native size;
``cls``/``patch`` (and ``--blocks`` levels) must equal transformers' outputs on the same normalised pixels within
:data:`ATOL`. Checked against
transformers 5.25.0 (PyPI; ``models/*/modeling_*.py`` of huggingface/transformers tag ``v5.25.0``); the figures
and the off-native comparison are in docs/teachers.md (``tools/check_hf_teachers.py``).

``pytest.importorskip("transformers")`` only guards a checkout without the ``test`` extra, which installs it.
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.config import ExtractConfig, StorageConfig
from dune_cache.errors import StoreMismatchError
from dune_cache.extract.run import run_extraction
from dune_cache.extract.provenance import checkpoint_provenance
from dune_cache.format.levels import level_name
from dune_cache.format.provenance import provenance_differences
from dune_cache.format.store import TeacherStore
from dune_cache.images.decode import load_pixels
from dune_cache.images.manifest import load_manifest
from dune_cache.teachers import CheckpointError, create_teacher, get_spec
from dune_cache.teachers.checkpoint_files import checkpoint_sha256
from dune_cache.teachers.dinov2 import dinov2_release_state, dinov2_teacher_from_state
from dune_cache.teachers.hf import load_checkpoint
from dune_cache.teachers.sam import sam_teacher
from dune_cache.utils.hashing import file_sha256

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # float32 rounding of the same operations (the target)
SAM_DEPTH = {"depth": 2, "global_attn_indexes": (1,)}  # SAM ViT-B's width, 2 of its 12 blocks (window + global)


# ---------------------------------------------------------------- transformers models with random weights

def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter seeded-random, so that no tensor is left at an init that hides a wrong mapping: LayerScale
    ``lambda1`` N(0.5, 0.1), norm weights 1 + N(0, 0.1), other vectors N(0, 0.1) (biases, tokens), matrices and
    kernels (incl. position embeddings and SAM's relative position tables) N(0, 1) / sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("lambda1"):
                p.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() < 2 or p.shape[-1] == p.numel():
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def dinov2_model(registers: int = 0, seed: int = 0):
    """DINOv2 ViT-S/14 (the release geometry: 384 wide, 12 blocks, 6 heads, 37x37 positions)."""
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return randomize_(transformers.Dinov2WithRegistersModel(config), seed)
    return randomize_(transformers.Dinov2Model(transformers.Dinov2Config(**common)), seed)


def dinov3_model(gated: bool = False):
    """DINOv3 ViT-S/16 (facebook/dinov3-vits16-pretrain-lvd1689m's config), or S+/16 (``gated``: SwiGLU)."""
    mlp = {"use_gated_mlp": True, "hidden_act": "silu"} if gated else {}
    config = transformers.DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                          num_attention_heads=6, patch_size=16, num_register_tokens=4,
                                          image_size=224, rope_theta=100.0, layer_norm_eps=1e-5, **mlp)
    return randomize_(transformers.DINOv3ViTModel(config))


SIGLIP_B16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)  # google/siglip2-base-patch16-224's vision_config


def sam_model():
    """``SamModel`` with ViT-B's image encoder at 2 blocks (the second global), real width and canvas."""
    vision = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, global_attn_indexes=[1])
    return randomize_(transformers.SamModel(transformers.SamConfig(vision_config=vision)))


def depth_anything_model():
    """Depth Anything V2 Small (depth-anything/Depth-Anything-V2-Small-hf's config)."""
    backbone = dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    image_size=518, patch_size=14, out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
                    apply_layernorm=True)
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                              neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
    return randomize_(transformers.DepthAnythingForDepthEstimation(config))


def saved(model, folder: Path, **options) -> Path:
    """``model.save_pretrained(folder)``; the folder."""
    model.save_pretrained(folder, **options)
    return folder


def pixels(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Seeded uint8 pixels ``(batch, 3, height, width)``."""
    return torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Patch tokens ``(B, h*w, D)`` -> ``(B, h, w, D)``."""
    return tokens.reshape(len(tokens), h, w, -1)


def assert_close(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor) -> None:
    """Max abs difference within :data:`ATOL`, shapes equal."""
    ours = torch.as_tensor(np.asarray(ours)) if isinstance(ours, np.ndarray) else ours
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= ATOL


def copy_photos(real_image_dir: Path, dest: Path, count: int = 2) -> Path:
    """The first ``count`` real photos in a folder of their own."""
    dest.mkdir()
    for photo in sorted(real_image_dir.iterdir())[:count]:
        shutil.copy(photo, dest / photo.name)
    return dest


def extract(teacher: str, checkpoint: Path, images: Path, out: Path, resolution: str, blocks=()) -> TeacherStore:
    """float32 extraction of ``images`` at ``resolution``; the group."""
    cfg = ExtractConfig(teacher=teacher, images=images, out=str(out), checkpoint=checkpoint, resolution=resolution,
                        batch_size=2, num_workers=0, progress=False, blocks=blocks,
                        storage=StorageConfig(unit_size=4, dtype="float32"))
    result = run_extraction(cfg)
    assert result.failed == 0
    return TeacherStore.open(str(out), result.group)


def manifest_pixels(images: Path, size: tuple[int, int]) -> torch.Tensor:
    """The uint8 pixels extraction feeds the teacher for the images of ``images`` (squash resize)."""
    manifest = load_manifest(images)
    return torch.stack([torch.from_numpy(load_pixels(manifest.path(i), size, "squash")) for i in range(len(manifest))])


# ---------------------------------------------------------------- exactness, family by family

def test_dinov2_folder_extracts_transformers_features_and_levels(tmp_path, real_image_dir):
    model = dinov2_model()
    folder = saved(model, tmp_path / "dinov2-small")
    images = copy_photos(real_image_dir, tmp_path / "images")
    store = extract("dinov2_vits14", folder, images, tmp_path / "cache", "518", blocks=(0, 6))
    teacher = create_teacher("dinov2_vits14", folder)
    with torch.no_grad():
        hf = model(pixel_values=teacher.normalize(manifest_pixels(images, (518, 518))), output_hidden_states=True)
    assert_close(store.read_features("cls", slice(None)), hf.pooler_output)
    assert_close(store.read_features("patch", slice(None)), grid(hf.last_hidden_state[:, 1:], 37, 37))
    for k in (0, 6):  # transformers' hidden_states[0] is the embeddings: block k's output is [k + 1], before the norm
        assert_close(store.read_features(level_name(k, "cls"), slice(None)), hf.hidden_states[k + 1][:, 0])
        assert_close(store.read_features(level_name(k, "patch"), slice(None)),
                     grid(hf.hidden_states[k + 1][:, 1:], 37, 37))
    checkpoint = store.provenance["checkpoint"]
    assert checkpoint["format"] == "hf" and checkpoint["file"] == "dinov2-small"
    assert [f["file"] for f in checkpoint["files"]] == ["config.json", "model.safetensors"]
    assert all(f["sha256"] == hashlib.sha256((folder / f["file"]).read_bytes()).hexdigest()
               for f in checkpoint["files"])
    assert checkpoint["weights_sha256"] == teacher.weights_sha256()
    assert checkpoint["sha256"] == checkpoint_sha256(folder, file_sha256)  # what live teachers check the folder by


def test_dinov2_registers_sharded_folder_matches_transformers(tmp_path):
    model = dinov2_model(registers=4)
    folder = saved(model, tmp_path / "reg", max_shard_size="20MB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    teacher = create_teacher("dinov2_vits14_reg4", folder)
    px = pixels(518, 518)
    with torch.no_grad():
        ours = teacher(px, blocks=(11,))
        hf = model(pixel_values=teacher.normalize(px), output_hidden_states=True)
    assert_close(ours.cls, hf.pooler_output)
    assert_close(ours.registers, hf.last_hidden_state[:, 1:5])
    assert_close(ours.patch, grid(hf.last_hidden_state[:, 5:], 37, 37))
    assert_close(ours.levels[11][1], grid(hf.hidden_states[12][:, 5:], 37, 37))
    assert teacher.checkpoint_format == "hf"


def test_dinov3_folder_through_the_cli_matches_transformers(tmp_path, real_image_dir):
    model = dinov3_model()
    folder = saved(model, tmp_path / "dinov3-vits16")
    images = copy_photos(real_image_dir, tmp_path / "images")
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, ["extract", "--teacher", "dinov3_vits16", "--checkpoint", str(folder),
                                      "--images", str(images), "--out", str(out), "--dtype", "float32",
                                      "--blocks", "3", "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), "dinov3_vits16")
    teacher = create_teacher("dinov3_vits16", folder)
    with torch.no_grad():
        hf = model(pixel_values=teacher.normalize(manifest_pixels(images, (256, 256))), output_hidden_states=True)
    assert_close(store.read_features("cls", slice(None)), hf.pooler_output)
    assert_close(store.read_features("patch", slice(None)), grid(hf.last_hidden_state[:, 5:], 16, 16))
    assert_close(store.read_features(level_name(3, "patch"), slice(None)), grid(hf.hidden_states[4][:, 5:], 16, 16))
    assert store.provenance["checkpoint"]["format"] == "hf"


def test_dinov3_plus_swiglu_folder_matches_transformers(tmp_path):
    model = dinov3_model(gated=True)
    teacher = create_teacher("dinov3_vits16plus", saved(model, tmp_path / "dinov3-vits16plus"))
    px = pixels(224, 320)  # RoPE: no resampling, any multiple of 16 is exact
    with torch.no_grad():
        ours = teacher(px)
        hf = model(pixel_values=teacher.normalize(px))
    assert_close(ours.cls, hf.pooler_output)
    assert_close(ours.registers, hf.last_hidden_state[:, 1:5])
    assert_close(ours.patch, grid(hf.last_hidden_state[:, 5:], 14, 20))


def test_dinov2_giant_swiglu_folder_at_reduced_depth_matches_transformers(tmp_path):
    config = transformers.Dinov2Config(hidden_size=1536, num_hidden_layers=2, num_attention_heads=24, image_size=518,
                                       patch_size=14, use_swiglu_ffn=True)
    model = randomize_(transformers.Dinov2Model(config))
    folder = saved(model, tmp_path / "giant")
    spec = get_spec("dinov2_vitg14")
    state, layout = dinov2_release_state(spec, load_checkpoint(folder), depth=2)
    teacher = dinov2_teacher_from_state(spec, state, str(folder), depth=2).eval()
    px = pixels(518, 518, batch=1)
    with torch.no_grad():
        ours = teacher(px)
        hf = model(pixel_values=teacher.normalize(px))
    assert layout == "hf"
    assert_close(ours.cls, hf.pooler_output)
    assert_close(ours.patch, grid(hf.last_hidden_state[:, 1:], 37, 37))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers 2 \(teacher: 40\)"):
        create_teacher("dinov2_vitg14", folder)


def test_siglip_vision_model_and_full_model_files_match_transformers(tmp_path):
    vision = randomize_(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP_B16_224)))
    unprefixed = saved(vision, tmp_path / "vision")  # transformers 5 writes its keys without vision_model.
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=SIGLIP_B16_224, text_config=text))
    full.vision_model.load_state_dict(vision.state_dict())
    prefixed = saved(full, tmp_path / "full") / "model.safetensors"  # the file alone: config.json read beside it
    a = create_teacher("siglip2_vitb16_224", unprefixed)
    b = create_teacher("siglip2_vitb16_224", prefixed)
    assert a.weights_sha256() == b.weights_sha256()
    px = pixels(224, 224)
    with torch.no_grad():
        ours = a(px, blocks=(5,))
        hf = vision(pixel_values=a.normalize(px), output_hidden_states=True)
    assert_close(ours.cls, hf.pooler_output)
    assert_close(ours.patch, grid(hf.last_hidden_state, 14, 14))
    assert_close(ours.levels[5][1], grid(hf.hidden_states[6], 14, 14))
    assert_close(ours.levels[5][0], hf.hidden_states[6].mean(dim=1))


def test_sam_folder_matches_transformers_after_and_before_the_neck(tmp_path):
    model = sam_model()
    folder = saved(model, tmp_path / "sam")
    neck = sam_teacher(get_spec("sam_vitb"), folder, after_neck=True, **SAM_DEPTH).eval()
    encoder = sam_teacher(get_spec("sam_vitb_encoder"), folder, after_neck=False, **SAM_DEPTH).eval()
    px = pixels(1024, 1024, batch=1)
    with torch.no_grad():
        ours_neck, ours = neck(px), encoder(px, blocks=(0,))
        hf = model.vision_encoder(pixel_values=neck.normalize(px), output_hidden_states=True)
    embedding = hf.last_hidden_state.permute(0, 2, 3, 1)  # (B, 256, 64, 64) -> channels last
    assert_close(ours_neck.patch, embedding)
    assert_close(ours_neck.cls, embedding.mean(dim=(1, 2)))
    assert_close(ours.patch, hf.hidden_states[-1])  # the last block's (B, 64, 64, 768), before the neck
    assert_close(ours.levels[0][1], hf.hidden_states[1])
    assert neck.checkpoint_format == "hf"


def test_depth_anything_folder_matches_the_transformers_backbone_and_dpt_levels(tmp_path):
    model = depth_anything_model()
    folder = saved(model, tmp_path / "da")
    teacher = create_teacher("depth_anything_v2_vits", folder)
    px = pixels(518, 518)
    with torch.no_grad():
        ours = teacher(px, blocks=teacher.dpt_blocks)
        hf = model.backbone(pixel_values=teacher.normalize(px)).feature_maps  # after the norm, [CLS, patches]
    assert_close(ours.cls, hf[-1][:, 0])
    assert_close(ours.patch, grid(hf[-1][:, 1:], 37, 37))
    for k, tokens in zip(teacher.dpt_blocks, hf):
        assert_close(ours.levels[k][0], tokens[:, 0])
        assert_close(ours.levels[k][1], grid(tokens[:, 1:], 37, 37))


def test_off_native_sizes_keep_the_release_resampling_whatever_the_format(tmp_path):
    folder = saved(dinov2_model(), tmp_path / "hf")
    hf_teacher = create_teacher("dinov2_vits14", folder)
    save_file(hf_teacher.vit.state_dict(), str(tmp_path / "timm.safetensors"))
    timm_teacher = create_teacher("dinov2_vits14", tmp_path / "timm.safetensors")
    px = pixels(224, 308)
    with torch.no_grad():
        a, b = hf_teacher(px), timm_teacher(px)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)


# ---------------------------------------------------------------- what is refused

def test_a_config_of_another_geometry_is_refused_naming_the_fields(tmp_path):
    small = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2,
                                                                num_attention_heads=2, image_size=518))
    folder = saved(small, tmp_path / "other")
    for given in (folder, folder / "model.safetensors"):
        with pytest.raises(CheckpointError) as info:
            create_teacher("dinov2_vits14", given)
        message = str(info.value)
        assert "hidden_size 64 (teacher: 384)" in message and "num_hidden_layers 2 (teacher: 12)" in message
        assert "\n" not in message
    with pytest.raises(CheckpointError, match="model_type 'dinov2' is not a dinov2_vits14_reg4 checkpoint"):
        create_teacher("dinov2_vits14_reg4", folder)


def test_sam_at_another_depth_than_the_teacher_name_is_refused(tmp_path):
    folder = saved(sam_model(), tmp_path / "sam")
    with pytest.raises(CheckpointError, match=r"vision_config.num_hidden_layers 2 \(teacher: 12\).*"
                                              r"global_attn_indexes \[1\] \(teacher: \[2, 5, 8, 11\]\)"):
        create_teacher("sam_vitb", folder)


def test_siglip2_naflex_tower_is_refused_with_the_reason(tmp_path):
    config = transformers.Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                              num_attention_heads=12, patch_size=16, num_patches=256)
    folder = saved(transformers.Siglip2VisionModel(config), tmp_path / "naflex")
    for given in (folder, folder / "model.safetensors"):
        with pytest.raises(CheckpointError, match="SigLIP2 NaFlex tower"):
            create_teacher("siglip2_vitb16_256", given)
    (folder / "config.json").unlink()  # recognised from the keys alone (the Linear patch embedding)
    with pytest.raises(CheckpointError, match="SigLIP2 NaFlex tower"):
        create_teacher("siglip2_vitb16_256", folder)


def test_folders_without_safetensors_or_with_a_missing_shard_are_refused(tmp_path):
    pickle_only = tmp_path / "bin"
    pickle_only.mkdir()
    (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only pytorch_model.bin .*safe_serialization=True"):
        create_teacher("dinov2_vits14", pickle_only)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        create_teacher("dinov2_vits14", empty)
    sharded = saved(dinov2_model(registers=4), tmp_path / "reg", max_shard_size="20MB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing in .*model-00002-of"):
        create_teacher("dinov2_vits14_reg4", sharded)


def test_the_cli_refuses_a_folder_that_is_not_a_checkpoint_in_one_line(tmp_path, real_image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["extract", "--teacher", "dinov2_vits14", "--checkpoint", str(empty),
                                      "--images", str(real_image_dir), "--out", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code != 0 and "not a Hugging Face model folder" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- provenance: the same weights are the same teacher

def test_same_weights_from_a_folder_and_a_timm_file_resume_one_group_other_weights_are_refused(
        tmp_path, real_image_dir):
    folder = saved(dinov2_model(), tmp_path / "hf")
    images = copy_photos(real_image_dir, tmp_path / "images")
    out = tmp_path / "cache"
    store = extract("dinov2_vits14", folder, images, out, "224")
    vit = create_teacher("dinov2_vits14", folder).vit.state_dict()
    save_file(vit, str(tmp_path / "timm.safetensors"))
    again = run_extraction(ExtractConfig(teacher="dinov2_vits14", images=images, out=str(out),
                                         checkpoint=tmp_path / "timm.safetensors", resolution="224", num_workers=0,
                                         progress=False, storage=StorageConfig(unit_size=4, dtype="float32")))
    assert (again.processed, again.total) == (0, 2)  # resumed: nothing left to do, nothing refused
    vit["norm.bias"] = vit["norm.bias"] + 1.0
    save_file(vit, str(tmp_path / "other.safetensors"))
    with pytest.raises(StoreMismatchError, match=r"checkpoint\.weights_sha256") as info:
        run_extraction(ExtractConfig(teacher="dinov2_vits14", images=images, out=str(out),
                                     checkpoint=tmp_path / "other.safetensors", resolution="224", num_workers=0,
                                     progress=False, storage=StorageConfig(unit_size=4, dtype="float32")))
    assert "checkpoint.sha256" not in str(info.value)  # file names and hashes differ but are not what is compared
    assert store.provenance["checkpoint"]["format"] == "hf"


def dinov3_release_layout(vit_state: dict[str, torch.Tensor], periods: torch.Tensor) -> dict[str, torch.Tensor]:
    """DINOv3 weights in timm names -> the release layout (``storage_tokens``, ``ls{1,2}.gamma``, a masked
    ``qkv.bias`` with its ``bias_mask``, ``rope_embed.periods``, ``mask_token``), as upstream saves them."""
    state = {"rope_embed.periods": periods, "mask_token": torch.zeros(1, vit_state["cls_token"].shape[-1])}
    for key, value in vit_state.items():
        if key.endswith(".attn.q_bias"):
            prefix = key.removesuffix("q_bias")
            state[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), vit_state[prefix + "v_bias"]])
            state[prefix + "qkv.bias_mask"] = torch.cat([torch.ones_like(value), torch.zeros_like(value),
                                                         torch.ones_like(value)])
        elif not key.endswith(".attn.v_bias"):
            state[key.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma")
                  .replace(".gamma_2", ".ls2.gamma")] = value
    return state


def test_dinov3_release_file_is_the_hub_teacher_only_with_the_same_rope_periods(tmp_path):
    hub = create_teacher("dinov3_vits16", saved(dinov3_model(), tmp_path / "hf"))
    periods = hub.vit.rope.periods.clone()  # transformers' (and timm's): float32 from rope_theta
    torch.save(dinov3_release_layout(hub.vit.state_dict(), periods), tmp_path / "same.pth")
    torch.save(dinov3_release_layout(hub.vit.state_dict(), periods.bfloat16().float()), tmp_path / "bf16.pth")
    same, bf16 = create_teacher("dinov3_vits16", tmp_path / "same.pth"), create_teacher("dinov3_vits16",
                                                                                          tmp_path / "bf16.pth")
    assert same.checkpoint_format == bf16.checkpoint_format == "release"
    assert same.weights_sha256() == hub.weights_sha256() != bf16.weights_sha256()
    px = pixels(256, 256, batch=1)
    with torch.no_grad():
        a, b, c = hub(px), same(px), bf16(px)
    assert torch.equal(a.patch, b.patch) and not torch.equal(a.patch, c.patch)


def test_repair_checks_a_folder_by_its_files_sha256(tmp_path, real_image_dir):
    from dune_cache.commands.repair import RepairConfig, check_inputs, extraction_config
    from dune_cache.errors import RepairError

    folder = saved(dinov2_model(), tmp_path / "hf")
    images = copy_photos(real_image_dir, tmp_path / "images")
    store = extract("dinov2_vits14", folder, images, tmp_path / "cache", "224")
    cfg = RepairConfig(cache=str(tmp_path / "cache"))
    check_inputs(store, extraction_config(cfg, store, "dinov2_vits14"), "dinov2_vits14", False)  # same folder: accepted
    other = saved(dinov2_model(seed=1), tmp_path / "other")
    cfg = RepairConfig(cache=str(tmp_path / "cache"), checkpoint=other)
    with pytest.raises(RepairError, match=r"checkpoint\.sha256"):
        check_inputs(store, extraction_config(cfg, store, "dinov2_vits14"), "dinov2_vits14", False)


def test_groups_made_before_weights_were_recorded_compare_their_files_as_before(tiny_checkpoint):
    teacher = create_teacher("tiny_test_teacher", tiny_checkpoint)
    new = {"checkpoint": checkpoint_provenance(tiny_checkpoint, teacher)}
    old = {"checkpoint": {k: new["checkpoint"][k] for k in ("file", "sha256", "bytes")}}  # a group made before
    assert new["checkpoint"]["format"] == "release" and new["checkpoint"]["sha256"] == old["checkpoint"]["sha256"]
    assert provenance_differences(old, new) == [] and provenance_differences(new, old) == []
    changed = {"checkpoint": {**old["checkpoint"], "sha256": "0" * 64}}
    assert [d.split(":")[0] for d in provenance_differences(changed, new)] == ["checkpoint.sha256"]
