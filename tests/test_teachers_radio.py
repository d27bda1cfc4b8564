"""RADIO / C-RADIO teachers: registration, the release file layout, outputs against an independent reference,
summary-head choice, strict loading, levels and extraction. Exactness against NVlabs/RADIO's own code is
``tools/check_upstream_radio.py`` (docs/teachers.md)."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import CheckpointError, UnknownTeacherError, create_teacher, list_teachers
from dune_cache.teachers.families import RADIO_RELEASES

WIDTH, HEADS, DEPTH, PATCH = 768, 12, 2, 16
MAX_GRID = 8  # cpe_max_size 128: small, so the tests resize and crop a real CPE grid
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEACHERS = [{"name": "sam", "use_summary": False}, {"name": "siglip2-g"}, {"name": "dino_v2-g"}, {"name": "siglip2-g"}]
NUM_SUMMARY, NUM_REGISTERS = 3, 5  # three distinct teachers; register_multiple 8


def release_args(**extras) -> argparse.Namespace:
    base = dict(model="vit_base_patch16_v2_224", model_kwargs={"depth": DEPTH, "weight_init": "skip"},
                cpe_max_size=MAX_GRID * PATCH, teachers=TEACHERS, cls_token_per_teacher=True, register_multiple=8,
                cpe_num_registers=None, model_norm=False, spectral_reparam=False)
    return argparse.Namespace(**{**base, **extras})


def release_backbone_state(seed: int = 0, prefix_tokens: int = NUM_SUMMARY + NUM_REGISTERS) -> dict:
    """Seeded ``base_model.*`` tensors of a 2-block ViT-B/16 ``*_v2_224`` RADIO backbone, written by hand."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=0.02: scale * torch.randn(*shape, generator=g)  # noqa: E731
    s = {"patch_generator.embedder.weight": rnd(WIDTH, 3 * PATCH * PATCH),
         "patch_generator.pos_embed": rnd(1, MAX_GRID ** 2, WIDTH, scale=1.0),
         "patch_generator.cls_token.token": rnd(prefix_tokens, WIDTH, scale=1.0),
         "reg_token": rnd(1, 4, WIDTH)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        s |= {b + "norm1.weight": 1 + rnd(WIDTH, scale=0.1), b + "norm1.bias": rnd(WIDTH),
              b + "attn.qkv.weight": rnd(3 * WIDTH, WIDTH), b + "attn.qkv.bias": rnd(3 * WIDTH),
              b + "attn.proj.weight": rnd(WIDTH, WIDTH), b + "attn.proj.bias": rnd(WIDTH),
              b + "ls1.grandma": 0.5 + rnd(WIDTH, scale=0.1),
              b + "norm2.weight": 1 + rnd(WIDTH, scale=0.1), b + "norm2.bias": rnd(WIDTH),
              b + "mlp.fc1.weight": rnd(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": rnd(4 * WIDTH),
              b + "mlp.fc2.weight": rnd(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": rnd(WIDTH),
              b + "ls2.grandma": 0.5 + rnd(WIDTH, scale=0.1)}
    return {f"base_model.{k}": v for k, v in s.items()}


def release_state(seed: int = 0, normalizer: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    state = release_backbone_state(seed)
    state |= {"input_conditioner.norm_mean": torch.tensor(MEAN).view(3, 1, 1),
              "input_conditioner.norm_std": torch.tensor(STD).view(3, 1, 1),
              "_heads.0.weight": torch.randn(4, WIDTH, generator=g),
              "_feature_projections.1.bias": torch.randn(WIDTH, generator=g)}
    if normalizer:
        state |= {"_feature_normalizer.mean": torch.randn(WIDTH, generator=g),
                  "_feature_normalizer.tx": torch.eye(WIDTH) + torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5}
    return state


def save_release(path, state=None, **args) -> str:
    torch.save({"args": release_args(**args), "state_dict": release_state() if state is None else state}, path)
    return str(path)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> str:
    return save_release(tmp_path_factory.mktemp("radio") / "c-radio_v3-b_test.pth.tar")


# ---------------------------------------------------------------- independent reference forward

def reference_tokens(state: dict, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output ``(B, 8 + h*w, D)`` of the release backbone, from the tensors: [0, 1] pixels
    conditioned, patches flattened ``(c, y, x)``, CPE grid resized to a square of the larger side then cropped."""
    s = {k.removeprefix("base_model."): v for k, v in state.items() if k.startswith("base_model.")}
    x = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    b, _, height, width = x.shape
    h, w = height // PATCH, width // PATCH
    patches = F.unfold(x, PATCH, stride=PATCH).transpose(1, 2)  # (B, h*w, 3*P*P), (c, y, x) order
    grid = s["patch_generator.pos_embed"].reshape(1, MAX_GRID, MAX_GRID, WIDTH).permute(0, 3, 1, 2)
    if (h, w) != (MAX_GRID, MAX_GRID):
        side = max(h, w)
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[..., :h, :w]
    t = patches @ s["patch_generator.embedder.weight"].T + grid.flatten(2).transpose(1, 2)
    t = torch.cat([s["patch_generator.cls_token.token"].expand(b, -1, -1), t], dim=1)
    outputs = []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        norm = lambda y, n: F.layer_norm(y, (WIDTH,), s[p + n + ".weight"], s[p + n + ".bias"], eps=1e-6)  # noqa: E731
        q, k, v = F.linear(norm(t, "norm1"), s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda y: y.reshape(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(WIDTH // HEADS), dim=-1)
        attended = (weights @ split(v)).transpose(1, 2).reshape(b, -1, WIDTH)
        t = t + s[p + "ls1.grandma"] * F.linear(attended, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(t, "norm2"), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        t = t + s[p + "ls2.grandma"] * F.linear(hidden, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        outputs.append(t)
    return outputs


def random_pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registration

def test_every_release_is_registered_with_its_width_and_preferred_resolution():
    specs = {s.name: s for s in list_teachers() if "radio" in s.name}
    assert set(specs) == set(RADIO_RELEASES)
    for name, spec in specs.items():
        release = RADIO_RELEASES[name]
        assert (spec.patch_size, spec.embed_dim, spec.native_resolution) == (16, release.width, (release.native,) * 2)
        assert spec.cls_source == "token" and not spec.final_norm and release.version in spec.description
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert (rows["c_radio_v3_b"][2:8] == ["16", "768", "0", "token", "512x512", "no"]
            and rows["c_radio_v3_b"][8] == "clip")
    assert "radio:<release>@<summary" in rows


# ---------------------------------------------------------------- outputs

@pytest.mark.parametrize("size", [(128, 128), (64, 96), (96, 48)])  # the CPE grid itself; resized and cropped
def test_release_file_matches_the_reference_forward(release_file, size):
    teacher = create_teacher("c_radio_v3_b", release_file)
    state = release_state()
    pixels = random_pixels(2, *size)
    with torch.no_grad():
        out = teacher(pixels)
        tokens = reference_tokens(state, pixels)[-1]
    h, w = size[0] // PATCH, size[1] // PATCH
    features = (tokens[:, 8:] - state["_feature_normalizer.mean"]) @ state["_feature_normalizer.tx"].T
    torch.testing.assert_close(out.patch, features.reshape(2, h, w, WIDTH), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.cls, tokens[:, 1], atol=1e-4, rtol=0)  # slot 1: siglip2-g, the first summary
    torch.testing.assert_close(out.registers, tokens[:, NUM_SUMMARY:8], atol=1e-4, rtol=0)


def test_loaded_spec_records_what_the_checkpoint_says(release_file):
    spec = create_teacher("c_radio_v3_b", release_file).spec
    assert (spec.arch, spec.num_registers, spec.final_norm) == ("vit_base_patch16_v2_224", NUM_REGISTERS, False)
    np.testing.assert_allclose(spec.mean, MEAN)
    np.testing.assert_allclose(spec.std, STD)
    assert "cls = the summary token of 'siglip2-g' (slot 1)" in spec.description
    assert "['siglip2-g', 'dino_v2-g']" in spec.description and "feature normalizer applied" in spec.description


def test_prefix_name_picks_another_summary_teacher(release_file):
    teacher = create_teacher("radio:c_radio_v3_b@dino_v2-g", release_file)
    pixels = random_pixels(1, 64, 64)
    with torch.no_grad():
        out = teacher(pixels)
        tokens = reference_tokens(release_state(), pixels)[-1]
    torch.testing.assert_close(out.cls, tokens[:, 2], atol=1e-4, rtol=0)
    assert teacher.spec.name == "radio:c_radio_v3_b@dino_v2-g" and "'dino_v2-g' (slot 2)" in teacher.spec.description
    with pytest.raises(CheckpointError, match="no summary teacher 'sam'; its summary teachers: siglip2-g, dino_v2-g"):
        create_teacher("radio:c_radio_v3_b@sam", release_file)
    with pytest.raises(UnknownTeacherError, match="release one of"):
        create_teacher("radio:c_radio_v9_b@dino_v2-g", release_file)


def test_one_shared_summary_token_and_explicit_registers(tmp_path):
    state = release_state(normalizer=False)
    state["base_model.patch_generator.cls_token.token"] = torch.randn(1 + 3, WIDTH)
    path = save_release(tmp_path / "shared.pth.tar", state, cls_token_per_teacher=False, cpe_num_registers=3,
                        register_multiple=None)
    teacher = create_teacher("c_radio_v3_b", path)
    assert (teacher.cfg.num_summary, teacher.cfg.num_registers, teacher.cfg.summary_slot) == (1, 3, 0)
    pixels = random_pixels(1, 64, 64)
    with torch.no_grad():
        out = teacher(pixels)
        tokens = reference_tokens(state, pixels)[-1]
    torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.patch.flatten(1, 2), tokens[:, 4:], atol=1e-4, rtol=0)  # no normalizer


def test_ema_weights_are_preferred_as_upstream_does(tmp_path):
    ema = release_state(seed=1)
    torch.save({"args": release_args(), "state_dict": release_state(seed=0), "state_dict_ema": ema},
               tmp_path / "ema.pth.tar")
    teacher = create_teacher("c_radio_v3_b", tmp_path / "ema.pth.tar")
    assert torch.equal(teacher.backbone.patch_generator.pos_embed, ema["base_model.patch_generator.pos_embed"])


def test_levels_are_the_raw_block_outputs_with_the_cls_slot(release_file):
    teacher = create_teacher("c_radio_v3_b", release_file)
    pixels = random_pixels(2, 64, 96)
    with torch.no_grad():
        out = teacher(pixels, blocks=(0, 1))
        blocks = reference_tokens(release_state(), pixels)
    for k, tokens in enumerate(blocks):
        torch.testing.assert_close(out.levels[k][0], tokens[:, 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.levels[k][1], tokens[:, 8:].reshape(2, 4, 6, WIDTH), atol=1e-4, rtol=0)
    assert "summary slot of cls (siglip2-g)" in teacher.level_description()


# ---------------------------------------------------------------- strict loading

def _drop(key):
    return lambda s: s.pop(key)


@pytest.mark.parametrize("change, args, reported", [
    (_drop("base_model.blocks.1.ls2.grandma"), {}, r"missing keys 1 \[blocks.1.ls2.gamma\]"),
    (lambda s: s.__setitem__("base_model.blocks.9.norm1.weight", torch.ones(WIDTH)), {}, "blocks.9.norm1.weight"),
    (lambda s: s.__setitem__("teacher_heads.0.weight", torch.ones(1)), {},
     r"unexpected keys \['teacher_heads.0.weight'\]"),
    (lambda s: s.__setitem__("base_model.blocks.0.attn.qkv.parametrizations.weight.original", torch.ones(1)), {},
     "spectral-reparametrised"),
    (_drop("input_conditioner.norm_std"), {}, "input_conditioner.* holds"),
    (lambda s: None, {"model": "vit_bigG_patch14_224"}, "args.model='vit_bigG_patch14_224' is not supported"),
    (lambda s: None, {"model": "vit_large_patch16_224"}, "is vit_large_patch16_224 .width 1024.*teacher c_radio_v3_b "
                                                          "is width 768"),
    (lambda s: None, {"cpe_max_size": 256}, r"pos_embed: checkpoint \(1, 64, 768\) vs model \(1, 256, 768\)"),
    (lambda s: None, {"teachers": [{"name": "sam", "use_summary": False}]},
     "no teacher of args.teachers has use_summary"),
    (lambda s: None, {"model_kwargs": {"scaled_ln": True}}, r"model_kwargs \['scaled_ln'\] not supported"),
])
def test_mismatched_release_file_is_refused_naming_what_differs(tmp_path, change, args, reported):
    state = release_state()
    change(state)
    path = save_release(tmp_path / "bad.pth.tar", state, **args)
    with pytest.raises(CheckpointError, match=reported):
        create_teacher("c_radio_v3_b", path)


def test_a_plain_state_dict_is_not_a_release_file(tmp_path):
    torch.save(release_state(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a RADIO release file: no args"):
        create_teacher("c_radio_v3_b", tmp_path / "plain.pth")


# ---------------------------------------------------------------- extraction

def test_extract_with_a_chosen_summary_teacher_equals_a_direct_forward(tmp_path, real_image_dir, release_file):
    out = tmp_path / "cache"
    name = "radio:c_radio_v3_b@dino_v2-g"
    result = CliRunner().invoke(app, ["extract", "--teacher", name, "--checkpoint", release_file, "--images",
                                      str(real_image_dir), "--out", str(out), "--resolution", "64x96", "--dtype",
                                      "float32", "--blocks", "1", "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out), "radio-c_radio_v3_b-dino_v2-g")
    manifest = load_manifest(real_image_dir)
    px = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (64, 96), "squash"))
                      for i in range(len(manifest))])
    with torch.no_grad():
        direct = create_teacher(name, release_file)(px, blocks=(1,))
    np.testing.assert_allclose(store.patch[:], direct.patch.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(store.cls[:], direct.cls.numpy(), atol=1e-5, rtol=1e-5)
    teacher = store.provenance["teacher"]
    assert teacher["name"] == name and teacher["arch"] == "vit_base_patch16_v2_224"
    assert "'dino_v2-g' (slot 2)" in teacher["description"]
    np.testing.assert_allclose(teacher["mean"], MEAN)
