"""tools/cost_model.py: FLOPs counted on the real (meta-tensor) graphs agree with a ViT's analytic count, and the
cost arithmetic is self-consistent. No timings."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dune_student.config import StudentConfig
from dune_student.loss.distill import teacher_losses

_PATH = Path(__file__).resolve().parents[1] / "tools" / "cost_model.py"
_SPEC = importlib.util.spec_from_file_location("cost_model", _PATH)
cm = importlib.util.module_from_spec(_SPEC)
sys.modules["cost_model"] = cm
_SPEC.loader.exec_module(cm)

TINY_STUDENT = StudentConfig(arch="vit_tiny", patch_size=14, num_registers=4)  # 192-d, 12 blocks, 3 heads


def test_analytic_formula_by_hand():
    # 2 tokens, 1 patch, D=2, 1 block, MLP 4, patch 1: embed 2*1*2*3 = 12;
    # block 2*2*(4*4 + 2*2*4) = 128, attention 4*2*2*2 = 32
    assert cm.analytic_vit_forward_flops(tokens=2, patches=1, dim=2, depth=1, mlp_hidden=4, patch=1) == 12 + 128 + 32


@pytest.mark.parametrize("name, resolution, prefix", [("dinov2_vits14", (56, 42), 1), ("mast3r", (32, 48), 0)])
def test_teacher_forward_matches_analytic_vit(name, resolution, prefix):
    """DINOv2-S/14 (CLS, no registers) and MASt3R ViT-L/16 (no CLS, RoPE2D), counted on meta tensors."""
    from dune_cache.teachers import get_spec

    spec = get_spec(name)
    dim, depth = spec.embed_dim, (12 if name == "dinov2_vits14" else 24)
    patches = (resolution[0] // spec.patch_size) * (resolution[1] // spec.patch_size)
    expected = cm.analytic_vit_forward_flops(patches + prefix, patches, dim, depth, 4 * dim, spec.patch_size)
    assert cm.teacher_forward_flops(name, resolution) == expected


def test_student_transformer_step_matches_analytic():
    """Student ViT-Ti/14 with 4 registers + two transformer projectors (D_t 16 and 24) at 28 px (2x2 grid)."""
    teachers = {"a": (16, (2, 2)), "b": (24, (2, 2))}
    step = cm.student_step_flops(TINY_STUDENT, "transformer", 28, teachers)
    d, n_patches = 192, 4
    embed = 2 * n_patches * d * 3 * 14 * 14
    student = cm.analytic_vit_forward_flops(1 + 4 + n_patches, n_patches, d, 12, 4 * d, 14)
    # each projector: one block over CLS + patches (registers dropped), then Linear(D -> D_t) on those tokens
    projector_block = cm.analytic_vit_forward_flops(1 + n_patches, 0, d, 1, 4 * d, 14)
    linears = sum(2 * (1 + n_patches) * d * out for out, _ in teachers.values())
    assert step.forward == student + 2 * projector_block + linears
    # backward: input and weight gradients of every product (2x forward), except the patch embedding whose
    # input (the pixels) needs no gradient
    assert step.backward == 2 * step.forward - embed


def test_ladder_costs_more_than_transformer_and_counts_every_rung():
    teachers = {"a": (16, (2, 2))}
    ladder = cm.student_step_flops(TINY_STUDENT, "ladder", 28, teachers)
    transformer = cm.student_step_flops(TINY_STUDENT, "transformer", 28, teachers)
    d, n_patches, depth = 192, 4, 12
    student = cm.analytic_vit_forward_flops(1 + 4 + n_patches, n_patches, d, depth, 4 * d, 14)
    # per block and token type (CLS: 1 token, patches: 4) Linear(D->h) GELU Linear(h->16); h = D, last block 4D
    rung = lambda hidden: 2 * (1 + n_patches) * (d * hidden + hidden * 16)  # noqa: E731
    assert ladder.forward == student + (depth - 1) * rung(d) + rung(4 * d)
    assert ladder.forward > transformer.forward


def test_loss_has_no_counted_flops():
    """The real distillation loss is element-wise only: what the meta surrogate loss assumes."""
    preds = {"a": (torch.randn(2, 8, requires_grad=True), torch.randn(2, 3, 3, 8, requires_grad=True))}
    targets = {"a": (torch.randn(2, 8), torch.randn(2, 3, 3, 8))}
    counter = FlopCounterMode(display=False)
    with counter:
        teacher_losses(preds, targets, ["a"]).sum().backward()
    assert counter.get_total_flops() == 0


def test_throughput_and_gpu_hours_are_consistent():
    flops = 425e9
    rate = cm.samples_per_s(flops, 989.4, 0.3)
    assert rate == pytest.approx(989.4e12 * 0.3 / flops)
    items = 20.7e6
    assert cm.gpu_hours(items, flops, 989.4, 0.3) == pytest.approx(items / rate / 3600)
    hours = cm.gpu_hours(items, flops, 989.4, 0.3)
    assert cm.implied_mfu(items, flops, hours, 989.4) == pytest.approx(0.3)


def test_dune_phase_samples_follow_main_dune():
    # 100 "epochs" of 1,281,167 images at global batch 512: ceil -> 250,228 iterations (even)
    assert cm.dune_phase_samples(100, 1_281_167, 512) == 250_228 * 512
    # an odd iteration count is rounded up to even: ceil(1001 / 2) = 501 -> 502
    assert cm.dune_phase_samples(1, 1001, 2) == 502 * 2


def test_feature_bytes():
    # DUNE at 336: 24x24 grid + CLS, 1024 channels, fp16 -> 1,181,696 B per teacher (~3.5 MB for DUNE's 3 teachers)
    assert cm.feature_bytes_per_image((24, 24), 1024) == 577 * 1024 * 2
    assert 3 * cm.feature_bytes_per_image((24, 24), 1024) == pytest.approx(3.5e6, rel=0.02)
    assert cm.feature_bytes_per_image((32, 32), 1024, views=3) == 4 * 1025 * 1024 * 2


def test_report_arithmetic(monkeypatch):
    """The report's sections agree with each other (FLOP counts replaced by fixed numbers to stay fast)."""
    monkeypatch.setattr(cm, "teacher_forward_flops", lambda name, res: 100e9)
    monkeypatch.setattr(cm, "student_step_flops",
                        lambda cfg, kind, res, teachers: cm.StepFlops(int(40e9 * (res // 14) ** 2 / 576),
                                                                      int(80e9 * (res // 14) ** 2 / 576)))
    monkeypatch.setattr(cm, "cross_check_table", lambda peak: [])
    args = cm.parse_args(["--train-mfu", "0.25", "--infer-mfu", "0.5", "--views", "0", "2"])
    report = cm.build_report(args)
    step = report["steps"]["transformer"]["336"]
    assert step["cached_step_gflops"] == pytest.approx(120)
    assert step["speedup_equal_mfu"] == pytest.approx((120 + 3 * 100) / 120, rel=1e-3)
    cached = report["cached_samples_per_s_per_h100"]["336"]
    assert cached == pytest.approx(989.4e12 * 0.25 / 120e9, rel=1e-3)
    live = report["live_samples_per_s_per_h100"]["336"]
    assert 1 / live == pytest.approx(1 / cached + 300e9 / (989.4e12 * 0.5), rel=1e-3)
    phase = report["dune_recipe"]["phases"][0]
    assert phase["extraction_h100_hours"]["2"] == pytest.approx(3 * phase["extraction_h100_hours"]["0"])
    assert phase["extraction_h100_hours"]["0"] == pytest.approx(20.7e6 * 300e9 / (989.4e12 * 0.5) / 3600, rel=1e-3)
    totals = report["dune_recipe"]["totals"]
    assert totals["cached_total_h100_hours"]["0"] == pytest.approx(
        totals["predicted_cached_training_h100_hours"]
        + sum(p["extraction_h100_hours"]["0"] for p in report["dune_recipe"]["phases"]))
    storage = report["storage"]["448"]
    raw = storage["fp16_bytes_per_sample_3_teachers"]
    assert raw == 3 * 1025 * 1024 * 2
    for enc in storage["encodings"].values():
        assert enc["bytes_per_sample"] * enc["ratio_vs_fp16"] == pytest.approx(raw)
        assert enc["cache_tb"]["2"] == pytest.approx(3 * enc["cache_tb"]["0"])
        assert enc["gb_per_s_per_8gpu_node"] == pytest.approx(8 * enc["gb_per_s_per_gpu"])
        assert enc["gb_per_s_per_gpu"] == pytest.approx(
            report["cached_samples_per_s_per_h100"]["448"] * enc["bytes_per_sample"] / 1e9)
