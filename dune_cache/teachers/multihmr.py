"""Multi-HMR (naver/multi-hmr) image encoder: the DINOv2 ViT-L/14 it fine-tuned at 672x672.

``multiHMR_672_L.pt`` holds ``ckpt['model_state_dict']``; its ``Dinov2Backbone`` wraps
``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`` as ``backbone.encoder``, so the
encoder keys are ``backbone.encoder.*`` in the original DINOv2 layout (no registers, 37x37
position embeddings). Everything else (the human-prediction head) is ignored. Upstream reads
``get_intermediate_layers(x)[0]``: the last block's patch tokens after the final norm.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .base import find_state_dict, read_checkpoint, strip_prefix
from .dinov2 import Dinov2Teacher, dinov2_teacher_from_state
from .spec import TeacherSpec

ENCODER_PREFIX = "backbone.encoder."


def build_multihmr_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Dinov2Teacher:
    """Factory of ``multihmr``: the ``backbone.encoder.*`` weights of a Multi-HMR checkpoint."""
    if checkpoint is None:
        return dinov2_teacher_from_state(spec, None, "random weights")
    state = find_state_dict(read_checkpoint(checkpoint), ("model_state_dict",))
    encoder = strip_prefix(state, ENCODER_PREFIX)
    if not encoder:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no '{ENCODER_PREFIX}*' keys (first keys: {sorted(state)[:8]})")
    return dinov2_teacher_from_state(spec, encoder, str(checkpoint))
