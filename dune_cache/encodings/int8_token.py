"""``int8-token``: per token, int8 codes of the normal channels with one scale (absmax / 127), and the
massive-activation channels found at calibration kept in the storage dtype."""
from __future__ import annotations

import numpy as np
import torch

from .base import INT8_MISSING, Part, Scheme, missing_to_nan, per_token_absmax_codes, storage_tensor, token_rows
from .registry import register_scheme


@register_scheme
class Int8TokenScheme(Scheme):
    """Per token: normal channels ``q = round(x / s)``, ``s = max|x_normal| / 127`` (part ``_scale``
    ``(..., 1)`` float32); the massive-activation channels (array ``outlier_channels`` ``(k,)`` int32) have
    code 0 and their values in part ``_outliers`` ``(..., k)`` (storage dtype; absent when ``k = 0``)."""

    name = "int8-token"
    array_keys = ("outlier_channels",)
    needs_calibration = True

    @property
    def channels(self) -> np.ndarray:
        return self.arrays["outlier_channels"]

    @classmethod
    def fit(cls, config, x):
        """Outlier channels: calibration absmax above ``outlier_ratio`` × the median channel's."""
        absmax = np.zeros(x.shape[-1])
        for rows in token_rows(x):
            absmax = np.maximum(absmax, np.abs(rows).max(0))
        reference = float(np.median(absmax[absmax > 0])) if (absmax > 0).any() else 0.0
        channels = np.flatnonzero(absmax > config.outlier_ratio * reference) if reference else np.zeros(0, np.int64)
        info = {"outlier_channels": channels.tolist(),
                "max_channel_ratio": float(absmax.max() / reference) if reference else 0.0}
        return {"outlier_channels": channels.astype(np.int32)}, info

    @staticmethod
    def describe(info):
        return [f"{len(info['outlier_channels'])} outlier channels"] if "outlier_channels" in info else []

    def parts(self) -> tuple[Part, ...]:
        parts = [Part("", self.dim, "int8", INT8_MISSING), Part("_scale", 1, "float32", float("nan"))]
        if len(self.channels):
            parts.append(Part("_outliers", len(self.channels), self.dtype, float("nan")))
        return tuple(parts)

    def encode_tensor(self, x):
        x = x.float()
        parts = {}
        if len(self.channels):
            channels = self.constants(x.device)["outlier_channels"].long()
            parts["_outliers"] = storage_tensor(x.index_select(-1, channels), self.dtype)
            x = x.index_fill(-1, channels, 0.0)
        codes, scale = per_token_absmax_codes(x)
        return {"": codes, "_scale": scale, **parts}

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        x = q.float().mul_(parts["_scale"].to(q.device, torch.float32))
        if len(self.channels):
            channels = self.constants(q.device)["outlier_channels"].long()
            x.index_copy_(-1, channels, parts["_outliers"].to(q.device, torch.float32))
        return missing_to_nan(x, q)
