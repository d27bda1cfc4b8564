"""CroCo-family (MASt3R / DUSt3R / CroCo v2) teachers: RoPE2D, checkpoint loading, outputs."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from dune_cache.teachers import CheckpointError, create_teacher, get_spec
from dune_cache.teachers.mast3r import VIT_LARGE, CrocoTeacher, load_croco_encoder
from dune_cache.teachers.rope import apply_rope_2d, patch_positions, rope_2d_tables

MAST3R_CONSTRUCTOR = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth={depth}, enc_num_heads={heads}, "
    "dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True)"
)


# ---------------------------------------------------------------- upstream layout, written independently

def upstream_encoder_shapes(dim: int, depth: int, patch: int = 16, mlp_ratio: int = 4) -> dict[str, tuple]:
    """Encoder parameter names/shapes of naver/croco ``CroCoNet`` with RoPE (no ``enc_pos_embed``)."""
    shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"enc_blocks.{i}."
        shapes.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (mlp_ratio * dim, dim), p + "mlp.fc1.bias": (mlp_ratio * dim,),
            p + "mlp.fc2.weight": (dim, mlp_ratio * dim), p + "mlp.fc2.bias": (dim,),
        })
    shapes.update({"enc_norm.weight": (dim,), "enc_norm.bias": (dim,)})
    return shapes


def upstream_decoder_shapes(enc_dim: int, dec_dim: int = 64) -> dict[str, tuple]:
    """A few decoder/head tensors of an ``AsymmetricMASt3R`` checkpoint (must be ignored by the teacher)."""
    shapes = {"mask_token": (1, 1, dec_dim), "decoder_embed.weight": (dec_dim, enc_dim),
              "decoder_embed.bias": (dec_dim,), "dec_norm.weight": (dec_dim,), "dec_norm.bias": (dec_dim,)}
    for blocks in ("dec_blocks.0.", "dec_blocks2.0."):
        shapes.update({blocks + "attn.qkv.weight": (3 * dec_dim, dec_dim),
                       blocks + "cross_attn.projq.weight": (dec_dim, dec_dim),
                       blocks + "norm_y.weight": (dec_dim,)})
    shapes.update({"downstream_head1.dpt.head.0.weight": (8, dec_dim, 3, 3),
                   "downstream_head2.head_local_features.fc1.weight": (16, dec_dim)})
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


SMALL_DEPTH = 2
SMALL_GEOMETRY = dataclasses.replace(VIT_LARGE, depth=SMALL_DEPTH)


def save_mast3r_checkpoint(path, state: dict, constructor: str) -> None:
    torch.save({"model": state, "args": argparse.Namespace(model=constructor), "epoch": 3}, path)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """Reduced-depth (2 blocks) ViT-L/16 MASt3R checkpoint in the upstream layout, with decoder keys."""
    encoder = random_state(upstream_encoder_shapes(1024, SMALL_DEPTH))
    path = tmp_path_factory.mktemp("mast3r") / "mast3r_small.pth"
    save_mast3r_checkpoint(path, {**encoder, **random_state(upstream_decoder_shapes(1024), seed=1)},
                           MAST3R_CONSTRUCTOR.format(depth=SMALL_DEPTH, heads=16))
    return path, encoder


def small_teacher() -> CrocoTeacher:
    return CrocoTeacher(get_spec("mast3r"), SMALL_GEOMETRY)


@pytest.fixture(scope="module")
def mast3r_random():
    """The real registered ViT-L/16 at random weights."""
    return create_teacher("mast3r")


def random_pixels(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- RoPE2D

def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    cos, sin = rope_2d_tables(positions, x.shape[-1], base)
    return apply_rope_2d(x, cos, sin)


def reference_rope_1d(v: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Channel i and i+n/2 as one complex number, rotated by pos * base**(-2i/n). v: (N, n), pos: (N,)."""
    n = v.shape[-1]
    z = torch.complex(v[:, : n // 2], v[:, n // 2:]).to(torch.complex128)
    angle = pos.double()[:, None] * base ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def test_patch_positions_are_row_major_y_x():
    assert patch_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rope2d_matches_independent_reference():
    head_dim, n = 64, 12
    q = torch.randn(1, 1, n, head_dim, dtype=torch.float64)
    positions = torch.stack((torch.randint(0, 30, (n,)), torch.randint(0, 40, (n,))), dim=-1)
    expected = torch.cat((reference_rope_1d(q[0, 0, :, :32], positions[:, 0], 100.0),
                          reference_rope_1d(q[0, 0, :, 32:], positions[:, 1], 100.0)), dim=-1)
    torch.testing.assert_close(rope(q, positions)[0, 0], expected, atol=1e-5, rtol=1e-5)


def test_rope2d_scores_depend_only_on_relative_position_and_norm_is_kept():
    q, k = torch.randn(2, 4, 20, 64), torch.randn(2, 4, 20, 64)
    positions = patch_positions(4, 5)
    scores = rope(q, positions) @ rope(k, positions).transpose(-1, -2)
    shifted = positions + torch.tensor([7, 3])
    scores_shifted = rope(q, shifted) @ rope(k, shifted).transpose(-1, -2)
    torch.testing.assert_close(scores_shifted, scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope(q, shifted).norm(dim=-1), q.norm(dim=-1))
    # and the positions do matter: swapping y and x changes the scores
    swapped = positions.flip(-1)
    assert not torch.allclose(rope(q, swapped) @ rope(k, swapped).transpose(-1, -2), scores, atol=1e-3)


# ---------------------------------------------------------------- registration and real-size layout

@pytest.mark.parametrize("name", ["mast3r", "dust3r", "croco_v2"])
def test_registered_specs(name):
    spec = get_spec(name)
    assert (spec.patch_size, spec.embed_dim, spec.num_registers, spec.cls_source) == (16, 1024, 0, "mean_patch")
    assert spec.final_norm


def test_real_size_parameter_names_match_upstream_layout():
    with torch.device("meta"):
        teacher = CrocoTeacher(get_spec("mast3r"), VIT_LARGE)
    ours = {k: tuple(v.shape) for k, v in teacher.encoder.state_dict().items()}
    assert ours == upstream_encoder_shapes(1024, 24)


# ---------------------------------------------------------------- loading

def test_checkpoint_loads_encoder_strictly_and_ignores_decoder(small_checkpoint):
    path, encoder = small_checkpoint
    teacher = small_teacher()
    load_croco_encoder(teacher, path)
    loaded = teacher.encoder.state_dict()
    assert loaded.keys() == encoder.keys()
    for k, v in encoder.items():
        assert torch.equal(loaded[k], v), k
    with torch.no_grad():
        out = teacher.eval()(random_pixels(2, 64, 96))
    assert out.cls.shape == (2, 1024) and out.patch.shape == (2, 4, 6, 1024) and out.registers.shape == (2, 0, 1024)
    assert torch.isfinite(out.patch).all()


def test_croco_v2_kwargs_checkpoint_loads(tmp_path):
    encoder = random_state(upstream_encoder_shapes(1024, SMALL_DEPTH))
    kwargs = dict(enc_embed_dim=1024, enc_depth=SMALL_DEPTH, enc_num_heads=16, dec_embed_dim=64, pos_embed="RoPE100")
    torch.save({"model": {**encoder, **random_state(upstream_decoder_shapes(1024))}, "croco_kwargs": kwargs},
               tmp_path / "croco.pth")
    teacher = CrocoTeacher(get_spec("croco_v2"), SMALL_GEOMETRY)
    load_croco_encoder(teacher, tmp_path / "croco.pth")
    assert torch.equal(teacher.encoder.enc_norm.weight, encoder["enc_norm.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("enc_blocks.1.mlp.fc2.bias"), "enc_blocks.1.mlp.fc2.bias"),
    (lambda s: s.__setitem__("enc_norm.weight", torch.zeros(768)), "enc_norm.weight"),
    (lambda s: s.__setitem__("patch_embed.norm.weight", torch.zeros(1024)), "patch_embed.norm.weight"),
    (lambda s: s.__setitem__("enc_pos_embed", torch.zeros(196, 1024)), "cosine"),
])
def test_broken_encoder_raises_checkpoint_error(tmp_path, small_checkpoint, change, message):
    path, encoder = small_checkpoint
    state = dict(encoder)
    change(state)
    save_mast3r_checkpoint(tmp_path / "broken.pth", state, MAST3R_CONSTRUCTOR.format(depth=SMALL_DEPTH, heads=16))
    with pytest.raises(CheckpointError, match=message):
        load_croco_encoder(small_teacher(), tmp_path / "broken.pth")


def test_declared_head_count_mismatch_raises(tmp_path, small_checkpoint):
    _, encoder = small_checkpoint
    save_mast3r_checkpoint(tmp_path / "heads.pth", encoder, MAST3R_CONSTRUCTOR.format(depth=SMALL_DEPTH, heads=8))
    with pytest.raises(CheckpointError, match="enc_num_heads"):
        load_croco_encoder(small_teacher(), tmp_path / "heads.pth")


def test_missing_checkpoint_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_croco_encoder(small_teacher(), tmp_path / "absent.pth")


# ---------------------------------------------------------------- outputs of the real-size teacher

def test_real_size_teacher_outputs(mast3r_random):
    with torch.no_grad():
        out = mast3r_random(random_pixels(2, 64, 96))
    assert out.cls.shape == (2, 1024) and out.patch.shape == (2, 4, 6, 1024) and out.registers.shape == (2, 0, 1024)
    torch.testing.assert_close(out.cls, out.patch.mean(dim=(1, 2)))
    # final LayerNorm (weight 1, bias 0 at init) applied: every token has zero mean and unit variance
    torch.testing.assert_close(out.patch.mean(-1), torch.zeros(2, 4, 6), atol=1e-4, rtol=0)


def test_non_multiple_of_patch_size_raises(mast3r_random):
    with pytest.raises(ValueError, match="multiple"):
        mast3r_random(random_pixels(1, 64, 90))
