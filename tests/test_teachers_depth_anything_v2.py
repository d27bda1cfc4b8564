"""Depth Anything V2 encoder teachers: the release file's ``pretrained.*`` encoder loaded strictly, the DPT head
ignored, anything else refused; tokens equal the plain DINOv2 teacher's on the same encoder weights.

Checkpoints are random weights in the layout of upstream ``DepthAnythingV2.state_dict()``: the DINOv2 encoder
(facebookresearch layout, written by ``fb_dinov2_state``) under ``pretrained.``, DPT-head tensors under
``depth_head.``. Exactness against the upstream forward is ``tools/check_upstream_depth_anything_v2.py``
(docs/teachers.md, "Depth Anything V2").
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import CheckpointError, create_teacher, get_spec, list_teachers
from dune_cache.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from dune_cache.teachers.base import load_state_dict_strict
from dune_cache.teachers.blocks import parse_blocks, resolve_blocks, sak_blocks
from dune_cache.teachers.depth_anything_v2 import DepthAnythingV2Teacher, encoder_state
from dune_cache.teachers.dinov2 import create_dinov2_vit, load_dinov2_state_dict
from test_teachers_dinov2 import FB_SHAPES, fb_dinov2_state, pixels

# size -> the 4 blocks upstream's DepthAnythingV2.intermediate_layer_idx reads
DPT_BLOCKS = {"s": [2, 5, 8, 11], "b": [2, 5, 8, 11], "l": [4, 11, 17, 23], "g": [9, 19, 29, 39]}


def dpt_head_state(width: int, features: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """A few tensors of upstream's ``DPTHead`` (``depth_head.*``), which the teacher must ignore."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"projects.0.weight": (48, width, 1, 1), "projects.0.bias": (48,),
              "resize_layers.0.weight": (48, 48, 4, 4), "scratch.layer1_rn.weight": (features, 48, 3, 3),
              "scratch.refinenet1.out_conv.weight": (features, features, 1, 1),
              "scratch.output_conv2.0.weight": (32, features // 2, 3, 3)}
    return {f"depth_head.{k}": torch.randn(s, generator=gen) for k, s in shapes.items()}


def release_state(size: str = "s", seed: int = 0) -> dict[str, torch.Tensor]:
    encoder = fb_dinov2_state(size, seed=seed)
    return {**{f"pretrained.{k}": v for k, v in encoder.items()}, **dpt_head_state(FB_SHAPES[size][0])}


@pytest.fixture(scope="module")
def vits_files(tmp_path_factory) -> tuple[Path, Path]:
    """(depth_anything_v2_vits.pth, the same encoder as a plain DINOv2 .pth)."""
    folder = tmp_path_factory.mktemp("dav2")
    state = release_state("s")
    torch.save(state, folder / "depth_anything_v2_vits.pth")
    torch.save({k.removeprefix("pretrained."): v for k, v in state.items() if k.startswith("pretrained.")},
               folder / "dinov2_vits14_pretrain.pth")
    return folder / "depth_anything_v2_vits.pth", folder / "dinov2_vits14_pretrain.pth"


@pytest.mark.parametrize("size", [(224, 308), (518, 518)])
def test_release_checkpoint_gives_the_dinov2_encoder_tokens(vits_files, size):
    h, w = size
    with torch.no_grad():
        out = create_teacher("depth_anything_v2_vits", vits_files[0])(pixels(h, w))
        plain = create_teacher("dinov2_vits14", vits_files[1])(pixels(h, w))
    assert (out.cls.shape, out.registers.shape, out.patch.shape) == ((1, 384), (1, 0, 384), (1, h // 14, w // 14, 384))
    torch.testing.assert_close(out.patch, plain.patch, rtol=0, atol=0)
    torch.testing.assert_close(out.cls, plain.cls, rtol=0, atol=0)


def test_key_outside_encoder_and_head_is_refused(tmp_path):
    state = {**release_state("s"), "scratch.refinenet1.out_conv.weight": torch.zeros(8, 8, 1, 1)}
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \[scratch\.refinenet1\.out_conv\.weight\]"):
        create_teacher("depth_anything_v2_vits", tmp_path / "bad.pth")


def test_missing_encoder_key_is_named(tmp_path):
    state = release_state("s")
    del state["pretrained.blocks.3.ls1.gamma"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys 1 \[blocks\.3\.ls1\.gamma\]"):
        create_teacher("depth_anything_v2_vits", tmp_path / "bad.pth")


def test_head_only_checkpoint_is_refused(tmp_path):
    torch.save(dpt_head_state(384), tmp_path / "head.pth")
    with pytest.raises(CheckpointError, match="no 'pretrained.\\*' encoder keys"):
        create_teacher("depth_anything_v2_vits", tmp_path / "head.pth")


@pytest.mark.parametrize("size", list(DPT_BLOCKS))
def test_real_size_release_keys_load_on_meta_and_dpt_reads_the_last_block(size):
    name = f"depth_anything_v2_vit{size}"
    encoder = {f"pretrained.{k}": v for k, v in fb_dinov2_state(size, device="meta").items()}
    vit = create_dinov2_vit(get_spec(name).arch, device="meta")
    load_state_dict_strict(vit, load_dinov2_state_dict(encoder_state(encoder, name)), name)
    assert DPT_BLOCKS[size][-1] == len(vit.blocks) - 1  # cls / patch (final norm, last block) = the DPT's last read


def test_registered_specs_and_dpt_blocks():
    specs = {s.name: s for s in list_teachers()}
    for size, blocks in DPT_BLOCKS.items():
        spec = specs[f"depth_anything_v2_vit{size}"]
        assert (spec.patch_size, spec.embed_dim, spec.num_registers, spec.native_resolution) == (
            14, FB_SHAPES[size][0], 0, (518, 518))
        assert (spec.mean, spec.std, spec.cls_source, spec.final_norm) == (IMAGENET_MEAN, IMAGENET_STD, "token", True)
        assert str(blocks) in spec.description and "final norm" in spec.description
    teacher = create_teacher("depth_anything_v2_vits")
    assert teacher.dpt_blocks == tuple(DPT_BLOCKS["s"]) and not teacher.training


# ---------------------------------------------------------------- levels (--blocks): the DPT head's convention

def test_levels_equal_timm_intermediates_after_the_final_norm():
    """A reduced encoder whose native grid is the input's (4x4, so the position embeddings are not resampled and
    timm's own ``forward_intermediates(norm=True)`` = upstream ``get_intermediate_layers(norm=True)``)."""
    torch.manual_seed(0)
    vit = timm.create_model(get_spec("depth_anything_v2_vits").arch, pretrained=False, num_classes=0, img_size=56,
                            depth=4, init_values=1.0, dynamic_img_size=True).eval()
    teacher = DepthAnythingV2Teacher(get_spec("depth_anything_v2_vits"), vit).eval()
    px = pixels(56, 56)
    with torch.no_grad():
        out = teacher(px, blocks=(1, 3))
        reference = vit.forward_intermediates(teacher.normalize(px), indices=[1, 3], norm=True,
                                              return_prefix_tokens=True, intermediates_only=True)
    for k, (patch, prefix) in zip((1, 3), reference):
        torch.testing.assert_close(out.levels[k][1], patch.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.levels[k][0], prefix[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.levels[3][0], out.cls, rtol=0, atol=0)  # the last block's level = cls / patch
    torch.testing.assert_close(out.levels[3][1], out.patch, rtol=0, atol=0)


def test_dpt_blocks_levels_of_a_release_file_off_the_native_grid(vits_files):
    """The 4 DPT blocks of the release encoder on a 4x6 grid: an explicit loop over the blocks, ``vit.norm`` of each
    read block's output, as ``get_intermediate_layers(x, [2, 5, 8, 11], return_class_token=True)``."""
    teacher = create_teacher("depth_anything_v2_vits", vits_files[0])
    px = pixels(56, 84)
    with torch.no_grad():
        out = teacher(px, blocks=teacher.dpt_blocks)
        tokens, _ = teacher.embed(teacher.normalize(px))
        expected = {}
        for k, block in enumerate(teacher.vit.blocks):
            tokens = block(tokens)
            expected[k] = teacher.vit.norm(tokens)
    assert sorted(out.levels) == DPT_BLOCKS["s"]
    for k in DPT_BLOCKS["s"]:
        torch.testing.assert_close(out.levels[k][0], expected[k][:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.levels[k][1], expected[k][:, 1:].reshape(1, 4, 6, 384), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", list(DPT_BLOCKS))
def test_blocks_dpt_resolves_to_the_blocks_the_head_reads(size):
    """``--blocks dpt`` is this family's own choice; other teachers do not know it, and the error lists theirs."""
    spec = get_spec(f"depth_anything_v2_vit{size}")
    teacher = DepthAnythingV2Teacher(spec, create_dinov2_vit(spec.arch, device="meta"))
    choice = parse_blocks("dpt")
    assert resolve_blocks(choice, teacher.depth, spec.name, named=teacher.named_blocks) == tuple(DPT_BLOCKS[size])
    dinov2 = create_teacher("dinov2_vits14")
    with pytest.raises(ValueError, match="'dpt' is not a block choice of teacher dinov2_vits14 .*choices: sak"):
        resolve_blocks(choice, dinov2.depth, "dinov2_vits14", named=dinov2.named_blocks)


@pytest.mark.parametrize("size", list(DPT_BLOCKS))
def test_level_description_names_the_dpt_blocks_and_where_sak_differs(size):
    spec = get_spec(f"depth_anything_v2_vit{size}")
    teacher = DepthAnythingV2Teacher(spec, create_dinov2_vit(spec.arch, device="meta"))
    description = teacher.level_description()
    dpt = ",".join(map(str, DPT_BLOCKS[size]))
    assert "after the final norm" in description
    assert f"--blocks dpt ({dpt}) stores exactly what the DPT head reads" in description
    sak = list(sak_blocks(teacher.depth))
    assert (sak == DPT_BLOCKS[size]) == (size != "l")  # SAK's quarters miss the DPT head's first block of ViT-L only
    assert ("sak gives the same blocks" in description) == (sak == DPT_BLOCKS[size])
    if size == "l":
        assert "sak gives 5,11,17,23, not the same" in description


def test_teachers_command_lists_depth_anything_v2():
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:] if line.strip()}
    for size in DPT_BLOCKS:
        assert rows[f"depth_anything_v2_vit{size}"][2:5] == ["14", str(FB_SHAPES[size][0]), "0"]


def test_extract_stores_the_encoder_features(tmp_path, vits_files, real_image_dir):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(real_image_dir.iterdir())[:2]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, [
        "extract", "--teacher", "depth_anything_v2_vits", "--checkpoint", str(vits_files[0]), "--images",
        str(images), "--out", str(out), "--resolution", "70x112", "--dtype", "float32", "--batch-size", "2",
        "--num-workers", "0", "--no-progress", "--blocks", "sak"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), "depth_anything_v2_vits")
    manifest = load_manifest(images)
    batch = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (70, 112), "squash"))
                         for i in range(len(manifest.ids))])
    teacher = create_teacher("depth_anything_v2_vits", vits_files[0])
    with torch.no_grad():
        direct = teacher(batch, blocks=teacher.dpt_blocks)
    assert store.patch.shape == (2, 5, 8, 384)
    np.testing.assert_allclose(store.cls[:], direct.cls.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(store.patch[:], direct.patch.numpy(), rtol=0, atol=1e-5)
    # --blocks sak is the DPT head's [2, 5, 8, 11] for ViT-S, stored after the final norm and said so
    assert store.blocks == teacher.dpt_blocks
    assert "after the final norm" in store.provenance["levels"]["tokens"]
    rows = np.arange(2)
    for k, (cls, patch) in direct.levels.items():
        np.testing.assert_allclose(store.read_features(f"levels/b{k}/cls", rows), cls.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(store.read_features(f"levels/b{k}/patch", rows), patch.numpy(), rtol=0, atol=1e-5)
