"""Export the student's encoder as safetensors that ``timm.create_model`` loads.

``export_encoder(student, "enc.safetensors")`` writes

* ``enc.safetensors``: the encoder state dict in timm's ``VisionTransformer`` key layout
  (no projector heads, no final norm: see :mod:`dune_student.model`);
* ``enc.json``: ``{"timm_model", "timm_kwargs", "img_size", "patch_size", "num_registers",
  "mean", "std", "tokens"}``.

Loading without this package::

    meta = json.load(open("enc.json"))
    model = timm.create_model(meta["timm_model"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(file="enc.safetensors", num_classes=0))
    tokens = model.forward_features(x)  # (B, 1 + R + N, D): [CLS, registers, patches]

``file=`` makes timm read the local file (no hub access); ``num_classes=0`` in the overlay keeps
timm's load strict (a classifier-count mismatch would relax it).
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .model import Student

FORMAT = "dune-student-encoder"
TOKEN_LAYOUT = ("forward_features(x): (B, 1 + R + N, D) = [CLS, R registers, N patches row-major], "
                "the last block's output without final norm (the tokens the projectors were trained on)")


def sidecar_path(path: str | Path) -> Path:
    """The JSON next to an exported ``.safetensors`` file."""
    return Path(path).with_suffix(".json")


def export_encoder(student: Student, path: str | Path) -> Path:
    """Write ``student.vit``'s state dict to ``path`` (``.safetensors``) plus the sidecar JSON; returns ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors (timm picks the loader by suffix): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in student.vit.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT})
    sidecar = {
        "format": FORMAT,
        "dune_student_version": __version__,
        "timm_model": student.timm_model_name,
        "timm_kwargs": student.timm_kwargs,
        "img_size": student.cfg.img_size,
        "patch_size": student.patch_size,
        "num_registers": student.num_registers,
        "mean": list(student.mean),
        "std": list(student.std),
        "tokens": TOKEN_LAYOUT,
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON of an exported encoder."""
    sidecar = json.loads(sidecar_path(path).read_text())
    if sidecar.get("format") != FORMAT:
        raise ValueError(f"{sidecar_path(path)} is not a {FORMAT} sidecar")
    return sidecar


def load_exported(path: str | Path) -> nn.Module:
    """The exported encoder as a plain timm ``VisionTransformer``, weights read from the local file only."""
    sidecar = read_sidecar(path)
    size = sidecar["img_size"]
    overlay = dict(file=str(path), num_classes=0, mean=tuple(sidecar["mean"]), std=tuple(sidecar["std"]),
                   input_size=(3, size, size), crop_pct=1.0)
    return timm.create_model(sidecar["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay,
                             **sidecar["timm_kwargs"])
