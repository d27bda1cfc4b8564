"""``pca-int8``: the ``pca`` coefficients stored as int8 codes with one step per token (half the bytes of
``pca``'s float16 coefficients at the same rank). CLS vectors are stored as ``none`` (see :mod:`.pca`)."""
from __future__ import annotations

import torch

from .base import INT8_MISSING, Part, missing_to_nan, per_token_absmax_codes
from .pca import PcaScheme
from .registry import register_scheme


@register_scheme
class PcaInt8Scheme(PcaScheme):
    """Part ``""`` ``(..., r)`` int8 codes ``q = round(c / step)`` of the coefficients ``c = (x − mean) · basisᵀ``;
    part ``_scale`` ``(..., 1)`` float32 ``step = max|c| / 127`` per token. Arrays, calibration and CLS as ``pca``:
    ``basis`` ``(r, D)`` orthonormal rows, ``mean`` ``(D,)``, float32. Decode: ``x = (q·step) · basis + mean``."""

    name = "pca-int8"

    def parts(self) -> tuple[Part, ...]:
        return (Part("", len(self.arrays["basis"]), "int8", INT8_MISSING), Part("_scale", 1, "float32", float("nan")))

    def encode_tensor(self, x):
        codes, step = per_token_absmax_codes(self.coefficients(x))
        return {"": codes, "_scale": step}

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        k = self.constants(q.device)
        c = missing_to_nan(q.float().mul_(parts["_scale"].to(q.device, torch.float32)), q)
        return (c @ k["basis"]).add_(k["mean"])
