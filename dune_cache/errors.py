"""The errors ``dune-cache`` reports to users, importable without torch, zarr or numpy.

The CLI catches them around commands whose heavy modules are imported only inside the command; each is
re-exported by the module that raises it (``location.StoreError``, ``images.ManifestError``, ...).
"""
from __future__ import annotations


class StoreError(RuntimeError):
    """A cache store cannot be used as asked."""


class CacheNotFoundError(StoreError):
    """Nothing (no Zarr group or array) at a cache location."""


class ManifestError(ValueError):
    """The image directory or list cannot be turned into a manifest."""


class EncodingError(ValueError):
    """An encoding is misconfigured, or features cannot be encoded as asked."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the teacher's keys/shapes."""


class NonFiniteFeaturesError(RuntimeError):
    """The teacher produced NaN/inf, or values the storage dtype cannot hold, for some images."""
