"""Any timm ViT-style model as a teacher: ``timm:<model_name>`` plus the :class:`TimmViTTeacher` base.

``timm:<model_name>`` (``model_name`` may carry a pretrained tag, ``vit_base_patch16_224.augreg_in21k``,
which selects the mean/std and native resolution of that tag's ``pretrained_cfg``) builds
``timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)`` and
loads a local checkpoint in timm's own key layout, strictly. The state dict may be the file
itself or nested under ``model``/``state_dict``/... (see :func:`find_state_dict`). Classifier
weights (the keys under ``pretrained_cfg["classifier"]``, e.g. ``head.*``, ``head_dist.*``) are
dropped: the teacher has no classifier (``num_classes=0``), so a classification checkpoint loads
as is. Every other key must match exactly.

"ViT-style" means a ``patch_embed``, prefix tokens (``num_prefix_tokens``) and support for
``dynamic_img_size`` (any input that is a multiple of the patch size; absolute position
embeddings are resampled by timm, bicubic). CNNs and hierarchical models (Swin) are refused.

Outputs follow the model's own head: patch tokens are ``forward_features`` (after ``model.norm``
if it has one); the CLS target is the class token or, for average-pool models
(``global_pool="avg"``: MAE-style fine-tunes such as dBOT-ft, EVA-02), the model's pooled pre-logits feature
``fc_norm(mean of patch tokens)``; models without a class token use the mean of patch tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import timm
import torch
from torch import nn

from .base import Teacher, TeacherOutput, find_state_dict, load_state_dict_strict, read_checkpoint, tokens_to_output
from .spec import TeacherSpec

StateConverter = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def create_timm_vit(model_name: str, *, skip_init: bool = False, **kwargs) -> nn.Module:
    """timm ViT ``model_name`` without classifier, accepting any multiple of its patch size.

    ``skip_init=True`` allocates the weights without random initialisation (seconds saved for a
    ViT-B/L) when every tensor is about to be loaded from a checkpoint; models holding computed,
    non-checkpointed buffers (e.g. RoPE tables) are still initialised normally.
    Raises ``ValueError`` for unknown names and for models that are not ViT-style.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
    options = {"pretrained": False, "num_classes": 0, "dynamic_img_size": True, **kwargs}
    try:
        model = timm.create_model(model_name, device="meta", **options)
    except TypeError as exc:  # the constructor has no dynamic_img_size: CNNs, NaFlexViT, ...
        raise ValueError(f"timm model {model_name!r} is not a ViT-style model with dynamic_img_size: {exc}") from exc
    missing = [a for a in ("patch_embed", "num_prefix_tokens") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"timm model {model_name!r} ({type(model).__name__}) is not a ViT-style model: "
                         f"no {', '.join(missing)}")
    patch_size = tuple(model.patch_embed.patch_size)
    if patch_size[0] != patch_size[1]:
        raise ValueError(f"timm model {model_name!r} has non-square patches {patch_size}")
    if skip_init and not _has_computed_buffers(model):
        return model.to_empty(device="cpu")
    return timm.create_model(model_name, **options)


def _has_computed_buffers(model: nn.Module) -> bool:
    """Whether the model has buffers that a checkpoint does not hold (non-persistent ones)."""
    return bool({name for name, _ in model.named_buffers()} - set(model.state_dict()))


def has_class_token(model: nn.Module) -> bool:
    """Whether the model prepends a learned class token (``VisionTransformer``: attribute; ``Eva``: ``cls_token``)."""
    if hasattr(model, "has_class_token"):
        return bool(model.has_class_token)
    return getattr(model, "cls_token", None) is not None


def num_register_tokens(model: nn.Module) -> int:
    """Number of register tokens (``num_reg_tokens``, else the length of ``reg_token``)."""
    if getattr(model, "num_reg_tokens", None) is not None:
        return int(model.num_reg_tokens)
    reg_token = getattr(model, "reg_token", None)
    return 0 if reg_token is None else int(reg_token.shape[1])


def pools_by_average(model: nn.Module) -> bool:
    """Whether the model's own image feature is the (fc-normed) mean of its patch tokens."""
    return getattr(model, "global_pool", "") == "avg"


def has_final_norm(model: nn.Module) -> bool:
    """Whether ``forward_features`` applies a final norm (average-pool models move it to ``fc_norm``)."""
    return not isinstance(getattr(model, "norm", nn.Identity()), nn.Identity)


def cls_description(model: nn.Module) -> str:
    """What the CLS target of :class:`TimmViTTeacher` is for this model, in words."""
    if pools_by_average(model):
        return "CLS = the model's pooled feature fc_norm(mean of patch tokens)"
    return "CLS = class token" if has_class_token(model) else "CLS = mean of patch tokens (no class token)"


def spec_from_timm_model(name: str, model: nn.Module, description: str = "") -> TeacherSpec:
    """The :class:`TeacherSpec` of a model made by :func:`create_timm_vit`, read off the model and its
    ``pretrained_cfg``."""
    cfg = model.pretrained_cfg
    uses_class_token = has_class_token(model) and not pools_by_average(model)
    return TeacherSpec(
        name=name,
        arch=cfg.get("architecture", type(model).__name__),
        patch_size=int(model.patch_embed.patch_size[0]),
        embed_dim=int(model.embed_dim),
        num_registers=num_register_tokens(model),
        cls_source="token" if uses_class_token else "mean_patch",
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        native_resolution=tuple(int(v) for v in cfg["input_size"][1:]),
        final_norm=has_final_norm(model),
        description=description,
    )


def drop_classifier(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the classifier keys named by ``model.pretrained_cfg["classifier"]`` (``head.*`` ...)."""
    classifier = model.pretrained_cfg.get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    prefixes = tuple(f"{n}." for n in names)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


class TimmViTTeacher(Teacher):
    """A timm ViT-style model (see :func:`create_timm_vit`) as a teacher.

    ``forward_features`` gives tokens ``(B, P + h*w, D)`` with prefix ``P = [CLS?, extra?, registers...]``.
    """

    def __init__(self, spec: TeacherSpec, model: nn.Module):
        super().__init__(spec)
        self.model = model
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_registers = num_register_tokens(model)
        self.token_split = "token" if has_class_token(model) else "mean_patch"
        self.pooled_cls = pools_by_average(model)
        if isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential)):
            # a block's CLS is the class token when there is one, also for average-pool models
            self.level_layout = (self.num_prefix_tokens, self.num_registers, self.token_split)

    def block_modules(self) -> nn.Module | None:
        """The model's ``blocks`` (``VisionTransformer``, ``Eva``, ...): each block's output is the residual
        stream before the final ``norm``; ``None`` for a model without a ``blocks`` list."""
        return self.model.blocks if self.level_layout is not None else None

    def load_checkpoint(self, path: Path, convert: StateConverter = dict, layout: str = "timm") -> None:
        """Load ``path`` strictly: its state dict, converted to timm names by ``convert``, classifier dropped.

        ``convert`` maps an upstream layout to timm names (default: already timm's). Raises :class:`CheckpointError`
        naming missing, unexpected and mis-shaped keys (timm names).
        """
        state = convert(find_state_dict(read_checkpoint(path)))
        source = f"{path} ({layout} layout, compared in timm names)"
        load_state_dict_strict(self.model, drop_classifier(state, self.model), source)

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        p = self.spec.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = self.model.forward_features(x)
        out = tokens_to_output(tokens, self.num_prefix_tokens, self.num_registers, grid, self.token_split)
        if self.pooled_cls:
            out.cls = self.model.forward_head(tokens, pre_logits=True)
        return out


def timm_teacher(model_name: str, checkpoint: Path | None) -> TimmViTTeacher:
    """``timm:<model_name>``: spec derived from the model; ``checkpoint`` in timm layout (None: random weights)."""
    model = create_timm_vit(model_name, skip_init=checkpoint is not None)
    description = (f"timm {model_name} ({type(model).__name__}), checkpoint in timm layout; {cls_description(model)}; "
                   f"patch tokens {'after' if has_final_norm(model) else 'without'} a final norm.")
    teacher = TimmViTTeacher(spec_from_timm_model(f"timm:{model_name}", model, description), model)
    if checkpoint is not None:
        teacher.load_checkpoint(checkpoint)
    return teacher
