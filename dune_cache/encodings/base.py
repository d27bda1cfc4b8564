"""What every scheme shares: the stored :class:`Part`, the :class:`Scheme` interface, storage casts and the
calibration helpers.

A scheme stores features ``(..., D)`` of one kind as parts ``(..., last)`` sharing the features' leading axes
(image, view, grid), so every part follows the feature arrays' chunk and shard layout, is written with its image
and is cut alike by a crop of the token grid. Encoding and decoding run in torch on any device
(:meth:`Scheme.encode_tensor`: extraction encodes a batch on its GPU before the copy to the host;
:meth:`Scheme.decode`: the trainer decodes on its GPU); :meth:`Scheme.encode` is the same on numpy arrays
(``recompress``, calibration). int8 codes lie in ``[-127, 127]``; ``-128`` is the fill value of unwritten
chunks and decodes to NaN, as float parts' NaN fill does, so the reader's damage check catches a lost chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..config import EncodingConfig
from ..errors import EncodingError

KINDS = ("cls", "patch")
INT8_MISSING = -128  # fill value of int8 codes: a chunk never written
INT8_MAX = 127
MANTISSA_BITS = {"float16": 10, "float32": 23}
CHUNK_TOKENS = 1 << 15  # tokens per step when calibration statistics are accumulated


def calibration_indices(count: int, wanted: int) -> np.ndarray:
    """``min(wanted, count)`` indices spread evenly over ``range(count)``, first and last included."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, count - 1, min(wanted, count)).round().astype(np.int64))


@dataclass(frozen=True)
class Part:
    """One stored array of an encoded feature array ``<name>``: ``<name><suffix>``, ``dtype``, ``fill`` (the
    value of a chunk never written). A per-token part (``rows == 0``) has the features' shape with ``last``
    channels, ``(..., last)``; a per-image part (``rows > 0``, patch arrays only) replaces the token grid by
    ``rows``: ``(image[, view], rows, last)``, one chunk per image (and view) like the features."""

    suffix: str
    last: int
    dtype: str
    fill: float | int
    rows: int = 0

    @property
    def per_image(self) -> bool:
        return self.rows > 0

    def stored_shape(self, lead: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of this part of features ``(*lead, *grid, D)`` (``grid``: ``(h, w)`` for patch tokens, ``()``
        for CLS): ``(*lead, *grid, last)`` per token, ``(*lead, rows, last)`` per image."""
        return (*lead, self.rows, self.last) if self.per_image else (*lead, *grid, self.last)


def storage_tensor(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` cast to the float storage ``dtype`` (values beyond its range become inf: :func:`check_range` finds them
    on the host, after the copy, so that the device never waits)."""
    return x.to(getattr(torch, dtype))


def check_range(parts: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """``parts`` as they are, or an :class:`EncodingError` when a float part holds an infinity: a value beyond the
    storage ``dtype``'s range (encoded features are finite: extraction refuses non-finite ones before)."""
    for suffix, values in parts.items():
        if values.dtype.kind == "f" and np.isinf(values).any():
            raise EncodingError(f"encoded values (part {suffix!r}) go beyond {dtype}'s range; use --dtype float32")
    return parts


def token_rows(x: np.ndarray) -> Iterator[np.ndarray]:
    """``(n, ..., D)`` -> float64 chunks ``(m, D)`` of at most :data:`CHUNK_TOKENS` tokens."""
    flat = x.reshape(-1, x.shape[-1])
    for start in range(0, len(flat), CHUNK_TOKENS):
        yield flat[start:start + CHUNK_TOKENS].astype(np.float64)


def token_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine of each vector of ``x`` ``(..., D)`` with the same vector of ``y``, flattened ``(N,)`` float64 (1 where
    both are zero)."""
    a, b = x.reshape(-1, x.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64)
    dot, norms = (a * b).sum(1), np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


def int8_codes(x: torch.Tensor) -> torch.Tensor:
    """float ``x`` already divided by its step -> int8 codes rounded to nearest (half to even), clipped to
    ``[-127, 127]``."""
    return x.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def divided(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x / step`` where ``step > 0``, 0 elsewhere (``step`` broadcasts against ``x``)."""
    positive = step > 0
    return torch.where(positive, x / torch.where(positive, step, torch.ones_like(step)), torch.zeros_like(x))


def per_token_absmax_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(..., C)`` -> int8 codes ``(..., C)`` and float32 step ``(..., 1)`` = ``max|x| / 127`` per token
    (0 for an all-zero token, whose codes are 0)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    return int8_codes(divided(x, scale)), scale


def missing_to_nan(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``values`` with NaN where the int8 ``codes`` (same shape) hold :data:`INT8_MISSING` (an unwritten chunk)."""
    return values.masked_fill_(codes == INT8_MISSING, torch.nan)


class Scheme:
    """How features ``(..., D)`` of one kind are stored: :meth:`parts` to create, :meth:`encode` (numpy),
    :meth:`decode` (torch). ``arrays``: calibration arrays (stored as ``encoding/<kind>_<key>``, keys
    :attr:`array_keys`); ``info``: calibration diagnostics recorded in provenance.

    A scheme that needs calibration implements :meth:`fit`; :attr:`cls_scheme` names the scheme that stores
    CLS vectors instead (``None``: this one), :attr:`passthrough` marks stored values that are the features."""

    name = ""
    array_keys: tuple[str, ...] = ()
    needs_calibration = False
    passthrough = False
    identity = False  # stored values are the features in the storage dtype, bit for bit (``none``)
    cls_scheme: str | None = None

    def __init__(self, dim: int, dtype: str, config: EncodingConfig, arrays: dict[str, np.ndarray] | None = None,
                 info: dict | None = None):
        self.dim, self.dtype, self.config = dim, dtype, config
        self.arrays = arrays or {}
        self.info = info or {}
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def fit(cls, config: EncodingConfig, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
        """Calibration arrays and diagnostics from float features ``x`` ``(n, ..., D)``."""
        return {}, {}

    @staticmethod
    def describe(info: dict) -> list[str]:
        """Calibration facts worth a word in ``dune-cache info`` (besides the scheme and relative error)."""
        return []

    def parts(self) -> tuple[Part, ...]:
        return (Part("", self.dim, self.dtype, float("nan")),)

    def encode_tensor(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float ``(..., D)`` on any device -> ``{suffix: stored values}`` there, without waiting for the device
        (float parts beyond the storage dtype's range come out as inf: see :meth:`encode`, :func:`check_range`)."""
        return {"": storage_tensor(x, self.dtype)}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`encode_tensor` on numpy arrays (on the CPU), with values beyond the storage dtype's range refused.
        Features already in the storage dtype pass through a plain scheme as they are (no pass over them)."""
        if self.identity and x.dtype == np.dtype(self.dtype):
            return {"": x}
        tensor = torch.from_numpy(np.ascontiguousarray(x))
        return check_range({k: v.numpy() for k, v in self.encode_tensor(tensor).items()}, self.dtype)

    def decode(self, parts: dict[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        """``{suffix: (..., last)}`` stored values -> float32 ``(..., D)`` on ``device`` (default: the parts')."""
        return parts[""].to(device, torch.float32)

    def decode_numpy(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`decode` on the CPU, numpy in and out."""
        return self.decode({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in parts.items()}).numpy()

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The calibration arrays as tensors on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in self.arrays.items()}
        return self._on_device[key]

    def fidelity(self, x: np.ndarray) -> dict[str, float]:
        """Round trip of the calibration features ``x`` ``(n, ..., D)``: ``relative_error``
        ``‖decode(encode(x)) − x‖ / ‖x‖``, and the cosine of each vector with its decoded self: mean and 0.1%
        quantile (``token_cosine_mean``, ``token_cosine_p001``; the tail is what a dense student learns from)."""
        err = norm = 0.0
        cosines = []
        for start in range(0, len(x), 16):
            block = x[start:start + 16].astype(np.float32)
            back = self.decode_numpy(self.encode(block)).astype(np.float64)
            err += float(((back - block) ** 2).sum())
            norm += float((block.astype(np.float64) ** 2).sum())
            cosines.append(token_cosines(block, back))
        cosine = np.concatenate(cosines)
        return {"relative_error": float(np.sqrt(err / norm)) if norm else 0.0,
                "token_cosine_mean": float(cosine.mean()), "token_cosine_p001": float(np.quantile(cosine, 0.001))}

    def __getstate__(self) -> dict:  # DataLoader workers get the arrays, not the device copies
        return {**self.__dict__, "_on_device": {}}
