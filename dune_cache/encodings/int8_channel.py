"""``int8-channel``: int8 codes ``q`` with a per-channel ``scale``/``offset`` calibrated once per group:
``x = q·scale + offset``."""
from __future__ import annotations

import numpy as np

from .base import INT8_MAX, INT8_MISSING, Part, Scheme, int8_codes, missing_to_nan, token_rows
from .registry import register_scheme


def channel_range(x: np.ndarray, margin: float, sigmas: float) -> dict[str, np.ndarray]:
    """``scale``, ``offset`` ``(D,)`` float32 from features ``x`` ``(n, ..., D)``: ``[min, max]`` widened by
    ``margin·(max − min)`` on each side and to at least ``mean ± sigmas·std`` (see EncodingConfig)."""
    d = x.shape[-1]
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    total, squares, count = np.zeros(d), np.zeros(d), 0
    for rows in token_rows(x):
        lo, hi = np.minimum(lo, rows.min(0)), np.maximum(hi, rows.max(0))
        total, squares, count = total + rows.sum(0), squares + (rows ** 2).sum(0), count + len(rows)
    mean = total / count
    std = np.sqrt(np.clip(squares / count - mean ** 2, 0, None))
    width = hi - lo
    lo, hi = np.minimum(lo - margin * width, mean - sigmas * std), np.maximum(hi + margin * width, mean + sigmas * std)
    scale = (hi - lo) / (2 * INT8_MAX)
    constant = scale <= 0
    scale[constant] = np.abs(lo[constant]) / INT8_MAX  # a constant channel: offset = its value, exact
    typical = np.median(scale[scale > 0]) if (scale > 0).any() else 1.0
    scale[scale <= 0] = typical  # all-zero channel: offset 0, the typical step for later values
    offset = np.round((lo + hi) / 2 / scale) * scale
    return {"scale": scale.astype(np.float32), "offset": offset.astype(np.float32)}


@register_scheme
class Int8ChannelScheme(Scheme):
    """``q = clip(round((x − offset) / scale), −127, 127)``; ``x = q·scale + offset`` (arrays ``scale``,
    ``offset`` ``(D,)`` float32; ``offset`` is a whole number of steps, so 0 is exact when in range)."""

    name = "int8-channel"
    array_keys = ("scale", "offset")
    needs_calibration = True

    @classmethod
    def fit(cls, config, x):
        """:func:`channel_range`, and the fraction of values of the odd-numbered calibration images clipped by a
        range fitted on the even-numbered ones (``heldout_clip_fraction``)."""
        info = {}
        if len(x) >= 2:
            half = channel_range(x[::2], config.margin, config.sigmas)
            codes = (x[1::2].astype(np.float32) - half["offset"]) / half["scale"]
            info["heldout_clip_fraction"] = float((np.abs(codes) > INT8_MAX + 0.5).mean())
        return channel_range(x, config.margin, config.sigmas), info

    @staticmethod
    def describe(info):
        return [f"held-out clip {info['heldout_clip_fraction']:.2g}"] if "heldout_clip_fraction" in info else []

    def parts(self) -> tuple[Part, ...]:
        return (Part("", self.dim, "int8", INT8_MISSING),)

    def encode_tensor(self, x):
        c = self.constants(x.device)
        return {"": int8_codes((x.float() - c["offset"]) / c["scale"])}

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        c = self.constants(q.device)
        return missing_to_nan(q.float().mul_(c["scale"]).add_(c["offset"]), q)
