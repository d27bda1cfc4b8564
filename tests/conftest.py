"""Shared fixtures: a tiny registered teacher with a checkpoint file, and small real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dune_cache.teachers import Teacher, TeacherOutput, TeacherSpec, register_teacher
from dune_cache.teachers.base import load_state_dict_strict, read_checkpoint

TINY = TeacherSpec(name="tiny_test_teacher", arch="conv-patch-embed", patch_size=8, embed_dim=16,
                   num_registers=0, native_resolution=(32, 48), description="test-only teacher")


class TinyTeacher(Teacher):
    """Patch-embedding conv: patch ``(B, h, w, D)``; CLS = learned token + mean patch."""

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, spec.patch_size)
        self.cls_token = nn.Parameter(torch.randn(spec.embed_dim))
        self.scale = nn.Parameter(torch.ones(()))

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        patch = self.proj(x).permute(0, 2, 3, 1) * self.scale
        cls = patch.mean(dim=(1, 2)) + self.cls_token
        return TeacherOutput(cls=cls, registers=patch.new_zeros(len(x), 0, patch.shape[-1]), patch=patch)


@register_teacher(TINY)
def tiny_test_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Teacher:
    model = TinyTeacher(spec)
    if checkpoint is not None:
        load_state_dict_strict(model, read_checkpoint(checkpoint), str(checkpoint))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(TinyTeacher(TINY).state_dict(), path)
    return path


def _real_photos() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    return [("astronaut", data.astronaut()), ("chelsea", data.chelsea()), ("coffee", data.coffee()),
            ("rocket", data.rocket()), ("camera", data.camera()), ("motorcycle", data.stereo_motorcycle()[0])]


@pytest.fixture(scope="session")
def real_image_dir(tmp_path_factory) -> Path:
    """Six real photos (scikit-image's bundled data), one grayscale, saved as PNG/JPEG."""
    out = tmp_path_factory.mktemp("images")
    for k, (name, arr) in enumerate(_real_photos()):
        Image.fromarray(arr).save(out / f"{name}.{'jpg' if k % 2 else 'png'}")
    return out
