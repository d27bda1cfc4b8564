"""What a teacher is, without torch: its :class:`TeacherSpec` and the normalisation constants specs use.

Listing teachers (``dune-cache teachers``), checking a name or resolving a geometry needs only these;
the models themselves (:mod:`dune_cache.teachers.base` and the family modules) import torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoint_files import check_checkpoint_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (RADIO's default input conditioner)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TeacherSpec:
    """Static facts about a teacher, recorded in every cache it produces."""

    name: str
    arch: str
    patch_size: int
    embed_dim: int
    num_registers: int = 0
    # "token": a learned CLS token; "mean_patch": the mean of the patch tokens
    # (teachers without a CLS token, e.g. MASt3R); "attn_pool": the output of the model's own
    # attention-pooling head (e.g. SigLIP2's MAP head), an image-level feature the model was trained on.
    cls_source: Literal["token", "mean_patch", "attn_pool"] = "token"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_resolution: tuple[int, int] = (224, 224)  # (H, W)
    final_norm: bool = True  # whether the encoder's final norm is applied to the outputs
    description: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a :class:`Path`; a :class:`CheckpointError` unless it is a file or a Hugging Face model folder
    (:func:`.checkpoint_files.check_checkpoint_path`)."""
    return check_checkpoint_path(path)
