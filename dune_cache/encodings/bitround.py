"""``bitround``: the storage dtype with the mantissa rounded to ``keepbits`` bits (7 = bfloat16's precision); a
plain float array, read as is. The zero low bits compress."""
from __future__ import annotations

import torch

from ..errors import EncodingError
from .base import MANTISSA_BITS, Scheme, storage_tensor
from .registry import register_scheme


@register_scheme
class BitRoundScheme(Scheme):
    """Mantissa rounded to ``keepbits`` bits, round to nearest even (as numcodecs' BitRound); a value that
    would round past the dtype's largest finite value is truncated instead."""

    name = "bitround"
    passthrough = True

    def __init__(self, dim, dtype, config, arrays=None, info=None):
        super().__init__(dim, dtype, config, arrays, info)
        if config.keepbits >= MANTISSA_BITS[dtype]:
            raise EncodingError(f"bitround keepbits {config.keepbits}: {dtype} has {MANTISSA_BITS[dtype]} mantissa "
                                f"bits; keep fewer (7 = bfloat16 level)")
        self.keepbits = config.keepbits

    def encode_tensor(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stored = storage_tensor(x, self.dtype)
        bits = stored.view(SAME_WIDTH_INT[stored.dtype]).to(torch.int64) & ((1 << 8 * stored.element_size()) - 1)
        drop = MANTISSA_BITS[self.dtype] - self.keepbits
        mask = ~((1 << drop) - 1) & ((1 << 8 * stored.element_size()) - 1)
        half = (1 << (drop - 1)) - 1
        rounded = from_bits((bits + half + ((bits >> drop) & 1)) & mask, stored.dtype)
        overflow = ~torch.isfinite(rounded) & torch.isfinite(stored)
        return {"": torch.where(overflow, from_bits(bits & mask, stored.dtype), rounded)}


SAME_WIDTH_INT = {torch.float16: torch.int16, torch.float32: torch.int32}  # same width, to reinterpret the bits


def from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 ``bits`` (the unsigned bit patterns, possibly one past the width) -> floats of ``dtype`` with those low
    bits (two's complement wrap to the signed integer type of the same width, then reinterpreted)."""
    width = 8 * torch.empty((), dtype=dtype).element_size()
    signed = ((bits & ((1 << width) - 1)) ^ (1 << (width - 1))) - (1 << (width - 1))
    return signed.to(SAME_WIDTH_INT[dtype]).view(dtype)
