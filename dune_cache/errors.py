"""The errors ``dune-cache`` reports to users, importable without torch, zarr or numpy.

The CLI catches them around commands whose heavy modules are imported only inside the command; each is
re-exported by the module that raises it (``location.StoreError``, ``images.ManifestError``, ...).
"""

from __future__ import annotations

import signal


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


class ClusterError(RuntimeError):
    """An extraction on a dask cluster (``--scheduler``) could not finish: a unit's task failed after its retries,
    units kept killing workers, or the cluster cannot run units as asked. What finished is kept."""


class ReaderError(StoreError):
    """A cache cannot be read as asked (missing teacher group, incomplete group, unknown backend, a chunk
    that does not decode)."""


class GeometryError(ValueError):
    """Resolution options that do not fit a teacher's patch size."""


class Interrupted(KeyboardInterrupt):
    """The job was stopped by SIGINT or SIGTERM (``signum``); what it finished is kept."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DiskFullError(StoreError):
    """A write was refused for lack of space or quota; what was written before is kept."""


class RepairError(StoreError):
    """A teacher group cannot be repaired as asked; nothing was changed."""


class UnknownTeacherError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class StoreMismatchError(StoreError):
    """An existing store was made with a different teacher, checkpoint, image list, geometry or storage."""


class DamagedFeaturesError(StoreError):
    """Features of an image marked done decode to non-finite values: a chunk lost (deleted, not copied or
    uploaded, never written) reads as the NaN fill value. Extraction never stores non-finite features."""


class OfflineCheckpointError(ValueError):
    """No offline checkpoint for a teacher: none is catalogued, or its package is not installed."""


class ImageDecodeError(Exception):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ImageCopyError(StoreError):
    """An image copy that cannot be made or used as asked (mismatched images or resolution, incomplete copy)."""


class ShowError(ValueError):
    """The pictures cannot be made as asked (unknown image ids, no images, bad cell size)."""
