"""``bitround``: the storage dtype with the mantissa rounded to ``keepbits`` bits (7 = bfloat16's precision); a
plain float array, read as is. The zero low bits compress."""
from __future__ import annotations

import numpy as np

from ..errors import EncodingError
from .base import MANTISSA_BITS, Scheme, to_storage
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

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        stored = to_storage(x, self.dtype)
        uint = np.dtype(f"uint{8 * stored.itemsize}")
        bits = stored.view(uint)
        drop = MANTISSA_BITS[self.dtype] - self.keepbits
        mask = uint.type(~((1 << drop) - 1) & int(np.iinfo(uint).max))
        half = uint.type((1 << (drop - 1)) - 1)
        rounded = ((bits + half + ((bits >> uint.type(drop)) & uint.type(1))) & mask).view(stored.dtype)
        overflow = ~np.isfinite(rounded) & np.isfinite(stored)
        return {"": np.where(overflow, (bits & mask).view(stored.dtype), rounded)}
