"""Encoder export: safetensors in timm's layout that timm.create_model loads from the local file."""
from __future__ import annotations

import json
import socket

import pytest
import timm
import torch
from safetensors.torch import load_file

from dune_student.model.export import export_encoder, load_exported, sidecar_path
from dune_student.model.heads import TeacherHeads
from dune_student.model.student import Student
from dune_student.config import StudentConfig


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    cfg = StudentConfig(arch="vit_tiny", patch_size=16, img_size=32, num_registers=4, layerscale=0.5, attention="sdpa")
    return Student(cfg).eval()


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_round_trip_timm_forward_features_equals_student_tokens(student, tmp_path, no_network):
    path = export_encoder(student, tmp_path / "enc" / "student.safetensors")
    model = load_exported(path).eval()
    assert type(model) is timm.models.VisionTransformer
    x = torch.randn(2, 3, 48, 80)  # not the 32 px the position embeddings are stored at
    with torch.no_grad():
        out = student(x, return_blocks=True)
        tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 4 + 3 * 5, 192)
    torch.testing.assert_close(tokens, out.blocks[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], out.cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 5:].reshape(2, 3, 5, 192), out.patch, rtol=1e-5, atol=1e-5)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["mean"] == pytest.approx(student.mean) and data_cfg["std"] == pytest.approx(student.std)


def test_export_holds_the_encoder_only_in_timm_key_layout(student, tmp_path):
    TeacherHeads(student, {"t": (24, (2, 2))})  # heads live outside the student: never exported
    path = export_encoder(student, tmp_path / "student.safetensors")
    state = load_file(str(path))
    reference = timm.create_model(student.timm_model_name, pretrained=False, **student.timm_kwargs)
    assert set(state) == set(reference.state_dict())
    assert "reg_token" in state and "blocks.0.ls1.gamma" in state and "norm.weight" not in state
    torch.testing.assert_close(state["pos_embed"], student.vit.pos_embed.detach())
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["timm_model"] == "vit_tiny_patch16_224"
    assert sidecar["timm_kwargs"]["patch_size"] == 16 and sidecar["timm_kwargs"]["reg_tokens"] == 4
    assert sidecar["timm_kwargs"]["final_norm"] is False and sidecar["img_size"] == 32


def test_export_path_must_be_safetensors(student, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        export_encoder(student, tmp_path / "student.pth")


def test_sidecar_that_does_not_match_the_weights_fails_instead_of_loading_partially(student, tmp_path):
    path = export_encoder(student, tmp_path / "student.safetensors")
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar["timm_kwargs"]["reg_tokens"] = 0
    sidecar_path(path).write_text(json.dumps(sidecar))
    with pytest.raises(RuntimeError, match="reg_token"):
        load_exported(path)
