"""The calibrated encoding of a teacher group: one scheme per kind, built from its config, calibrated on float
features or loaded from a store, and summarised for ``dune-cache info``."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import EncodingConfig
from ..errors import EncodingError
from .base import KINDS, Part, Scheme
from .registry import scheme_class


def kind_scheme(name: str, kind: str) -> str:
    """The scheme that stores features of ``kind`` under encoding ``name`` (``pca`` and the composite schemes keep
    CLS as ``none``)."""
    cls_scheme = scheme_class(name).cls_scheme
    return cls_scheme if kind == "cls" and cls_scheme else name


def build_scheme(config: EncodingConfig, kind: str, dim: int, dtype: str, arrays: dict[str, np.ndarray],
                 info: dict) -> Scheme:
    """The scheme of ``kind`` under ``config`` with its calibration ``arrays`` and ``info``."""
    return scheme_class(kind_scheme(config.name, kind))(dim, dtype, config, arrays=arrays, info=info)


def calibrate_scheme(config: EncodingConfig, kind: str, dim: int, dtype: str, x: np.ndarray | None) -> Scheme:
    """Calibrate the scheme of ``kind`` on float features ``x`` ``(n, ..., D)`` (``None`` for schemes that need
    none) and record its diagnostics and its round-trip fidelity on ``x`` (:meth:`Scheme.fidelity`)."""
    name = kind_scheme(config.name, kind)
    if not scheme_class(name).needs_calibration:
        return build_scheme(config, kind, dim, dtype, {}, {"scheme": name})
    if x is None or len(x) == 0:
        raise EncodingError(f"encoding {config.name} needs calibration features of {kind}")
    if x.shape[-1] != dim:
        raise EncodingError(f"calibration features of {kind} have {x.shape[-1]} channels, the teacher {dim}")
    arrays, extra = scheme_class(name).fit(config, x)
    info = {"scheme": name, "images": len(x), **extra}
    built = build_scheme(config, kind, dim, dtype, arrays, info)
    info.update(built.fidelity(x))
    return built


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
        return all(s.passthrough for s in self.schemes.values())

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
            keys = scheme_class(info["scheme"]).array_keys
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


def encoding_summary(section: dict | None) -> str:
    """One line for ``dune-cache info``: name, params and the calibration results that matter."""
    config = EncodingConfig.from_json(section)
    details = []
    for kind, info in (section or {}).get("kinds", {}).items():
        facts = [info["scheme"], *scheme_class(info["scheme"]).describe(info)]
        if "relative_error" in info:
            facts.append(f"rel. error {info['relative_error']:.3g}")
        if "token_cosine_p001" in info:
            facts.append(f"cosine mean {info['token_cosine_mean']:.4f}, 0.1% quantile {info['token_cosine_p001']:.4f}")
        details.append(f"{kind}: {', '.join(facts)}")
    return str(config) + (f" ({'; '.join(details)})" if details else "")
