"""dune_cache: run heavy vision teachers once and store their features in Zarr v3 caches.

The package, bottom to top (each folder's docstring says what lives there and what it may import; arrows run
downward only):

- ``errors``, ``utils/``: the errors users see; shared plumbing (console, signals, devices, hashing)
- ``teachers/``: the teacher registry, specs, geometry, block choice and one module per family
- ``config``: what ``dune-cache extract`` is asked to do (light: no torch, zarr or numpy)
- ``encodings/``, ``images/``, ``storage/``: feature encodings; manifests, decoding and views; where a cache lives
- ``format/``: what a cache holds on disk (teacher groups, layout, provenance, levels, statistics, image copy)
- ``read/``: the read path (:class:`CacheReader`); ``extract/``: the write path (one teacher over a manifest)
- ``viz/``, ``offline/``, ``commands/``: pictures, offline checkpoints, the work of each ``dune-cache`` command
- ``cli``: the ``dune-cache`` command line

This module is the public API: everything ``dune_student``, the tools and users import from ``dune_cache`` is named
in :data:`__all__` below and imported on first use (so that ``import dune_cache`` stays light for the CLI).
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (  # noqa: F401  (public API, see __all__)
    CacheNotFoundError,
    CheckpointError,
    DamagedFeaturesError,
    DiskFullError,
    EncodingError,
    GeometryError,
    ImageCopyError,
    ImageDecodeError,
    Interrupted,
    ManifestError,
    NonFiniteFeaturesError,
    OfflineCheckpointError,
    ReaderError,
    RepairError,
    ShowError,
    StoreError,
    StoreMismatchError,
    UnknownTeacherError,
)

__version__ = "0.1.0"

_LAZY = {
    # reading a cache
    "CacheReader": "read.reader", "TargetBatch": "read.batches", "EncodedBatch": "read.batches",
    "FULL_IMAGE": "read.batches", "pin_fields": "utils.runtime", "block_shuffled_order": "read.shuffle",
    "TeacherStats": "format.stats", "read_stats": "format.stats",
    # writing and describing one
    "TeacherStore": "format.store", "damaged_message": "format.store",
    "StorageConfig": "config", "EncodingConfig": "config", "ExtractConfig": "config",
    "Encoding": "encodings", "run_extraction": "extract.run",
    # images
    "ImageManifest": "images.manifest", "load_manifest": "images.manifest", "image_files": "images.manifest",
    "load_pixels": "images.decode", "open_rgb": "images.decode", "check_image_header": "images.decode",
    "crop_view": "images.views",
    "decode_size": "images.views",
    # teachers
    "create_teacher": "teachers", "register_teacher": "teachers", "register_prefix": "teachers",
    "get_spec": "teachers", "list_teachers": "teachers",
    "checkpoint_sha256": "teachers.checkpoint_files", "TeacherSpec": "teachers", "Teacher": "teachers",
    "TeacherOutput": "teachers", "load_state_dict_strict": "teachers.base", "sak_blocks": "teachers.blocks",
    "plain_copy": "teachers.checkpoint_io", "weights_only_refusal": "teachers.checkpoint_io",
    # pictures of token grids
    "Panel": "viz.pictures", "ShowResult": "viz.pictures", "feature_columns": "viz.pictures",
    "sample_paths": "viz.pictures", "select_samples": "viz.pictures", "write_pictures": "viz.pictures",
    "unreachable": "viz.pictures",
    # shared plumbing (dune_student's command line and jobs use it too)
    "is_remote": "storage.urls", "redact_url": "utils.redaction", "resolve_chunk_cache": "storage.chunk_cache",
    "fail": "utils.console", "new_app": "utils.console", "setup_logging": "utils.console",
    "disk_full_error": "utils.interrupt", "pick_device": "utils.runtime", "default_num_workers": "utils.runtime",
    "file_sha256": "utils.hashing", "installed_package_file": "utils.resources",
}

__all__ = sorted([*_LAZY, "CacheNotFoundError", "CheckpointError", "DamagedFeaturesError", "DiskFullError",
                  "EncodingError", "GeometryError", "ImageCopyError", "ImageDecodeError", "Interrupted",
                  "ManifestError", "NonFiniteFeaturesError", "OfflineCheckpointError", "ReaderError", "RepairError",
                  "ShowError", "StoreError", "StoreMismatchError", "UnknownTeacherError"])


def __getattr__(name: str) -> Any:
    """The public names of :data:`_LAZY`, imported from their module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
