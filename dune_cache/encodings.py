"""Encodings of teacher features: a lossless default and lossy ones, chosen per teacher group.

An encoding turns float features ``(..., D)`` of one *kind* (``cls``: CLS vectors, ``patch``: patch tokens;
``views/cls`` and ``views/patch`` share their kind's encoding) into stored *parts*, and back:

- ``none`` (default): the features in the storage dtype; lossless apart from that dtype.
- ``bitround``: the storage dtype with the mantissa rounded to ``keepbits`` bits (round to nearest even;
  7 = bfloat16's precision); a plain float array, read as is. The zero low bits compress.
- ``int8-channel``: int8 codes ``q`` with a per-channel ``scale``/``offset`` calibrated once per group:
  ``x = q·scale + offset``.
- ``int8-token``: per token, int8 codes of the normal channels with one scale (absmax / 127), and the
  massive-activation channels found at calibration kept in the storage dtype.
- ``pca``: coefficients ``c`` ``(..., r)`` on an orthonormal basis ``(r, D)`` around a mean ``(D,)``
  calibrated once per group: ``x = c·basis + mean``. CLS vectors are stored as ``none``: one CLS per image
  is at most ``1/(h·w)`` of the bytes, and a calibration set's few CLS vectors cannot estimate a
  ``D``-dimensional basis.

Calibration (numpy) runs on float features of ``calibration_images`` images spread evenly over the image
list (the first images of a sorted list are often one video or one folder; measured on the e2e caches,
docs/cache-format.md "Encodings"). Encoding runs in numpy (writer, ``recompress``); decoding in torch on any
device (:meth:`Encoding.decode`), with :meth:`Encoding.decode_numpy` as the CPU convenience. int8 codes lie
in ``[-127, 127]``; ``-128`` is the fill value of unwritten chunks and decodes to NaN, as float parts'
NaN fill does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import EncodingConfig
from .errors import EncodingError

KINDS = ("cls", "patch")
INT8_MISSING = -128  # fill value of int8 codes: a chunk never written
INT8_MAX = 127
MANTISSA_BITS = {"float16": 10, "float32": 23}
FLOAT_MAX = {"float16": 65504.0, "float32": float(np.finfo(np.float32).max)}
CHUNK_TOKENS = 1 << 15  # tokens per step when calibration statistics are accumulated


def kind_scheme(name: str, kind: str) -> str:
    """The scheme that stores features of ``kind`` under encoding ``name`` (``pca`` keeps CLS as ``none``)."""
    return "none" if name == "pca" and kind == "cls" else name


def calibration_indices(count: int, wanted: int) -> np.ndarray:
    """``min(wanted, count)`` indices spread evenly over ``range(count)``, first and last included."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, count - 1, min(wanted, count)).round().astype(np.int64))


# ---------------------------------------------------------------------------------------
# Schemes: how one kind is stored
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One stored array of an encoded feature array ``<name>``: ``<name><suffix>``, shape
    ``(..., last)``, ``dtype``, ``fill`` (the value of a chunk never written)."""

    suffix: str
    last: int
    dtype: str
    fill: float | int


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` cast to the float storage ``dtype``; an error if values are beyond its range. ``x`` already in
    ``dtype`` (what the extraction writer gets) is returned as it is: it can hold no finite value beyond the range,
    and extraction refuses non-finite features before (``check_rows``). Skipping the range pass there saves most
    of the encoding's CPU: numpy computes float16 in software (``abs().max()``: ~7 ms per 2 MB image)."""
    if x.dtype == np.dtype(dtype):
        return x
    if np.abs(x).max(initial=0.0) > FLOAT_MAX[dtype]:
        raise EncodingError(f"encoded values reach {np.abs(x).max():.4g}, beyond {dtype}'s range; "
                            "use --dtype float32")
    return x.astype(dtype)


def token_rows(x: np.ndarray) -> Iterator[np.ndarray]:
    """``(n, ..., D)`` -> float64 chunks ``(m, D)`` of at most :data:`CHUNK_TOKENS` tokens."""
    flat = x.reshape(-1, x.shape[-1])
    for start in range(0, len(flat), CHUNK_TOKENS):
        yield flat[start:start + CHUNK_TOKENS].astype(np.float64)


def relative_error(scheme: "Scheme", x: np.ndarray) -> float:
    """``‖decode(encode(x)) − x‖ / ‖x‖`` over the calibration features ``x`` ``(n, ..., D)``."""
    err = norm = 0.0
    for start in range(0, len(x), 16):
        block = x[start:start + 16].astype(np.float32)
        back = scheme.decode_numpy(scheme.encode(block))
        err += float(((back.astype(np.float64) - block) ** 2).sum())
        norm += float((block.astype(np.float64) ** 2).sum())
    return float(np.sqrt(err / norm)) if norm else 0.0


class Scheme:
    """How features ``(..., D)`` of one kind are stored: :meth:`parts` to create, :meth:`encode` (numpy),
    :meth:`decode` (torch). ``arrays``: calibration arrays (stored as ``encoding/<kind>_<key>``);
    ``info``: calibration diagnostics recorded in provenance."""

    name = ""

    def __init__(self, dim: int, dtype: str, arrays: dict[str, np.ndarray] | None = None,
                 info: dict | None = None):
        self.dim, self.dtype = dim, dtype
        self.arrays = arrays or {}
        self.info = info or {}
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    def parts(self) -> tuple[Part, ...]:
        return (Part("", self.dim, self.dtype, float("nan")),)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Float ``(..., D)`` -> ``{suffix: stored values}``."""
        return {"": to_storage(x, self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        """``{suffix: (..., last)}`` stored values -> float32 ``(..., D)`` on ``device`` (default: the parts')."""
        return parts[""].to(device, torch.float32)

    def decode_numpy(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`decode` on the CPU, numpy in and out."""
        return self.decode({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in parts.items()}).numpy()

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The calibration arrays as float32 tensors on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in self.arrays.items()}
        return self._on_device[key]

    def __getstate__(self) -> dict:  # DataLoader workers get the arrays, not the device copies
        return {**self.__dict__, "_on_device": {}}


class NoneScheme(Scheme):
    name = "none"


class BitRoundScheme(Scheme):
    """Mantissa rounded to ``keepbits`` bits, round to nearest even (as numcodecs' BitRound); a value that
    would round past the dtype's largest finite value is truncated instead."""

    name = "bitround"

    def __init__(self, dim: int, dtype: str, keepbits: int, **kw):
        super().__init__(dim, dtype, **kw)
        if keepbits >= MANTISSA_BITS[dtype]:
            raise EncodingError(f"bitround keepbits {keepbits}: {dtype} has {MANTISSA_BITS[dtype]} mantissa "
                                f"bits; keep fewer (7 = bfloat16 level)")
        self.keepbits = keepbits

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


class Int8ChannelScheme(Scheme):
    """``q = clip(round((x − offset) / scale), −127, 127)``; ``x = q·scale + offset`` (arrays ``scale``,
    ``offset`` ``(D,)`` float32; ``offset`` is a whole number of steps, so 0 is exact when in range)."""

    name = "int8-channel"

    def parts(self) -> tuple[Part, ...]:
        return (Part("", self.dim, "int8", INT8_MISSING),)

    @staticmethod
    def fit(x: np.ndarray, margin: float, sigmas: float) -> dict[str, np.ndarray]:
        """``scale``, ``offset`` ``(D,)`` from calibration features ``x`` ``(n, ..., D)`` (see EncodingConfig)."""
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

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        q = np.rint((x.astype(np.float32) - self.arrays["offset"]) / self.arrays["scale"])
        return {"": np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)}

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        c = self.constants(q.device)
        return q.float().mul_(c["scale"]).add_(c["offset"]).masked_fill_(q == INT8_MISSING, torch.nan)


class Int8TokenScheme(Scheme):
    """Per token: normal channels ``q = round(x / s)``, ``s = max|x_normal| / 127`` (part ``_scale``
    ``(..., 1)`` float32); the massive-activation channels (array ``outlier_channels`` ``(k,)`` int32) have
    code 0 and their values in part ``_outliers`` ``(..., k)`` (storage dtype; absent when ``k = 0``)."""

    name = "int8-token"

    @property
    def channels(self) -> np.ndarray:
        return self.arrays["outlier_channels"]

    def parts(self) -> tuple[Part, ...]:
        parts = [Part("", self.dim, "int8", INT8_MISSING), Part("_scale", 1, "float32", float("nan"))]
        if len(self.channels):
            parts.append(Part("_outliers", len(self.channels), self.dtype, float("nan")))
        return tuple(parts)

    @staticmethod
    def fit(x: np.ndarray, outlier_ratio: float) -> tuple[dict[str, np.ndarray], dict]:
        """Outlier channels from calibration features ``x`` ``(n, ..., D)``, and diagnostics."""
        absmax = np.zeros(x.shape[-1])
        for rows in token_rows(x):
            absmax = np.maximum(absmax, np.abs(rows).max(0))
        reference = float(np.median(absmax[absmax > 0])) if (absmax > 0).any() else 0.0
        channels = np.flatnonzero(absmax > outlier_ratio * reference) if reference else np.zeros(0, np.int64)
        info = {"outlier_channels": channels.tolist(),
                "max_channel_ratio": float(absmax.max() / reference) if reference else 0.0}
        return {"outlier_channels": channels.astype(np.int32)}, info

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = x.astype(np.float32)
        normal = x.copy()
        normal[..., self.channels] = 0
        scale = np.abs(normal).max(axis=-1, keepdims=True) / INT8_MAX
        q = np.rint(np.divide(normal, scale, out=np.zeros_like(normal), where=scale > 0))
        parts = {"": np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), "_scale": scale}
        if len(self.channels):
            parts["_outliers"] = to_storage(x[..., self.channels], self.dtype)
        return parts

    def decode(self, parts, device=None):
        q = parts[""].to(device)
        x = q.float().mul_(parts["_scale"].to(q.device, torch.float32))
        if len(self.channels):
            channels = self.constants(q.device)["outlier_channels"].long()
            x.index_copy_(-1, channels, parts["_outliers"].to(q.device, torch.float32))
        return x.masked_fill_(q == INT8_MISSING, torch.nan)


class PcaScheme(Scheme):
    """``c = (x − mean) · basisᵀ`` stored in part ``""`` ``(..., r)`` (storage dtype), ``x = c · basis + mean``
    (arrays ``basis`` ``(r, D)`` with orthonormal rows, ``mean`` ``(D,)``, float32)."""

    name = "pca"

    def parts(self) -> tuple[Part, ...]:
        return (Part("", len(self.arrays["basis"]), self.dtype, float("nan")),)

    @staticmethod
    def fit(x: np.ndarray, rank: int, variance: float) -> tuple[dict[str, np.ndarray], dict]:
        """Mean, basis (top principal directions, each row's largest entry positive) and diagnostics."""
        d = x.shape[-1]
        total, outer, count = np.zeros(d), np.zeros((d, d)), 0
        for rows in token_rows(x):
            total, outer, count = total + rows.sum(0), outer + rows.T @ rows, count + len(rows)
        mean = total / count
        eigenvalues, vectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
        eigenvalues, vectors = np.clip(eigenvalues[::-1], 0, None), vectors[:, ::-1]
        kept = np.cumsum(eigenvalues) / max(eigenvalues.sum(), np.finfo(float).tiny)
        if rank > d:
            raise EncodingError(f"pca rank {rank} exceeds the feature dimension {d}")
        r = rank or min(int(np.searchsorted(kept, variance - 1e-12)) + 1, d)
        basis = vectors[:, :r].T
        basis *= np.sign(basis[np.arange(r), np.abs(basis).argmax(1)])[:, None]
        info = {"rank": r, "variance_kept": float(kept[r - 1])}
        return {"basis": basis.astype(np.float32), "mean": mean.astype(np.float32)}, info

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        coefficients = (x.astype(np.float32) - self.arrays["mean"]) @ self.arrays["basis"].T
        return {"": to_storage(coefficients, self.dtype)}

    def decode(self, parts, device=None):
        c = parts[""].to(device, torch.float32)
        k = self.constants(c.device)
        return (c @ k["basis"]).add_(k["mean"])


SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (NoneScheme, BitRoundScheme, Int8ChannelScheme,
                                                          Int8TokenScheme, PcaScheme)}


def build_scheme(config: EncodingConfig, kind: str, dim: int, dtype: str, arrays: dict[str, np.ndarray],
                 info: dict) -> Scheme:
    """The scheme of ``kind`` under ``config`` with its calibration ``arrays`` and ``info``."""
    scheme = kind_scheme(config.name, kind)
    if scheme == "bitround":
        return BitRoundScheme(dim, dtype, config.keepbits, arrays=arrays, info=info)
    return SCHEMES[scheme](dim, dtype, arrays=arrays, info=info)


def calibrate_scheme(config: EncodingConfig, kind: str, dim: int, dtype: str, x: np.ndarray | None) -> Scheme:
    """Calibrate the scheme of ``kind`` on float features ``x`` ``(n, ..., D)`` (``None`` for schemes that
    need none) and record diagnostics: relative error on ``x``, and for ``int8-channel`` the fraction of
    values of the odd-numbered calibration images clipped by a range fitted on the even-numbered ones."""
    scheme = kind_scheme(config.name, kind)
    if scheme not in ("int8-channel", "int8-token", "pca"):
        return build_scheme(config, kind, dim, dtype, {}, {"scheme": scheme})
    if x is None or len(x) == 0:
        raise EncodingError(f"encoding {config.name} needs calibration features of {kind}")
    if x.shape[-1] != dim:
        raise EncodingError(f"calibration features of {kind} have {x.shape[-1]} channels, the teacher {dim}")
    info: dict = {"scheme": scheme, "images": len(x)}
    if scheme == "int8-channel":
        arrays = Int8ChannelScheme.fit(x, config.margin, config.sigmas)
        if len(x) >= 2:
            half = Int8ChannelScheme(dim, dtype, Int8ChannelScheme.fit(x[::2], config.margin, config.sigmas))
            held = x[1::2].astype(np.float32)
            codes = (held - half.arrays["offset"]) / half.arrays["scale"]
            info["heldout_clip_fraction"] = float((np.abs(codes) > INT8_MAX + 0.5).mean())
    elif scheme == "int8-token":
        arrays, extra = Int8TokenScheme.fit(x, config.outlier_ratio)
        info.update(extra)
    else:
        arrays, extra = PcaScheme.fit(x, config.rank, config.variance)
        info.update(extra)
    built = build_scheme(config, kind, dim, dtype, arrays, info)
    info["relative_error"] = relative_error(built, x)
    return built


# ---------------------------------------------------------------------------------------
# The encoding of a teacher group
# ---------------------------------------------------------------------------------------
class Encoding:
    """The calibrated encoding of one teacher group: one :class:`Scheme` per kind (``cls``, ``patch``)."""

    def __init__(self, config: EncodingConfig, schemes: dict[str, Scheme]):
        self.config, self.schemes = config, schemes

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def passthrough(self) -> bool:
        """Stored values are the features (``none``, ``bitround``): read them as floats, no decode step."""
        return all(isinstance(s, (NoneScheme, BitRoundScheme)) for s in self.schemes.values())

    @classmethod
    def calibrate(cls, config: EncodingConfig, dim: int, dtype: str,
                  samples: dict[str, np.ndarray] | None = None) -> "Encoding":
        """Calibrated on ``samples`` ``{kind: float (n, ..., D)}`` (``None`` when ``config`` needs none)."""
        samples = samples or {}
        return cls(config, {kind: calibrate_scheme(config, kind, dim, dtype, samples.get(kind)) for kind in KINDS})

    @classmethod
    def load(cls, section: dict | None, dim: int, dtype: str, read: Callable[[str], np.ndarray]) -> "Encoding":
        """From provenance ``storage.encoding`` (``None``: ``none``) and ``read(name)`` of the arrays in
        ``<teacher>/encoding/``."""
        config = EncodingConfig.from_json(section)
        kinds = (section or {}).get("kinds", {})
        schemes = {}
        for kind in KINDS:
            info = kinds.get(kind, {"scheme": kind_scheme(config.name, kind)})
            keys = ARRAY_KEYS[info["scheme"]]
            schemes[kind] = build_scheme(config, kind, dim, dtype, {k: read(f"{kind}_{k}") for k in keys}, info)
        return cls(config, schemes)

    def to_json(self) -> dict:
        """Provenance ``storage.encoding``: name, params and per kind its scheme and calibration diagnostics."""
        return {**self.config.to_json(), "kinds": {kind: s.info for kind, s in self.schemes.items()}}

    def arrays(self) -> dict[str, np.ndarray]:
        """Calibration arrays to store as ``<teacher>/encoding/<name>``."""
        return {f"{kind}_{key}": value for kind, s in self.schemes.items() for key, value in s.arrays.items()}

    def scheme(self, array: str) -> Scheme:
        """Scheme of a feature array (``cls``, ``patch``, ``views/cls``, ``views/patch``)."""
        return self.schemes[array.rpartition("/")[2]]

    def parts(self, array: str) -> tuple[Part, ...]:
        return self.scheme(array).parts()

    def encode(self, array: str, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.scheme(array).encode(x)

    def decode(self, array: str, parts: dict[str, torch.Tensor], device: torch.device | str | None = None
               ) -> torch.Tensor:
        return self.scheme(array).decode(parts, device)

    def decode_numpy(self, array: str, parts: dict[str, np.ndarray]) -> np.ndarray:
        return self.scheme(array).decode_numpy(parts)

    def __str__(self) -> str:
        return str(self.config)


ARRAY_KEYS = {"none": (), "bitround": (), "int8-channel": ("scale", "offset"), "int8-token": ("outlier_channels",),
              "pca": ("basis", "mean")}


def encoding_summary(section: dict | None) -> str:
    """One line for ``dune-cache info``: name, params and the calibration results that matter."""
    config = EncodingConfig.from_json(section)
    details = []
    for kind, info in (section or {}).get("kinds", {}).items():
        facts = [info["scheme"]]
        if "rank" in info:
            facts.append(f"rank {info['rank']} ({100 * info['variance_kept']:.2f}% variance)")
        if "outlier_channels" in info:
            facts.append(f"{len(info['outlier_channels'])} outlier channels")
        if "heldout_clip_fraction" in info:
            facts.append(f"held-out clip {info['heldout_clip_fraction']:.2g}")
        if "relative_error" in info:
            facts.append(f"rel. error {info['relative_error']:.3g}")
        details.append(f"{kind}: {', '.join(facts)}")
    return str(config) + (f" ({'; '.join(details)})" if details else "")

