"""Intermediate blocks of a teacher in the cache (``extract --blocks``): teachers, store, resume, reader, info,
verify and repair. References are computed independently of the extraction's forward hooks: timm's own
``forward_intermediates`` (DINOv2, timm ViTs) and an explicit block loop (CroCo/MASt3R)."""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dune_cache.encodings import EncodingConfig
from dune_cache.config import ExtractConfig
from dune_cache.extract.loading import ManifestImages
from dune_cache.extract.run import run_extraction
from dune_cache.teachers.geometry import resolve_geometry
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.commands.info import cache_info
from dune_cache.commands.verify import verify_cache
from dune_cache.teachers.blocks import parse_blocks, resolve_blocks, sak_blocks
from dune_cache.read.reader import CacheReader
from dune_cache.commands.repair import RepairConfig, repair_cache
from dune_cache.errors import DamagedFeaturesError, StoreMismatchError
from dune_cache.config import StorageConfig
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import create_teacher, get_spec
from dune_cache.teachers.dinov2 import dinov2_teacher_from_state
from dune_cache.teachers.mast3r import VIT_LARGE, CrocoTeacher
from dune_cache.teachers.rope import patch_positions, rope_2d_tables
from dune_cache.teachers.timm_generic import create_timm_vit

TIMM = "vit_tiny_patch16_224"  # 12 blocks, 192-d: SAK's choice is [2, 5, 8, 11]
TEACHER = f"timm:{TIMM}"
GROUP = f"timm-{TIMM}"


def random_pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def timm_levels(model, x: torch.Tensor, blocks: list[int], prefix: bool
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Block outputs by timm's own ``forward_intermediates`` (no final norm): block -> (class token, or the mean
    patch token without ``prefix`` tokens; patch ``(B, h, w, D)``)."""
    out = model.forward_intermediates(x, indices=blocks, norm=False, return_prefix_tokens=prefix,
                                      output_fmt="NCHW", intermediates_only=True)
    levels = {}
    for k, item in zip(blocks, out):
        patch = (item[0] if prefix else item).permute(0, 2, 3, 1)
        levels[k] = (item[1][:, 0] if prefix else patch.mean(dim=(1, 2)), patch)
    return levels


# ---------------------------------------------------------------- choosing blocks

def test_sak_choice_matches_upstream_table():
    # innovator-zero/SAK models/backbones/model_set.py out_indices_cfg (small/base, large, huge, giant, so400m)
    upstream = {12: [2, 5, 8, 11], 24: [5, 11, 17, 23], 32: [7, 15, 23, 31], 40: [9, 19, 29, 39],
                27: [6, 13, 20, 26]}
    assert {depth: list(sak_blocks(depth)) for depth in upstream} == upstream


def test_block_flag_parsing_and_resolution():
    assert parse_blocks("sak") == "sak" and parse_blocks(None) == () and parse_blocks("11, 5,5") == (5, 11)
    assert resolve_blocks("sak", 24, "t") == (5, 11, 17, 23) and resolve_blocks((3, 1), 12, "t") == (1, 3)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_blocks("5;7")
    assert parse_blocks("DPT") == "dpt"  # a name: the teacher's own choices are known once it is built
    with pytest.raises(ValueError, match="'five' is not a block choice of teacher t .*choices: dpt, sak"):
        resolve_blocks(parse_blocks("five"), 12, "t", named={"dpt": (2, 5)})
    assert resolve_blocks("dpt", 12, "t", named={"dpt": (5, 2)}) == (2, 5)
    with pytest.raises(ValueError, match="has 12 blocks"):
        resolve_blocks((12,), 12, "t")
    with pytest.raises(ValueError, match="does not support --blocks"):
        resolve_blocks((1,), None, "mobilenet_v2")


# ---------------------------------------------------------------- teachers

def test_dinov2_levels_equal_timm_intermediates():
    torch.manual_seed(0)
    spec = get_spec("dinov2_vits14_reg4")
    teacher = dinov2_teacher_from_state(spec, None, "random").eval()
    pixels = random_pixels(2, 56, 42)
    with torch.no_grad():
        out = teacher(pixels, blocks=(0, 5, 11))
        final = teacher(pixels)
        ref = timm_levels(teacher.vit, teacher.normalize(pixels), [0, 5, 11], prefix=True)
    assert teacher.depth == 12 and sorted(out.levels) == [0, 5, 11]
    for k, (cls, patch) in ref.items():
        assert out.levels[k][1].shape == (2, 4, 3, 384)
        torch.testing.assert_close(out.levels[k][0], cls, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.levels[k][1], patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch, final.patch)  # asking for levels leaves the final features alone
    # the last block's output is taken before the final norm
    torch.testing.assert_close(teacher.vit.norm(out.levels[11][1]), out.patch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, prefix", [({"reg_tokens": 2}, True),
                                            ({"class_token": False, "global_pool": "avg"}, False)])
def test_timm_vit_levels_equal_timm_intermediates(kwargs, prefix):
    from dune_cache.teachers.timm_generic import TimmViTTeacher, spec_from_timm_model

    model = create_timm_vit(TIMM, depth=3, **kwargs).eval()
    teacher = TimmViTTeacher(spec_from_timm_model("timm:test", model), model)
    pixels = random_pixels(2, 48, 32)
    with torch.no_grad():
        out = teacher(pixels, blocks=(0, 2))
        ref = timm_levels(model, teacher.normalize(pixels), [0, 2], prefix)
    for k, (cls, patch) in ref.items():
        torch.testing.assert_close(out.levels[k][0], cls)
        torch.testing.assert_close(out.levels[k][1], patch)


def test_croco_levels_equal_an_explicit_block_loop():
    torch.manual_seed(0)
    teacher = CrocoTeacher(get_spec("mast3r"), dataclasses.replace(VIT_LARGE, depth=3)).eval()
    pixels = random_pixels(1, 48, 64)
    encoder = teacher.encoder
    with torch.no_grad():
        out = teacher(pixels, blocks=(1, 2))
        tokens, (h, w) = encoder.patch_embed(teacher.normalize(pixels))
        cos, sin = rope_2d_tables(patch_positions(h, w, tokens.device), encoder.head_dim, encoder.rope_base)
        expected = {}
        for k, block in enumerate(encoder.enc_blocks):
            tokens = block(tokens, cos, sin)
            expected[k] = tokens.reshape(1, h, w, -1)
    for k in (1, 2):
        torch.testing.assert_close(out.levels[k][1], expected[k])
        torch.testing.assert_close(out.levels[k][0], expected[k].mean(dim=(1, 2)))
    assert "mean of the patch tokens" in teacher.level_description()


def test_cnn_teacher_refuses_blocks(tmp_path, real_image_dir):
    teacher = create_teacher("mobilenet_v2", None)
    assert teacher.depth is None
    with pytest.raises(ValueError, match="does not support --blocks"):
        teacher(random_pixels(1, 64, 64), blocks=(1,))
    cfg = ExtractConfig(teacher="mobilenet_v2", images=real_image_dir, out=str(tmp_path / "c"), random_weights=True,
                        blocks=(1,), num_workers=0, progress=False)
    with pytest.raises(ValueError, match="mobilenet_v2 does not support --blocks"):
        run_extraction(cfg)


# ---------------------------------------------------------------- extraction into the store

@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    torch.save(create_timm_vit(TIMM).state_dict(), path)
    return path


def extract_config(images: Path, out: Path, checkpoint: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(teacher=TEACHER, images=images, out=str(out), checkpoint=checkpoint, resolution="32x48",
                         batch_size=4, num_workers=0, progress=False, blocks="sak",
                         storage=StorageConfig(unit_size=4))
    return replace(base, **kw)


@pytest.fixture(scope="module")
def level_cache(tmp_path_factory, real_image_dir, timm_checkpoint) -> Path:
    """The six photos through ViT-Tiny with ``--blocks sak --views 1``."""
    out = tmp_path_factory.mktemp("levels") / "cache.zarr"
    run_extraction(extract_config(real_image_dir, out, timm_checkpoint, views=1))
    return out


def reference_levels(checkpoint: Path, pixels: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    teacher = create_teacher(TEACHER, checkpoint).eval()
    with torch.no_grad():
        return timm_levels(teacher.model, teacher.normalize(pixels), [2, 5, 8, 11], prefix=True)


def test_stored_levels_equal_timm_intermediates(level_cache, real_image_dir, timm_checkpoint):
    manifest = load_manifest(real_image_dir)
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (32, 48), "squash"))
                          for i in range(len(manifest))])
    ref = reference_levels(timm_checkpoint, pixels)
    group = zarr.open_group(str(level_cache / GROUP), mode="r")  # plain zarr, no dune_cache
    meta = group.attrs["dune_cache"]
    assert meta["levels"]["blocks"] == [2, 5, 8, 11] and "before the final norm" in meta["levels"]["tokens"]
    for k, (cls, patch) in ref.items():
        stored_patch, stored_cls = group[f"levels/b{k}/patch"], group[f"levels/b{k}/cls"]
        assert stored_patch.shape == (6, 2, 3, 192) and stored_patch.dtype == np.float16
        assert stored_patch.chunks == group["patch"].chunks and stored_cls.chunks == group["cls"].chunks
        np.testing.assert_allclose(stored_patch[:], patch.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored_cls[:], cls.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(group["levels/b11/patch"][:], group["patch"][:], atol=1e-2)  # final = normed


def test_stored_view_levels_equal_the_views_forward(level_cache, real_image_dir, timm_checkpoint):
    store = TeacherStore.open(str(level_cache), GROUP)
    manifest = load_manifest(real_image_dir)
    geometry = resolve_geometry(create_teacher(TEACHER, None).spec, "32x48", None, None, "squash")
    sampling = ExtractConfig(teacher=TEACHER, images=real_image_dir, out="").view_sampling
    views = ManifestImages(manifest, np.arange(2), geometry, views=1, view_sampling=sampling)
    pixels = torch.cat([views[i][2].pixels for i in range(2)])  # (2 images x 1 view, 3, H, W)
    ref = reference_levels(timm_checkpoint, pixels)
    for k, (cls, patch) in ref.items():
        np.testing.assert_allclose(store.read_features(f"views/levels/b{k}/patch", np.arange(2))[:, 0], patch.numpy(),
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(store.read_features(f"views/levels/b{k}/cls", np.arange(2))[:, 0], cls.numpy(),
                                   rtol=2e-3, atol=2e-3)


def test_resume_refuses_another_block_list(level_cache, real_image_dir, timm_checkpoint):
    for blocks in ((2, 5), ()):
        with pytest.raises(StoreMismatchError, match="levels.blocks"):
            run_extraction(extract_config(real_image_dir, level_cache, timm_checkpoint, views=1, blocks=blocks))
    result = run_extraction(extract_config(real_image_dir, level_cache, timm_checkpoint, views=1,
                                           blocks=(11, 8, 5, 2)))  # the same blocks: resumes, nothing to do
    assert result.processed == 0


def test_reader_returns_levels_decoded_and_masked(level_cache):
    plain = CacheReader(str(level_cache), backend="zarr")
    assert plain.blocks == {GROUP: (2, 5, 8, 11)}
    assert plain.read(np.arange(2)).level_patch == {}
    reader = CacheReader(str(level_cache), backend="zarr", levels=True)
    store = TeacherStore.open(str(level_cache), GROUP)
    indices = np.array([3, 0, 3])
    batch = reader.read(indices)
    rows = reader.rows[indices, 0]
    assert sorted(batch.level_patch[GROUP]) == [2, 5, 8, 11] and batch.mask.all()
    for k in (2, 11):
        np.testing.assert_array_equal(batch.level_patch[GROUP][k].numpy(),
                                      store.read_features(f"levels/b{k}/patch", rows))
        np.testing.assert_array_equal(batch.level_cls[GROUP][k].numpy(), store.read_features(f"levels/b{k}/cls", rows))
    viewed = reader.read(indices, views=np.array([0, -1, 0]))
    np.testing.assert_array_equal(viewed.level_patch[GROUP][5][0].numpy(),
                                  store.read_features("views/levels/b5/patch", rows[0])[0])
    np.testing.assert_array_equal(viewed.level_patch[GROUP][5][1], batch.level_patch[GROUP][5][1])


def test_info_reports_each_level_and_verify_covers_them(level_cache):
    info = cache_info(str(level_cache))[GROUP]
    levels = info["levels"]
    assert list(levels) == ["b2", "b5", "b8", "b11"]
    assert all(level["bytes"] > 0 for level in levels.values())
    # each level stores as many values as the final features: about a fifth of the group each
    assert 0.1 < levels["b5"]["share"] < 0.3 and sum(level["share"] for level in levels.values()) < 1
    assert verify_cache(str(level_cache))[0].ok


def test_damaged_level_is_found_refused_and_repaired(tmp_path, level_cache):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(level_cache, cache)
    store = TeacherStore.open(str(cache), GROUP)
    before = store.read_features("levels/b8/patch", 1)
    chunk = next((cache / GROUP / "levels" / "b8" / "patch").rglob("c/1/*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    report = verify_cache(str(cache))[0]
    assert not report.ok and list(report.damaged) == [1]
    with pytest.raises(DamagedFeaturesError, match="levels/b8/patch"):
        CacheReader(str(cache), backend="zarr", levels=True).read(np.arange(3))
    assert CacheReader(str(cache), backend="zarr").read(np.arange(3)).mask.all()  # final targets are intact
    skipping = CacheReader(str(cache), backend="zarr", levels=True, skip_damaged=True)
    batch = skipping.read(np.arange(3))
    sample = int(np.flatnonzero(skipping.rows[:, 0] == 1)[0])
    assert not batch.mask[sample, 0] and (batch.level_patch[GROUP][2][sample] == 0).all()
    repair_cache(RepairConfig(cache=str(cache), num_workers=0, progress=False))
    repaired = TeacherStore.open(str(cache), GROUP).read_features("levels/b8/patch", 1)
    np.testing.assert_allclose(repaired, before, rtol=1e-3, atol=1e-5)  # one fp16 step: another batch composition
    assert verify_cache(str(cache))[0].ok


def test_calibrated_encoding_is_calibrated_per_level(tmp_path, real_image_dir, timm_checkpoint):
    out = tmp_path / "int8.zarr"
    storage = StorageConfig(unit_size=4, encoding=EncodingConfig.parse("int8-channel"))
    run_extraction(extract_config(real_image_dir, out, timm_checkpoint, blocks=(2, 11), storage=storage))
    exact = TeacherStore.open(str(out), GROUP)
    group = zarr.open_group(str(out / GROUP), mode="r")
    assert set(exact.provenance["levels"]["encodings"]) == {"b2", "b11"}
    own = {k: [group[f"levels/b{k}/encoding/{key}"][...] for key in sorted(group[f"levels/b{k}/encoding"].array_keys())]
           for k in (2, 11)}
    assert any(not np.array_equal(a, b) for a, b in zip(own[2], own[11]))  # each level has its own scales
    manifest = load_manifest(real_image_dir)
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (32, 48), "squash")) for i in range(6)])
    ref = reference_levels(timm_checkpoint, pixels)
    for k in (2, 11):
        decoded = exact.read_features(f"levels/b{k}/patch", np.arange(6))
        error = np.linalg.norm(decoded - ref[k][1].numpy()) / np.linalg.norm(ref[k][1].numpy())
        assert error < 0.02, (k, error)


def test_plain_zarr_recipe_of_the_format_spec(level_cache):
    import re

    text = (Path(__file__).parents[1] / "docs" / "cache-format.md").read_text().split("\n## Levels", 1)[1]
    scope = {"CACHE": str(level_cache), "TEACHER": GROUP}
    exec(re.search(r"```python\n(.*?)```", text, re.S).group(1), scope)
    store = TeacherStore.open(str(level_cache), GROUP)
    assert scope["result"]["blocks"] == [2, 5, 8, 11]
    for k in (2, 11):
        np.testing.assert_array_equal(scope["result"]["levels"][k]["patch"], store.read_features(f"levels/b{k}/patch",
                                                                                                  np.arange(4)))


def test_cli_flag_maps_to_the_config_and_info_prints_levels(tmp_path, level_cache, real_image_dir, timm_checkpoint):
    from typer.testing import CliRunner

    from dune_cache.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["info", str(level_cache)])
    assert info.exit_code == 0, info.output
    assert "levels     blocks [2, 5, 8, 11]: output tokens of block k" in info.output
    assert info.output.count("of the group") == 4
    common = ["extract", "--teacher", TEACHER, "--checkpoint", str(timm_checkpoint), "--images", str(real_image_dir),
              "--resolution", "32x48", "--num-workers", "0", "--no-progress"]
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "c"), "--blocks", "2,x"])
    assert bad.exit_code != 0 and "expected 'sak', a teacher's own choice name (e.g. 'dpt') or" in bad.output
    unknown = runner.invoke(app, [*common, "--out", str(tmp_path / "c"), "--blocks", "dpt"])
    assert unknown.exit_code != 0 and "'dpt' is not a block choice of teacher" in unknown.output
    ok = runner.invoke(app, [*common, "--out", str(tmp_path / "c"), "--blocks", "11,3"])
    assert ok.exit_code == 0, ok.output
    assert TeacherStore.open(str(tmp_path / "c"), GROUP).blocks == (3, 11)


# ---------------------------------------------------------------- recompress

def recompress_levels(cache: Path, out: Path, encoding: str) -> None:
    from dune_cache.commands.recompress import RecompressConfig, recompress

    recompress(RecompressConfig(cache=str(cache), out=str(out), encoding=EncodingConfig.parse(encoding),
                                progress=False, block_images=4))


def test_recompress_carries_every_level_over(tmp_path, level_cache):
    out = tmp_path / "int8.zarr"
    recompress_levels(level_cache, out, "int8-channel")
    source, target = TeacherStore.open(str(level_cache), GROUP), TeacherStore.open(str(out), GROUP)
    assert target.blocks == source.blocks == (2, 5, 8, 11)
    assert {k: v for k, v in target.provenance["levels"].items() if k != "encodings"} == source.provenance["levels"]
    assert set(target.provenance["levels"]["encodings"]) == {"b2", "b5", "b8", "b11"}
    assert target.feature_names() == source.feature_names()  # views/levels/b{k} included
    np.testing.assert_array_equal(target.read_status(), source.read_status())
    done = np.flatnonzero(source.read_status() == 1)
    assert len(done) == 6
    for name in source.feature_names():
        x, y = source.read_features(name, done), target.read_features(name, done)
        assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.02, name
    assert all(report.ok for report in verify_cache(str(out)))  # complete: every done image of every array


def test_failed_recompress_leaves_no_group(tmp_path, level_cache, caplog):
    cache = tmp_path / "damaged.zarr"
    shutil.copytree(level_cache, cache)
    shutil.rmtree(cache / GROUP / "levels" / "b8" / "patch" / "c")  # every image's block-8 patch tokens lost
    for encoding, made in (("int8-channel", False), ("none", True)):  # refused calibrating; failing copying
        out = tmp_path / f"{encoding}.zarr"
        caplog.clear()
        with pytest.raises(DamagedFeaturesError, match="levels/b8/patch"):
            recompress_levels(cache, out, encoding)
        assert not (out / GROUP).exists()
        assert ("removing the incomplete group" in caplog.text) == made, encoding
