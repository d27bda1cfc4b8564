"""What every teacher is: a frozen encoder with a declared geometry.

A teacher takes uint8 pixels ``(B, 3, H, W)`` (H, W multiples of its patch size),
normalises them itself and returns :class:`TeacherOutput`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import NO_BLOCKS
from .checkpoint_files import hf_weight_files
from .checkpoint_io import load_torch_file, read_safetensors
from .spec import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec, check_checkpoint_file  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    """Tokens of one batch.

    cls: ``(B, D)``; registers: ``(B, R, D)`` (R may be 0); patch: ``(B, h, w, D)``.
    levels: block ``k`` -> (cls ``(B, D)``, patch ``(B, h, w, D)``) of the blocks asked for
    (:meth:`Teacher.forward` ``blocks``; see :meth:`Teacher.level_tokens`), empty by default.
    """

    cls: torch.Tensor
    registers: torch.Tensor
    patch: torch.Tensor
    levels: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Teacher(nn.Module):
    """Base class: subclasses set ``spec`` and implement :meth:`forward_tokens`.

    Intermediate blocks (``--blocks``) are opt-in: a teacher that returns its transformer blocks from
    :meth:`block_modules` and sets ``level_layout`` gets the tokens each chosen block outputs (captured
    by forward hooks, before any final norm) split like its final tokens (:meth:`level_tokens`).
    """

    spec: TeacherSpec
    # (prefix tokens, registers among them, CLS source "token" | "mean_patch") of a block's output tokens
    level_layout: tuple[int, int, str] | None = None
    # the layout of the checkpoint the weights came from (provenance checkpoint.format): "release" (the upstream
    # project's own file), "timm" or "hf" (transformers); the families reading several layouts set it on load
    checkpoint_format: str = "release"

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

    def block_modules(self) -> nn.Module | None:
        """The transformer blocks in the order they run (``nn.ModuleList``/``nn.Sequential``; block ``k`` is
        ``block_modules()[k]``), or ``None`` for a teacher that does not expose them (no ``--blocks``)."""
        return None

    @property
    def depth(self) -> int | None:
        """Number of blocks :meth:`block_modules` exposes (``None``: none, ``--blocks`` is refused)."""
        blocks = self.block_modules()
        return None if blocks is None or self.level_layout is None else len(blocks)

    @property
    def named_blocks(self) -> dict[str, tuple[int, ...]]:
        """The teacher's own ``--blocks`` choices by name, besides ``sak`` (e.g. Depth Anything V2's ``dpt``)."""
        return {}

    @property
    def no_blocks_reason(self) -> str:
        """Why ``--blocks`` is refused when :attr:`depth` is ``None`` (the error's second half)."""
        return NO_BLOCKS

    def level_description(self) -> str:
        """What a level's tokens are, for provenance ``levels.tokens``."""
        token = self.level_layout is not None and self.level_layout[2] == "token"
        cls = "the class token" if token else "the mean of the patch tokens"
        return (f"output tokens of block k (0-based, of {self.depth}) of {self.spec.name}, before the final norm "
                f"(none applied), registers dropped; CLS = {cls} of that block's output")

    def level_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's output tokens ``(B, P + h*w, D)`` -> cls ``(B, D)``, patch ``(B, h, w, D)``. Blocks that
        output a grid ``(B, h, w, D)`` (e.g. SAM's windowed ViT) have no prefix: CLS is their mean."""
        num_prefix, num_registers, cls_source = self.level_layout
        if tokens.dim() == 4:
            return tokens.mean(dim=(1, 2)), tokens
        out = tokens_to_output(tokens, num_prefix, num_registers, grid, cls_source)
        return out.cls, out.patch

    def forward(self, pixels: torch.Tensor, blocks: tuple[int, ...] = ()) -> TeacherOutput:
        """uint8 pixels ``(B, 3, H, W)`` -> tokens; H and W must be multiples of the patch size. ``blocks``:
        0-based blocks whose outputs also come back, in ``TeacherOutput.levels``."""
        p = self.spec.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(
                f"teacher {self.spec.name}: input {tuple(pixels.shape[-2:])} is not a multiple of patch size {p}"
            )
        if not blocks:
            return self.forward_tokens(self.normalize(pixels))
        captured = self.capture_blocks(blocks)
        try:
            out = self.forward_tokens(self.normalize(pixels))
        finally:
            for hook in captured.pop("hooks"):
                hook.remove()
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        out.levels = {k: self.level_tokens(captured[k], grid) for k in blocks}
        return out

    def weights_sha256(self) -> str:
        """sha256 over every tensor the teacher computes with (parameters and buffers, persistent or not, e.g. the
        release's DINOv3 RoPE periods), by name in sorted order: ``name``, dtype, shape, then the values as
        little-endian float32 (other dtypes as they are). Equal digests = the same model whatever file it came from."""
        digest = hashlib.sha256()
        tensors = dict(self.named_buffers())
        tensors.update(self.named_parameters())
        for name in sorted(tensors):
            tensor = tensors[name].detach().cpu()
            tensor = tensor.float() if tensor.is_floating_point() else tensor
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy())
        return digest.hexdigest()

    def checkpoint_identity(self) -> tuple[str, str]:
        """``(checkpoint_format, weights_sha256)``: what provenance records of the loaded weights."""
        return self.checkpoint_format, self.weights_sha256()

    def capture_blocks(self, blocks: tuple[int, ...]) -> dict:
        """Forward hooks keeping the output of each of ``blocks`` in the returned dict (key: block; ``"hooks"``:
        the handles to remove); a ``ValueError`` for a teacher without blocks or an index past its depth."""
        depth = self.depth
        if depth is None:
            raise ValueError(f"teacher {self.spec.name} does not support --blocks: {self.no_blocks_reason}")
        if any(not 0 <= k < depth for k in blocks):
            raise ValueError(f"teacher {self.spec.name} has {depth} blocks (0..{depth - 1}); asked for {list(blocks)}")
        captured: dict = {}
        modules = self.block_modules()

        def keep(block: int, _module, _inputs, output) -> None:
            captured[block] = output

        captured["hooks"] = [modules[k].register_forward_hook(functools.partial(keep, k)) for k in blocks]
        return captured


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
    """Load a checkpoint file, or a Hugging Face model folder (its safetensors, :func:`read_safetensors_folder`), on
    CPU without executing anything it holds (:mod:`.checkpoint_io`): ``.safetensors`` (a ``convert-checkpoint`` file
    comes back as the structure it was converted from), anything else through ``torch.load(weights_only=True)`` with
    the plain types release files hold. A file that needs more is a :class:`CheckpointError` naming what it holds and
    ``dune-cache convert-checkpoint``."""
    path = check_checkpoint_file(path)
    if path.is_dir():
        return read_safetensors_folder(path)
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        return load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a checkpoint problem
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model folder: ``model.safetensors``, or every shard its index lists (a tensor
    in two shards is an error naming both)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in hf_weight_files(folder):
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - any reader failure is a checkpoint problem
            raise CheckpointError(f"cannot read checkpoint {file}: {exc}") from exc
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise CheckpointError(f"checkpoint {folder}: tensor {twice[0]} is in both {origin[twice[0]].name} and "
                                  f"{file.name}; a shard index must name each tensor once")
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return state


def find_state_dict(ckpt: Mapping,
                    candidates: tuple[str, ...] = ("model", "state_dict", "model_state_dict", "teacher", "module"),
                    ) -> dict:
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
    """``module.load_state_dict(state, strict=True)`` with an error that lists missing, unexpected and mis-shaped
    keys."""
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
