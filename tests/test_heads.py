"""Per-teacher projectors: shapes, grid resize, the ladder's sum, gradients into the student."""
from __future__ import annotations

import pytest
import torch

from dune_student.model.attention import BackendAttention
from dune_student.config import HEAD_KINDS, HeadConfig
from dune_student.model.heads import TeacherHeads, resize_patch_grid
from dune_student.model.student import Student, split_tokens
from dune_student.config import StudentConfig

# student grid for a 48x64 input at patch 16: 3x4
TEACHERS = {"same_grid": (24, (3, 4)), "finer_grid": (40, (6, 8))}


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    return Student(StudentConfig(arch="vit_tiny", patch_size=16, img_size=32, num_registers=4, attention="sdpa"))


def run_heads(student: Student, heads: TeacherHeads, x: torch.Tensor, grids=None):
    return heads(student(x, return_blocks=heads.needs_blocks), grids)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_output_shapes_and_grid_resize(student, kind):
    heads = TeacherHeads(student, TEACHERS, HeadConfig(kind=kind))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = run_heads(student, heads, x)
        overridden = run_heads(student, heads, x, grids={"same_grid": (5, 7)})
    assert out["same_grid"][0].shape == (2, 24) and out["same_grid"][1].shape == (2, 3, 4, 24)
    assert out["finer_grid"][0].shape == (2, 40) and out["finer_grid"][1].shape == (2, 6, 8, 40)
    assert overridden["same_grid"][1].shape == (2, 5, 7, 24)
    assert heads.needs_blocks == (kind in ("ladder", "sak"))


def test_transformer_projector_uses_student_attention_backend(student):
    heads = TeacherHeads(student, TEACHERS)
    layers = [m for m in heads.modules() if isinstance(m, BackendAttention)]
    assert len(layers) == 2 and all(layer.backend == student.attention_backend for layer in layers)
    assert heads.projectors["finer_grid"].block.attn.num_heads == student.num_heads


def test_resize_is_bilinear_without_corner_alignment_and_keeps_axes():
    columns = torch.arange(3.0).view(1, 1, 3, 1).expand(1, 2, 3, 1)  # value = column index
    resized = resize_patch_grid(columns, (4, 6))
    expected_row = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0])  # align_corners=False, edges clamped
    torch.testing.assert_close(resized[0, :, :, 0], expected_row.expand(4, 6))
    assert resize_patch_grid(columns, (2, 3)) is columns


def zero_rung(rung) -> None:
    for mlp in (rung.cls, rung.patch):
        torch.nn.init.zeros_(mlp[2].weight)
        torch.nn.init.zeros_(mlp[2].bias)


def test_ladder_sums_one_mlp_per_block(student):
    heads = TeacherHeads(student, {"t": (24, (3, 4))}, HeadConfig(kind="ladder"))
    ladder = heads.projectors["t"]
    assert [rung.cls[0].out_features for rung in ladder.rungs] == [192] * 11 + [4 * 192]
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = student(x, return_blocks=True)
        full_cls, full_patch = heads(out)["t"]
        per_block = [rung(*split_tokens(tokens, 4, (3, 4))) for rung, tokens in zip(ladder.rungs, out.blocks)]
        torch.testing.assert_close(full_cls, sum(c for c, _ in per_block), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full_patch, sum(p for _, p in per_block), rtol=1e-5, atol=1e-6)
        keep = 5
        for index, rung in enumerate(ladder.rungs):
            if index != keep:
                zero_rung(rung)
        only_cls, only_patch = heads(out)["t"]
    torch.testing.assert_close(only_cls, per_block[keep][0])
    torch.testing.assert_close(only_patch, per_block[keep][1])
    assert not torch.allclose(only_cls, full_cls)


def test_ladder_without_block_outputs_is_an_error(student):
    heads = TeacherHeads(student, {"t": (24, (3, 4))}, HeadConfig(kind="ladder"))
    with torch.no_grad(), pytest.raises(ValueError, match="return_blocks=True"):
        heads(student(torch.randn(1, 3, 48, 64)))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_reach_every_student_parameter(student, kind):
    heads = TeacherHeads(student, TEACHERS, HeadConfig(kind=kind))
    student.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 48, 64)
    if kind == "sak":  # every level is distilled
        levels = heads.forward_levels(student(x, return_blocks=True))
        out = {f"{t}/{i}": pair for t, pairs in levels.items() for i, pair in enumerate(pairs)}
    else:
        out = run_heads(student, heads, x)
    loss = sum(cls.square().mean() + patch.square().mean() for cls, patch in out.values())
    loss.backward()
    missing = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is not None for p in heads.parameters())


def test_unknown_head_kind_is_rejected():
    with pytest.raises(ValueError, match="head kind"):
        HeadConfig(kind="linear")
