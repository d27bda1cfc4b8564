"""SigLIP2 vision towers: registration, the timm and Hugging Face checkpoint layouts, outputs, extraction."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from dune_cache.cli import app
from dune_cache.config import ExtractConfig
from dune_cache.extract.run import run_extraction
from dune_cache.images.manifest import load_manifest
from dune_cache.images.decode import load_pixels
from dune_cache.config import StorageConfig
from dune_cache.format.store import TeacherStore
from dune_cache.teachers import CheckpointError, create_teacher, get_spec, list_teachers
from dune_cache.teachers.base import find_state_dict, read_checkpoint
from dune_cache.teachers.siglip2 import (build_siglip2_teacher, create_siglip2_vit, siglip2_teacher_from_state,
                                         siglip2_timm_state)

# vision_config of the google/siglip2-* cards: stem -> (hidden, intermediate, layers, heads)
CARD_CONFIGS = {"vitb16": (768, 3072, 12, 12), "vitl16": (1024, 4096, 24, 16), "so400m14": (1152, 4304, 27, 16),
                "so400m16": (1152, 4304, 27, 16), "vitg16": (1536, 6144, 40, 16)}
EXPECTED_NAMES = {"siglip2_vitb16_224", "siglip2_vitb16_256", "siglip2_vitb16_384", "siglip2_vitb16_512",
                  "siglip2_vitl16_256", "siglip2_vitl16_384", "siglip2_vitl16_512", "siglip2_so400m14_224",
                  "siglip2_so400m14_378", "siglip2_so400m16_256", "siglip2_so400m16_384", "siglip2_so400m16_512",
                  "siglip2_vitg16_256", "siglip2_vitg16_384"}
SMALL = "siglip2_vitb16_224"  # tests build it at reduced depth
SMALL_DEPTH, SMALL_HEADS = 2, 12


# ---------------------------------------------------------------- upstream layouts, written independently

def hf_vision_shapes(hidden: int, intermediate: int, layers: int, patch: int, grid: int) -> dict[str, tuple]:
    """Parameter names/shapes of HF ``SiglipVisionModel`` (keys under ``vision_model.``), head included."""
    p = "vision_model."
    shapes = {p + "embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
              p + "embeddings.patch_embedding.bias": (hidden,),
              p + "embeddings.position_embedding.weight": (grid * grid, hidden)}
    for i in range(layers):
        layer = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{name}.weight": (hidden, hidden),
                           f"{layer}self_attn.{name}.bias": (hidden,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{layer}{norm}.weight": (hidden,), f"{layer}{norm}.bias": (hidden,)})
        shapes.update({f"{layer}mlp.fc1.weight": (intermediate, hidden), f"{layer}mlp.fc1.bias": (intermediate,),
                       f"{layer}mlp.fc2.weight": (hidden, intermediate), f"{layer}mlp.fc2.bias": (hidden,)})
    shapes.update({
        p + "post_layernorm.weight": (hidden,), p + "post_layernorm.bias": (hidden,),
        p + "head.probe": (1, 1, hidden),
        p + "head.attention.in_proj_weight": (3 * hidden, hidden), p + "head.attention.in_proj_bias": (3 * hidden,),
        p + "head.attention.out_proj.weight": (hidden, hidden), p + "head.attention.out_proj.bias": (hidden,),
        p + "head.layernorm.weight": (hidden,), p + "head.layernorm.bias": (hidden,),
        p + "head.mlp.fc1.weight": (intermediate, hidden), p + "head.mlp.fc1.bias": (intermediate,),
        p + "head.mlp.fc2.weight": (hidden, intermediate), p + "head.mlp.fc2.bias": (hidden,),
    })
    return shapes


def hf_text_and_logit_shapes() -> dict[str, tuple]:
    """A few tensors of a full ``SiglipModel`` besides its vision tower (ignored by the teacher)."""
    return {"text_model.embeddings.token_embedding.weight": (100, 32),
            "text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
            "text_model.final_layer_norm.weight": (32,), "text_model.head.weight": (32, 32),
            "logit_scale": (1,), "logit_bias": (1,)}


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors: norm weights around 1, the rest N(0, 0.02²)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        state[key] = 1 + 0.1 * noise if "norm" in key and key.endswith("weight") else 0.02 * noise
    return state


def small_hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    hidden, intermediate, _, _ = CARD_CONFIGS["vitb16"]
    return random_state(hf_vision_shapes(hidden, intermediate, SMALL_DEPTH, 16, 14), seed)


# ---------------------------------------------------------------- reference forward of the HF layout

def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, ``(B, Nq, D)``, ``(B, Nk, D)`` x2 -> ``(B, Nq, D)``."""
    b, nq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, nq, d)


def _mlp(s: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, s[prefix + "fc1.weight"], s[prefix + "fc1.bias"]), approximate="tanh")
    return F.linear(hidden, s[prefix + "fc2.weight"], s[prefix + "fc2.bias"])


def _norm(s: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s[prefix + "weight"], s[prefix + "bias"], eps=1e-6)


def reference_layers(state: dict, x: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """HF Siglip encoder semantics on normalised ``x`` ``(B, 3, H, W)``: each layer's output ``(B, h, w, D)``
    (``output_hidden_states`` after the embeddings), before ``post_layernorm``."""
    s = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    weight = s["embeddings.patch_embedding.weight"]
    embedded = F.conv2d(x, weight, s["embeddings.patch_embedding.bias"], stride=weight.shape[-1])
    b, d, h, w = embedded.shape
    pos = s["embeddings.position_embedding.weight"]
    m = math.isqrt(pos.shape[0])
    pos = pos.T.reshape(1, d, m, m)
    if (h, w) != (m, m):
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    t = (embedded + pos).flatten(2).transpose(1, 2)
    depth = len({k.split(".")[2] for k in s if k.startswith("encoder.layers.")})
    layers = []
    for i in range(depth):
        p = f"encoder.layers.{i}."
        y = _norm(s, p + "layer_norm1.", t)
        q, k, v = (F.linear(y, s[f"{p}self_attn.{n}_proj.weight"], s[f"{p}self_attn.{n}_proj.bias"]) for n in "qkv")
        attended = _attention(q, k, v, heads)
        t = t + F.linear(attended, s[p + "self_attn.out_proj.weight"], s[p + "self_attn.out_proj.bias"])
        t = t + _mlp(s, p + "mlp.", _norm(s, p + "layer_norm2.", t))
        layers.append(t.reshape(b, h, w, d))
    return layers


def reference_forward(state: dict, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Siglip vision tower semantics on normalised ``x`` ``(B, 3, H, W)``.

    Returns the pooled output ``(B, D)`` and the post-layernorm tokens ``(B, h, w, D)``.
    """
    s = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    last = reference_layers(state, x, heads)[-1]
    b, h, w, d = last.shape
    t = _norm(s, "post_layernorm.", last.reshape(b, h * w, d))
    in_w, in_b = s["head.attention.in_proj_weight"], s["head.attention.in_proj_bias"]
    q = F.linear(s["head.probe"].expand(b, -1, -1), in_w[:d], in_b[:d])
    k, v = F.linear(t, in_w[d:2 * d], in_b[d:2 * d]), F.linear(t, in_w[2 * d:], in_b[2 * d:])
    attended = _attention(q, k, v, heads)
    pooled = F.linear(attended, s["head.attention.out_proj.weight"], s["head.attention.out_proj.bias"])
    pooled = pooled + _mlp(s, "head.mlp.", _norm(s, "head.layernorm.", pooled))
    return pooled[:, 0], t.reshape(b, h, w, d)


def random_pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def small_teacher_from_file(path: Path):
    return siglip2_teacher_from_state(get_spec(SMALL), find_state_dict(read_checkpoint(path)), str(path),
                                      SMALL_DEPTH).eval()


# ---------------------------------------------------------------- registration

def test_every_released_tower_is_registered_with_its_geometry():
    specs = {s.name: s for s in list_teachers() if s.name.startswith("siglip2_")}
    assert set(specs) == EXPECTED_NAMES
    for name, spec in specs.items():
        stem, resolution = name.split("_")[1:]
        assert spec.patch_size == int(stem[-2:]) and spec.embed_dim == CARD_CONFIGS[stem][0]
        assert spec.native_resolution == (int(resolution),) * 2 and int(resolution) % spec.patch_size == 0
        assert (spec.mean, spec.std, spec.num_registers, spec.cls_source) == ((0.5,) * 3, (0.5,) * 3, 0, "attn_pool")
        assert "attention-pool" in spec.description and "post_layernorm" in spec.description


def test_cli_lists_the_towers():
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert rows["siglip2_so400m14_378"][2:6] == ["14", "1152", "0", "attn_pool"]
    assert rows["siglip2_vitg16_384"][6] == "384x384"


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_real_size_hf_layout_converts_to_exactly_the_model_keys(name):
    spec = get_spec(name)
    hidden, intermediate, layers, _ = CARD_CONFIGS[name.split("_")[1]]
    grid = spec.native_resolution[0] // spec.patch_size
    shapes = hf_vision_shapes(hidden, intermediate, layers, spec.patch_size, grid)
    hf = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = {k: tuple(v.shape) for k, v in siglip2_timm_state(hf).items()}
    model = {k: tuple(v.shape) for k, v in create_siglip2_vit(spec.arch, device="meta").state_dict().items()}
    assert converted == model


# ---------------------------------------------------------------- loading and outputs

@pytest.fixture(scope="module")
def full_siglip_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """Reduced-depth B/16-224 in a full ``SiglipModel`` ``model.safetensors``: vision, text and logit tensors."""
    vision = small_hf_state()
    path = tmp_path_factory.mktemp("siglip2") / "model.safetensors"
    save_file({**vision, **random_state(hf_text_and_logit_shapes(), seed=1)}, str(path))
    return path, vision


@pytest.mark.parametrize("size", [(224, 224), (160, 288)])  # native 14x14; off-native: shrink rows, grow columns
def test_hf_checkpoint_matches_the_reference_forward(full_siglip_checkpoint, size):
    path, vision = full_siglip_checkpoint
    teacher = small_teacher_from_file(path)
    pixels = random_pixels(2, *size)
    with torch.no_grad():
        out = teacher(pixels)
        cls, patch = reference_forward(vision, (pixels.float() / 255 - 0.5) / 0.5, SMALL_HEADS)
    h, w = size[0] // 16, size[1] // 16
    assert out.patch.shape == (2, h, w, 768) and out.cls.shape == (2, 768) and out.registers.shape == (2, 0, 768)
    torch.testing.assert_close(out.patch, patch, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.cls, cls, atol=1e-4, rtol=0)
    assert not torch.allclose(out.cls, out.patch.mean(dim=(1, 2)), atol=1e-2)  # cls is the pool, not a mean


def test_off_native_position_embeddings_are_resized_like_hf_without_antialiasing(full_siglip_checkpoint):
    path, vision = full_siglip_checkpoint
    teacher = small_teacher_from_file(path)
    grid = teacher.vit.pos_embed.reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    with torch.no_grad():  # black pixels: tokens = patch-embedding bias + position embeddings
        tokens, _ = teacher.embed(torch.zeros(1, 3, 160, 288))
    pos = (tokens[0] - teacher.vit.patch_embed.proj.bias).T.reshape(1, 768, 10, 18)
    torch.testing.assert_close(pos, F.interpolate(grid, size=(10, 18), mode="bicubic", align_corners=False))
    timm_rule = F.interpolate(grid, size=(10, 18), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(pos, timm_rule, atol=1e-4)


def test_timm_layout_checkpoint_matches_timm_forward_at_native_size(tmp_path):
    torch.manual_seed(0)
    model = create_siglip2_vit(get_spec(SMALL).arch, SMALL_DEPTH).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(path))
    teacher = small_teacher_from_file(path)
    pixels = random_pixels(2, 224, 224)
    with torch.no_grad():
        out = teacher(pixels)
        tokens = model.forward_features((pixels.float() / 255 - 0.5) / 0.5)
        pooled = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(out.patch, tokens.reshape(2, 14, 14, 768), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cls, pooled, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- levels (--blocks)

def test_levels_equal_timm_intermediates_at_the_native_size(tmp_path):
    """No prefix tokens: level k = timm's ``forward_intermediates`` of block k (before ``norm``), CLS = its mean."""
    torch.manual_seed(0)
    model = create_siglip2_vit(get_spec(SMALL).arch, SMALL_DEPTH).eval()
    teacher = siglip2_teacher_from_state(get_spec(SMALL), model.state_dict(), "timm weights", SMALL_DEPTH).eval()
    pixels = random_pixels(2, 224, 224)
    with torch.no_grad():
        out = teacher(pixels, blocks=(0, 1))
        reference = model.forward_intermediates(teacher.normalize(pixels), indices=[0, 1], norm=False,
                                                intermediates_only=True)
    assert teacher.depth == SMALL_DEPTH and "the mean of the patch tokens" in teacher.level_description()
    for k, block_map in enumerate(reference):
        patch = block_map.permute(0, 2, 3, 1)
        torch.testing.assert_close(out.levels[k][1], patch, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.levels[k][0], patch.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.vit.norm(out.levels[1][1]), out.patch, rtol=0, atol=0)  # final = normed


def test_levels_off_the_native_grid_equal_the_reference_layers(full_siglip_checkpoint):
    """Off-native (HF position-embedding resize): level k = the reference's layer-k hidden state."""
    path, vision = full_siglip_checkpoint
    teacher = small_teacher_from_file(path)
    pixels = random_pixels(2, 160, 288)
    with torch.no_grad():
        out = teacher(pixels, blocks=(0, 1))
        layers = reference_layers(vision, (pixels.float() / 255 - 0.5) / 0.5, SMALL_HEADS)
    for k, patch in enumerate(layers):
        assert out.levels[k][1].shape == (2, 10, 18, 768)
        torch.testing.assert_close(out.levels[k][1], patch, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.levels[k][0], patch.mean(dim=(1, 2)), atol=1e-4, rtol=0)


def test_hf_and_timm_layouts_of_the_same_weights_give_the_same_features(tmp_path, full_siglip_checkpoint):
    path, _ = full_siglip_checkpoint
    hf_teacher = small_teacher_from_file(path)
    save_file(hf_teacher.vit.state_dict(), str(tmp_path / "timm.safetensors"))
    timm_teacher = small_teacher_from_file(tmp_path / "timm.safetensors")
    pixels = random_pixels(1, 96, 128)
    with torch.no_grad():
        a, b = hf_teacher(pixels), timm_teacher(pixels)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)


@pytest.mark.parametrize("change, reported", [
    (lambda s: s.pop("vision_model.encoder.layers.1.self_attn.k_proj.weight"),
     "vision_model.encoder.layers.1.self_attn.k_proj.weight"),
    (lambda s: s.pop("vision_model.head.probe"), "attn_pool.latent"),
    (lambda s: s.__setitem__("vision_model.embeddings.position_ids", torch.arange(196)[None]),
     "vision_model.embeddings.position_ids"),
    (lambda s: s.__setitem__("vision_model.encoder.layers.2.mlp.fc1.bias", torch.zeros(3072)), "blocks.2.mlp.fc1.bias"),
    (lambda s: s.__setitem__("visual.proj", torch.zeros(768, 768)), "visual.proj"),
    (lambda s: s.__setitem__("vision_model.embeddings.position_embedding.weight", torch.zeros(256, 768)),
     r"pos_embed: checkpoint \(1, 256, 768\) vs model \(1, 196, 768\)"),
])
def test_mismatched_checkpoint_raises_naming_the_keys(tmp_path, change, reported):
    state = small_hf_state()
    change(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=reported) as info:
        small_teacher_from_file(tmp_path / "model.safetensors")
    assert "Hugging Face layout" in str(info.value)


def test_text_tower_and_logit_keys_are_ignored_but_nothing_else(full_siglip_checkpoint):
    path, vision = full_siglip_checkpoint
    teacher = small_teacher_from_file(path)
    assert torch.equal(teacher.vit.attn_pool.latent, vision["vision_model.head.probe"])
    qkv = torch.cat([vision[f"vision_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(teacher.vit.blocks[1].attn.qkv.weight, qkv)


def test_create_teacher_real_size_random_weights_and_patch_multiple():
    teacher = create_teacher(SMALL)
    assert len(teacher.block_modules()) == 12
    with torch.no_grad():
        out = teacher(random_pixels(1, 32, 48))
    assert out.patch.shape == (1, 2, 3, 768) and out.cls.shape == (1, 768)
    with pytest.raises(ValueError, match="multiple"):
        teacher(random_pixels(1, 32, 40))


# ---------------------------------------------------------------- extraction end to end

def test_extract_float32_with_a_real_size_hf_checkpoint(tmp_path, real_image_dir):
    spec = get_spec(SMALL)
    hidden, intermediate, layers, _ = CARD_CONFIGS["vitb16"]
    checkpoint = tmp_path / "model.safetensors"
    save_file(random_state(hf_vision_shapes(hidden, intermediate, layers, 16, 14)), str(checkpoint))
    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted(real_image_dir.iterdir())[:3]:
        shutil.copy(photo, images / photo.name)
    cfg = ExtractConfig(teacher=SMALL, images=images, out=str(tmp_path / "cache"), checkpoint=checkpoint,
                        resolution="48x64", batch_size=2, num_workers=0, progress=False,
                        storage=StorageConfig(unit_size=4, dtype="float32"))
    result = run_extraction(cfg)
    assert (result.processed, result.failed) == (3, 0)
    store = TeacherStore.open(str(tmp_path / "cache"), SMALL)
    teacher = build_siglip2_teacher(spec, checkpoint).eval()
    manifest = load_manifest(images)
    pixels = torch.stack([torch.from_numpy(load_pixels(manifest.path(i), (48, 64), "squash")) for i in range(3)])
    with torch.no_grad():
        out = teacher(pixels)
    assert store.patch.shape == (3, 3, 4, 768)
    np.testing.assert_allclose(store.patch[:], out.patch.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(store.cls[:], out.cls.numpy(), atol=1e-5, rtol=0)
