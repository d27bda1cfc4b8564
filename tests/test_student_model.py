"""Student ViT: attention backends, parameter counts, token layout."""
from __future__ import annotations

import logging

import pytest
import timm
import torch

from dune_student.model import attention
from dune_student.model.attention import resolve_attention_backend, set_attention_backend, xformers_import_error
from dune_student.model.student import Student
from dune_student.config import StudentConfig

TINY = dict(arch="vit_tiny", patch_size=16, img_size=32, num_registers=4)
HAS_CUDA_XFORMERS = torch.cuda.is_available() and xformers_import_error() is None


def stock_timm_model(student: Student) -> torch.nn.Module:
    """timm's own VisionTransformer (stock Attention) with the student's architecture and weights."""
    model = timm.create_model(student.timm_model_name, pretrained=False, **student.timm_kwargs)
    model.load_state_dict(student.vit.state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["timm-fused", "timm-explicit-softmax"])
def test_sdpa_attention_matches_timm_stock_attention(fused):
    torch.manual_seed(0)
    student = Student(StudentConfig(**TINY, layerscale=None, attention="sdpa")).eval()
    stock = stock_timm_model(student)
    for block in stock.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = student(x, return_blocks=True)
        expected = stock.forward_features(x)
    assert student.attention_backend == "sdpa"
    torch.testing.assert_close(out.blocks[-1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls, expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.patch, expected[:, 5:].reshape(2, 3, 4, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA_XFORMERS, reason="needs CUDA and xformers")
def test_xformers_matches_sdpa_outputs_and_gradients():
    torch.manual_seed(0)
    auto = Student(StudentConfig(**TINY, layerscale=0.5, attention="auto"), device="cuda")
    assert auto.attention_backend == "xformers"
    x = torch.randn(4, 3, 64, 96, device="cuda")
    results = {}
    for backend in ("sdpa", "xformers"):
        set_attention_backend(auto, backend)
        auto.zero_grad(set_to_none=True)
        out = auto(x, return_blocks=True)
        (out.cls.square().mean() + out.patch.square().mean()).backward()
        results[backend] = (out.blocks[-1].detach(), {n: p.grad.clone() for n, p in auto.named_parameters()})
    tokens_sdpa, grads_sdpa = results["sdpa"]
    tokens_xf, grads_xf = results["xformers"]
    torch.testing.assert_close(tokens_xf, tokens_sdpa, rtol=1e-4, atol=1e-4)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_xf[name], grad, rtol=1e-3, atol=1e-5, msg=name)


# Counts at DINOv2's 518 px (37x37 position embeddings) with 4 registers, and ViT-B/16 at 224 px:
# timm's models minus their final norm (2*D), and for ViT-B/16 minus the CLS position embedding (D).
@pytest.mark.parametrize("cfg, timm_name, minus, expected", [
    (dict(arch="vit_small", patch_size=14, img_size=518), "vit_small_patch14_reg4_dinov2", 2 * 384, 22_056_576),
    (dict(arch="vit_base", patch_size=14, img_size=518), "vit_base_patch14_reg4_dinov2", 2 * 768, 86_580_480),
    (dict(arch="vit_large", patch_size=14, img_size=518), "vit_large_patch14_reg4_dinov2", 2 * 1024, 304_368_640),
    (dict(arch="vit_base", patch_size=16, img_size=224, num_registers=0, layerscale=None), "vit_base_patch16_224",
     3 * 768, 85_796_352),
])
def test_parameter_counts(cfg, timm_name, minus, expected):
    student = Student(StudentConfig(**cfg), device="meta")
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, device="meta")
    count = sum(p.numel() for p in student.parameters())
    assert count == expected
    assert count == sum(p.numel() for p in reference.parameters()) - minus


def test_return_blocks_gives_every_block_output():
    student = Student(StudentConfig(**TINY, attention="sdpa"))
    x = torch.randn(2, 3, 32, 80)
    with torch.no_grad():
        plain = student(x)
        out = student(x, return_blocks=True)
    assert plain.blocks == []
    assert len(out.blocks) == student.depth == 12
    assert all(block.shape == (2, 1 + 4 + 2 * 5, 192) for block in out.blocks)
    assert out.cls.shape == (2, 192) and out.patch.shape == (2, 2, 5, 192)
    torch.testing.assert_close(out.cls, out.blocks[-1][:, 0])
    torch.testing.assert_close(out.patch, plain.patch)
    assert not torch.equal(out.blocks[0], out.blocks[-1])


def test_auto_on_cpu_uses_sdpa_and_logs_why(caplog):
    with caplog.at_level(logging.INFO, logger="dune_student.model.student"):
        student = Student(StudentConfig(**TINY), device="cpu")
    assert student.attention_backend == "sdpa"
    assert "student attention backend: sdpa (auto: the model is on cpu, not CUDA)" in caplog.text


def test_xformers_requested_where_it_cannot_run_is_an_error(monkeypatch):
    with pytest.raises(RuntimeError, match="xformers.*needs a CUDA device"):
        Student(StudentConfig(**TINY, attention="xformers"), device="cpu")
    monkeypatch.setattr(attention, "_import_xformers_ops", lambda: "ModuleNotFoundError: No module named 'xformers'")
    with pytest.raises(RuntimeError, match="cannot be imported.*No module named 'xformers'"):
        resolve_attention_backend("xformers", "cuda")
    choice = resolve_attention_backend("auto", "cuda")
    assert choice.backend == "sdpa" and "xformers unavailable" in choice.reason


def test_auto_on_cuda_with_xformers_importable_picks_xformers(monkeypatch):
    monkeypatch.setattr(attention, "_import_xformers_ops", lambda: object())
    assert resolve_attention_backend("auto", "cuda").backend == "xformers"
    assert resolve_attention_backend("auto", "cpu").backend == "sdpa"
    assert resolve_attention_backend("sdpa", "cuda").backend == "sdpa"


def test_invalid_configs_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="arch"):
        StudentConfig(arch="vit_huge")
    with pytest.raises(ValueError, match="attention"):
        StudentConfig(attention="flash")
    student = Student(StudentConfig(**TINY))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        student(torch.randn(1, 3, 40, 32))


def test_normalize_uses_imagenet_statistics():
    student = Student(StudentConfig(**TINY))
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = student.normalize(pixels)
    mean, std = torch.tensor(student.mean), torch.tensor(student.std)
    torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)
