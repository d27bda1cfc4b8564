"""2-D rotary position embedding (RoPE2D) as used by CroCo v2, DUSt3R and MASt3R.

Each attention head of width ``d`` is split into a y half and an x half (first half y); a
1-D rotary embedding of width ``d/2`` is applied to each, driven by the token's integer
patch row (y) and column (x). Within a half of width ``n`` the rotation pairs channel ``i``
with channel ``i + n/2`` ("rotate half" layout) at angle ``pos / base**(2i/n)``.
"""
from __future__ import annotations

import torch


def rope_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """Rotation speeds ``1 / base**(2i/dim)`` for ``i < dim/2``: ``(dim/2,)`` float32."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def patch_positions(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Integer ``(y, x)`` coordinates of a row-major ``h x w`` patch grid: ``(h*w, 2)`` int64."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack((ys.flatten(), xs.flatten()), dim=-1)


def rope_2d_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for :func:`apply_rope_2d`.

    positions: ``(..., N, 2)`` integer ``(y, x)``; returns ``cos, sin`` each ``(..., N, head_dim)``
    float32, laid out as ``[y half | x half]`` with each half's angles repeated twice.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE2D needs a head dimension divisible by 4, got {head_dim}")
    inv_freq = rope_inverse_frequencies(head_dim // 2, base).to(positions.device)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., N, 2, head_dim/4)
    angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # (..., N, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a | b] -> [-b | a]`` along the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``(B, heads, N, head_dim)`` by tables ``(N, head_dim)`` (or broadcastable).

    The y half and the x half are rotated independently; computed in float32, returned in ``x.dtype``.
    """
    xf = x.float()
    y_half, x_half = xf.chunk(2, dim=-1)
    rotated = torch.cat((_rotate_half(y_half), _rotate_half(x_half)), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
