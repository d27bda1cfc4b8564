"""Export the student's encoder as safetensors that ``timm.create_model`` loads.

``export_encoder(student, "enc.safetensors")`` writes

* ``enc.safetensors``: the encoder state dict in timm's ``VisionTransformer`` key layout
  (no projector heads, no final norm: see :mod:`dune_student.model.student`);
* ``enc.json``: ``{"timm_model", "timm_kwargs", "img_size", "patch_size", "num_registers",
  "mean", "std", "tokens"}``.

Loading without this package::

    meta = json.load(open("enc.json"))
    model = timm.create_model(meta["timm_model"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(file="enc.safetensors", num_classes=0))
    tokens = model.forward_features(x)  # (B, 1 + R + N, D): [CLS, registers, patches]

``file=`` makes timm read the local file (no hub access); ``num_classes=0`` in the overlay keeps
timm's load strict (a classifier-count mismatch would relax it).

SAK students (``heads.kind=sak``, :func:`export_sak`) add ``enc.sak.safetensors`` — every teacher's adapter path
and aligners under ``paths.<teacher>.``, every task's routers under ``routers.<task>.<level>.`` — and a ``sak``
section in ``enc.json`` (teachers and dims, levels, adapter reduction, tasks, router settings). The stem file stays
a plain timm encoder; :func:`load_exported` then returns a :class:`SAKBackbone` (layout: docs/training.md, "SAK").
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from .router import TaskRouters
from .sak import SAKProjector
from .student import Student, run_stem

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


def sak_weights_path(path: str | Path) -> Path:
    """The adapter-path and router weights next to an exported stem ``x.safetensors``: ``x.sak.safetensors``."""
    return Path(path).with_suffix(".sak.safetensors")


def export_sak(student: Student, projectors: nn.ModuleDict, path: str | Path,
               routers: TaskRouters | None = None) -> Path:
    """Export a SAK student: the stem as :func:`export_encoder` does, its teacher paths (``projectors``: teacher ->
    :class:`~dune_student.model.sak.SAKProjector`) and, if given, its task routers; returns ``path``."""
    path = export_encoder(student, path)
    first = next(iter(projectors.values()))
    state = {f"paths.{t}.{k}": v for t, projector in projectors.items() for k, v in projector.state_dict().items()}
    if routers is not None:
        state.update({f"routers.{k}": v for k, v in routers.routers.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(sak_weights_path(path)),
              metadata={"format": FORMAT})
    some_router = next(iter(routers.routers.values()))[0] if routers is not None else None
    sidecar = read_sidecar(path)
    sidecar["sak"] = {
        "teachers": {t: projector.aligners[0].out_features for t, projector in projectors.items()},
        "levels": first.levels, "reduction": first.reduction,
        "tasks": routers.tasks if routers is not None else [],
        "router_pooling": some_router.pooling if some_router else None,
        "router_noisy_gating": some_router.noisy_gating if some_router else None,
        "weights": sak_weights_path(path).name,
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
    """The exported encoder as a plain timm ``VisionTransformer``, weights read from the local file only; a SAK
    export as a :class:`SAKBackbone` around it."""
    sidecar = read_sidecar(path)
    size = sidecar["img_size"]
    overlay = dict(file=str(path), num_classes=0, mean=tuple(sidecar["mean"]), std=tuple(sidecar["std"]),
                   input_size=(3, size, size), crop_pct=1.0)
    vit = timm.create_model(sidecar["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay,
                            **sidecar["timm_kwargs"])
    return load_sak(vit, sidecar, sak_weights_path(path)) if "sak" in sidecar else vit


def load_sak(vit: nn.Module, sidecar: dict, weights: Path) -> "SAKBackbone":
    """Rebuild the paths and routers a SAK sidecar describes and load their weights strictly."""
    sak, dim = sidecar["sak"], sidecar["timm_kwargs"]["embed_dim"]
    projectors = nn.ModuleDict({t: SAKProjector(dim, sidecar["num_registers"], out_dim, sak["levels"], sak["reduction"])
                                for t, out_dim in sak["teachers"].items()})
    routers = (TaskRouters(sak["tasks"], len(sak["levels"]), dim, len(projectors), sak["router_pooling"],
                           sak["router_noisy_gating"]) if sak["tasks"] else None)
    backbone = SAKBackbone(vit, projectors, sidecar["num_registers"], sidecar["patch_size"], routers)
    prefixes = {"paths": "projectors.", "routers": "routers.routers."}  # file key prefix -> SAKBackbone's
    state = {prefixes[k.split(".", 1)[0]] + k.split(".", 1)[1]: v for k, v in load_file(str(weights)).items()}
    backbone.load_state_dict({**{f"vit.{k}": v for k, v in vit.state_dict().items()}, **state}, strict=True)
    return backbone.eval()


class SAKBackbone(nn.Module):
    """A SAK student for downstream use: stem (timm ViT), teacher paths and optional per-task routers.

    ``forward(pixels)``: ImageNet-normalised ``(B, 3, H, W)`` -> with routers, task -> per level routed features
    ``(B, h, w, D)``; without, ``"stem"`` and each teacher -> per level ``(B, h, w, D)`` (the stem's block output;
    a path's normalised tokens). :meth:`route` also returns the routers' weights ``(B, h, w, 1 + T)``.
    """

    def __init__(self, vit: nn.Module, projectors: nn.ModuleDict, num_registers: int, patch_size: int,
                 routers: TaskRouters | None = None):
        super().__init__()
        self.vit, self.projectors, self.routers = vit, projectors, routers
        self.num_registers, self.patch_size = num_registers, patch_size
        self.levels = next(iter(projectors.values())).levels

    def representations(self, pixels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``"stem"`` and each teacher -> per level patch features ``(B, h, w, D)``."""
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        out = run_stem(self.vit, pixels, self.num_registers, grid, return_blocks=True)
        start = 1 + self.num_registers
        as_grid = lambda tokens: tokens[:, start:].reshape(len(tokens), *grid, tokens.shape[-1])  # noqa: E731
        result = {"stem": [as_grid(out.blocks[level]) for level in self.levels]}
        for teacher, projector in self.projectors.items():
            result[teacher] = [as_grid(tokens) for tokens in projector.path_tokens(out)]
        return result

    def route(self, pixels: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """task -> per level (routed ``(B, h, w, D)``, weights ``(B, h, w, 1 + T)``, experts: stem then teachers)."""
        if self.routers is None:
            raise ValueError("this SAK export has no routers (train them with `dune-student route`)")
        reps = self.representations(pixels)
        paths = [[reps[t][k] for t in self.projectors] for k in range(len(self.levels))]
        return self.routers(reps["stem"], paths)

    def forward(self, pixels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if self.routers is None:
            return self.representations(pixels)
        return {task: [routed for routed, _ in levels] for task, levels in self.route(pixels).items()}
