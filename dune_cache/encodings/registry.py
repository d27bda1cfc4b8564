"""The schemes by name: ``register_scheme`` (a class decorator) and ``scheme_class``.

Each scheme lives in its own module of this package and registers itself when the package is imported; its name
and parameters are also listed in :data:`dune_cache.config.ENCODINGS` / ``PARAMS`` (importable without numpy, so
the CLI checks ``--encoding`` before importing this package). Registering a name the config does not know is an
error, and so is a scheme whose ``needs_calibration`` differs from the config's, so the two cannot drift apart.
"""
from __future__ import annotations

from ..config import ENCODINGS, EncodingConfig
from .base import Scheme

_SCHEMES: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: ``cls`` is the scheme stored under ``cls.name``."""
    if cls.name not in ENCODINGS:
        raise ValueError(f"scheme {cls.name!r} is not listed in dune_cache.config.ENCODINGS")
    if cls.needs_calibration != EncodingConfig(name=cls.name).needs_calibration:
        raise ValueError(f"scheme {cls.name!r}: needs_calibration differs from EncodingConfig.needs_calibration")
    if cls.name in _SCHEMES:
        raise ValueError(f"scheme {cls.name!r} registered twice")
    _SCHEMES[cls.name] = cls
    return cls


def scheme_class(name: str) -> type[Scheme]:
    """The scheme registered under ``name``."""
    return _SCHEMES[name]


def list_schemes() -> list[str]:
    """Names of the registered schemes, in registration order."""
    return list(_SCHEMES)
