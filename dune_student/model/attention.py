"""Self-attention of the student through xformers or PyTorch SDPA, chosen once per model.

:class:`BackendAttention` is timm's ``Attention`` with the same parameters (``qkv``, ``proj``,
``q_norm``, ``k_norm``, ``norm``) and a ``backend`` attribute, so a model built with it has
exactly timm's state-dict layout. Its forward calls

* ``xformers.ops.memory_efficient_attention(q, k, v)`` with q/k/v laid out ``(B, N, H, Dh)``, or
* ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` with ``(B, H, N, Dh)``.

``auto`` picks xformers when the model lives on a CUDA device and ``import xformers.ops``
works, SDPA otherwise; asking for ``xformers`` where it cannot run is an error, never a silent
fallback.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from ..config import ATTENTION_BACKENDS


@dataclass(frozen=True)
class BackendChoice:
    """The attention backend a model uses and why (for the log)."""

    backend: str  # "xformers" | "sdpa"
    reason: str


@functools.cache
def _import_xformers_ops() -> ModuleType | str:
    """``xformers.ops``, or the reason it cannot be imported."""
    try:
        import xformers.ops
    except Exception as error:  # ImportError, or a broken build failing while it loads
        return f"{type(error).__name__}: {error}"
    return xformers.ops


def xformers_import_error() -> str | None:
    """Why ``import xformers.ops`` fails, or None when it works."""
    result = _import_xformers_ops()
    return result if isinstance(result, str) else None


def resolve_attention_backend(requested: str, device: torch.device | str) -> BackendChoice:
    """Backend for ``requested`` (``auto`` | ``xformers`` | ``sdpa``) on a model living on ``device``."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {requested!r}")
    device = torch.device(device)
    if requested == "sdpa":
        return BackendChoice("sdpa", "requested")
    import_error = xformers_import_error()
    if requested == "xformers":
        problems = []
        if device.type != "cuda":
            problems.append(f"the model is on {device.type}, xformers attention needs a CUDA device")
        if import_error is not None:
            problems.append(f"xformers.ops cannot be imported ({import_error}); "
                            "install it with pip install -e '.[gpu]'")
        if problems:
            raise RuntimeError("attention 'xformers' requested but " + "; ".join(problems)
                               + ". Use --attention sdpa or auto.")
        return BackendChoice("xformers", "requested")
    if device.type != "cuda":
        return BackendChoice("sdpa", f"auto: the model is on {device.type}, not CUDA")
    if import_error is not None:
        return BackendChoice("sdpa", f"auto: xformers unavailable ({import_error})")
    return BackendChoice("xformers", "auto: CUDA device and xformers.ops importable")


class BackendAttention(Attention):
    """timm ``Attention`` (same parameters and names) computed by ``self.backend``.

    ``backend`` is ``"sdpa"`` after construction; :func:`set_attention_backend` changes it.
    Attention masks are not supported (the student attends over all tokens).
    """

    backend: str = "sdpa"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Tokens ``(B, N, D)`` -> ``(B, N, D)``."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("student attention takes no mask and is never causal")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, N, H, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if self.backend == "xformers":
            out = _xformers_attention(q, k, v, dropout)
        else:
            out = _sdpa_attention(q, k, v, dropout)
        out = self.norm(out.reshape(batch, tokens, -1))
        return self.proj_drop(self.proj(out))


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Memory-efficient attention on ``(B, N, H, Dh)`` tensors -> ``(B, N, H, Dh)``."""
    ops = _import_xformers_ops()
    if isinstance(ops, str):
        raise RuntimeError(f"attention backend is 'xformers' but xformers.ops cannot be imported ({ops})")
    return ops.memory_efficient_attention(q, k, v, p=dropout)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """PyTorch SDPA on ``(B, N, H, Dh)`` tensors (transposed to its ``(B, H, N, Dh)``) -> ``(B, N, H, Dh)``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout)
    return out.transpose(1, 2)


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Make every :class:`BackendAttention` inside ``module`` use ``backend``; returns how many."""
    if backend not in ("xformers", "sdpa"):
        raise ValueError(f"a resolved backend is 'xformers' or 'sdpa', got {backend!r}")
    layers = [m for m in module.modules() if isinstance(m, BackendAttention)]
    for layer in layers:
        layer.backend = backend
    return len(layers)
