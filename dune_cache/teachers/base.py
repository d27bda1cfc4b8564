"""What every teacher is: a frozen encoder with a declared geometry.

A teacher takes uint8 pixels ``(B, 3, H, W)`` (H, W multiples of its patch size),
normalises them itself and returns :class:`TeacherOutput`.
"""
from __future__ import annotations

import argparse
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .spec import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec, check_checkpoint_file  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    """Tokens of one batch.

    cls: ``(B, D)``; registers: ``(B, R, D)`` (R may be 0); patch: ``(B, h, w, D)``.
    """

    cls: torch.Tensor
    registers: torch.Tensor
    patch: torch.Tensor


class Teacher(nn.Module):
    """Base class: subclasses set ``spec`` and implement :meth:`forward_tokens`."""

    spec: TeacherSpec

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels in [0, 255] ``(B, 3, H, W)`` -> normalised float ``(B, 3, H, W)``."""
        return (pixels.float() - self.pixel_mean) / self.pixel_std

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        """Normalised images ``(B, 3, H, W)`` -> tokens."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> TeacherOutput:
        """uint8 pixels ``(B, 3, H, W)`` -> tokens; H and W must be multiples of the patch size."""
        p = self.spec.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(
                f"teacher {self.spec.name}: input {tuple(pixels.shape[-2:])} is not a multiple of patch size {p}"
            )
        return self.forward_tokens(self.normalize(pixels))


def tokens_to_output(tokens: torch.Tensor, num_prefix: int, num_registers: int, grid: tuple[int, int],
                     cls_source: str = "token") -> TeacherOutput:
    """Split ViT tokens ``(B, num_prefix + h*w, D)`` into a :class:`TeacherOutput`.

    The prefix is ``[CLS?, registers...]``; with ``cls_source="mean_patch"`` there is no CLS
    token and the CLS target is the mean of the patch tokens.
    """
    b, _, d = tokens.shape
    h, w = grid
    patch = tokens[:, num_prefix:].reshape(b, h, w, d)
    if cls_source == "mean_patch":
        cls = patch.mean(dim=(1, 2))
        registers = tokens[:, :num_registers]
    else:
        cls = tokens[:, 0]
        registers = tokens[:, 1:1 + num_registers]
    return TeacherOutput(cls=cls, registers=registers, patch=patch)


def read_checkpoint(path: str | Path) -> Mapping:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin`` via torch, ``.safetensors``) on CPU."""
    path = check_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # MASt3R/DUSt3R/CroCo checkpoints pickle an argparse Namespace under 'args': allow it in the safe loader.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            log.warning("%s holds objects beyond tensors (%s); loading it with full unpickling", path,
                        str(exc).splitlines()[0])
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a checkpoint problem
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def find_state_dict(ckpt: Mapping, candidates: tuple[str, ...] = ("model", "state_dict", "model_state_dict", "teacher", "module")) -> dict:
    """Return the tensor mapping inside a checkpoint: ``ckpt`` itself or ``ckpt[k]`` for the first k present."""
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    for key in candidates:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return dict(ckpt[key])
    raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {sorted(ckpt)[:20]})")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only keys starting with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mis_shaped:
        def _fmt(keys: list[str]) -> str:
            shown = ", ".join(keys[:12])
            return f"{len(keys)} [{shown}{', ...' if len(keys) > 12 else ''}]"

        raise CheckpointError(
            f"checkpoint {source} does not match {type(module).__name__}: "
            f"missing keys {_fmt(missing)}; unexpected keys {_fmt(unexpected)}; shape mismatches {_fmt(mis_shaped)}"
        )
    module.load_state_dict(state, strict=True)
